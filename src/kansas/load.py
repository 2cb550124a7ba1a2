"""kansas-load: many simulated Zulip clients in one Twisted process, with exact accounting.

Each simulated client owns one event queue, created the way Django creates it
(``POST {internal}/api/v1/events/internal`` with the shared secret, ``Host`` = its realm),
then polls ``GET {public}/json/events`` on its own keep-alive HTTP/1.1 connection:
a long-poll (``dont_block=false``) or, for ``--dont-block-share`` of the clients, a tight
loop of immediate polls (``dont_block=true``). Events are injected at ``--event-rate``
per second with ``POST {internal}/api/internal/notify_tornado``, each carrying a unique
``seq`` and sent to a random subset of the users.

The clients react as Zulip's do: ``last_event_id`` is the highest event id received
(heartbeats included, but heartbeats are not counted as deliveries); on a timeout
(90 s, as the web app), a 5xx or a connection error they back off briefly and retry
with the same ``last_event_id``; on ``400 BAD_EVENT_QUEUE_ID`` they register again and
from then on expect only events injected after the new queue was created.

Accounting. An event is *expected* by a client when the client's queue was created
(its registration reply received) before the event's ``notify_tornado`` call was sent:
the shard then certainly held the queue. An event sent while a registration was in
flight may or may not reach that queue; such deliveries are accepted but counted
apart (``uncertain``). A delivery to a user the event was not sent to, or of an event
whose notify call had completed before the queue's registration began, is
``unexpected``. Per client, the same ``seq`` twice is a duplicate. Within one queue the
event ids must rise, and an event whose notify call completed before another's was sent
must arrive first (else ``out_of_order``). Events whose notify call failed (an error,
or a 200 naming ``failed_shards``) are not expected anywhere; recipients that never got
one are counted as ``failed_notify_missing``. At the end injection stops, and the
clients keep polling until every expected event has arrived or ``--drain`` seconds
pass; what is still missing is lost.

Every phase has a deadline and every request a timeout, so a run always ends. The
exit status is 0 only when nothing was lost, duplicated, unexpected or out of order
and no error occurred other than the kinds listed in ``--tolerate``.

Python API: ``await run_load(reactor, LoadConfig(...))`` returns a ``LoadReport``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import signal
import socket
import sys
import time
import traceback
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any, NoReturn, cast
from urllib.parse import quote, urlencode, urlsplit

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IReactorCore,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

DEFAULT_SECRET = "kansas-demo-secret"
#: Zulip's web app and python-zulip-api give a long-poll 90 s.
DEFAULT_POLL_TIMEOUT = 90.0
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_CONNECT_RATE = 500.0
DEFAULT_DRAIN = 30.0
DEFAULT_MAX_BACKOFF = 2.0
DEFAULT_INTERNAL_CONNECTIONS = 32
#: First back-off after an error; doubles per consecutive error up to --max-backoff.
BACKOFF_BASE = 0.1
#: How often request deadlines are checked (one sweep instead of a timer per request).
SWEEP_INTERVAL = 0.25
#: How often phase conditions (all registered, all delivered) are checked.
CHECK_INTERVAL = 0.02
#: Extra time the connect phase gets beyond clients / connect rate.
CONNECT_GRACE = 30.0
#: After the run, how long open connections get to close.
CLOSE_WAIT = 2.0
MAX_HEAD_BYTES = 64 * 1024
USER_AGENT = "kansas-load"

ResponseCallback = Callable[[int, dict[bytes, bytes], bytes], None]
ErrorCallback = Callable[[str], None]


# -- configuration and report --------------------------------------------------------------


@dataclass
class LoadConfig:
    public: str
    internal: str
    secret: str = DEFAULT_SECRET
    realms: list[str] = field(default_factory=lambda: ["localhost"])
    clients: int = 100
    duration: float = 10.0
    event_rate: float = 10.0
    #: Each event goes to between these many users (inclusive); None: 1..min(clients, 10).
    recipients: tuple[int, int] | None = None
    dont_block_share: float = 0.0
    connect_rate: float = DEFAULT_CONNECT_RATE
    #: Longest the connect phase may last; None: clients / connect_rate + CONNECT_GRACE.
    connect_deadline: float | None = None
    drain: float = DEFAULT_DRAIN
    tolerate: frozenset[str] = frozenset()
    poll_timeout: float = DEFAULT_POLL_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_backoff: float = DEFAULT_MAX_BACKOFF
    internal_connections: int = DEFAULT_INTERNAL_CONNECTIONS
    seed: int | None = None
    quiet: bool = True
    json_report: str | None = None

    def recipient_range(self) -> tuple[int, int]:
        if self.recipients is not None:
            low, high = self.recipients
        else:
            low, high = 1, min(self.clients, 10)
        return max(1, min(low, self.clients)), max(1, min(high, self.clients))

    def check(self) -> None:
        """Raise ValueError for a configuration that cannot run."""
        for name, url in (("public", self.public), ("internal", self.internal)):
            _parse_url(url, name)
        if self.clients < 1:
            raise ValueError("--clients must be at least 1")
        if not self.realms or any(not r for r in self.realms):
            raise ValueError("--realms needs at least one realm")
        if not 0.0 <= self.dont_block_share <= 1.0:
            raise ValueError("--dont-block-share must be between 0 and 1")
        positive = ("connect_rate", "poll_timeout", "request_timeout", "max_backoff")
        for name in positive:
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number")
        for name in ("duration", "event_rate", "drain"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"--{name.replace('_', '-')} must be a non-negative number")
        if self.connect_deadline is not None and not 0 <= self.connect_deadline < math.inf:
            raise ValueError("--connect-deadline must be a non-negative number")
        if self.internal_connections < 1:
            raise ValueError("--internal-connections must be at least 1")
        if self.recipients is not None:
            low, high = self.recipients
            if not 1 <= low <= high:
                raise ValueError("--recipients must be M or A..B with 1 <= A <= B")


@dataclass
class LatencySummary:
    """Milliseconds."""

    count: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0


@dataclass
class LoadReport:
    ok: bool
    failures: list[str]
    interrupted: bool
    clients: int
    clients_registered: int
    long_poll_clients: int
    dont_block_clients: int
    phase_seconds: dict[str, float]
    drained: bool
    events_injected: int
    events_confirmed: int
    events_failed: int
    deliveries_expected: int
    delivered: int
    lost: int
    abandoned: int
    uncertain: int
    failed_notify_missing: int
    duplicated: int
    out_of_order: int
    unexpected: int
    foreign_events: int
    heartbeats: int
    requests: int
    requests_per_second: float
    run_requests_per_second: float
    long_polls: int
    dont_block_polls: int
    reregistrations: int
    stale_retries: int
    errors: dict[str, int]
    request_latency: LatencySummary
    event_latency: LatencySummary
    register_latency: LatencySummary
    notify_latency: LatencySummary
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """A human-readable summary."""

        def lat(name: str, s: LatencySummary) -> str:
            return (
                f"  {name:<17} n={s.count:<8} p50 {s.p50_ms:8.2f} ms  p90 {s.p90_ms:8.2f} ms"
                f"  p99 {s.p99_ms:8.2f} ms  max {s.max_ms:8.2f} ms"
            )

        phases = "  ".join(f"{k} {v:.1f} s" for k, v in self.phase_seconds.items())
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        lines = [
            f"kansas-load: {'OK' if self.ok else 'FAILED'}"
            + ("" if self.ok else f" ({'; '.join(self.failures)})"),
            f"  clients           {self.clients} ({self.long_poll_clients} long-polling, "
            f"{self.dont_block_clients} dont_block), {self.clients_registered} registered, "
            f"{self.reregistrations} re-registrations, {self.stale_retries} requests "
            "retried on a closed keep-alive connection",
            f"  phases            {phases}  (drained: {'yes' if self.drained else 'NO'})",
            f"  events            {self.events_injected} injected, {self.events_confirmed} "
            f"confirmed, {self.events_failed} failed",
            f"  deliveries        {self.deliveries_expected} expected, {self.delivered} "
            f"delivered, {self.lost} lost, {self.abandoned} abandoned (re-registration), "
            f"{self.uncertain} uncertain, {self.failed_notify_missing} missing after a failed "
            "notify",
            f"  anomalies         {self.duplicated} duplicated, {self.out_of_order} out of "
            f"order, {self.unexpected} unexpected, {self.foreign_events} foreign",
            f"  requests          {self.requests} ({self.long_polls} long-polls, "
            f"{self.dont_block_polls} dont_block), {self.requests_per_second:.0f}/s overall, "
            f"{self.run_requests_per_second:.0f}/s during the run",
            f"  heartbeats        {self.heartbeats}",
            f"  errors            {errors}",
            lat("request latency", self.request_latency),
            lat("event latency", self.event_latency),
            lat("register latency", self.register_latency),
            lat("notify latency", self.notify_latency),
        ]
        return "\n".join(lines)


class Samples:
    """Latency samples in seconds, kept compactly; summarised at the end."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values = array("d")

    def add(self, seconds: float) -> None:
        self.values.append(seconds)

    def summary(self) -> LatencySummary:
        if not self.values:
            return LatencySummary()
        ordered = sorted(self.values)
        n = len(ordered)

        def pct(p: float) -> float:
            # Nearest-rank percentile.
            return round(ordered[max(0, math.ceil(p * n) - 1)] * 1000.0, 3)

        return LatencySummary(n, pct(0.50), pct(0.90), pct(0.99), round(ordered[-1] * 1000.0, 3))


# -- accounting --------------------------------------------------------------------------


@dataclass(eq=False)
class EventRecord:
    seq: int
    users: frozenset[int]
    sent_at: float = 0.0
    #: Logical clock ticks: when the notify call was sent and when it ended (None: not yet).
    sent_tick: int | None = None
    done_tick: int | None = None
    #: True: the notify call succeeded; False: it failed (or never ran); None: in flight.
    ok: bool | None = None


@dataclass(eq=False)
class Generation:
    """One queue of one client: from the start of its registration until abandoned."""

    start_tick: int
    done_tick: int | None = None
    queue_id: str | None = None
    awaiting: set[int] = field(default_factory=set)  # expected, not yet delivered
    got: set[int] = field(default_factory=set)  # expected and delivered
    forfeited: set[int] = field(default_factory=set)  # expected, given up with the queue
    excused: set[int] = field(default_factory=set)  # its notify call failed; not arrived
    abandoned: bool = False
    last_event_id: int = -1
    max_sent_tick: int = 0


@dataclass(eq=False)
class Ledger:
    user_id: int
    gens: list[Generation] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)

    @property
    def current(self) -> Generation | None:
        return self.gens[-1] if self.gens else None


class Accounting:
    """Which client must get which event, and what each one got.

    Order of events is judged with a logical clock (``tick``) that advances at every
    registration start and end and every notify start and end, in the order this
    process saw them.
    """

    def __init__(self, clients: int) -> None:
        self._tick = 0
        self.events: list[EventRecord] = []
        self.ledgers = [Ledger(user_id) for user_id in range(1, clients + 1)]
        #: Expected deliveries not yet made (for the drain phase).
        self.outstanding = 0
        #: Notify calls created but not finished.
        self.unfinished = 0
        self.duplicated = 0
        self.out_of_order = 0
        self.unexpected = 0
        self.uncertain = 0
        self.foreign = 0
        self.heartbeats = 0
        self.event_latency = Samples()

    def tick(self) -> int:
        self._tick += 1
        return self._tick

    def ledger(self, user_id: int) -> Ledger:
        return self.ledgers[user_id - 1]

    # -- queues ---------------------------------------------------------------

    def registering(self, user_id: int) -> Generation:
        """A (re-)registration begins: the previous queue, if any, is abandoned."""
        ledger = self.ledger(user_id)
        previous = ledger.current
        if previous is not None and not previous.abandoned:
            previous.abandoned = True
            self.outstanding -= len(previous.awaiting)
            previous.forfeited |= previous.awaiting
            previous.awaiting = set()
            previous.excused = set()
        gen = Generation(start_tick=self.tick())
        ledger.gens.append(gen)
        return gen

    def registered(self, gen: Generation, queue_id: str) -> None:
        gen.done_tick = self.tick()
        gen.queue_id = queue_id

    # -- events ---------------------------------------------------------------

    def new_event(self, users: Sequence[int]) -> int:
        seq = len(self.events)
        self.events.append(EventRecord(seq, frozenset(users)))
        self.unfinished += 1
        return seq

    def sending(self, seq: int, now: float) -> None:
        """The notify call for ``seq`` is being sent now: every recipient whose queue is
        registered must get it."""
        record = self.events[seq]
        record.sent_at = now
        record.sent_tick = self.tick()
        for user_id in record.users:
            gen = self.ledger(user_id).current
            if gen is not None and gen.done_tick is not None and not gen.abandoned:
                gen.awaiting.add(seq)
                self.outstanding += 1

    def sent(self, seq: int, ok: bool) -> None:
        """The notify call for ``seq`` ended (``ok``: the server took it everywhere)."""
        record = self.events[seq]
        if record.ok is not None:
            return
        record.done_tick = self.tick()
        record.ok = ok
        self.unfinished -= 1
        if not ok:
            self._unexpect(record)

    def _unexpect(self, record: EventRecord) -> None:
        # Not delivered: not missed (but noted). Delivered: only "uncertain".
        seq = record.seq
        for user_id in record.users:
            for gen in self.ledger(user_id).gens:
                if seq in gen.awaiting:
                    gen.awaiting.discard(seq)
                    if not gen.abandoned:
                        gen.excused.add(seq)
                    self.outstanding -= 1
                elif seq in gen.got:
                    gen.got.discard(seq)
                    self.uncertain += 1
                gen.forfeited.discard(seq)

    def deliver(self, user_id: int, gen: Generation, event: dict[str, Any], now: float) -> None:
        """One non-heartbeat event arrived on ``gen``, the queue of ``user_id``."""
        seq = event.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < len(self.events):
            self.foreign += 1
            return
        ledger = self.ledger(user_id)
        if seq in ledger.seen:
            self.duplicated += 1
            return
        ledger.seen.add(seq)
        record = self.events[seq]
        if record.sent_tick is not None:
            self.event_latency.add(now - record.sent_at)
        if seq in gen.awaiting:
            gen.awaiting.discard(seq)
            gen.got.add(seq)
            self.outstanding -= 1
        elif (
            user_id not in record.users
            or record.sent_tick is None
            or (record.ok and record.done_tick is not None and record.done_tick < gen.start_tick)
        ):
            self.unexpected += 1
        else:
            gen.excused.discard(seq)
            self.uncertain += 1
        # An event whose notify ended before an already received one was sent is late.
        if record.ok and record.done_tick is not None and record.done_tick < gen.max_sent_tick:
            self.out_of_order += 1
        if record.sent_tick is not None and record.sent_tick > gen.max_sent_tick:
            gen.max_sent_tick = record.sent_tick

    def finish(self) -> None:
        """The run is over: notify calls still unfinished count as failed."""
        for record in self.events:
            if record.ok is None:
                self.sent(record.seq, False)

    def counts(self) -> dict[str, int]:
        gens = [gen for ledger in self.ledgers for gen in ledger.gens]
        delivered = sum(len(g.got) for g in gens)
        lost = sum(len(g.awaiting) for g in gens)
        abandoned = sum(len(g.forfeited) for g in gens)
        return {
            "deliveries_expected": delivered + lost + abandoned,
            "delivered": delivered,
            "lost": lost,
            "abandoned": abandoned,
            "uncertain": self.uncertain,
            "failed_notify_missing": sum(len(g.excused) for g in gens),
            "duplicated": self.duplicated,
            "out_of_order": self.out_of_order,
            "unexpected": self.unexpected,
            "foreign_events": self.foreign,
            "heartbeats": self.heartbeats,
            "events_injected": sum(1 for r in self.events if r.sent_tick is not None),
            "events_confirmed": sum(1 for r in self.events if r.ok),
            "events_failed": sum(1 for r in self.events if r.sent_tick is not None and not r.ok),
        }


# -- a small HTTP/1.1 keep-alive client ------------------------------------------------------

_IDLE, _HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE = range(7)


class _ProtocolError(Exception):
    pass


class _Connection(Protocol):
    """One TCP connection; parses one response per request (Content-Length, chunked, or
    until close)."""

    def __init__(self, owner: HTTPClient) -> None:
        self.owner: HTTPClient | None = owner
        self.net = owner.net
        self.state = _IDLE
        self.buf = b""
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.parts: list[bytes] = []
        self.remaining = 0
        self.keep_alive = True
        self.used = 0  # responses read on this connection

    def connectionMade(self) -> None:
        self.net.sockets += 1
        transport = self.transport
        if transport is not None:
            cast(ITCPTransport, transport).setTcpNoDelay(True)
        if self.owner is not None:
            self.owner._connected(self)
        elif transport is not None:
            transport.loseConnection()

    def send(self, payload: bytes) -> None:
        self.state = _HEAD
        self.parts = []
        assert self.transport is not None
        self.transport.write(payload)

    def closed_by_server(self) -> bool:
        """Whether the server has closed this idle connection (peek: EOF or reset)."""
        transport: Any = self.transport
        handle = transport.getHandle() if transport is not None else None
        if handle is None:
            return True
        try:
            return bool(handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"")
        except BlockingIOError:
            return False
        except OSError:
            return True

    def abort(self) -> None:
        self.owner = None
        transport = self.transport
        if transport is not None:
            cast(ITCPTransport, transport).abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.owner is None:
            return
        if self.state == _IDLE:
            self._broken("data while no request was in flight")
            return
        self.buf = self.buf + data if self.buf else data
        try:
            self._parse()
        except (_ProtocolError, ValueError, IndexError) as e:
            self._broken(str(e))

    def _broken(self, reason: str) -> None:
        owner = self.owner
        self.abort()
        if owner is not None:
            owner._lost(self, "protocol")

    def _parse(self) -> None:
        while True:
            state = self.state
            buf = self.buf
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise _ProtocolError("response head too large")
                    return
                lines = buf[:end].split(b"\r\n")
                self.buf = buf[end + 4 :]
                version, status_text = lines[0].split(b" ", 2)[:2]
                status = int(status_text)
                headers: dict[bytes, bytes] = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip()
                if 100 <= status < 200:
                    continue  # 100 Continue and friends: the real head follows
                self.status, self.headers = status, headers
                connection = headers.get(b"connection", b"").lower()
                if version == b"HTTP/1.1":
                    self.keep_alive = b"close" not in connection
                else:
                    self.keep_alive = b"keep-alive" in connection
                if status in (204, 304):
                    self._done()
                    return
                if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                    self.state = _CHUNK_SIZE
                elif b"content-length" in headers:
                    self.remaining = int(headers[b"content-length"])
                    if self.remaining < 0:
                        raise _ProtocolError("negative Content-Length")
                    self.state = _BODY
                else:
                    self.keep_alive = False
                    self.state = _UNTIL_CLOSE
            elif state == _BODY:
                take = min(len(buf), self.remaining)
                if take:
                    self.parts.append(buf[:take] if take < len(buf) else buf)
                    self.buf = buf[take:]
                    self.remaining -= take
                if self.remaining:
                    return
                self._done()
                return
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise _ProtocolError("chunk size line too long")
                    return
                size = int(buf[:end].split(b";", 1)[0].strip(), 16)
                if size < 0:
                    raise _ProtocolError("negative chunk size")
                self.buf = buf[end + 2 :]
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.remaining = size
                    self.state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if len(buf) < self.remaining + 2:
                    return
                if buf[self.remaining : self.remaining + 2] != b"\r\n":
                    raise _ProtocolError("chunk not followed by CRLF")
                self.parts.append(buf[: self.remaining])
                self.buf = buf[self.remaining + 2 :]
                self.state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise _ProtocolError("trailer too large")
                    return
                self.buf = buf[end + 2 :]
                if end == 0:
                    self._done()
                    return
            elif state == _UNTIL_CLOSE:
                if buf:
                    self.parts.append(buf)
                    self.buf = b""
                return
            else:
                raise _ProtocolError("data while no request was in flight")

    def _done(self) -> None:
        self.state = _IDLE
        self.used += 1
        body = b"".join(self.parts) if len(self.parts) != 1 else self.parts[0]
        self.parts = []
        if self.buf:
            # Bytes after a complete response that nobody asked for: do not reuse.
            self.keep_alive = False
            self.buf = b""
        owner = self.owner
        if owner is not None:
            owner._response(self, self.status, self.headers, body, self.keep_alive)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.net.sockets -= 1
        owner = self.owner
        self.owner = None
        if owner is None:
            return
        if self.state == _UNTIL_CLOSE:
            self.state = _IDLE
            body = b"".join(self.parts)
            self.parts = []
            owner._response(self, self.status, self.headers, body, False)
        elif self.state == _HEAD and not self.buf and self.used:
            # A kept-alive connection the server closed as the request went out (it
            # was idle on the server's side): not an answer, the request may be retried.
            owner._lost(self, "stale")
        else:
            owner._lost(self, "connection")


class _ConnectionFactory(ClientFactory):
    noisy = False

    def __init__(self, owner: HTTPClient) -> None:
        self.owner: HTTPClient | None = owner

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        owner = self.owner
        if owner is None:
            return None
        return _Connection(owner)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        owner, self.owner = self.owner, None
        if owner is not None:
            owner._connect_failed(self)


class Network:
    """Connections of one run: request deadlines (one periodic sweep), and closing all."""

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self.tcp = IReactorTCP(reactor)
        self.busy: set[HTTPClient] = set()
        self.clients: list[HTTPClient] = []
        self._sweep_call: IDelayedCall | None = None
        #: Sockets open right now (a close counts once the reactor reports it).
        self.sockets = 0
        #: Requests sent again after a server closed a kept-alive connection under them.
        self.stale_retries = 0

    def start(self) -> None:
        self._sweep_call = self.reactor.callLater(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        now = self.reactor.seconds()
        late = [c for c in self.busy if c.deadline <= now]
        for client in late:
            client._timed_out()
        self._sweep_call = self.reactor.callLater(SWEEP_INTERVAL, self._sweep)

    def client(self, host: str, port: int) -> HTTPClient:
        client = HTTPClient(self, host, port)
        self.clients.append(client)
        return client

    def close(self) -> None:
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        for client in self.clients:
            client.close()
        self.busy.clear()


class HTTPClient:
    """One keep-alive connection to one server, one request at a time, reconnecting as
    needed. Exactly one of ``on_response`` / ``on_error`` ends each request, unless the
    client is closed first."""

    __slots__ = (
        "conn",
        "connect_factory",
        "connector",
        "deadline",
        "host",
        "net",
        "on_error",
        "on_response",
        "payload",
        "port",
        "sent",
    )

    def __init__(self, net: Network, host: str, port: int) -> None:
        self.net = net
        self.host = host
        self.port = port
        self.conn: _Connection | None = None
        self.connector: IConnector | None = None
        self.connect_factory: _ConnectionFactory | None = None
        self.payload: bytes | None = None
        self.sent: bytes | None = None  # the request in flight, kept for one retry
        self.on_response: ResponseCallback | None = None
        self.on_error: ErrorCallback | None = None
        self.deadline = 0.0

    @property
    def busy(self) -> bool:
        return self.on_response is not None

    def request(
        self,
        payload: bytes,
        timeout: float,
        on_response: ResponseCallback,
        on_error: ErrorCallback,
    ) -> None:
        if self.on_response is not None:
            raise RuntimeError("a request is already in flight on this client")
        self.on_response = on_response
        self.on_error = on_error
        self.deadline = self.net.reactor.seconds() + timeout
        self.net.busy.add(self)
        self.sent = payload
        conn = self.conn
        if conn is not None and not payload.startswith(b"GET ") and conn.closed_by_server():
            self._drop(conn)  # as urllib3 (Django's client) checks before reusing one
            conn = None
        if conn is not None:
            conn.send(payload)
            return
        self._connect(payload, timeout)

    def _connect(self, payload: bytes, timeout: float) -> None:
        self.payload = payload
        if self.connector is None:
            factory = _ConnectionFactory(self)
            self.connect_factory = factory
            self.connector = self.net.tcp.connectTCP(
                self.host, self.port, factory, timeout=min(timeout, DEFAULT_REQUEST_TIMEOUT)
            )

    def _connected(self, conn: _Connection) -> None:
        self.connector = None
        self.connect_factory = None
        self.conn = conn
        payload, self.payload = self.payload, None
        if payload is not None and self.on_response is not None:
            conn.send(payload)

    def _connect_failed(self, factory: _ConnectionFactory) -> None:
        if factory is not self.connect_factory:
            return
        self.connector = None
        self.connect_factory = None
        self.payload = None
        self._fail("connect")  # refused or timed out: told apart from a cut connection

    def _response(
        self,
        conn: _Connection,
        status: int,
        headers: dict[bytes, bytes],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        if conn is not self.conn:
            return
        if not keep_alive:
            self._drop(conn)
        callback = self.on_response
        self._clear()
        if callback is not None:
            callback(status, headers, body)

    def _lost(self, conn: _Connection, kind: str) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        sent, self.sent = self.sent, None
        if self.on_response is None:
            return
        if kind == "stale" and sent is not None:
            # What every HTTP client does for an idempotent request (RFC 9112, 9.3.1), and
            # Zulip's Django for its POSTs to Tornado too ("All of the POST requests we
            # make to Tornado are safe to retry", its TornadoAdapter): a request on a kept-
            # alive connection closed before any answer is sent again, on a new one.
            self.net.stale_retries += 1
            self._connect(sent, max(self.deadline - self.net.reactor.seconds(), 1.0))
            return
        self._fail("connection" if kind == "stale" else kind)

    def _timed_out(self) -> None:
        self._abort_connection()
        self._fail("timeout")

    def _fail(self, kind: str) -> None:
        errback = self.on_error
        self._clear()
        if errback is not None:
            errback(kind)

    def _clear(self) -> None:
        self.sent = None
        self.on_response = None
        self.on_error = None
        self.net.busy.discard(self)

    def _drop(self, conn: _Connection) -> None:
        self.conn = None
        conn.owner = None
        if conn.transport is not None:
            conn.transport.loseConnection()

    def _abort_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        connector, self.connector = self.connector, None
        factory, self.connect_factory = self.connect_factory, None
        self.payload = None
        if factory is not None:
            factory.owner = None
        if connector is not None:
            with contextlib.suppress(RuntimeError):  # already connected or failed
                connector.stopConnecting()

    def close(self) -> None:
        """Drop the connection and any request in flight, without callbacks."""
        self._clear()
        self._abort_connection()


class HTTPPool:
    """Up to ``size`` keep-alive connections to one server; requests beyond wait."""

    def __init__(self, net: Network, host: str, port: int, size: int) -> None:
        self.net = net
        self.host = host
        self.port = port
        self.size = size
        self.idle: list[HTTPClient] = []
        self.count = 0
        self.waiting: deque[
            tuple[bytes, float, ResponseCallback, ErrorCallback, Callable[[], None] | None]
        ] = deque()

    @property
    def pending(self) -> int:
        return len(self.waiting)

    def request(
        self,
        payload: bytes,
        timeout: float,
        on_response: ResponseCallback,
        on_error: ErrorCallback,
        starting: Callable[[], None] | None = None,
    ) -> None:
        """Send when a connection is free; ``starting`` is called just before."""
        if self.idle:
            client = self.idle.pop()
        elif self.count < self.size:
            self.count += 1
            client = self.net.client(self.host, self.port)
        else:
            self.waiting.append((payload, timeout, on_response, on_error, starting))
            return
        self._run(client, payload, timeout, on_response, on_error, starting)

    def _run(
        self,
        client: HTTPClient,
        payload: bytes,
        timeout: float,
        on_response: ResponseCallback,
        on_error: ErrorCallback,
        starting: Callable[[], None] | None,
    ) -> None:
        def done(status: int, headers: dict[bytes, bytes], body: bytes) -> None:
            try:
                on_response(status, headers, body)
            finally:
                self._release(client)

        def failed(kind: str) -> None:
            try:
                on_error(kind)
            finally:
                self._release(client)

        if starting is not None:
            starting()
        client.request(payload, timeout, done, failed)

    def _release(self, client: HTTPClient) -> None:
        if self.waiting:
            self._run(client, *self.waiting.popleft())
        else:
            self.idle.append(client)

    def clear(self) -> None:
        self.waiting.clear()


def _parse_url(url: str, what: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--{what} must be an http:// URL: {url!r}")
    try:
        port = parts.port or 80
    except ValueError as e:
        raise ValueError(f"--{what}: bad port in {url!r}") from e
    return parts.hostname, port, parts.path.rstrip("/")


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _status_kind(status: int) -> str:
    return f"http-{status}"


# -- simulated clients --------------------------------------------------------------------


class SimClient:
    """One Zulip client: a queue, and a poll loop on its own connection."""

    def __init__(self, run: LoadRun, user_id: int, realm: str, dont_block: bool) -> None:
        self.run = run
        self.user_id = user_id
        self.realm = realm
        self.dont_block = dont_block
        self.http = run.net.client(run.public_host, run.public_port)
        self.gen: Generation | None = None
        self.registered = False
        self.failures = 0
        self.timer: IDelayedCall | None = None
        self.stopped = False
        self.in_long_poll = False
        self._prefix = b""
        self._suffix = (
            f" HTTP/1.1\r\nHost: {realm}\r\nUser-Agent: {USER_AGENT}\r\n"
            "Accept: application/json\r\n\r\n"
        ).encode()
        self._sent_at = 0.0

    # -- registration -------------------------------------------------------------

    def register(self) -> None:
        if self.stopped:
            return
        run = self.run
        if self.gen is None or self.gen.done_tick is not None:
            if self.registered:
                self.registered = False
                run.registered_clients -= 1
            self.gen = run.accounting.registering(self.user_id)
        form = {
            "secret": run.config.secret,
            "user_profile_id": str(self.user_id),
            "user_client": "website",
            "client": "internal",
            "dont_block": "true",
            "lifespan_secs": "0",
            "apply_markdown": "true",
            "client_gravatar": "true",
            "slim_presence": "true",
            "all_public_streams": "false",
            "narrow": "[]",
        }
        body = urlencode(form).encode()
        payload = (
            f"POST {run.internal_path}/api/v1/events/internal HTTP/1.1\r\n"
            f"Host: {self.realm}\r\nUser-Agent: {USER_AGENT}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        started = [0.0]

        def starting() -> None:
            started[0] = run.reactor.seconds()

        run.register_pool.request(
            payload,
            run.config.request_timeout,
            lambda s, h, b: self._guard(self._registered, s, b, started[0]),
            lambda kind: self._guard(self._register_failed, kind),
            starting,
        )

    def _registered(self, status: int, body: bytes, started: float) -> None:
        run = self.run
        data = _json_object(body)
        queue_id = data.get("queue_id") if data is not None else None
        if status != 200 or not isinstance(queue_id, str) or not queue_id:
            kind = _status_kind(status) if status != 200 else "bad-reply"
            self._register_failed(kind)
            return
        run.register_latency.add(run.reactor.seconds() - started)
        if self.stopped or self.gen is None:
            return
        run.accounting.registered(self.gen, queue_id)
        self.registered = True
        run.registered_clients += 1
        self._prefix = (
            f"GET {run.public_path}/json/events?queue_id={quote(queue_id, safe='')}"
            f"&dont_block={'true' if self.dont_block else 'false'}&last_event_id="
        ).encode()
        self.poll()

    def _register_failed(self, kind: str) -> None:
        self.run.error("register", kind)
        self._retry_later(self.register)

    # -- polling ------------------------------------------------------------------

    def poll(self) -> None:
        self.timer = None
        gen = self.gen
        if self.stopped or gen is None:
            return
        run = self.run
        payload = self._prefix + str(gen.last_event_id).encode() + self._suffix
        if self.dont_block:
            timeout = run.config.request_timeout
        else:
            timeout = run.config.poll_timeout
            self.in_long_poll = True
            run.active_long_polls += 1
        self._sent_at = run.reactor.seconds()
        self.http.request(payload, timeout, self._on_poll_response, self._on_poll_error)

    def _end_poll(self) -> None:
        run = self.run
        run.requests += 1
        if self.in_long_poll:
            self.in_long_poll = False
            run.active_long_polls -= 1
            run.long_polls += 1
        else:
            run.dont_block_polls += 1

    def _on_poll_response(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self._guard(self._poll_response, status, body)

    def _on_poll_error(self, kind: str) -> None:
        self._guard(self._poll_error, kind)

    def _poll_response(self, status: int, body: bytes) -> None:
        run = self.run
        now = run.reactor.seconds()
        self._end_poll()
        gen = self.gen
        if self.stopped or gen is None:
            return
        if status != 200:
            data = _json_object(body) if status == 400 else None
            if data is not None and data.get("code") == "BAD_EVENT_QUEUE_ID":
                run.error("poll", "bad-queue")
                run.reregistrations += 1
                self.gen = None
                self.registered = False
                run.registered_clients -= 1
                # At once, as a client reloading; backing off if it keeps happening.
                self._retry_later(self.register, immediately=self.failures == 0)
                return
            self._poll_error(_status_kind(status), ended=True)
            return
        data = _json_object(body)
        events = data.get("events") if data is not None else None
        if data is None or data.get("result") != "success" or not isinstance(events, list):
            self._poll_error("bad-reply", ended=True)
            return
        reply_queue = data.get("queue_id")
        if reply_queue is not None and reply_queue != gen.queue_id:
            self._poll_error("wrong-queue", ended=True)
            return
        if self.dont_block:
            run.request_latency.add(now - self._sent_at)
        accounting = run.accounting
        for event in events:
            if not isinstance(event, dict):
                accounting.foreign += 1
                continue
            event_id = event.get("id")
            if not isinstance(event_id, int):
                accounting.foreign += 1
                continue
            if event_id <= gen.last_event_id:
                accounting.out_of_order += 1
            else:
                gen.last_event_id = event_id
            if event.get("type") == "heartbeat":
                accounting.heartbeats += 1
                continue
            accounting.deliver(self.user_id, gen, event, now)
        self.failures = 0
        self.poll()

    def _poll_error(self, kind: str, ended: bool = False) -> None:
        if not ended:
            self._end_poll()
        self.run.error("poll", kind)
        self._retry_later(self.poll)

    # -- helpers -------------------------------------------------------------------

    def _retry_later(self, action: Callable[[], None], immediately: bool = False) -> None:
        if self.stopped:
            return
        self.failures += 1
        if immediately:
            delay = 0.0
        else:
            cap = self.run.config.max_backoff
            delay = min(cap, BACKOFF_BASE * 2 ** min(self.failures - 1, 30))
            delay *= self.run.rng.uniform(0.5, 1.0)
        self.timer = self.run.reactor.callLater(delay, self._fire, action)

    def _fire(self, action: Callable[[], None]) -> None:
        self.timer = None
        self._guard(action)

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.run.internal_error(traceback.format_exc())

    def stop(self) -> None:
        self.stopped = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.in_long_poll:
            self.in_long_poll = False
            self.run.active_long_polls -= 1
        self.http.close()


# -- the run -----------------------------------------------------------------------------


class LoadRun:
    def __init__(
        self, reactor: IReactorTime, config: LoadConfig, progress: IO[str] | None = None
    ) -> None:
        config.check()
        self.reactor = reactor
        self.config = config
        self.progress_out = progress if not config.quiet else None
        self.rng = random.Random(config.seed)
        self.net = Network(reactor)
        self.public_host, self.public_port, self.public_path = _parse_url(config.public, "public")
        host, port, self.internal_path = _parse_url(config.internal, "internal")
        size = config.internal_connections
        self.register_pool = HTTPPool(self.net, host, port, size)
        self.notify_pool = HTTPPool(self.net, host, port, size)
        self.accounting = Accounting(config.clients)
        self.request_latency = Samples()
        self.register_latency = Samples()
        self.notify_latency = Samples()
        self.errors: dict[str, int] = {}
        self.internal_errors: list[str] = []
        self.requests = 0
        self.long_polls = 0
        self.dont_block_polls = 0
        self.active_long_polls = 0
        self.registered_clients = 0
        self.reregistrations = 0
        self.phase = "init"
        self._end_run_early = False
        self.phase_seconds: dict[str, float] = {}
        self.interrupted = False
        self._wake: Deferred[None] | None = None
        self._timers: list[IDelayedCall] = []
        self._progress_call: IDelayedCall | None = None
        self._progress_state = (0.0, 0.0, 0)
        realms = config.realms
        ids = list(range(1, config.clients + 1))
        dont_block = set(self.rng.sample(ids, round(config.dont_block_share * config.clients)))
        self.clients = [
            SimClient(self, user_id, realms[(user_id - 1) % len(realms)], user_id in dont_block)
            for user_id in ids
        ]
        self._recipients = config.recipient_range()
        self._injected = 0
        self._inject_start = 0.0
        self._notify_body_prefix = urlencode({"secret": config.secret}).encode() + b"&data="
        self._notify_head = (
            f"POST {self.internal_path}/api/internal/notify_tornado HTTP/1.1\r\n"
            f"Host: {realms[0]}\r\nUser-Agent: {USER_AGENT}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
        ).encode()

    # -- bookkeeping ---------------------------------------------------------------

    def error(self, phase: str, kind: str) -> None:
        key = kind if phase == "poll" else f"{phase}:{kind}"
        self.errors[key] = self.errors.get(key, 0) + 1

    def internal_error(self, text: str) -> None:
        self.error("tool", "internal")
        if len(self.internal_errors) < 5:
            self.internal_errors.append(text)
            sys.stderr.write(f"kansas-load: internal error:\n{text}")

    def end_run(self) -> None:
        """Stop injecting events now, then drain and report as usual (SIGUSR1), so a
        scenario of unknown length (restarts under load) sets the run's length."""
        self._end_run_early = True
        self._poke()

    def interrupt(self) -> None:
        """End the current phase now and report (Ctrl-C)."""
        self.interrupted = True
        self._poke()

    def _poke(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None and not wake.called:
            wake.callback(None)

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self.reactor.callLater(delay, fn))

    async def _wait(self, seconds: float, done: Callable[[], bool] | None = None) -> bool:
        """Wait up to ``seconds`` (checking ``done`` every CHECK_INTERVAL); True if
        ``done`` became true (or there was nothing to check)."""
        deadline = self.reactor.seconds() + seconds
        while not self.interrupted:
            if done is not None and done():
                return True
            left = deadline - self.reactor.seconds()
            if left <= 0:
                return done is None
            wake: Deferred[None] = Deferred()
            self._wake = wake
            step = left if done is None else min(left, CHECK_INTERVAL)
            call = self.reactor.callLater(step, self._poke)
            await wake
            if call.active():
                call.cancel()
        return False

    # -- phases --------------------------------------------------------------------

    async def run(self) -> LoadReport:
        config = self.config
        started = self.reactor.seconds()
        self.net.start()
        self._start_progress(started)
        try:
            # Connect: queue creations at --connect-rate; clients poll once registered.
            self.phase = "connect"
            t0 = self.reactor.seconds()
            self._ramp(t0, 0)
            connect_deadline = config.connect_deadline
            if connect_deadline is None:
                connect_deadline = config.clients / config.connect_rate + CONNECT_GRACE
            await self._wait(connect_deadline, lambda: self.registered_clients == len(self.clients))
            t1 = self.reactor.seconds()
            self.phase_seconds["connect"] = round(t1 - t0, 3)
            # Run: inject events for --duration.
            self.phase = "run"
            requests_before = self.requests
            self._inject_start = t1
            self._inject()
            if not self._end_run_early:
                await self._wait(config.duration, lambda: self._end_run_early)
            t2 = self.reactor.seconds()
            self.phase_seconds["run"] = round(t2 - t1, 3)
            run_requests = self.requests - requests_before
            # Drain: no more events; poll until every expected one arrived.
            self.phase = "drain"
            accounting = self.accounting
            drained = await self._wait(
                config.drain, lambda: accounting.unfinished == 0 and accounting.outstanding == 0
            )
            t3 = self.reactor.seconds()
            self.phase_seconds["drain"] = round(t3 - t2, 3)
        finally:
            self.phase = "stop"
            self._stop_all()
        await self._close_connections()
        self.phase_seconds["total"] = round(self.reactor.seconds() - started, 3)
        return self._report(t3 - started, run_requests, t2 - t1, drained)

    def _ramp(self, t0: float, started: int) -> None:
        # Goes on after the connect phase's deadline: late clients still register.
        if self.phase == "stop":
            return
        due = min(len(self.clients), int((self.reactor.seconds() - t0) * self.config.connect_rate))
        for client in self.clients[started:due]:
            client.register()
        if due < len(self.clients):
            self._later(0.01, lambda: self._ramp(t0, due))

    def _inject(self) -> None:
        if self.phase != "run" or self.interrupted:
            return
        rate = self.config.event_rate
        if rate > 0:
            due = int((self.reactor.seconds() - self._inject_start) * rate) + 1
            # After a stall, catch up by at most half a second's worth at a time.
            count = min(due - self._injected, max(1, int(rate / 2)))
            for _ in range(count):
                self._send_event()
        self._later(0.01 if rate > 0 else 0.5, self._inject)

    def _send_event(self) -> None:
        accounting = self.accounting
        low, high = self._recipients
        n = self.rng.randint(low, high)
        users = self.rng.sample(range(1, self.config.clients + 1), n)
        seq = accounting.new_event(users)
        self._injected += 1
        data = json.dumps(
            {"event": {"type": "message", "seq": seq, "kansas_load": True}, "users": users},
            separators=(",", ":"),
        )
        body = self._notify_body_prefix + quote(data, safe="").encode()
        payload = self._notify_head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        started = [0.0]

        def starting() -> None:
            started[0] = now = self.reactor.seconds()
            accounting.sending(seq, now)

        def replied(status: int, headers: dict[bytes, bytes], body: bytes) -> None:
            data = _json_object(body)
            ok = status == 200 and data is not None and data.get("result") == "success"
            if ok and data is not None and data.get("failed_shards"):
                ok = False
                self.error("notify", "partial")
            elif not ok:
                self.error("notify", _status_kind(status) if status != 200 else "bad-reply")
            else:
                self.notify_latency.add(self.reactor.seconds() - started[0])
            accounting.sent(seq, ok)

        def failed(kind: str) -> None:
            self.error("notify", kind)
            accounting.sent(seq, False)

        self.notify_pool.request(
            payload, self.config.request_timeout, replied, failed, starting=starting
        )

    def _stop_all(self) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        for client in self.clients:
            client.stop()
        self.register_pool.clear()
        self.notify_pool.clear()
        self.net.close()
        self.accounting.finish()
        self._stop_progress()

    async def _close_connections(self) -> None:
        # Aborted sockets close on the next reactor turns; wait for that, bounded.
        deadline = self.reactor.seconds() + CLOSE_WAIT
        while self.reactor.seconds() < deadline:
            d: Deferred[None] = Deferred()
            self.reactor.callLater(0.01, d.callback, None)
            await d
            if self.net.sockets <= 0:
                break

    # -- progress ------------------------------------------------------------------

    def _start_progress(self, started: float) -> None:
        self._progress_state = (started, started, 0)
        if self.progress_out is not None:
            self._progress_call = self.reactor.callLater(1.0, self._progress)

    def _progress(self) -> None:
        started, last_time, last_requests = self._progress_state
        now = self.reactor.seconds()
        rate = (self.requests - last_requests) / max(now - last_time, 1e-9)
        self._progress_state = (started, now, self.requests)
        acc = self.accounting
        delivered = sum(len(g.got) for ledger in acc.ledgers for g in ledger.gens)
        errors = sum(self.errors.values())
        line = (
            f"kansas-load {now - started:7.1f}s {self.phase:<7} "
            f"long-polls {self.active_long_polls:6d}  req/s {rate:8.0f}  "
            f"events {len(acc.events):7d}  "
            f"delivered {delivered:8d}  outstanding {acc.outstanding:6d}  errors {errors}"
        )
        if self.progress_out is not None:
            print(line, file=self.progress_out, flush=True)
        self._progress_call = self.reactor.callLater(1.0, self._progress)

    def _stop_progress(self) -> None:
        if self._progress_call is not None and self._progress_call.active():
            self._progress_call.cancel()
        self._progress_call = None

    # -- report --------------------------------------------------------------------

    def _report(
        self, polling_seconds: float, run_requests: int, run_seconds: float, drained: bool
    ) -> LoadReport:
        counts = self.accounting.counts()
        registered = self.registered_clients
        failures: list[str] = []
        for name in ("lost", "duplicated", "out_of_order", "unexpected"):
            if counts[name]:
                failures.append(f"{name.replace('_', ' ')} {counts[name]}")
        bad = {k: v for k, v in self.errors.items() if not _tolerated(k, self.config.tolerate)}
        if bad:
            failures.append("errors " + ", ".join(f"{k} {v}" for k, v in sorted(bad.items())))
        if self.interrupted:
            failures.append("interrupted")
        config = asdict(self.config)
        config["tolerate"] = sorted(self.config.tolerate)
        config["recipients"] = list(self.config.recipient_range())
        dont_block = sum(1 for c in self.clients if c.dont_block)
        return LoadReport(
            ok=not failures,
            failures=failures,
            interrupted=self.interrupted,
            clients=len(self.clients),
            clients_registered=registered,
            long_poll_clients=len(self.clients) - dont_block,
            dont_block_clients=dont_block,
            phase_seconds=self.phase_seconds,
            drained=drained,
            requests=self.requests,
            requests_per_second=round(self.requests / max(polling_seconds, 1e-9), 1),
            run_requests_per_second=round(run_requests / max(run_seconds, 1e-9), 1),
            long_polls=self.long_polls,
            dont_block_polls=self.dont_block_polls,
            reregistrations=self.reregistrations,
            stale_retries=self.net.stale_retries,
            errors=dict(sorted(self.errors.items())),
            request_latency=self.request_latency.summary(),
            event_latency=self.accounting.event_latency.summary(),
            register_latency=self.register_latency.summary(),
            notify_latency=self.notify_latency.summary(),
            config=config,
            **counts,
        )


def _tolerated(kind: str, tolerate: frozenset[str]) -> bool:
    """``http-502`` tolerates it in every phase; ``notify:http-502`` only there."""
    return kind in tolerate or kind.split(":", 1)[-1] in tolerate


async def run_load(
    reactor: IReactorTime, config: LoadConfig, progress: IO[str] | None = None
) -> LoadReport:
    """Run one load test on ``reactor`` (already running) and return its report.

    ``progress`` receives one line per second unless ``config.quiet``; default stderr.
    """
    run = LoadRun(reactor, config, progress if progress is not None else sys.stderr)
    report = await run.run()
    if config.json_report:
        write_report(report, config.json_report)
    return report


def write_report(report: LoadReport, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report.to_json(), f, indent=2)
        f.write("\n")


# -- CLI -----------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a non-negative number: {text!r}")
    return value


def _recipients(text: str) -> tuple[int, int]:
    try:
        if ".." in text:
            low_text, high_text = text.split("..", 1)
            low, high = int(low_text), int(high_text)
        else:
            low = high = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected M or A..B: {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"need 1 <= A <= B: {text!r}")
    return low, high


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> LoadConfig:
    parser = _ArgumentParser(
        prog="kansas-load",
        description="Simulate many Zulip clients against kansas (or a Tornado/demo shard) "
        "and account for every event. SIGUSR1 ends event injection early (then the "
        "run drains and reports as usual); Ctrl-C interrupts.",
    )
    add = parser.add_argument
    add("--public", required=True, help="where clients long-poll, e.g. http://127.0.0.1:9799")
    add("--internal", required=True, help="queue creation and notify, e.g. http://127.0.0.1:9798")
    add("--secret", default=DEFAULT_SECRET, help="shared secret for internal calls")
    add("--realms", type=_list, default=["localhost"], help="comma-separated Host headers")
    add("--clients", type=int, default=100, help="simulated clients (user ids 1..N)")
    add("--duration", type=_float, default=10.0, help="seconds of event injection")
    add("--event-rate", type=_float, default=10.0, help="events per second")
    add("--recipients", type=_recipients, help="users per event: M or A..B (1..min(N,10))")
    add("--dont-block-share", type=_float, default=0.0, help="share of dont_block pollers")
    add("--connect-rate", type=_float, default=DEFAULT_CONNECT_RATE, help="queue creations/s")
    add("--connect-deadline", type=_float, help="max seconds to register (N/rate + 30)")
    add("--drain", type=_float, default=DEFAULT_DRAIN, help="max seconds to wait at the end")
    add("--tolerate", type=_list, default=[], help="error kinds that do not fail the run")
    add("--poll-timeout", type=_float, default=DEFAULT_POLL_TIMEOUT, help="long-poll timeout")
    add("--request-timeout", type=_float, default=DEFAULT_REQUEST_TIMEOUT)
    add("--max-backoff", type=_float, default=DEFAULT_MAX_BACKOFF, help="retry back-off cap (s)")
    add("--internal-connections", type=int, default=DEFAULT_INTERNAL_CONNECTIONS)
    add("--seed", type=int, help="random seed (reproducible choices)")
    add("--json-report", help="write the report as JSON here")
    add("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    config = LoadConfig(
        public=args.public,
        internal=args.internal,
        secret=args.secret,
        realms=args.realms,
        clients=args.clients,
        duration=args.duration,
        event_rate=args.event_rate,
        recipients=args.recipients,
        dont_block_share=args.dont_block_share,
        connect_rate=args.connect_rate,
        connect_deadline=args.connect_deadline,
        drain=args.drain,
        tolerate=frozenset(args.tolerate),
        poll_timeout=args.poll_timeout,
        request_timeout=args.request_timeout,
        max_backoff=args.max_backoff,
        internal_connections=args.internal_connections,
        seed=args.seed,
        quiet=args.quiet,
        json_report=args.json_report,
    )
    try:
        config.check()
    except ValueError as e:
        parser.error(str(e))
    return config


def _raise_fd_limit(wanted: int) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    _raise_fd_limit(config.clients + 2 * config.internal_connections + 256)
    from twisted.internet import reactor as _reactor

    reactor = cast(Any, _reactor)
    outcome: list[LoadReport | BaseException] = []
    run = LoadRun(cast(IReactorTime, reactor), config, sys.stderr)

    def on_sigint(signum: int, frame: object) -> None:
        if run.interrupted:
            # A second Ctrl-C: stop at once.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        cast(IReactorThreads, reactor).callFromThread(run.interrupt)

    async def go() -> None:
        try:
            outcome.append(await run.run())
        except BaseException as e:
            outcome.append(e)
        finally:
            cast(IReactorCore, reactor).stop()

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(
        signal.SIGUSR1, lambda *_: cast(IReactorThreads, reactor).callFromThread(run.end_run)
    )
    cast(IReactorCore, reactor).callWhenRunning(lambda: ensureDeferred(go()))
    started = time.monotonic()
    reactor.run(installSignalHandlers=False)
    if not outcome:
        print("kansas-load: the reactor stopped before the run ended", file=sys.stderr)
        return 2
    result = outcome[0]
    if isinstance(result, BaseException):
        detail = "".join(traceback.format_exception(result))
        print(f"kansas-load: failed after {time.monotonic() - started:.1f} s:\n{detail}")
        return 2
    if config.json_report:
        write_report(result, config.json_report)
    print(result.text(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
