"""``kansas.zulip``: the Zulip side of kansas, as a Django app Zulip loads with one setting.

In ``/etc/zulip/settings.py``::

    EXTRA_INSTALLED_APPS = ["kansas.zulip"]           # next to any apps already listed
    KANSAS_INTERNAL_URL = "http://127.0.0.1:9798"     # kansas --internal-listen
    KANSAS_POSTGRES = "host=127.0.0.1 dbname=kansas user=kansas_reader"
    KANSAS_REDIS = "redis://127.0.0.1:6379/0"         # optional

Its ``AppConfig.ready()`` (in Django, in every Tornado process and in the queue workers)
makes Zulip follow kansas (``kansas.zulip.patching`` says exactly what), or, on a Zulip
it does not recognise, logs one line naming what it did not find and changes nothing.
Without ``KANSAS_INTERNAL_URL`` it changes nothing: that is the roll-back.
``python -m kansas.zulip check`` (run from Zulip's directory, as Zulip's user) prints
what it will patch in that Zulip and whether each piece was found.

Importing this package needs no Django (kansas itself does not depend on it).
"""
