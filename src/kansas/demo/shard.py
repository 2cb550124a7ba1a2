"""A demo shard: a small stand-in for one Zulip Tornado process.

It speaks the parts of Zulip's real-time event protocol that kansas routes: queue
creation and the first fetch on ``POST /api/v1/events/internal``, long-polls on
``GET /json/events`` and ``GET /api/v1/events``, ``DELETE`` of a queue, event delivery
on ``POST /api/internal/notify_tornado`` and ``POST /api/internal/web_reload_clients``.
``GET /demo/queues`` (local callers only) is an addition for tests: it shows which
queues this shard holds. Heartbeats come 45 s plus 0-10 whole seconds after a long-poll
parks, as in Tornado (``--heartbeat`` fixes the delay instead).

It is also the reference implementation of the shard side of transparent queue moves
(``/api/internal/kansas/{prepare,fence,export,import,finish}``, and the
``X-Kansas-Notification`` id of each notification): see docs/transparent-moves.md.

Internal endpoints need the form field ``secret`` (``--secret``, default
``DEFAULT_SECRET``) and a local caller. Like Tornado behind nginx, the caller's address
is taken from ``X-Real-Ip``, else the last ``X-Forwarded-For`` entry, else the peer:
a proxy in front must not pass those headers on from outside.

Two modes:

* Without ``--sharding`` it serves every request, as a Zulip whose port checks are
  off (Zulip with the kansas app). Public requests are NOT authenticated: any caller
  that knows a queue id may read or delete it.
* With ``--sharding FILE`` (Zulip's ``sharding.json``) it behaves as an unmodified
  Zulip 9 Tornado on its port. A user's port is ``get_user_tornado_port``
  (``ZulipSharding.port_for``; realms the file does not name go to ``--default-port``,
  by default the file's lowest port). Then:

  - a client ``GET``/``DELETE`` needs HTTP Basic credentials ``user<ID>@…:<any key>``
    (the tests' convention; the demo has no user table), else ``401`` with
    ``WWW-Authenticate: Basic realm="zulip"``; the realm is the ``Host``, port
    stripped; another user's queue is ``BAD_EVENT_QUEUE_ID``;
  - a ``GET`` of another port's user: ``200``, empty body, ``X-Accel-Redirect:
    /internal/tornado/<port><path>?<query>``, before the queue is looked up;
  - a ``DELETE`` of another port's user: a ``cleanup_queue`` event published to that
    port (POSTed to its ``notify_tornado``, standing in for RabbitMQ) and ``200`` at
    once; the owning shard deletes the queue if it is that user's;
  - a queue creation (or Django's immediate fetch) for another port's user: ``500``,
    Tornado's failed ``assert``. Only when the ``Host`` names a realm: unmodified
    Django posts to ``http://127.0.0.1:<port>``, and an IP address says no realm (the
    demo cannot look the user's realm up), so that request is not checked;
  - queues reloaded from ``--state-file`` get a ``restart`` event (if they take it).

  A ``cleanup_queue`` notification is acted on in both modes.

What it does not do: ``/json/events`` takes Basic credentials, not a session cookie;
API keys are not checked; narrows are stored but not applied (``event_types`` is);
a ``GET`` without ``queue_id`` is a 400 (Tornado creates a queue); no rate limiting.

Run it with ``python -m kansas.demo.shard --port P``; it prints one line
``demo shard NAME listening on HOST:PORT`` once it listens. On SIGTERM it dumps its
queues to ``--state-file`` (if given) and exits 0. On start it loads that file if it
exists, then renames it to ``<file>.last``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import hmac
import ipaddress
import json
import os
import random
import re
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import IO, Any, NoReturn, Protocol, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IReactorCore,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import Agent, FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from kansas.errors import KansasError
from kansas.router import realm_from_host
from kansas.transparent.protocol import (
    EXPORT_PATH,
    FENCE_PATH,
    FINISH_PATH,
    IMPORT_PATH,
    MAX_FENCE_TIMEOUT,
    NOTIFICATION_HEADER,
    PREPARE_PATH,
    Cut,
    Reception,
    parse_notification_id,
)
from kansas.zulip_sharding import ZULIP_DEFAULT_PORT, ZulipSharding, load_sharding

JSONDict = dict[str, Any]
#: Sends ``(port, notice)`` to that port's shard, fire and forget: RabbitMQ's
#: ``notify_tornado_port_<port>`` in Zulip. What it returns is ignored.
Publisher = Callable[[int, JSONDict], object]

DEFAULT_SECRET = "kansas-demo-secret"
DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_GC_INTERVAL = 60.0
MAX_LIFESPAN_SECS = 7 * 24 * 3600
#: Tornado's heartbeat: 45 s plus a whole number of seconds up to 10, drawn per long-poll.
HEARTBEAT_MIN_SECS = 45
HEARTBEAT_JITTER_SECS = 10
# Tornado's default idle keep-alive timeout; kansas pools connections to shards.
KEEPALIVE_IDLE_TIMEOUT = 3600.0
STATE_VERSION = 1
#: A moved queue's tombstone answers stale requests this long.
TOMBSTONE_SECONDS = 600.0
#: Pending connections the listening socket keeps (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 1024
#: Notifications one move batch's recording may hold.
MAX_RECORDED = 100_000
#: What a restart event says about the server: demo values in Zulip 9's range.
DEMO_ZULIP_VERSION = "9.0-kansas-demo"
DEMO_ZULIP_FEATURE_LEVEL = 237
#: How long a notice published to another port may take before it is given up.
PUBLISH_TIMEOUT = 5.0
#: Nginx's internal location that replays a request on another Tornado port.
ACCEL_REDIRECT_PREFIX = b"/internal/tornado/"

EVENTS_PATHS = (b"/json/events", b"/api/v1/events")
INTERNAL_EVENTS_PATH = b"/api/v1/events/internal"
NOTIFY_PATH = b"/api/internal/notify_tornado"
WEB_RELOAD_PATH = b"/api/internal/web_reload_clients"
DEMO_QUEUES_PATH = b"/demo/queues"

_INT_RE = re.compile(r"-?[0-9]+")
#: The tests' convention for an HTTP Basic username: user<ID>@<anything>.
_BASIC_USER_RE = re.compile(r"user([0-9]+)@.*", re.DOTALL)

log = Logger()


class ShardError(Exception):
    """An error reply, in Zulip's JSON shape."""

    def __init__(
        self,
        status: int,
        code: str,
        msg: str,
        *,
        headers: dict[bytes, bytes] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(msg)
        self.status = status
        self.code = code
        self.msg = msg
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> JSONDict:
        return {"result": "error", "msg": self.msg, "code": self.code, **self.extra}


def bad_request(msg: str) -> ShardError:
    return ShardError(400, "BAD_REQUEST", msg)


def bad_queue(queue_id: str) -> ShardError:
    return ShardError(
        400, "BAD_EVENT_QUEUE_ID", f"Bad event queue ID: {queue_id}", queue_id=queue_id
    )


def access_denied() -> ShardError:
    return ShardError(403, "ACCESS_DENIED", "Access denied")


def unauthorized(msg: str) -> ShardError:
    return ShardError(
        401, "UNAUTHORIZED", msg, headers={b"WWW-Authenticate": b'Basic realm="zulip"'}
    )


def internal_error() -> ShardError:
    return ShardError(500, "INTERNAL_ERROR", "Internal error")


def success(**fields: Any) -> JSONDict:
    return {"result": "success", "msg": "", **fields}


def restart_event(server_generation: int) -> JSONDict:
    return {
        "type": "restart",
        "zulip_version": DEMO_ZULIP_VERSION,
        "zulip_feature_level": DEMO_ZULIP_FEATURE_LEVEL,
        "server_generation": server_generation,
        "immediate": False,
    }


def _cannot_publish(port: int, notice: JSONDict) -> None:
    log.warn("no publisher: notice for port {port} dropped: {notice}", port=port, notice=notice)


@dataclass(eq=False)
class _Parked:
    """A long-poll waiting on a queue, with its pending heartbeat."""

    deferred: Deferred[JSONDict]
    heartbeat: IDelayedCall


@dataclass(eq=False)
class EventQueue:
    queue_id: str
    user_profile_id: int
    user_client: str
    narrow: list[Any]
    event_types: list[str] | None
    lifespan_secs: int
    timeout: float
    last_connection: float
    next_event_id: int = 0
    events: list[JSONDict] = field(default_factory=list)
    parked: _Parked | None = None
    #: The move batch that froze it (see docs/transparent-moves.md), if any.
    frozen_by: str | None = None

    def accepts(self, event: JSONDict) -> bool:
        return self.event_types is None or event.get("type") in self.event_types

    def add_event(self, event: JSONDict) -> JSONDict:
        # Each queue numbers its own events; copy so queues never share a dict.
        stored = copy.deepcopy(event)
        stored["id"] = self.next_event_id
        self.next_event_id += 1
        self.events.append(stored)
        return stored

    def prune(self, last_event_id: int) -> None:
        self.events = [e for e in self.events if e["id"] > last_event_id]

    def to_state(self) -> JSONDict:
        return {
            "queue_id": self.queue_id,
            "user_profile_id": self.user_profile_id,
            "user_client": self.user_client,
            "narrow": self.narrow,
            "event_types": self.event_types,
            "lifespan_secs": self.lifespan_secs,
            "timeout": self.timeout,
            "last_connection": self.last_connection,
            "next_event_id": self.next_event_id,
            "events": self.events,
        }

    def to_export(self, now: float) -> JSONDict:
        state = copy.deepcopy(self.to_state())
        del state["last_connection"]
        # The importing host's clock may differ: send how long ago, not when.
        state["idle_seconds"] = max(0.0, now - self.last_connection)
        return state

    @classmethod
    def from_export(cls, state: JSONDict, now: float) -> EventQueue:
        state = dict(state)
        state["last_connection"] = now - float(state.get("idle_seconds", 0.0))
        return cls.from_state(state, now)

    @classmethod
    def from_state(cls, state: JSONDict, now: float) -> EventQueue:
        events = state["events"]
        if not isinstance(events, list) or not all(
            isinstance(e, dict) and isinstance(e.get("id"), int) for e in events
        ):
            raise ValueError(f"bad events for queue {state.get('queue_id')!r}")
        event_types = state["event_types"]
        return cls(
            queue_id=str(state["queue_id"]),
            user_profile_id=int(state["user_profile_id"]),
            user_client=str(state["user_client"]),
            narrow=list(state["narrow"]),
            event_types=None if event_types is None else [str(t) for t in event_types],
            lifespan_secs=int(state["lifespan_secs"]),
            timeout=float(state["timeout"]),
            # A clock that went backwards must not make a queue immortal.
            last_connection=min(float(state["last_connection"]), now),
            next_event_id=int(state["next_event_id"]),
            events=events,
        )


Notification = tuple[tuple[str, int] | None, JSONDict, dict[int, Any]]


@dataclass(eq=False)
class _Recording:
    """A move batch on its new shard: every notification received since ``prepare``."""

    seen: dict[str, int]
    lease: IDelayedCall
    notifications: list[Notification] = field(default_factory=list)
    overflowed: bool = False
    imported: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Freeze:
    """A move batch on its old shard: the queues it froze, their state and the cut."""

    queues: list[JSONDict]
    cut: Cut
    lease: IDelayedCall


@dataclass(eq=False)
class _Fence:
    wanted: dict[str, int]
    deferred: Deferred[JSONDict]
    timer: IDelayedCall | None = None


class DemoShard:
    """The queues of one shard, free of HTTP; time comes from ``clock``."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        name: str = "demo",
        secret: str = DEFAULT_SECRET,
        heartbeat: float | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        gc_interval: float = DEFAULT_GC_INTERVAL,
        rng: random.Random | None = None,
        sharding: ZulipSharding | None = None,
        port: int | None = None,
        default_port: int | None = None,
        publish: Publisher | None = None,
    ) -> None:
        self.clock = clock
        self.name = name
        self._secret = secret.encode("utf-8")
        self.heartbeat = heartbeat
        self.idle_timeout = idle_timeout
        self.gc_interval = gc_interval
        self._rng = rng if rng is not None else random.Random()
        # Insertion-ordered, so web_reload_clients and listings are deterministic.
        self.queues: dict[str, EventQueue] = {}
        self._gc_loop: LoopingCall | None = None
        # Transparent moves (docs/transparent-moves.md).
        self.reception = Reception()
        self.recordings: dict[str, _Recording] = {}
        self.freezes: dict[str, _Freeze] = {}
        self.tombstones: dict[str, float] = {}  # moved queue id -> until when
        self._fences: list[_Fence] = []
        # Zulip's port checks (off without a sharding map: this shard serves everyone).
        self.sharding = sharding
        #: The port this shard listens on (``listen`` sets it when it is None).
        self.port = port
        if default_port is None:
            # Zulip's TORNADO_PORTS[0], as the import takes it: the file's lowest port
            file_default = sharding.default_port if sharding is not None else None
            default_port = file_default or ZULIP_DEFAULT_PORT
        self.default_port = default_port
        #: Sends a notice to another port's shard (RabbitMQ's job in Zulip).
        self.publish: Publisher = publish if publish is not None else _cannot_publish

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start the periodic idle-queue GC."""
        if self._gc_loop is not None:
            return
        loop = LoopingCall(self.gc)
        loop.clock = self.clock
        self._gc_loop = loop
        loop.start(self.gc_interval, now=False).addErrback(
            lambda f: log.failure("queue GC stopped", f)
        )

    def stop(self) -> None:
        """Stop GC and drop every parked long-poll (their connections get closed)."""
        if self._gc_loop is not None:
            if self._gc_loop.running:
                self._gc_loop.stop()
            self._gc_loop = None
        for queue in self.queues.values():
            if queue.parked is not None:
                queue.parked.deferred.cancel()

    # -- auth ---------------------------------------------------------------

    def check_secret(self, secret: str | None) -> bool:
        if secret is None:
            return False
        return hmac.compare_digest(secret.encode("utf-8"), self._secret)

    # -- Zulip's port checks (with a sharding map) -----------------------------

    def user_port(self, realm: str, user_id: int) -> int | None:
        """The port that owns user ``user_id`` of ``realm`` (Zulip's
        ``get_user_tornado_port``); None without a sharding map."""
        if self.sharding is None:
            return None
        return self.sharding.port_for(realm, user_id, self.default_port)

    def other_port(self, realm: str, user_id: int) -> int | None:
        """The user's port if it is not this shard's, else None (this shard serves the
        user: its own, or every user without a sharding map)."""
        port = self.user_port(realm, user_id)
        return None if port is None or port == self.port else port

    def cleanup_elsewhere(self, port: int, user_id: int, queue_id: str) -> None:
        """A DELETE for another port's user: Zulip cannot redirect a DELETE, so it
        publishes a ``cleanup_queue`` event to the owning port and answers at once."""
        event = {"type": "cleanup_queue", "queue_id": queue_id}
        self.publish(port, {"users": [user_id], "event": event})

    # -- queues -------------------------------------------------------------

    def create_queue(
        self,
        user_profile_id: int,
        *,
        user_client: str = "API",
        narrow: list[Any] | None = None,
        event_types: list[str] | None = None,
        lifespan_secs: int = 0,
    ) -> EventQueue:
        timeout = (
            float(min(lifespan_secs, MAX_LIFESPAN_SECS)) if lifespan_secs else self.idle_timeout
        )
        queue = EventQueue(
            queue_id=str(uuid.uuid4()),
            user_profile_id=user_profile_id,
            user_client=user_client,
            narrow=list(narrow) if narrow is not None else [],
            event_types=None if event_types is None else list(event_types),
            lifespan_secs=lifespan_secs,
            timeout=timeout,
            last_connection=self.clock.seconds(),
        )
        self.queues[queue.queue_id] = queue
        return queue

    def get_queue(self, queue_id: str, user_profile_id: int | None = None) -> EventQueue:
        queue = self.queues.get(queue_id)
        # Another user's queue looks exactly like a missing one, as in Zulip.
        if queue is None or (
            user_profile_id is not None and queue.user_profile_id != user_profile_id
        ):
            raise bad_queue(queue_id)
        return queue

    def get_events(
        self,
        queue_id: str,
        last_event_id: int | None = None,
        dont_block: bool = False,
        user_profile_id: int | None = None,
    ) -> Deferred[JSONDict]:
        """Fetch events: fires at once, or later if the request is parked.

        Raises ShardError for an unknown queue. The returned Deferred is cancellable
        (client disconnected): that unparks it. It fails with ShardError if the queue
        is deleted, and with CancelledError if the shard stops, while it is parked.
        """
        if queue_id not in self.queues and queue_id in self.tombstones:
            # Moved away: a stale route. "Poll again", and kansas routes it anew.
            return succeed(success(events=[], queue_id=queue_id))
        queue = self.get_queue(queue_id, user_profile_id)
        queue.last_connection = self.clock.seconds()
        if last_event_id is not None:
            # Also while frozen: the export is a copy, and the new shard prunes on the
            # client's next GET; a rollback then finds the queue pruned.
            queue.prune(last_event_id)
        if queue.parked is not None:
            # Only one long-poll per queue: the newer one wins.
            self._complete(queue, events=[])
        if queue.frozen_by is not None and dont_block:
            return succeed(success(events=[], queue_id=queue_id))
        if queue.frozen_by is None and (queue.events or dont_block):
            return succeed(success(events=list(queue.events)))

        def cancel(d: Deferred[JSONDict]) -> None:
            if queue.parked is not None and queue.parked.deferred is d:
                self._unpark(queue)

        deferred: Deferred[JSONDict] = Deferred(cancel)
        delay = self.heartbeat if self.heartbeat is not None else self.heartbeat_delay()
        call = self.clock.callLater(delay, self._heartbeat, queue, deferred)
        queue.parked = _Parked(deferred, call)
        return deferred

    def heartbeat_delay(self) -> int:
        """A parked long-poll's wait for its heartbeat, as Tornado draws it."""
        return HEARTBEAT_MIN_SECS + self._rng.randint(0, HEARTBEAT_JITTER_SECS)

    def delete_queue(self, queue_id: str, user_profile_id: int | None = None) -> None:
        if queue_id not in self.queues and queue_id in self.tombstones:
            return
        queue = self.get_queue(queue_id, user_profile_id)
        del self.queues[queue_id]
        parked = self._unpark(queue)
        if parked is not None:
            # Tell the waiting long-poll now rather than at its heartbeat.
            parked.deferred.errback(bad_queue(queue_id))

    def _unpark(self, queue: EventQueue) -> _Parked | None:
        parked = queue.parked
        if parked is None:
            return None
        queue.parked = None
        if parked.heartbeat.active():
            parked.heartbeat.cancel()
        # Connection time counts until the long-poll ends, for GC.
        queue.last_connection = self.clock.seconds()
        return parked

    def _complete(self, queue: EventQueue, events: list[JSONDict] | None = None) -> None:
        if queue.frozen_by is not None and events is None:
            return  # events that arrive while frozen are kept for a rollback, not sent
        parked = self._unpark(queue)
        if parked is not None:
            reply_events = list(queue.events) if events is None else events
            parked.deferred.callback(success(events=reply_events, queue_id=queue.queue_id))

    def _heartbeat(self, queue: EventQueue, deferred: Deferred[JSONDict]) -> None:
        if queue.parked is None or queue.parked.deferred is not deferred:
            return
        if queue.frozen_by is not None:
            self._complete(queue, events=[])  # no event id may be used while frozen
            return
        queue.add_event({"type": "heartbeat"})
        self._complete(queue)

    # -- events -------------------------------------------------------------

    def notify(
        self,
        event: JSONDict,
        users: Iterable[int | JSONDict],
        notification_id: tuple[str, int] | None = None,
    ) -> int:
        """Deliver ``event`` to every queue of ``users``; return how many got it.
        ``notification_id``: kansas's ``(origin, seq)`` for it, if stamped."""
        flags_by_user: dict[int, Any] = {}
        for user in users:
            # Zulip's message events list users as {"id": N, "flags": [...]}.
            if isinstance(user, dict):
                flags_by_user[int(user["id"])] = user.get("flags")
            else:
                flags_by_user[int(user)] = None
        delivered = 0
        if event.get("type") == "cleanup_queue":
            # Not for clients: a DELETE another port forwarded (not recorded for a move
            # batch either: replayed on an imported queue it would become an event).
            delivered = self._cleanup_queue(event.get("queue_id"), flags_by_user)
        else:
            for queue in list(self.queues.values()):
                if self._deliver(queue, event, flags_by_user):
                    delivered += 1
            self._record(notification_id, event, flags_by_user)
        if notification_id is not None:
            self.reception.receive(*notification_id, self.clock.seconds())
            self._check_fences()
        return delivered

    def _record(
        self,
        notification_id: tuple[str, int] | None,
        event: JSONDict,
        flags_by_user: dict[int, Any],
    ) -> None:
        for recording in self.recordings.values():
            if len(recording.notifications) >= MAX_RECORDED:
                recording.overflowed = True
            else:
                recording.notifications.append((notification_id, event, flags_by_user))

    def _cleanup_queue(self, queue_id: object, users: Collection[int]) -> int:
        """Delete ``queue_id`` if one of ``users`` owns it; 1 if it did, else 0."""
        queue = self.queues.get(queue_id) if isinstance(queue_id, str) else None
        if queue is None or queue.user_profile_id not in users:
            # As Tornado: noted and dropped (the queue may have expired meanwhile).
            message = "cleanup_queue: no queue {queue_id!r} of users {users}"
            log.info(message, queue_id=queue_id, users=sorted(users))
            return 0
        self.delete_queue(queue.queue_id)
        return 1

    def send_restart_events(self, server_generation: int) -> int:
        """Tell every queue that takes it that the server restarted, as Tornado does
        after loading its queues at start; return how many queues got it."""
        event = restart_event(server_generation)
        sent = 0
        for queue in self.queues.values():
            if queue.accepts(event):
                queue.add_event(event)
                self._complete(queue)
                sent += 1
        return sent

    def _deliver(self, queue: EventQueue, event: JSONDict, flags_by_user: dict[int, Any]) -> bool:
        if queue.user_profile_id not in flags_by_user or not queue.accepts(event):
            return False
        per_user = event
        flags = flags_by_user[queue.user_profile_id]
        if flags is not None:
            per_user = {**event, "flags": flags}
        queue.add_event(per_user)
        self._complete(queue)
        return True

    # -- transparent moves (docs/transparent-moves.md) --------------------------

    def prepare(self, batch: str, lease: float) -> dict[str, int]:
        """New shard: start recording notifications for ``batch``; the fence target."""
        recording = self.recordings.get(batch)
        if recording is not None:
            recording.lease.reset(lease)
            return recording.seen
        timer = self.clock.callLater(lease, self._lease_over, batch)
        self.recordings[batch] = _Recording(self.reception.seen(), timer)
        return self.recordings[batch].seen

    def fence(self, wanted: dict[str, int], timeout: float) -> Deferred[JSONDict]:
        """Old shard: fires once every notification up to ``wanted`` has been applied."""
        fence = _Fence(wanted, Deferred())
        self._fences.append(fence)
        fence.timer = self.clock.callLater(timeout, self._fence_timeout, fence)
        self._check_fences()
        return fence.deferred

    def _check_fences(self) -> None:
        if not self._fences:
            return
        now = self.clock.seconds()
        for fence in list(self._fences):
            if self.reception.covers(fence.wanted, now):
                self._end_fence(fence)
                fence.deferred.callback(success(received=self.reception.watermarks(now)))

    def _end_fence(self, fence: _Fence) -> None:
        self._fences.remove(fence)
        if fence.timer is not None and fence.timer.active():
            fence.timer.cancel()

    def _fence_timeout(self, fence: _Fence) -> None:
        fence.timer = None
        if fence not in self._fences:
            return
        now = self.clock.seconds()
        if self.reception.covers(fence.wanted, now):  # a gap may have just been skipped
            self._check_fences()
            return
        self._end_fence(fence)
        received = self.reception.watermarks(now)
        missing = ShardError(
            409, "FENCE_TIMEOUT", "Notifications are still missing",
            received=received, wanted=fence.wanted,
        )  # fmt: skip
        fence.deferred.errback(missing)

    def export(self, batch: str, queue_ids: list[str], lease: float) -> JSONDict:
        """Old shard: freeze these queues for ``batch`` and return their state."""
        freeze = self.freezes.get(batch)
        if freeze is not None:
            frozen = {q["queue_id"] for q in freeze.queues}
            extra = [q for q in queue_ids if q in self.queues and q not in frozen]
            if extra:
                raise ShardError(409, "BATCH_EXPORTED", f"Batch {batch} is exported already")
            freeze.lease.reset(lease)
        else:
            busy = [
                q for q in queue_ids if q in self.queues and self.queues[q].frozen_by is not None
            ]
            if busy:
                raise ShardError(409, "QUEUE_MOVING", f"Queue {busy[0]} is being moved")
            now = self.clock.seconds()
            states = []
            for queue_id in dict.fromkeys(queue_ids):
                queue = self.queues.get(queue_id)
                if queue is None:
                    continue
                states.append(queue.to_export(now))
                queue.frozen_by = batch
                self._complete(queue, events=[])  # its long-poll: "poll again"
            timer = self.clock.callLater(lease, self._lease_over, batch)
            freeze = self.freezes[batch] = _Freeze(states, self.reception.cut(now), timer)
        held = {q["queue_id"] for q in freeze.queues}
        return success(
            queues=freeze.queues,
            missing=[q for q in queue_ids if q not in held and q not in self.tombstones],
            moved=[q for q in queue_ids if q not in held and q in self.tombstones],
            cut=freeze.cut.to_json(),
        )

    def import_queues(self, batch: str, states: list[JSONDict], cut: Cut) -> list[str]:
        """New shard: rebuild the queues of ``batch`` and merge what was recorded."""
        recording = self.recordings.get(batch)
        if recording is None:
            raise ShardError(409, "NOT_PREPARED", f"Batch {batch} is not prepared here")
        if recording.overflowed:
            raise ShardError(409, "RECORDING_OVERFLOW", f"Batch {batch} recorded too much")
        now = self.clock.seconds()
        if not self.reception.covers(cut.high(), now):
            # A notification the old shard had applied may still be on its way here.
            raise ShardError(409, "NOT_CAUGHT_UP", "Notifications of the cut are still missing")
        try:
            queues = [EventQueue.from_export(state, now) for state in states]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise bad_request(f"Bad value for 'queues': {e!r}") from e
        for queue in queues:
            if queue.queue_id in self.queues and queue.queue_id not in recording.imported:
                raise ShardError(409, "QUEUE_EXISTS", f"Queue {queue.queue_id} exists here")
        for queue in queues:
            if queue.queue_id in self.queues:
                continue  # imported by this batch already
            for notification_id, event, flags_by_user in recording.notifications:
                if notification_id is None or notification_id not in cut:
                    self._deliver(queue, event, flags_by_user)
            self.queues[queue.queue_id] = queue
            self.tombstones.pop(queue.queue_id, None)
            recording.imported.append(queue.queue_id)
        return [q.queue_id for q in queues]

    def finish(self, batch: str, commit: bool) -> list[str]:
        """Either shard: end ``batch``; the queue ids it acted on."""
        done: list[str] = []
        freeze = self.freezes.pop(batch, None)
        if freeze is not None:
            if freeze.lease.active():
                freeze.lease.cancel()
            for state in freeze.queues:
                queue = self.queues.get(state["queue_id"])
                if queue is None or queue.frozen_by != batch:
                    continue
                done.append(queue.queue_id)
                queue.frozen_by = None
                if commit:
                    del self.queues[queue.queue_id]
                    self.tombstones[queue.queue_id] = self.clock.seconds() + TOMBSTONE_SECONDS
                    self._complete(queue, events=[])
                elif queue.events:
                    self._complete(queue)
        recording = self.recordings.pop(batch, None)
        if recording is not None:
            if recording.lease.active():
                recording.lease.cancel()
            for queue_id in recording.imported:
                done.append(queue_id)
                queue = self.queues.get(queue_id)
                if not commit and queue is not None:
                    del self.queues[queue_id]
                    self._complete(queue, events=[])
        return done

    def _lease_over(self, batch: str) -> None:
        if batch in self.freezes or batch in self.recordings:
            log.warn("move batch {batch} was not finished in time: rolled back here", batch=batch)
            self.finish(batch, commit=False)

    def web_reload_clients(self, client_count: int | None, immediate: bool) -> tuple[int, bool]:
        """Ask up to ``client_count`` web clients to reload; return (sent, complete).

        A queue that still holds an un-acked reload event is skipped, so repeated calls
        work through all web clients (the way Zulip's restart script loops).
        """
        waiting = [
            q
            for q in self.queues.values()
            if q.user_client == "website"
            and not any(e.get("type") == "web_reload_client" for e in q.events)
        ]
        chosen = waiting if client_count is None else waiting[: max(client_count, 0)]
        for queue in chosen:
            queue.add_event({"type": "web_reload_client", "immediate": immediate})
            self._complete(queue)
        return len(chosen), len(chosen) == len(waiting)

    # -- GC -----------------------------------------------------------------

    def gc(self) -> list[str]:
        """Drop idle queues; return their ids."""
        now = self.clock.seconds()
        expired = [
            q.queue_id
            for q in self.queues.values()
            if q.parked is None and q.frozen_by is None and now - q.last_connection > q.timeout
        ]
        for queue_id in expired:
            del self.queues[queue_id]
        for queue_id, until in list(self.tombstones.items()):
            if until <= now:
                del self.tombstones[queue_id]
        return expired

    # -- introspection and persistence -------------------------------------

    def describe(self) -> JSONDict:
        return success(
            shard=self.name,
            queues=[
                {
                    "queue_id": q.queue_id,
                    "user_profile_id": q.user_profile_id,
                    "pending": len(q.events),
                    "parked": q.parked is not None,
                    # only while a move batch has it frozen
                    **({"frozen": True} if q.frozen_by is not None else {}),
                }
                for q in self.queues.values()
            ],
        )

    def dump_state(self) -> JSONDict:
        return {
            "version": STATE_VERSION,
            "shard": self.name,
            "saved_at": self.clock.seconds(),
            "queues": [q.to_state() for q in self.queues.values()],
        }

    def load_state(self, state: JSONDict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError("unknown state format")
        now = self.clock.seconds()
        try:
            loaded = [EventQueue.from_state(q, now) for q in state["queues"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed queue in state: {e!r}") from e
        for queue in loaded:
            self.queues[queue.queue_id] = queue

    def save_state_file(self, path: str) -> None:
        """Write the queues to ``path`` atomically (temp file in the same dir + rename)."""
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".shard-state-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.dump_state(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    def load_state_file(self, path: str) -> bool:
        """Load queues from ``path`` if it exists; return whether it did."""
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except FileNotFoundError:
            return False
        self.load_state(state)
        return True


# -- HTTP layer ----------------------------------------------------------------


class HTTPRequest(Protocol):
    """The part of twisted.web's (mostly untyped) Request used here, typed."""

    uri: bytes
    path: bytes
    method: bytes
    content: IO[bytes] | None

    def getHeader(self, key: str) -> str | None: ...
    def getClientAddress(self) -> IAddress: ...
    def setResponseCode(self, code: int) -> None: ...
    def setHeader(self, name: bytes, value: bytes) -> None: ...
    def write(self, data: bytes) -> None: ...
    def finish(self) -> None: ...
    def loseConnection(self) -> None: ...
    def notifyFinish(self) -> Deferred[None]: ...


def _client_ip(request: HTTPRequest) -> str | None:
    # Tornado (xheaders=True) trusts these headers, so a proxy must not pass them on
    # from outside; the demo does the same so kansas's handling of them is tested.
    real_ip = request.getHeader("X-Real-Ip")
    if real_ip:
        return real_ip.strip()
    forwarded = request.getHeader("X-Forwarded-For")
    if forwarded:
        return forwarded.split(",")[-1].strip()
    addr = request.getClientAddress()
    if isinstance(addr, IPv4Address | IPv6Address):
        return addr.host
    return None


def is_local(request: HTTPRequest) -> bool:
    ip = _client_ip(request)
    if ip is None:
        return False
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped.is_loopback
    return parsed.is_loopback


def basic_auth_user(request: HTTPRequest) -> int:
    """The user id of a request's HTTP Basic credentials, ``user<ID>@…:<API key>``, or
    a 401. The demo has no user table: the id is read from the username, any key goes."""
    header = request.getHeader("Authorization")
    if not header:
        raise unauthorized("Missing authorization header for basic auth")
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise unauthorized("This endpoint requires HTTP basic authentication.")
    try:
        credentials = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise unauthorized("Invalid authorization header for basic auth") from None
    username, colon, _api_key = credentials.partition(":")
    match = _BASIC_USER_RE.fullmatch(username)
    if not colon or match is None:
        raise unauthorized("Invalid API key")
    return int(match.group(1))


def request_realm(request: HTTPRequest) -> str:
    """The realm a request is for: its ``Host``, lower-cased, port stripped."""
    return realm_from_host(request.getHeader("Host"))


def names_a_realm(realm: str) -> bool:
    """Whether a Host's realm is a host name, not empty and not an IP address (Django
    posts queue creation to ``http://127.0.0.1:<port>``: that Host says no realm)."""
    try:
        ipaddress.ip_address(realm.removeprefix("[").removesuffix("]"))
    except ValueError:
        return realm != ""
    return False


def full_path(request: HTTPRequest) -> bytes:
    """Django's ``get_full_path()``: the path, then ``?`` and the query as received,
    if there is one."""
    query = request.uri.partition(b"?")[2]
    return request.path + b"?" + query if query else request.path


def accel_redirect(request: HTTPRequest, port: int) -> bytes:
    """Tornado's answer to a GET of another port's user: an empty 200 that nginx's
    internal ``/internal/tornado/<port>`` location replays on that port."""
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Content-Length", b"0")
    target = ACCEL_REDIRECT_PREFIX + str(port).encode("ascii") + full_path(request)
    request.setHeader(b"X-Accel-Redirect", target)
    return b""


def _form(request: HTTPRequest) -> dict[str, str]:
    """Query string plus urlencoded body (body wins), first value per name."""
    try:
        query = parse_qsl(urlsplit(request.uri.decode("ascii")).query, keep_blank_values=True)
        body: list[tuple[str, str]] = []
        ctype = (request.getHeader("Content-Type") or "").split(";")[0].strip().lower()
        if ctype == "application/x-www-form-urlencoded" and request.content is not None:
            request.content.seek(0)
            text = request.content.read().decode("utf-8")
            body = parse_qsl(text, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as e:
        raise bad_request("Malformed request: not UTF-8") from e
    form: dict[str, str] = {}
    for key, value in query:
        form.setdefault(key, value)
    from_body: dict[str, str] = {}
    for key, value in body:
        from_body.setdefault(key, value)
    return form | from_body


def _int_arg(form: dict[str, str], name: str, *, required: bool = False) -> int | None:
    value = form.get(name)
    if value is None or (value == "" and not required):
        if required:
            raise bad_request(f"Missing '{name}' argument")
        return None
    if not _INT_RE.fullmatch(value.strip()):
        raise bad_request(f"Bad value for '{name}': {value}")
    return int(value)


def _bool_arg(form: dict[str, str], name: str, default: bool) -> bool:
    value = form.get(name)
    if value is None or value == "":
        return default
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, bool):
        raise bad_request(f"Bad value for '{name}': {value}")
    return parsed


def _json_arg(form: dict[str, str], name: str) -> Any:
    value = form.get(name)
    if value is None or value == "":
        return None
    try:
        return json.loads(value)
    except ValueError as e:
        raise bad_request(f"Bad value for '{name}': {value}") from e


def _batch_arg(form: dict[str, str]) -> str:
    batch = form.get("batch")
    if not batch or len(batch) > 200:
        raise bad_request("Missing or bad 'batch' argument")
    return batch


def _seconds_arg(form: dict[str, str], name: str) -> float:
    try:
        value = float(form.get(name, ""))
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise bad_request(f"Bad value for '{name}': seconds, > 0")
    return value


def _queue_id_arg(form: dict[str, str]) -> str:
    queue_id = form.get("queue_id")
    if not queue_id:
        raise bad_request("Missing 'queue_id' argument")
    return queue_id


def _json_bytes(request: HTTPRequest, status: int, body: JSONDict) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(data)).encode("ascii"))
    return data


def _error_bytes(request: HTTPRequest, error: ShardError) -> bytes:
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return _json_bytes(request, error.status, error.body())


class ShardResource(Resource):
    """Routes every path of the shard; all replies are JSON."""

    isLeaf = True

    def __init__(self, shard: DemoShard, die_on_import: int | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.shard = shard
        self.shard_die_on_import = die_on_import
        self.imports = 0

    def render(self, request: http.Request) -> bytes | int:
        return self.render_request(cast(HTTPRequest, request))

    def render_request(self, request: HTTPRequest) -> bytes | int:
        try:
            return self._route(request)
        except ShardError as e:
            return _error_bytes(request, e)
        except Exception:
            # JSON even for bugs: kansas and its tests parse every reply.
            log.failure("error handling {path!r}", path=request.path)
            return _error_bytes(request, internal_error())

    def _route(self, request: HTTPRequest) -> bytes | int:
        path = request.path
        method = request.method
        routes: dict[bytes, dict[bytes, Callable[[HTTPRequest], bytes | int]]] = {
            INTERNAL_EVENTS_PATH: {b"POST": self._internal_events},
            NOTIFY_PATH: {b"POST": self._notify},
            WEB_RELOAD_PATH: {b"POST": self._web_reload},
            DEMO_QUEUES_PATH: {b"GET": self._demo_queues},
            PREPARE_PATH: {b"POST": self._prepare},
            FENCE_PATH: {b"POST": self._fence},
            EXPORT_PATH: {b"POST": self._export},
            IMPORT_PATH: {b"POST": self._import},
            FINISH_PATH: {b"POST": self._finish},
        }
        for events_path in EVENTS_PATHS:
            routes[events_path] = {b"GET": self._get_events, b"DELETE": self._delete}
        handlers = routes.get(path)
        if handlers is None:
            raise ShardError(404, "NOT_FOUND", "Not Found")
        handler = handlers.get(method)
        if handler is None:
            allowed = ", ".join(m.decode("ascii") for m in handlers)
            raise ShardError(
                405,
                "METHOD_NOT_ALLOWED",
                f"Method Not Allowed ({method.decode('ascii', 'replace')})",
                headers={b"Allow": allowed.encode("ascii")},
            )
        return handler(request)

    def _internal_form(self, request: HTTPRequest) -> dict[str, str]:
        form = _form(request)
        if not is_local(request) or not self.shard.check_secret(form.get("secret")):
            raise access_denied()
        return form

    # -- handlers -------------------------------------------------------------

    def _internal_events(self, request: HTTPRequest) -> bytes | int:
        form = self._internal_form(request)
        queue_id = form.get("queue_id")
        user_profile_id = _int_arg(form, "user_profile_id", required=not queue_id)
        if user_profile_id is not None:
            self._check_internal_port(request, user_profile_id)
        if queue_id:
            # Django's follow-up fetch right after creating the queue.
            deferred = self.shard.get_events(
                queue_id,
                last_event_id=_int_arg(form, "last_event_id"),
                dont_block=True,
                user_profile_id=user_profile_id,
            )
            return self._reply_when_done(request, deferred)
        assert user_profile_id is not None
        event_types = _json_arg(form, "event_types")
        if event_types is not None and (
            not isinstance(event_types, list) or not all(isinstance(t, str) for t in event_types)
        ):
            raise bad_request(f"Bad value for 'event_types': {form['event_types']}")
        narrow = _json_arg(form, "narrow")
        if narrow is not None and not isinstance(narrow, list):
            raise bad_request(f"Bad value for 'narrow': {form['narrow']}")
        lifespan_secs = _int_arg(form, "lifespan_secs") or 0
        if lifespan_secs < 0:
            raise bad_request(f"Bad value for 'lifespan_secs': {form['lifespan_secs']}")
        queue = self.shard.create_queue(
            user_profile_id,
            user_client=form.get("user_client") or "API",
            narrow=narrow,
            event_types=event_types,
            lifespan_secs=lifespan_secs,
        )
        return _json_bytes(request, 200, success(events=[], queue_id=queue.queue_id))

    def _check_internal_port(self, request: HTTPRequest, user_id: int) -> None:
        """Zulip's ``get_events_internal`` asserts that the user is this port's: a
        creation (or Django's immediate fetch) on the wrong port is a 500. The realm is
        the Host's; an IP-address Host (unmodified Django posts to 127.0.0.1:<port>)
        names none, and the demo has no user table to find it: not checked then."""
        realm = request_realm(request)
        if not names_a_realm(realm):
            return
        port = self.shard.other_port(realm, user_id)
        if port is not None:
            message = "queue request for user {user} of {realm} on port {here}; theirs is {port}"
            log.warn(message, user=user_id, realm=realm, here=self.shard.port, port=port)
            raise internal_error()

    def _client_user(self, request: HTTPRequest) -> int | None:
        """The authenticated user of a client request; None without a sharding map
        (then the shard checks no credentials, as before)."""
        if self.shard.sharding is None:
            return None
        return basic_auth_user(request)

    def _get_events(self, request: HTTPRequest) -> bytes | int:
        user_id = self._client_user(request)
        if user_id is not None:
            # Before the queue lookup, as Zulip: another port's user is bounced there.
            port = self.shard.other_port(request_realm(request), user_id)
            if port is not None:
                return accel_redirect(request, port)
        form = _form(request)
        queue_id = _queue_id_arg(form)
        deferred = self.shard.get_events(
            queue_id,
            last_event_id=_int_arg(form, "last_event_id"),
            dont_block=_bool_arg(form, "dont_block", False),
            user_profile_id=user_id,
        )
        return self._reply_when_done(request, deferred)

    def _delete(self, request: HTTPRequest) -> bytes | int:
        user_id = self._client_user(request)
        queue_id = _queue_id_arg(_form(request))
        if user_id is not None:
            port = self.shard.other_port(request_realm(request), user_id)
            if port is not None:
                # Answered before the owner acts: a GET may still succeed after this.
                self.shard.cleanup_elsewhere(port, user_id, queue_id)
                return _json_bytes(request, 200, success())
        self.shard.delete_queue(queue_id, user_id)
        return _json_bytes(request, 200, success())

    def _notify(self, request: HTTPRequest) -> bytes | int:
        form = self._internal_form(request)
        data = _json_arg(form, "data")
        if not isinstance(data, dict):
            raise bad_request("Missing 'data' argument")
        event, users = data.get("event"), data.get("users")
        if not isinstance(event, dict) or not isinstance(users, list):
            raise bad_request("Bad value for 'data': needs 'event' and 'users'")
        notification_id = parse_notification_id(request.getHeader(NOTIFICATION_HEADER))
        try:
            self.shard.notify(event, users, notification_id)
        except (KeyError, TypeError, ValueError) as e:
            raise bad_request("Bad value for 'data': bad 'users'") from e
        return _json_bytes(request, 200, success())

    def _web_reload(self, request: HTTPRequest) -> bytes | int:
        form = self._internal_form(request)
        sent, complete = self.shard.web_reload_clients(
            _int_arg(form, "client_count"), _bool_arg(form, "immediate", False)
        )
        return _json_bytes(request, 200, success(sent_events=sent, complete=complete))

    # -- transparent moves ------------------------------------------------------

    def _prepare(self, request: HTTPRequest) -> bytes | int:
        form = self._internal_form(request)
        seen = self.shard.prepare(_batch_arg(form), _seconds_arg(form, "lease"))
        return _json_bytes(request, 200, success(seen=seen))

    def _fence(self, request: HTTPRequest) -> bytes | int:
        form = self._internal_form(request)
        wanted = _json_arg(form, "seen")
        if not isinstance(wanted, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in wanted.values()
        ):
            raise bad_request("Bad value for 'seen'")
        timeout = min(_seconds_arg(form, "timeout"), MAX_FENCE_TIMEOUT)
        return self._reply_when_done(request, self.shard.fence(wanted, timeout))

    def _export(self, request: HTTPRequest) -> bytes | int:
        form = self._internal_form(request)
        queue_ids = _json_arg(form, "queues")
        if not isinstance(queue_ids, list) or not all(isinstance(q, str) for q in queue_ids):
            raise bad_request("Bad value for 'queues'")
        reply = self.shard.export(_batch_arg(form), queue_ids, _seconds_arg(form, "lease"))
        return _json_bytes(request, 200, reply)

    def _import(self, request: HTTPRequest) -> bytes | int:
        form = self._internal_form(request)
        self.imports += 1
        if self.imports == self.shard_die_on_import:
            # Fault injection for tests: die like a SIGKILLed Tornado, mid-batch.
            os.kill(os.getpid(), signal.SIGKILL)
        states = _json_arg(form, "queues")
        if not isinstance(states, list) or not all(isinstance(q, dict) for q in states):
            raise bad_request("Bad value for 'queues'")
        try:
            cut = Cut.from_json(_json_arg(form, "cut"))
        except (KeyError, TypeError, ValueError) as e:
            raise bad_request("Bad value for 'cut'") from e
        imported = self.shard.import_queues(_batch_arg(form), states, cut)
        return _json_bytes(request, 200, success(imported=imported))

    def _finish(self, request: HTTPRequest) -> bytes | int:
        form = self._internal_form(request)
        outcome = form.get("outcome")
        if outcome not in ("commit", "abort"):
            raise bad_request("Bad value for 'outcome': commit or abort")
        done = self.shard.finish(_batch_arg(form), outcome == "commit")
        return _json_bytes(request, 200, success(done=done))

    def _demo_queues(self, request: HTTPRequest) -> bytes | int:
        if not is_local(request):
            raise access_denied()
        return _json_bytes(request, 200, self.shard.describe())

    def _reply_when_done(self, request: HTTPRequest, deferred: Deferred[JSONDict]) -> bytes | int:
        gone = False

        def on_reply(body: JSONDict) -> None:
            if not gone:
                request.write(_json_bytes(request, 200, body))
                request.finish()

        def on_error(failure: Failure) -> None:
            if gone:
                return
            if isinstance(failure.value, CancelledError):
                # The shard is stopping: drop the long-poll like a dying Tornado would.
                request.loseConnection()
            elif isinstance(failure.value, ShardError):
                request.write(_error_bytes(request, failure.value))
                request.finish()
            else:
                log.failure("error completing a request", failure)
                request.write(_error_bytes(request, internal_error()))
                request.finish()

        def on_disconnect(failure: Failure) -> None:
            nonlocal gone
            gone = True
            deferred.cancel()

        deferred.addCallbacks(on_reply, on_error)
        if not deferred.called:
            request.notifyFinish().addErrback(on_disconnect)
        return NOT_DONE_YET


class _Body(TwistedProtocol):
    """A response body, read whole (twisted's readBody warns on Agent's transports)."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.data))
        else:
            self.done.errback(reason)


class NotifyPublisher:
    """RabbitMQ's stand-in: POSTs a notice to ``/api/internal/notify_tornado`` of the
    shard on ``host:port``. Fire and forget: a failure is logged, never raised."""

    def __init__(
        self,
        reactor: Any,
        secret: str,
        host: str = "127.0.0.1",
        timeout: float = PUBLISH_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._agent = Agent(reactor)
        self._secret = secret
        self._host = host
        self._timeout = timeout

    def __call__(self, port: int, notice: JSONDict) -> Deferred[None]:
        """Send it; the Deferred (for tests) fires once it is answered or given up."""
        body = urlencode({"secret": self._secret, "data": json.dumps(notice)}).encode()
        url = f"http://{self._host}:{port}{NOTIFY_PATH.decode()}".encode()
        headers = Headers({b"Content-Type": [b"application/x-www-form-urlencoded"]})
        sent = self._agent.request(b"POST", url, headers, FileBodyProducer(BytesIO(body)))
        answered = sent.addCallback(self._check_answer)
        answered.addTimeout(self._timeout, self._reactor)
        return answered.addErrback(self._failed, port, notice)

    def _check_answer(self, response: IResponse) -> Deferred[None]:
        def check(answer: bytes) -> None:
            if response.code != 200:
                raise RuntimeError(f"status {response.code}: {answer[:200]!r}")

        body = _Body()
        response.deliverBody(body)
        return body.done.addCallback(check)

    def _failed(self, failure: Failure, port: int, notice: JSONDict) -> None:
        why = failure.getErrorMessage()
        message = "notice for port {port} not delivered ({why}): {notice}"
        log.warn(message, port=port, why=why, notice=notice)


class _QuietSite(Site):
    """A Site without the per-request access log line."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def make_site(
    shard: DemoShard, reactor: IReactorTime | None = None, die_on_import: int | None = None
) -> Site:
    # Site's constructor is untyped in Twisted.
    return _QuietSite(  # type: ignore[no-untyped-call]
        ShardResource(shard, die_on_import),
        logPath=None,
        timeout=KEEPALIVE_IDLE_TIMEOUT,
        reactor=reactor,
        parsePOSTFormSubmission=False,
    )


def listen(
    shard: DemoShard,
    reactor: IReactorTCP,
    port: int = 0,
    interface: str = "127.0.0.1",
    die_on_import: int | None = None,
) -> IListeningPort:
    """Serve ``shard`` over HTTP; ``port=0`` picks a free port (see ``getHost().port``)."""
    # Site is a ServerFactory at runtime; its untyped base hides that from mypy.
    site = cast(ServerFactory, make_site(shard, cast(IReactorTime, reactor), die_on_import))
    # Twisted's default backlog (50) overflows when a move batch sends dozens of held
    # long-polls here at once: a dropped SYN costs the client a 1 s retransmission.
    listening = reactor.listenTCP(port, site, backlog=LISTEN_BACKLOG, interface=interface)
    if shard.port is None:
        shard.port = cast(IPv4Address | IPv6Address, listening.getHost()).port
    return listening


# -- CLI -----------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _port(text: str) -> int:
    if not _INT_RE.fullmatch(text) or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return int(text)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: callers show it as a test failure.
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _ArgumentParser(
        prog="python -m kansas.demo.shard",
        description="A demo Zulip Tornado shard speaking the real-time event protocol.",
    )
    parser.add_argument("--port", type=_port, required=True, help="0 picks a free port")
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--secret", default=DEFAULT_SECRET, help="Zulip's SHARED_SECRET")
    parser.add_argument("--state-file", help="queues are dumped here on SIGTERM, loaded on start")
    parser.add_argument(
        "--heartbeat",
        type=_positive_float,
        help="fixed heartbeat delay in seconds (default: random 45-55)",
    )
    parser.add_argument("--idle-timeout", type=_positive_float, default=DEFAULT_IDLE_TIMEOUT)
    parser.add_argument("--gc-interval", type=_positive_float, default=DEFAULT_GC_INTERVAL)
    parser.add_argument("--name", help="shard name (default: shard-PORT)")
    parser.add_argument(
        "--sharding",
        metavar="FILE",
        help="Zulip's sharding.json: check users' ports as an unmodified Tornado does "
        "(redirect, 500, cleanup_queue), authenticate clients, send restart events",
    )
    parser.add_argument(
        "--default-port",
        type=_port,
        help="with --sharding: the port of realms the file does not name "
        "(default: the lowest port in the file)",
    )
    parser.add_argument(
        "--die-on-import",
        type=int,
        metavar="N",
        help="testing aid: SIGKILL itself on the N-th move import call (a crash mid-batch)",
    )
    args = parser.parse_args(argv)
    if args.default_port is not None and args.sharding is None:
        parser.error("--default-port needs --sharding")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from twisted.internet import reactor as _reactor

    reactor = cast(Any, _reactor)
    sharding = None
    if args.sharding is not None:
        try:
            sharding = load_sharding(args.sharding)
        except KansasError as e:
            sys.exit(f"demo shard: {e}")
    shard = DemoShard(
        cast(IReactorTime, reactor),
        name=args.name or "demo",
        secret=args.secret,
        heartbeat=args.heartbeat,
        idle_timeout=args.idle_timeout,
        gc_interval=args.gc_interval,
        sharding=sharding,
        port=args.port or None,
        default_port=args.default_port,
        publish=NotifyPublisher(reactor, args.secret),
    )
    server_generation = int(reactor.seconds())
    state_file: str | None = args.state_file
    loaded = False
    if state_file is not None:
        try:
            loaded = shard.load_state_file(state_file)
        except (OSError, ValueError) as e:
            sys.exit(f"demo shard: cannot load state file {state_file}: {e}")
    if loaded and sharding is not None:
        # Zulip-faithful mode only: without it, reloaded queues stay as they were dumped.
        shard.send_restart_events(server_generation)
    try:
        port = listen(
            shard, cast(IReactorTCP, reactor), args.port, args.interface, args.die_on_import
        )
    except CannotListenError as e:
        sys.exit(f"demo shard: cannot listen on {args.interface}:{args.port}: {e.socketError}")
    if loaded and state_file is not None:
        # Move the dump aside once we serve (as Zulip does): a crash after this start
        # must not reload stale queues whose event ids would then be handed out twice.
        os.replace(state_file, state_file + ".last")
    host = cast(IPv4Address | IPv6Address, port.getHost())
    if args.name is None:
        shard.name = f"shard-{host.port}"
    failed = False

    def shutdown() -> None:
        nonlocal failed
        shard.stop()
        if state_file is not None:
            try:
                shard.save_state_file(state_file)
            except OSError as e:
                failed = True
                print(f"demo shard: cannot save state to {state_file}: {e}", file=sys.stderr)

    cast(IReactorCore, reactor).addSystemEventTrigger("before", "shutdown", shutdown)
    # Warnings and errors to stderr; stdout is kept for the one "listening" line.
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )
    shard.start()
    print(f"demo shard {shard.name} listening on {host.host}:{host.port}", flush=True)
    reactor.run()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
