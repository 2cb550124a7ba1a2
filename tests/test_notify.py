"""Notifications for a down shard are held and delivered in order (no sockets)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from kansas.health import HealthMonitor
from kansas.model import Assignment, Shard
from kansas.proxy.backend import BackendPool
from kansas.proxy.notify import NotifyDispatcher

SHARD = Shard("a", "http://127.0.0.1:9800")
OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 29\r\n\r\n"
    b'{"result":"success","msg":""}'
)


class World:
    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        directory = SimpleNamespace(current=Assignment({"a": SHARD}))
        self.health = HealthMonitor(self.reactor, directory)  # type: ignore[arg-type]
        self.pool = BackendPool(self.reactor)
        self.notify = NotifyDispatcher(self.pool, self.health, max_letters=3, max_age=60)
        self.seen = 0

    def next_connection(self) -> tuple[Any, StringTransport]:
        _host, _port, factory, _t, _b = self.reactor.tcpClients[self.seen]
        self.seen += 1
        conn = factory.buildProtocol(None)
        transport = StringTransport()
        conn.makeConnection(transport)
        return conn, transport

    def refuse_next(self) -> None:
        _host, _port, factory, _t, _b = self.reactor.tcpClients[self.seen]
        self.seen += 1
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))


def letter(n: int) -> bytes:
    return b"POST /api/internal/notify_tornado HTTP/1.1\r\nContent-Length: 1\r\n\r\n%d" % n


def test_delivered_at_once_when_the_shard_is_up() -> None:
    w = World()
    outcomes: list[Any] = []
    w.notify.deliver(SHARD, letter(1)).addCallback(outcomes.append)
    conn, transport = w.next_connection()
    assert transport.value().endswith(b"\r\n\r\n1")
    conn.dataReceived(OK)
    assert outcomes[0].state == "delivered" and outcomes[0].reply.status == 200


def test_held_while_down_and_delivered_in_order_when_back() -> None:
    w = World()
    outcomes: list[Any] = []
    w.notify.deliver(SHARD, letter(1)).addCallback(outcomes.append)
    w.refuse_next()  # the shard is restarting
    for n in (2, 3):
        w.notify.deliver(SHARD, letter(n)).addCallback(outcomes.append)
    assert [o.state for o in outcomes] == ["queued"] * 3 and w.notify.queued("a") == 3
    assert w.health.is_down("a")
    w.notify.deliver(SHARD, letter(4)).addCallback(outcomes.append)  # the mailbox is full
    assert outcomes[-1].state == "failed" and w.notify.lost == 1

    w.health.succeeded("a")  # seen again: oldest first, one at a time
    conn, transport = w.next_connection()
    delivered = []
    for _ in range(3):
        delivered.append(transport.value()[-1:])  # one at a time: the next waits for
        transport.clear()  # this one's answer (and goes on the same kept-alive connection)
        conn.dataReceived(OK)
    assert delivered == [b"1", b"2", b"3"] and w.notify.queued() == 0
    assert len(w.reactor.tcpClients) == w.seen


def test_a_refused_flush_keeps_the_letter_and_expired_ones_are_dropped() -> None:
    w = World()
    w.health.failed("a", "test")
    w.notify.deliver(SHARD, letter(1))
    w.health.succeeded("a")
    w.refuse_next()  # not quite back
    assert w.notify.queued("a") == 1 and w.health.is_down("a")
    w.reactor.advance(61)
    w.health.succeeded("a")
    assert w.notify.queued("a") == 0 and w.notify.lost == 1
    assert len(w.reactor.tcpClients) == w.seen  # nothing sent: it was too old


def test_a_shard_hanging_up_before_answering_gets_it_again_when_back() -> None:
    w = World()
    outcomes: list[Any] = []
    w.notify.deliver(SHARD, letter(1)).addCallback(outcomes.append)
    conn, _ = w.next_connection()
    conn.connectionLost(Failure(ConnectionDone()))  # a stopping Tornado, request unread
    assert outcomes[0].state == "queued" and w.notify.queued("a") == 1
    w.refuse_next()  # the probe kansas started at once: the shard is gone
    assert w.health.is_down("a")
    w.health.succeeded("a")
    _conn, transport = w.next_connection()
    assert transport.value().endswith(b"\r\n\r\n1")


def test_a_shard_hanging_up_mid_answer_had_taken_it() -> None:
    w = World()
    outcomes: list[Any] = []
    w.notify.deliver(SHARD, letter(1)).addCallback(outcomes.append)
    conn, _ = w.next_connection()
    conn.dataReceived(OK[:-5])  # the head and part of the body
    conn.connectionLost(Failure(ConnectionDone()))
    assert outcomes[0].state == "failed" and w.notify.queued() == 0


def test_drained_fires_once_held_notifications_are_out_and_tries_at_once() -> None:
    w = World()
    w.health.failed("a", "restarting")
    w.notify.deliver(SHARD, letter(1))
    fired: list[object] = []
    w.notify.drained("a").addCallback(fired.append)  # a queue creation waits for this
    conn, transport = w.next_connection()  # tried now, though the shard was believed down
    assert transport.value().endswith(b"\r\n\r\n1") and not fired
    conn.dataReceived(OK)
    assert fired == [None] and not w.health.is_down("a")
    assert w.notify.drained("a").called  # nothing held: at once
