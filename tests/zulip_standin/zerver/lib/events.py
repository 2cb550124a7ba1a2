"""Stand-in: register imports the two queue functions by name."""

from typing import Any

from zerver.tornado.django_api import get_user_events, request_event_queue


def do_events_register(user_profile: Any) -> tuple[str, list[Any]]:
    queue_id = request_event_queue(user_profile, "website", True, queue_lifespan_secs=600)
    return queue_id, get_user_events(user_profile, queue_id, -1)
