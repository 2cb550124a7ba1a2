"""Stand-in: ports from a sharding map (realm host -> port or ports)."""

from typing import Any

shard_map: dict[str, Any] = {"split.example.com": [9800, 9801], "solo.example.com": 9801}
TORNADO_PORTS = [9800, 9801]


def get_realm_tornado_ports(realm: Any) -> list[int]:
    ports = shard_map.get(realm.host, TORNADO_PORTS[0])
    return [ports] if isinstance(ports, int) else list(ports)


def get_user_id_tornado_port(realm_ports: list[int], user_id: int) -> int:
    return realm_ports[user_id % len(realm_ports)]


def get_user_tornado_port(user: Any) -> int:
    return get_user_id_tornado_port(get_realm_tornado_ports(user.realm), user.id)


def get_tornado_url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def notify_tornado_queue_name(port: int) -> str:
    return f"notify_tornado_port_{port}"
