"""Stand-in: Tornado's three port checks, answering what they would do."""

from typing import Any

from zerver.tornado.descriptors import is_current_port
from zerver.tornado.django_api import queue_json_publish
from zerver.tornado.sharding import get_user_tornado_port, notify_tornado_queue_name

users: dict[int, Any] = {}


def get_events(request: Any, user_profile: Any) -> str:
    port = get_user_tornado_port(user_profile)
    if not is_current_port(port):
        return f"X-Accel-Redirect: /internal/tornado/{port}{request}"
    return "served"


def cleanup_event_queue(request: Any, user_profile: Any, queue_id: str) -> str:
    port = get_user_tornado_port(user_profile)
    if not is_current_port(port):
        queue_json_publish(
            notify_tornado_queue_name(port),
            {"users": [user_profile.id], "event": {"type": "cleanup_queue", "queue_id": queue_id}},
        )
        return "re-published"
    return "deleted"


def get_events_internal(request: Any, user_profile_id: int) -> str:
    assert is_current_port(get_user_tornado_port(users[user_profile_id]))
    return "created"
