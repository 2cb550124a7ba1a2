"""Persistent HTTP/1.1 connections to the shards, one request in flight on each.

The stock ``twisted.web.proxy`` client opens an HTTP/1.0 connection per request and
keeps it after the client leaves; here connections are kept alive and reused (most
recently used first), responses stream to a ``ResponseSink`` as they arrive, and a
cancelled exchange aborts its connection so the shard drops the parked request too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import StrEnum
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kansas.http.wire import Header, HttpError, ResponseParser, is_json
from kansas.proxy.quick import QuickResponse, quick_response
from kansas.proxy.sending import send_now

log = Logger()

#: How often response deadlines are checked: they are enforced to within this.
SWEEP_INTERVAL = 1.0

Address = tuple[str, int]


class Failed(StrEnum):
    """Why an exchange ended without a complete response."""

    UNREACHABLE = "unreachable"  # could not connect: the shard is down (or restarting)
    CLOSED = "closed"  # the shard hung up (say, a Tornado restart cutting its long-polls)
    TIMEOUT = "timeout"  # no complete answer within the response timeout: a hung shard
    PROTOCOL = "protocol"  # the shard broke HTTP


class ResponseSink(TypingProtocol):
    """Where a backend response goes, part by part. Exactly one of ``response_end`` or
    ``response_failed`` ends every exchange that was not cancelled."""

    def response_head(self, status: int, headers: list[Header]) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_end(self) -> None: ...
    def response_failed(self, reason: str, started: bool, kind: Failed) -> None: ...


class ShardFailure(ConnectionError):
    """An exchange that ended without a complete response, and why."""

    def __init__(self, reason: str, kind: Failed, started: bool = False) -> None:
        super().__init__(reason)
        self.kind = kind
        self.started = started  # part of a response had arrived

    @property
    def unanswered(self) -> bool:
        """The shard never answered: it could not be reached, or hung up before a single
        response byte (as a stopping Tornado does with requests it has not handled)."""
        return not self.started and self.kind in (Failed.UNREACHABLE, Failed.CLOSED)


class CollectedResponse:
    """A ResponseSink that keeps the whole (small) reply: status, headers, body."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[Header] = []
        self.parts: list[bytes] = []
        self.done: Deferred[CollectedResponse] = Deferred()

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)

    def response_head(self, status: int, headers: list[Header]) -> None:
        self.status, self.headers = status, headers

    def response_body(self, data: bytes) -> None:
        self.parts.append(data)

    def response_end(self) -> None:
        self.done.callback(self)

    def response_failed(self, reason: str, started: bool, kind: Failed) -> None:
        self.done.errback(ShardFailure(reason, kind, started))

    def json(self) -> dict[str, Any] | None:
        if not is_json(self.headers):
            return None
        try:
            data = json.loads(self.body)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None


class Exchange:
    """One request to one shard, from sending to the end of its response."""

    __slots__ = (
        "address",
        "conn",
        "connector",
        "deadline",
        "done",
        "payload",
        "pool",
        "retry_safe",
        "sink",
        "started",
        "whole",
    )

    def __init__(
        self,
        pool: BackendPool,
        address: Address,
        payload: bytes,
        sink: ResponseSink,
        retry_safe: bool,
    ) -> None:
        self.pool = pool
        self.address = address
        self.payload = payload
        self.sink = sink
        #: the sink's ``response_whole``, if it takes a whole answer at once
        self.whole: Callable[[QuickResponse], bool] | None = getattr(sink, "response_whole", None)
        self.retry_safe = retry_safe
        self.conn: BackendConnection | None = None
        self.connector: Any = None
        self.started = False  # response bytes have reached the sink
        self.done = False
        self.deadline = 0.0  # when the pool's sweep gives up on the answer

    def cancel(self) -> None:
        """The client went away: drop the exchange and its connection (never reused)."""
        if self.done:
            return
        if not self._close(abort=True) and self.connector is not None:
            self.connector.stopConnecting()

    def _close(self, abort: bool = False) -> bool:
        """Mark done; with ``abort``, drop the connection in use (if any, returning
        True): it is mid-exchange and can never be reused."""
        self.done = True
        conn, self.conn = self.conn, None
        if conn is None or not abort:
            return False
        conn.exchange = None
        conn.abort()
        return True

    def finished(self) -> None:
        self._close()
        self.sink.response_end()

    def failed(self, reason: str, kind: Failed) -> None:
        if self.done:
            return
        self._close(abort=True)
        self.sink.response_failed(reason, self.started, kind)

    def timed_out(self) -> None:
        host, port = self.address
        self.failed(f"shard {host}:{port} did not answer in time", Failed.TIMEOUT)


class BackendConnection(Protocol):
    __slots__ = ("address", "exchange", "parser", "pool", "reused")

    def __init__(self, pool: BackendPool, address: Address, exchange: Exchange | None) -> None:
        self.pool = pool
        self.address = address
        self.exchange = exchange
        self.reused = False
        self.parser = ResponseParser(self._on_head, self._on_body, self._on_end)

    # -- driving a request -------------------------------------------------------------
    def send(self, exchange: Exchange) -> None:
        self.exchange = exchange
        exchange.conn = self
        self.pool._busy.add(self)
        self.parser.expect()
        send_now(self.transport, exchange.payload)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- Protocol ------------------------------------------------------------------------
    def connectionMade(self) -> None:
        exchange = self.exchange
        if exchange is None or exchange.done:  # cancelled while connecting
            self.exchange = None
            self.abort()
            return
        exchange.connector = None
        self.send(exchange)

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.whole is not None and self.parser.awaits_head:
            answer = quick_response(data)
            if answer is not None and exchange.whole(answer):
                # The sink has answered its client: what _on_head and _on_end do.
                exchange.started = True
                self.exchange = None
                self.parser.took_whole()
                exchange._close()
                if answer.reusable:
                    self.pool._release(self)
                else:
                    self.abort()
                return
        try:
            self.parser.feed(data)
        except HttpError as e:
            exchange = self.exchange
            if exchange is not None:
                host, port = self.address
                exchange.failed(f"shard {host}:{port}: {e.message}", Failed.PROTOCOL)
            self.abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.pool._forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is None or exchange.done:
            return
        if self.parser.connection_closed():
            return  # a response read until close has ended
        exchange.conn = None
        if not exchange.started and self.reused and exchange.retry_safe:
            # A kept-alive connection the shard closed as we reused it: nothing was
            # processed, so try once more on a fresh connection.
            exchange.retry_safe = False
            self.pool._connect(exchange)
            return
        host, port = self.address
        exchange.failed(f"shard {host}:{port} closed the connection", Failed.CLOSED)

    # -- parser events -------------------------------------------------------------------
    def _on_head(self, status: int, headers: list[Header]) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.started = True
            exchange.sink.response_head(status, headers)

    def _on_body(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.sink.response_body(data)

    def _on_end(self, reusable: bool) -> None:
        exchange, self.exchange = self.exchange, None
        if reusable:
            self.pool._release(self)
        else:
            self.abort()
        if exchange is not None:
            exchange.finished()


class _Connecting(ClientFactory):
    noisy = False

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def buildProtocol(self, addr: Any) -> BackendConnection:
        return BackendConnection(self.exchange.pool, self.exchange.address, self.exchange)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        exchange = self.exchange
        exchange.connector = None
        if not exchange.done:
            host, port = exchange.address
            why = reason.getErrorMessage()
            exchange.failed(f"shard {host}:{port} is unreachable: {why}", Failed.UNREACHABLE)


class BackendPool:
    """Keeps idle keep-alive connections per shard address and starts exchanges."""

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float = 5.0,
        response_timeout: float = 150.0,
        max_idle_per_address: int = 1024,
    ) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.max_idle_per_address = max_idle_per_address
        self._idle: dict[Address, list[BackendConnection]] = {}
        self._busy: set[BackendConnection] = set()
        # One sweep a second for response timeouts, instead of a timer per request
        # (a timer costs time on every request and memory on every held long-poll).
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = reactor

    def send(
        self, address: Address, payload: bytes, sink: ResponseSink, retry_safe: bool
    ) -> Exchange:
        """Send ``payload`` (a whole HTTP/1.1 request) to ``address``; the response goes
        to ``sink``. ``retry_safe``: may be sent again if a reused connection fails first."""
        exchange = Exchange(self, address, payload, sink, retry_safe)
        exchange.deadline = self.reactor.seconds() + self.response_timeout
        if not self._sweeper.running:
            self._sweeper.start(SWEEP_INTERVAL, now=False)
        idle = self._idle.get(address)
        if idle:
            conn = idle.pop()
            conn.reused = True
            conn.send(exchange)
        else:
            self._connect(exchange)
        return exchange

    def _connect(self, exchange: Exchange) -> None:
        host, port = exchange.address
        exchange.connector = self.reactor.connectTCP(
            host, port, _Connecting(exchange), timeout=self.connect_timeout
        )

    def _release(self, conn: BackendConnection) -> None:
        self._busy.discard(conn)
        idle = self._idle.setdefault(conn.address, [])
        if len(idle) >= self.max_idle_per_address:
            conn.abort()
            return
        idle.append(conn)

    def _forget(self, conn: BackendConnection) -> None:
        self._busy.discard(conn)
        idle = self._idle.get(conn.address)
        if idle and conn in idle:
            idle.remove(conn)

    def abandon(self, address: Address, why: str) -> int:
        """The shard at ``address`` is down: close its idle connections, and fail as
        unreachable the GETs waiting there with no answer byte yet (they are parked
        and replayed: a GET is safe to send again). Anything else is left to finish or
        time out: a notification or a DELETE may have been processed already, and
        sending it again would repeat it (a held notification delivered twice).
        Returns how many failed."""
        for conn in self._idle.pop(address, []):
            conn.abort()
        waiting = [
            c.exchange
            for c in self._busy
            if c.address == address
            and c.exchange is not None
            and not c.exchange.started
            and c.exchange.payload.startswith(b"GET ")
        ]
        host, port = address
        for exchange in waiting:
            exchange.failed(f"shard {host}:{port} is unreachable: {why}", Failed.UNREACHABLE)
        return len(waiting)

    def idle_count(self, address: Address | None = None) -> int:
        if address is not None:
            return len(self._idle.get(address, ()))
        return sum(map(len, self._idle.values()))

    def _sweep(self) -> None:
        now = self.reactor.seconds()
        late = [
            c.exchange for c in self._busy if c.exchange is not None and c.exchange.deadline <= now
        ]
        for exchange in late:
            exchange.timed_out()
        if not self._busy and self._sweeper.running:
            self._sweeper.stop()  # restarted by the next send

    def close(self) -> None:
        """Close every idle connection (busy ones end with their exchanges)."""
        if self._sweeper.running:
            self._sweeper.stop()
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.abort()
        self._idle.clear()
