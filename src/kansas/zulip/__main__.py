"""``python -m kansas.zulip check``: what the app will patch in this Zulip, piece by piece.

Run it from Zulip's directory (``/home/zulip/deployments/current``) with Zulip's Python,
as Zulip's user; it loads Zulip's Django settings (``zproject.settings`` unless
``DJANGO_SETTINGS_MODULE`` says otherwise). Exit status 0 when every piece was found
(or the app is switched off), 1 when the app would refuse, 2 when Zulip cannot be loaded.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from kansas.zulip.patching import Settings, find, problems, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kansas.zulip",
        description="The Zulip side of kansas (a Django app): check a Zulip against it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="print what the app will patch in this Zulip")
    check.add_argument(
        "--zulip-dir",
        default=os.getcwd(),
        help="Zulip's directory (its manage.py's), default: the current one",
    )
    args = parser.parse_args(argv)
    zulip_dir = os.path.abspath(args.zulip_dir)
    if zulip_dir not in sys.path:
        sys.path.insert(0, zulip_dir)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "zproject.settings")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        importlib.import_module("django").setup()
        django_settings = importlib.import_module("django.conf").settings
        installed = list(django_settings.INSTALLED_APPS)
    except Exception as e:
        print(
            f"python -m kansas.zulip: cannot load Zulip's Django from {zulip_dir} "
            f"({type(e).__name__}: {e})",
            file=sys.stderr,
        )
        return 2
    settings = Settings.from_django(django_settings)
    enabled = "kansas.zulip" in installed or any(
        app.startswith("kansas.zulip.") for app in installed
    )
    print(f"Zulip at {zulip_dir}")
    print(f"kansas.zulip in INSTALLED_APPS: {'yes' if enabled else 'no'}")
    print(f"KANSAS_INTERNAL_URL: {settings.internal_url or '(unset)'}")
    print(f"KANSAS_POSTGRES: {'(set)' if settings.postgres else '(unset)'}")
    print(f"KANSAS_REDIS: {settings.redis or '(unset)'}")
    for line in report(settings):
        print(line)
    if settings.internal_url and not settings.postgres:
        return 1
    return 1 if problems(find()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
