"""Packaging glue that setup.cfg cannot express: ship the twistd plugin.

``twisted/plugins/kansas_plugin.py`` lives at the top of the tree (twistd finds it there
when the checkout is on ``sys.path``) and is installed into Twisted's own
``twisted.plugins`` package so that ``twistd kansas`` works from an installed kansas.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages("src"), "twisted.plugins"])
