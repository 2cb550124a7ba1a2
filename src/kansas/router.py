"""Routing decisions as pure functions: no I/O, no clock, no reactor, no Twisted.

The proxy asks two questions. Where does a new queue go (``place_queue``)? And where
does a request for a queue go that kansas has no mapping for (``realm_home``)?
``kansas.placement`` asks the same questions from inside Django, so this module must
stay importable without Twisted.

The rules, first match wins:

1. the user's override (``kansas-ctl user move``);
2. the realm's exact rule: a pin (one shard) or a split (``shards[user_id % n]``,
   Zulip's user-split realms) -- a realm has at most one of them;
3. the first regex rule matching the realm (``re.match``, case-insensitive, as in
   Zulip's ``sharding.json``), which also names one shard or a split;
4. weighted consistent hashing of the realm over the shards.

A rule that lands on a shard no longer registered is skipped: the next rule decides.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from kansas import hashing
from kansas.model import REGEX_CACHE_SIZE, Assignment


class Reason(StrEnum):
    """Which rule chose the shard (logged, and asked about by operators)."""

    QUEUE_MAPPING = "queue-mapping"
    USER_OVERRIDE = "user-override"
    REALM_PIN = "realm-pin"
    REALM_SPLIT = "realm-split"
    REGEX = "regex"
    HASH = "hash"
    #: No mapping for the queue: sent to its realm's home shard (its rules, else hash).
    FALLBACK = "fallback"
    #: The shard asked first answered with Zulip's ``X-Accel-Redirect`` to another
    #: Tornado port (a user-split realm): sent on to the shard of that port.
    TORNADO_REDIRECT = "tornado-redirect"


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


def realm_host_problem(host: str | bytes | None, own_port: int | None = None) -> str | None:
    """Why a queue creation's ``Host`` cannot be its realm's host, or None if it can.

    Django sends the realm's host (``realm.host``, maybe with a port: a development
    server's ``localhost:9991`` is a realm). A missing Host, an IP address, or kansas's
    own internal listener (``own_port``: a Django posting to kansas without setting the
    Host) names no realm, and would place the queue as realm ``127.0.0.1`` on a shard
    its realm's rules do not name.
    """
    if isinstance(host, bytes):
        host = host.decode("latin-1")
    host = (host or "").strip().lower()
    if not host:
        return "missing"
    if host.startswith("["):  # an IPv6 literal, maybe with a port
        return "an IP address"
    name, _, port = host.partition(":") if host.count(":") == 1 else (host, "", "")
    try:
        ipaddress.ip_address(name.rstrip("."))
    except ValueError:
        pass
    else:
        return "an IP address"  # also a bare IPv6 literal (several ':')
    if own_port is not None and port == str(own_port):
        return "kansas's own internal listener"
    if not valid_realm(realm_from_host(host)):
        return "not a host name"
    return None


def hashed_shard(assignment: Assignment, realm: str) -> str | None:
    """The consistent-hash default for a realm over the shards that take new queues."""
    return hashing.pick(realm, ((s.name, s.weight) for s in assignment.shards.values()))


def split_shard(shards: tuple[str, ...], user_id: int | None) -> str:
    """The shard of a split that a user belongs to: ``shards[user_id % n]`` (as Zulip
    computes it); a request without a user (none in Zulip) counts as user 0."""
    return shards[(user_id or 0) % len(shards)]


def regex_rule_index(assignment: Assignment, realm: str) -> int:
    """The index of the first regex rule matching ``realm``, or -1.

    Remembered per snapshot (a new snapshot starts with an empty memory), so a realm's
    regexes are evaluated once, not on every queue creation.
    """
    cache = assignment.regex_cache
    found = cache.get(realm)
    if found is not None:
        return found
    found = -1
    for index, rule in enumerate(assignment.regex_rules):
        if rule.compiled.match(realm):
            found = index
            break
    if len(cache) >= REGEX_CACHE_SIZE:
        cache.clear()
    cache[realm] = found
    return found


def _realm_rules(assignment: Assignment, realm: str) -> Iterator[tuple[tuple[str, ...], Reason]]:
    """The realm's rules, most specific first, as (shards, reason): its pin, else its
    split; then the first regex rule matching it. The hash comes after all of them."""
    pinned = assignment.realm_pins.get(realm)
    if pinned is not None:
        yield (pinned,), Reason.REALM_PIN
    else:
        split = assignment.realm_splits.get(realm)
        if split is not None:
            yield split, Reason.REALM_SPLIT
    if assignment.regex_rules:
        index = regex_rule_index(assignment, realm)
        if index >= 0:
            yield assignment.regex_rules[index].shards, Reason.REGEX


def _by_rules(assignment: Assignment, realm: str, user_id: int | None) -> Decision | None:
    for shards, reason in _realm_rules(assignment, realm):
        chosen = split_shard(shards, user_id)
        if chosen in assignment.shards:
            return Decision(chosen, reason)
    return None


def realm_home(assignment: Assignment, realm: str) -> Decision | None:
    """Where the realm as a whole lives: its pin, split or regex rule, else its hash.

    A split realm has no single home: this is the shard of its user 0 (the first of
    the split), so a queue of a split realm whose mapping is lost is found only if it
    lives there (see ``realm_shards`` for every candidate).
    """
    decided = _by_rules(assignment, realm, None)
    if decided is not None:
        return decided
    hashed = hashed_shard(assignment, realm)
    return None if hashed is None else Decision(hashed, Reason.HASH)


def place_queue(assignment: Assignment, realm: str, user_id: int | None) -> Decision | None:
    """The shard for a new queue: a user override beats the realm's pin or split, which
    beats the first matching regex rule, which beats the hash.

    None when no shard can take it (none registered, or all weighted 0).
    """
    if user_id is not None and assignment.user_overrides:
        override = assignment.user_overrides.get((realm, user_id))
        if override is not None and override in assignment.shards:
            return Decision(override, Reason.USER_OVERRIDE)
    decided = _by_rules(assignment, realm, user_id)
    if decided is not None:
        return decided
    hashed = hashed_shard(assignment, realm)
    return None if hashed is None else Decision(hashed, Reason.HASH)


def realm_shards(assignment: Assignment, realm: str) -> tuple[str, ...]:
    """Every registered shard on which ``place_queue`` may put a queue of this realm, in
    a stable order: its rules' shards (then its hash, if some users reach it), then the
    shards its users are moved to."""
    found: dict[str, None] = {}
    for shards, _reason in _realm_rules(assignment, realm):
        live = [name for name in shards if name in assignment.shards]
        found.update(dict.fromkeys(live))
        if len(live) == len(shards):
            break  # every user of the realm is decided at this rule
    else:
        hashed = hashed_shard(assignment, realm)
        if hashed is not None:
            found[hashed] = None
    for (override_realm, _user), name in sorted(assignment.user_overrides.items()):
        if override_realm == realm and name in assignment.shards:
            found[name] = None
    return tuple(found)
