"""Stand-in: send_event under another name, and an unrelated function called send_event."""

from typing import Any

from zerver.tornado.django_api import send_event as notify_clients


def send_event(realm: Any, event: Any, users: Any) -> str:
    return "not Zulip's send_event"


def do_alias(realm: Any, users: list[Any]) -> None:
    notify_clients(realm, {"type": "alias"}, users)
