"""Packaging glue that setup.cfg cannot express: ship the twistd plugin.

``twisted/plugins/kansas_plugin.py`` lives at the top of the tree (twistd finds it there
when the checkout is on ``sys.path``) and is installed into Twisted's own
``twisted.plugins`` package so that ``twistd kansas`` works from an installed kansas.

``src/twisted`` is a symlink to ``../twisted``, so that every package installed lives
under ``src/`` (setup.cfg's ``package_dir`` maps only ``src``). That is what lets an
editable install (``pip install -e``) find the plugin: setuptools then puts ``src/``
itself on ``sys.path`` (a plain ``.pth`` file), and Twisted looks for plugins in the
``twisted/plugins`` directory of every ``sys.path`` entry. Had ``twisted.plugins`` a
``package_dir`` entry of its own, setuptools would install an import hook instead,
which Twisted's scan of ``sys.path`` never sees.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages("src"), "twisted.plugins"])
