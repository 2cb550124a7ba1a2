"""What both listeners share: choosing the shard for a queue, and rewriting heads.

``EventRouter.route`` answers from the in-process cache without a Deferred when it
can (the hot path), else asks Redis, else falls back to the realm's home shard.
``EventRouter.answered`` updates the table from the shard's answer.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable
from typing import NamedTuple
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred

from kansas.http.wire import HOP_BY_HOP, Header
from kansas.model import DEFAULT_QUEUE_TIMEOUT, Assignment, QueueRoute, Shard
from kansas.router import Reason, realm_home, realm_shards
from kansas.routes import RouteTable

#: Queue ids are uuid4 strings (Zulip >= 6) or "<generation>:<counter>" (older).
QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,99}")
EVENT_PATHS = frozenset({b"/json/events", b"/api/v1/events"})
INTERNAL_QUEUE_PATH = b"/api/v1/events/internal"
INTERNAL_PREFIX = b"/api/internal/"
#: A Zulip Tornado process answers a GET of a user it does not own (a realm split over
#: several ports) with ``200``, an empty body and ``X-Accel-Redirect:
#: /internal/tornado/<port><path>?<query>``, for nginx to replay on that port.
TORNADO_REDIRECT = re.compile(rb"/internal/tornado/([0-9]{1,5})(?:/.*)?")

#: Headers kansas sets itself on the way to a shard; a client's copies are dropped.
_REPLACED_UPSTREAM = HOP_BY_HOP | {
    b"x-real-ip",
    b"x-forwarded-for",
    b"content-length",
    b"expect",  # kansas has the whole body before it forwards
    b"x-request-id",  # kansas's own (a trusted caller's, else a new one)
}
#: Headers of a shard's answer that are not relayed: the client gets kansas's request id.
_DROPPED_DOWNSTREAM = HOP_BY_HOP | {b"x-request-id"}


class Directory(TypingProtocol):
    """Holds the current assignment snapshot (``kansas.follower`` keeps it fresh)."""

    @property
    def current(self) -> Assignment: ...


class Target(NamedTuple):  # a tuple: made for every request
    shard: Shard
    reason: Reason
    route: QueueRoute | None  # None: not in the table (a fallback, or a new queue)
    #: For a fallback: the realm's other shards, asked in turn if this one does not know
    #: the queue (a user-split realm, users moved elsewhere).
    others: tuple[Shard, ...] = ()

    def next_candidate(self) -> Target | None:
        if not self.others:
            return None
        return Target(self.others[0], self.reason, None, self.others[1:])


class Detour(NamedTuple):
    """Where a shard's ``X-Accel-Redirect`` leads: the next target, or why not."""

    target: Target | None
    #: when ``target`` is None: a metric label, and a sentence for the client's 502 and
    #: the log
    problem: str = ""
    why: str = ""


class NoShard(Exception):
    """No shard can serve this realm (none registered, or all weighted 0)."""


class QueueInvalidated(Exception):
    """A move invalidated this queue: answer BAD_EVENT_QUEUE_ID (the client re-registers
    and lands on its new shard) and free the queue on its old shard."""

    def __init__(self, route: QueueRoute, shard: Shard | None) -> None:
        super().__init__(route.queue_id)
        self.route = route
        self.shard = shard  # the old shard, if still registered


class QueueMoving(Exception):
    """A transparent move is switching this queue to another shard: hold the request
    until the switch is committed or rolled back (``kansas.transparent.holding``)."""

    def __init__(self, route: QueueRoute) -> None:
        super().__init__(route.queue_id)
        self.route = route


class EventRouter:
    __slots__ = ("_moving", "directory", "fresh", "table", "wall")

    def __init__(
        self, table: RouteTable, directory: Directory, wall: Callable[[], float] = time.time
    ) -> None:
        self.table = table
        self.directory = directory
        self._moving = directory.current.moving_realms
        #: Unix time: the deadlines of transparent moves' markers are written in it.
        self.wall = wall
        #: Routes just read from Redis for requests held by a transparent move, used
        #: once instead of reading them again (kansas.transparent.holding).
        self.fresh: dict[str, QueueRoute] = {}

    def assignment_changed(self, assignment: Assignment) -> None:
        """When a realm's move ends, its cached routes are dropped: one cached before an
        invalidation and not requested since must not outlive the move."""
        ended = self._moving - assignment.moving_realms
        self._moving = assignment.moving_realms
        if ended:
            self.table.uncached_by_moves += self.table.uncache_realms(ended)

    def route(self, queue_id: str, realm: str) -> Target | Deferred[Target]:
        """The shard for a request on ``queue_id``: at once on a cache hit (unless its
        realm is being moved). Raises (or fails with) QueueInvalidated for a queue a
        move has invalidated, QueueMoving for one a transparent move is switching."""
        table = self.table
        if self.fresh:
            fresh = self.fresh.pop(queue_id, None)
            if fresh is not None:
                table.remember(fresh)
                return self._mapped(fresh, realm)
        route = table.cached(queue_id)
        if route is not None:
            table.hits += 1
            if route.realm not in self.directory.current.moving_realms:
                return self._mapped(route, realm)
            # A move is under way: another process may have invalidated the queue, so
            # Redis is asked every time (one GET, only while the realm moves).
            return self.table.refetch(route).addCallback(self._mapped, realm)
        table.misses += 1
        return table.fetch(queue_id).addCallback(
            lambda found: self._fallback(realm) if found is None else self._mapped(found, realm)
        )

    def cached_target(self, queue_id: str) -> Target | None:
        """What ``route`` answers on an ordinary cache hit, without its side effects
        (the hit is not counted); None for anything else: a miss, a realm being moved,
        an invalidated or switching queue, an unregistered shard, a held request."""
        if self.fresh:
            return None
        route = self.table.cached(queue_id)
        if route is None or route.invalid or route.moving_to is not None:
            return None
        current = self.directory.current
        if route.realm in current.moving_realms:
            return None
        shard = current.shards.get(route.shard)
        if shard is None:
            return None
        return Target(shard, Reason.QUEUE_MAPPING, route)

    def _mapped(self, route: QueueRoute, realm: str) -> Target:
        if route.invalid:
            raise QueueInvalidated(route, self.directory.current.shards.get(route.shard))
        if route.moving_to is not None and route.moving(self.wall()):
            self.table.uncache(route.queue_id)  # read from Redis again after the switch
            raise QueueMoving(route)
        shard = self.directory.current.shards.get(route.shard)
        if shard is None:
            # The mapping names a shard that is no longer registered: the queue cannot
            # be reached. Route like an unknown queue; its shard says BAD_EVENT_QUEUE_ID.
            return self._fallback(realm)
        return Target(shard, Reason.QUEUE_MAPPING, route)

    def _fallback(self, realm: str) -> Target:
        assignment = self.directory.current
        decision = realm_home(assignment, realm)
        if decision is None:
            raise NoShard(realm)
        others = tuple(
            assignment.shards[name]
            for name in realm_shards(assignment, realm)
            if name != decision.shard
        )
        return Target(assignment.shards[decision.shard], Reason.FALLBACK, None, others)

    def redirected(self, target: Target, location: bytes) -> Detour:
        """A shard answered with Zulip's ``X-Accel-Redirect`` (``location``): the shard
        of the port it names, asked once. Tornado redirects only to the port that owns
        the user, so that shard's answer is final: no other candidate is asked after it,
        and a second redirect is an error, never a loop."""
        name = target.shard.name
        if target.reason is Reason.TORNADO_REDIRECT:
            why = f"Shard {name} redirected a request that another shard redirected to it"
            return Detour(None, "redirect-loop", why)
        m = TORNADO_REDIRECT.fullmatch(location)
        if m is None:
            shown = location[:100].decode("ascii", "replace")
            return Detour(None, "redirect-target", f"Shard {name} redirected to {shown!r}")
        port = int(m.group(1))
        shard = shard_of_port(self.directory.current, port, target.shard.address[0])
        if shard is None:
            why = f"Shard {name} redirected to Tornado port {port}, which is no known shard's"
            return Detour(None, "redirect-port", why)
        return Detour(Target(shard, Reason.TORNADO_REDIRECT, None))

    def answered(
        self, method: bytes, queue_id: str, realm: str, target: Target, status: int
    ) -> None:
        """Keep the table in step with what the shard said about the queue."""
        if status != 200:
            if status == 400 and target.route is not None:
                # Most likely BAD_EVENT_QUEUE_ID: the queue is gone from its shard. Ask
                # Redis next time rather than trusting the cache.
                self.table.uncache(queue_id)
            return
        if method == b"DELETE":
            self.table.forget(queue_id)
        elif target.route is not None:
            self.table.seen(target.route)
        else:
            # Found on the realm's home shard after the mapping was lost: record it so
            # the queue keeps its shard even if the realm's placement changes later.
            route = QueueRoute(queue_id, target.shard.name, realm, None, DEFAULT_QUEUE_TIMEOUT)
            self.table.record(route)


def shard_of_port(assignment: Assignment, port: int, host: str) -> Shard | None:
    """The shard a Tornado process means by its ``port``: the one on the same host as
    the redirecting shard (nginx's ``tornado<port>`` upstreams are local), else the only
    one with that port anywhere."""
    found = [s for s in assignment.shards.values() if s.address[1] == port]
    same_host = [s for s in found if s.address[0] == host]
    if len(same_host) == 1:
        return same_host[0]
    return found[0] if len(found) == 1 else None


def tornado_redirect(headers: list[Header]) -> bytes | None:
    """The ``X-Accel-Redirect`` of a shard's answer, if it has one."""
    for lname, _name, value in headers:
        if lname == b"x-accel-redirect":
            return value
    return None


def upstream_head(
    method: bytes,
    target: bytes,
    headers: list[Header],
    peer: str,
    body_length: int,
    trust_real_ip: bool = False,
    request_id: bytes = b"",
) -> bytes:
    """The HTTP/1.1 request head for a shard: hop-by-hop headers out, ``Host`` kept,
    ``X-Real-Ip`` set to the real peer and the peer appended to ``X-Forwarded-For``,
    ``X-Request-Id`` set to ``request_id`` (a caller's own is always dropped).

    ``trust_real_ip``: the peer is a trusted front (nginx): its ``X-Real-Ip``, if it is
    an IP address, is the client's and is passed on instead of the peer's.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    listed: frozenset[bytes] | set[bytes] = frozenset()
    forwarded_for = b""
    real_ip = peer.encode()
    for lname, _name, value in headers:
        if lname == b"connection":
            listed = {t.strip().lower() for t in value.split(b",")}
    for lname, name, value in headers:
        if lname in _REPLACED_UPSTREAM or lname in listed:
            if lname == b"x-forwarded-for":
                forwarded_for = value
            elif lname == b"x-real-ip" and trust_real_ip and is_ip_address(value):
                real_ip = value
            continue
        parts += (name, b": ", value, b"\r\n")
    peer_bytes = peer.encode()
    chain = forwarded_for + b", " + peer_bytes if forwarded_for else peer_bytes
    parts += (b"X-Forwarded-For: ", chain, b"\r\nX-Real-Ip: ", real_ip, b"\r\n")
    if request_id:
        parts += (b"X-Request-Id: ", request_id, b"\r\n")
    if body_length or method not in (b"GET", b"HEAD", b"DELETE"):
        parts += (b"Content-Length: ", str(body_length).encode(), b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def is_ip_address(value: bytes) -> bool:
    try:
        ipaddress.ip_address(value.decode("ascii"))
    except ValueError:
        return False
    return True


def downstream_headers(headers: list[Header]) -> list[Header]:
    """A shard's response headers minus the hop-by-hop ones (and those it lists), and
    minus its ``X-Request-Id`` (the caller gets kansas's)."""
    listed: set[bytes] = set()
    for lname, _name, value in headers:
        if lname == b"connection":
            listed = {t.strip().lower() for t in value.split(b",")}
    return [h for h in headers if h[0] not in _DROPPED_DOWNSTREAM and h[0] not in listed]
