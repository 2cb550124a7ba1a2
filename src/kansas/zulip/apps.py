"""The Django app (``EXTRA_INSTALLED_APPS = ["kansas.zulip"]``). Django is imported here
only, when Django loads the app."""

from __future__ import annotations

import importlib
from typing import Any

from kansas.zulip.patching import Settings, install

AppConfig: Any = importlib.import_module("django.apps").AppConfig


class KansasZulipConfig(AppConfig):  # type: ignore[misc]
    name = "kansas.zulip"
    label = "kansas_zulip"
    verbose_name = "kansas (Zulip follows kansas's queue placement)"

    def ready(self) -> None:
        settings = importlib.import_module("django.conf").settings
        install(Settings.from_django(settings))
