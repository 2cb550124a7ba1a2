"""Stand-in: an action module that imported send_event by name."""

from typing import Any

from zerver.tornado.django_api import send_event, send_event_on_commit


def do_send(realm: Any, users: list[Any]) -> None:
    send_event(realm, {"type": "message"}, users)


def do_send_on_commit(realm: Any, users: list[Any]) -> None:
    send_event_on_commit(realm, {"type": "message"}, users)
