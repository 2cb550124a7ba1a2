"""Stand-in: Django's side of queues and events; records instead of sending."""

from collections import defaultdict
from functools import lru_cache, partial
from typing import Any

from zerver.tornado.sharding import (
    get_realm_tornado_ports,
    get_tornado_url,
    get_user_id_tornado_port,
    get_user_tornado_port,
    notify_tornado_queue_name,
)

published: list[tuple[str, dict[str, Any]]] = []
posted: list[tuple[str, dict[str, Any], dict[str, str]]] = []


class Reply:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def json(self) -> dict[str, Any]:
        return self.body


class Session:
    def post(self, url: str, data: dict[str, Any], headers: Any = None) -> Reply:
        posted.append((url, dict(data), dict(headers or {})))
        return Reply({"result": "success", "queue_id": "q-1", "events": []})


@lru_cache(None)
def requests_client() -> Session:
    return Session()


def request_event_queue(
    user_profile: Any, user_client: Any, apply_markdown: bool, queue_lifespan_secs: int = 0
) -> str:
    url = get_tornado_url(get_user_tornado_port(user_profile))
    form = {
        "user_profile_id": user_profile.id,
        "user_client": user_client,
        "apply_markdown": apply_markdown,
        "lifespan_secs": queue_lifespan_secs,
    }
    return requests_client().post(url + "/api/v1/events/internal", data=form).json()["queue_id"]


def get_user_events(user_profile: Any, queue_id: str, last_event_id: int) -> list[Any]:
    url = get_tornado_url(get_user_tornado_port(user_profile))
    form = {
        "queue_id": queue_id,
        "last_event_id": last_event_id,
        "user_profile_id": user_profile.id,
    }
    return requests_client().post(url + "/api/v1/events/internal", data=form).json()["events"]


def send_notification_http(port: int, data: dict[str, Any]) -> None:
    requests_client().post(get_tornado_url(port) + "/api/internal/notify_tornado", data=data)


def queue_json_publish(queue_name: str, event: dict[str, Any], processor: Any = None) -> None:
    published.append((queue_name, event))


def send_event(realm: Any, event: Any, users: Any) -> None:
    ports = get_realm_tornado_ports(realm)
    by_port: dict[int, list[Any]] = defaultdict(list)
    for user in users:
        user_id = user if isinstance(user, int) else user["id"]
        by_port[get_user_id_tornado_port(ports, user_id)].append(user)
    for port, port_users in by_port.items():
        queue_json_publish(
            notify_tornado_queue_name(port),
            {"event": event, "users": port_users},
            partial(send_notification_http, port),
        )


def send_event_on_commit(realm: Any, event: Any, users: Any) -> None:
    send_event(realm, event, users)
