"""Routing decisions as pure functions: no I/O, no clock, no reactor.

The proxy asks two questions. Where does a new queue go (``place_queue``)? And where
does a request for a queue go that kansas has no mapping for (``realm_home``)?
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kansas import hashing
from kansas.model import Assignment


class Reason(StrEnum):
    """Which rule chose the shard (logged, and asked about by operators)."""

    QUEUE_MAPPING = "queue-mapping"
    USER_OVERRIDE = "user-override"
    REALM_PIN = "realm-pin"
    HASH = "hash"
    #: No mapping for the queue: sent to its realm's home shard (pin or hash).
    FALLBACK = "fallback"


@dataclass(frozen=True, slots=True)
class Decision:
    shard: str
    reason: Reason


def realm_from_host(host: str | bytes | None) -> str:
    """The realm a ``Host`` header names: lower-cased, port stripped (as Zulip's nginx maps)."""
    if host is None:
        return ""
    if isinstance(host, bytes):
        host = host.decode("latin-1")
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal, maybe with a port
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    colon = host.rfind(":")
    if colon != -1 and host[colon + 1 :].isdigit():
        host = host[:colon]
    return host.rstrip(".")


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_:[]")


def valid_realm(realm: str) -> bool:
    """A realm host kansas will route: a DNS name or IP literal, nothing else (Host
    headers are client-chosen, and realms end up in logs and Redis values)."""
    return 0 < len(realm) <= 253 and _HOST_CHARS.issuperset(realm)


def hashed_shard(assignment: Assignment, realm: str) -> str | None:
    """The consistent-hash default for a realm over the shards that take new queues."""
    return hashing.pick(realm, ((s.name, s.weight) for s in assignment.shards.values()))


def realm_home(assignment: Assignment, realm: str) -> Decision | None:
    """Where the realm as a whole lives: its pin if it has one, else its hash."""
    pinned = assignment.realm_pins.get(realm)
    if pinned is not None and pinned in assignment.shards:
        return Decision(pinned, Reason.REALM_PIN)
    hashed = hashed_shard(assignment, realm)
    return None if hashed is None else Decision(hashed, Reason.HASH)


def place_queue(assignment: Assignment, realm: str, user_id: int | None) -> Decision | None:
    """The shard for a new queue: a user override beats a realm pin beats the hash.

    None when no shard can take it (none registered, or all weighted 0).
    """
    if user_id is not None:
        override = assignment.user_overrides.get((realm, user_id))
        if override is not None and override in assignment.shards:
            return Decision(override, Reason.USER_OVERRIDE)
    return realm_home(assignment, realm)
