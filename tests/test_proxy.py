"""The hot path without sockets: FrontProtocol and BackendPool on a MemoryReactorClock.

Client and shard connections are StringTransports; the test plays the shard.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from kansas.health import HealthMonitor
from kansas.model import Assignment, QueueRoute, Shard
from kansas.proxy.backend import BackendConnection, BackendPool, _Connecting
from kansas.proxy.forwarding import EventRouter
from kansas.proxy.front import FrontFactory, FrontProtocol
from kansas.proxy.parking import Parking
from kansas.proxy.sending import send_now
from kansas.routes import RouteTable
from kansas.stores.memory import MemoryRouteStore

Q1 = "5b0c6c58-1f8c-4c57-9a4a-000000000001"
REALM = "chat.example.com"
OK = b'{"result":"success","msg":"","events":[]}'


def ok_reply(body: bytes = OK, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
        % (extra, len(body), body)
    )


class Harness:
    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.store = MemoryRouteStore(self.reactor)
        self.table = RouteTable(self.store, self.reactor)
        shards = {
            "a": Shard("a", "http://127.0.0.1:9800"),
            "b": Shard("b", "http://127.0.0.1:9801"),
        }
        self.directory = SimpleNamespace(current=Assignment(shards, {REALM: "b"}))
        self.router = EventRouter(self.table, self.directory)  # type: ignore[arg-type]
        self.pool = BackendPool(self.reactor)
        self.health = HealthMonitor(self.reactor, self.directory)  # type: ignore[arg-type]
        self.parking = Parking(self.reactor, self.health, max_parked=2, release_rate=100)
        self.health.start()
        self.front = FrontFactory(self.router, self.pool, self.reactor, self.health, self.parking)
        self.connected = 0

    def client(self) -> tuple[FrontProtocol, StringTransport]:
        proto = self.front.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.1.2.3", 5555))
        proto.makeConnection(transport)
        return proto, transport

    def shard_connection(self, port: int) -> tuple[BackendConnection, StringTransport]:
        """Accept the newest connection kansas opened (it must be to ``port``)."""
        assert len(self.reactor.tcpClients) > self.connected, "kansas opened no connection"
        host, got_port, factory, _timeout, _bind = self.reactor.tcpClients[self.connected]
        self.connected += 1
        assert (host, got_port) == ("127.0.0.1", port)
        conn = factory.buildProtocol(None)
        transport = StringTransport()
        conn.makeConnection(transport)
        return conn, transport

    def route(self, queue_id: str = Q1, shard: str = "a") -> None:
        self.store.put(QueueRoute(queue_id, shard, REALM, 1, 600))


def get(queue_id: str = Q1, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return (
        b"GET /json/events?queue_id=%s&last_event_id=-1 HTTP/%s\r\nHost: Chat.Example.com\r\n"
        b"X-Real-Ip: 6.6.6.6\r\n%s\r\n" % (queue_id.encode(), version, extra)
    )


def status_and_json(raw: bytes) -> tuple[int, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_relays_by_mapping_and_reuses_the_shard_connection(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    client.dataReceived(get())
    conn, st = h.shard_connection(9800)
    sent = st.value()
    assert sent.startswith(
        b"GET /json/events?queue_id=%s&last_event_id=-1 HTTP/1.1\r\n" % Q1.encode()
    )
    assert b"X-Real-Ip: 10.1.2.3\r\n" in sent and b"6.6.6.6" not in sent
    assert b"Host: Chat.Example.com\r\n" in sent
    conn.dataReceived(ok_reply(extra=b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n"))
    out = ct.value()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(OK)
    assert b"Keep-Alive" not in out and b"Connection" not in out
    assert h.pool.idle_count(("127.0.0.1", 9800)) == 1

    ct.clear()
    st.clear()
    client.dataReceived(get())
    assert len(h.reactor.tcpClients) == 1  # reused, no new connection
    assert st.value().startswith(b"GET ")
    conn.dataReceived(ok_reply())
    assert ct.value().endswith(OK)
    assert not ct.disconnecting


def test_a_client_leaving_aborts_its_long_poll_upstream(h: Harness) -> None:
    h.route()
    client, _ct = h.client()
    client.dataReceived(get())
    conn, st = h.shard_connection(9800)
    client.connectionLost(Failure(ConnectionDone()))
    assert st.disconnected  # aborted: the shard frees the parked request
    conn.connectionLost(Failure(ConnectionDone()))
    assert h.pool.idle_count() == 0 and not h.pool._busy


def test_unknown_queue_goes_to_the_realm_home_and_is_recorded(h: Harness) -> None:
    client, ct = h.client()
    client.dataReceived(get())
    conn, _ = h.shard_connection(9801)  # the realm is pinned to b
    conn.dataReceived(ok_reply())
    assert ct.value().endswith(OK)
    recorded = h.store.get(Q1).result
    assert recorded == QueueRoute(Q1, "b", REALM, None, 600)


def test_an_unknown_queue_the_shard_rejects_is_not_recorded(h: Harness) -> None:
    client, ct = h.client()
    client.dataReceived(get())
    conn, _ = h.shard_connection(9801)
    body = json.dumps({"result": "error", "msg": f"Bad event queue ID: {Q1}",
                       "code": "BAD_EVENT_QUEUE_ID", "queue_id": Q1}).encode()  # fmt: skip
    conn.dataReceived(ok_reply(body).replace(b"200 OK", b"400 Bad Request"))
    assert status_and_json(ct.value())[1]["code"] == "BAD_EVENT_QUEUE_ID"
    assert h.store.get(Q1).result is None


def test_delete_forgets_the_mapping(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    body = b"queue_id=" + Q1.encode()
    client.dataReceived(
        b"DELETE /api/v1/events HTTP/1.1\r\nHost: chat.example.com\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    conn, st = h.shard_connection(9800)
    assert st.value().endswith(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    conn.dataReceived(ok_reply(b'{"result":"success","msg":""}'))
    assert status_and_json(ct.value())[0] == 200
    assert h.store.get(Q1).result is None and h.table.cached(Q1) is None


def refuse(h: Harness, index: int) -> None:
    """The shard refuses kansas's connection number ``index``."""
    _host, _port, factory, _t, _b = h.reactor.tcpClients[index]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    h.connected = max(h.connected, index + 1)


def delete(queue_id: str = Q1) -> bytes:
    return b"DELETE /json/events?queue_id=%s HTTP/1.1\r\nHost: x\r\n\r\n" % queue_id.encode()


def test_a_delete_to_an_unreachable_shard_is_a_json_502(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    client.dataReceived(delete())
    refuse(h, 0)
    status, body = status_and_json(ct.value())
    assert status == 502 and body["code"] == "BAD_GATEWAY" and "a" in body["msg"]
    assert not ct.disconnecting  # the client's connection stays usable
    assert h.health.is_down("a")
    ct.clear()
    client.dataReceived(delete())  # known down: answered at once, no connection tried
    assert status_and_json(ct.value())[0] == 502 and len(h.reactor.tcpClients) == 1


def test_a_get_for_a_down_shard_waits_and_is_replayed_when_it_is_back(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    client.dataReceived(get())
    refuse(h, 0)
    assert ct.value() == b"" and h.parking.parked("a") == 1 and h.health.is_down("a")
    h.reactor.advance(1.0)  # the health probe runs ...
    probe = h.reactor.tcpClients[-1][2]
    probe.clientConnectionFailed(None, Failure(ConnectionRefusedError()))  # ... still down
    h.reactor.advance(1.0)
    probe = h.reactor.tcpClients[-1][2]
    h.connected = len(h.reactor.tcpClients)
    probe.buildProtocol(None).makeConnection(StringTransport())  # ... and now it answers
    assert not h.health.is_down("a")  # and the parked GET is replayed at once
    conn, st = h.shard_connection(9800)
    assert st.value().startswith(b"GET /json/events?queue_id=")
    conn.dataReceived(ok_reply())
    assert ct.value().endswith(OK) and h.parking.parked() == 0


def test_a_parked_get_gets_an_empty_success_at_its_deadline(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    client.dataReceived(get())
    refuse(h, 0)
    h.reactor.advance(49.9)
    for _host, _port, factory, _t, _b in h.reactor.tcpClients[1:]:
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert ct.value() == b""
    h.reactor.advance(0.1)
    status, body = status_and_json(ct.value())
    assert (status, body) == (200, {"result": "success", "msg": "", "events": [], "queue_id": Q1})
    assert h.parking.parked() == 0 and h.parking.expired == 1


def test_a_client_leaving_while_parked_is_dropped_at_once(h: Harness) -> None:
    h.route()
    client, _ = h.client()
    client.dataReceived(get())
    refuse(h, 0)
    assert h.parking.parked("a") == 1
    client.connectionLost(Failure(ConnectionDone()))
    assert h.parking.parked("a") == 0
    assert not h.reactor.getDelayedCalls() or all(
        c.func != h.parking._expired for c in h.reactor.getDelayedCalls()
    )


def test_a_full_lot_answers_503_with_retry_after(h: Harness) -> None:
    h.route()
    h.health.failed("a", "test")
    for _ in range(2):  # max_parked=2 in the harness
        client, ct = h.client()
        client.dataReceived(get())
        assert ct.value() == b""
    client, ct = h.client()
    client.dataReceived(get())
    assert ct.value().startswith(b"HTTP/1.1 503 ") and b"Retry-After: 10\r\n" in ct.value()
    assert status_and_json(ct.value())[1]["code"] == "SHARD_UNAVAILABLE"


def test_a_long_poll_cut_by_a_restarting_shard_waits_too(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    client.dataReceived(get())
    conn, _ = h.shard_connection(9800)
    conn.connectionLost(Failure(ConnectionDone()))  # Tornado's SIGTERM drops long-polls
    assert ct.value() == b"" and h.parking.parked("a") == 1
    probe = h.reactor.tcpClients[-1][2]  # kansas asks at once whether the shard is going
    probe.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert h.health.is_down("a")


def test_release_is_rate_limited(h: Harness) -> None:
    h.parking.max_parked = 100
    h.route()
    h.health.failed("a", "test")
    clients = [h.client() for _ in range(20)]
    for client, _ in clients:
        client.dataReceived(get())
    h.connected = len(h.reactor.tcpClients)
    h.health.succeeded("a")  # back: 100/s, so 5 per 50 ms tick
    assert len(h.reactor.tcpClients) - h.connected == 5
    h.reactor.advance(0.05)
    assert len(h.reactor.tcpClients) - h.connected == 10
    h.reactor.advance(0.1)
    assert len(h.reactor.tcpClients) - h.connected == 20
    assert h.parking.released == 20


def test_parking_never_outlasts_the_clients_patience(h: Harness) -> None:
    h.route()
    h.front.park_timeout = 80.0
    client, ct = h.client()
    client.dataReceived(get())
    conn, _ = h.shard_connection(9800)
    h.reactor.advance(40)  # a long-poll held by the shard for 40 s, then cut
    conn.connectionLost(Failure(ConnectionDone()))
    h.health.failed("a", "test")
    h.reactor.advance(44.9)
    assert ct.value() == b""
    h.reactor.advance(0.2)  # 85 s after the request arrived, not 40 + 80
    assert status_and_json(ct.value())[0] == 200


def test_non_json_reply_is_replaced_and_its_connection_dropped(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    client.dataReceived(get())
    conn, st = h.shard_connection(9800)
    conn.dataReceived(
        b"HTTP/1.1 500 Oops\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\n<b>x"
    )
    status, body = status_and_json(ct.value())
    assert status == 502 and "not JSON" in body["msg"]
    assert st.disconnected


def test_garbage_from_the_shard_is_a_502(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    client.dataReceived(get())
    conn, st = h.shard_connection(9800)
    conn.dataReceived(b"\x00\x01garbage\r\n\r\n")
    assert status_and_json(ct.value())[0] == 502 and st.disconnected


def test_shard_that_hangs_is_cut_at_the_backend_timeout(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    client.dataReceived(get())
    _conn, st = h.shard_connection(9800)
    h.reactor.advance(149)
    assert ct.value() == b""
    h.reactor.advance(1)
    assert status_and_json(ct.value())[0] == 502 and st.disconnected


def test_failure_mid_response_cuts_the_client(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    client.dataReceived(get())
    conn, _ = h.shard_connection(9800)
    conn.dataReceived(ok_reply()[:-5])
    conn.connectionLost(Failure(ConnectionDone()))
    assert ct.disconnected


def test_chunked_reply_rechunked_for_11_and_closed_for_10(h: Harness) -> None:
    h.route()
    chunked = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'3\r\n{"a\r\n5\r\n":1}\n\r\n0\r\n\r\n'
    )
    client, ct = h.client()
    client.dataReceived(get())
    conn, _ = h.shard_connection(9800)
    conn.dataReceived(chunked)
    assert ct.value().endswith(
        b'Transfer-Encoding: chunked\r\n\r\n3\r\n{"a\r\n5\r\n":1}\n\r\n0\r\n\r\n'
    )
    old, ot = h.client()
    old.dataReceived(get(version=b"1.0"))
    conn.dataReceived(chunked)  # the idle connection is reused
    out = ot.value()
    assert b"Connection: close\r\n" in out and out.endswith(b'\r\n\r\n{"a":1}\n')
    assert ot.disconnecting


def test_stale_kept_alive_connection_is_retried_once(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    client.dataReceived(get())
    conn, _ = h.shard_connection(9800)
    conn.dataReceived(ok_reply())
    ct.clear()
    client.dataReceived(get())  # goes out on the idle connection ...
    conn.connectionLost(Failure(ConnectionDone()))  # ... which the shard had closed
    conn2, st2 = h.shard_connection(9800)
    assert st2.value().startswith(b"GET ")
    conn2.dataReceived(ok_reply())
    assert ct.value().endswith(OK)


def test_pipelined_requests_answer_in_order(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    client.dataReceived(get() + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, _ = h.shard_connection(9800)
    assert ct.value() == b""  # the 404 waits for the first answer
    conn.dataReceived(ok_reply())
    first, second = ct.value().split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"200") and second.startswith(b"404")


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /json/events HTTP/1.1\r\nHost: x\r\n\r\n", 400, "BAD_REQUEST"),
        (
            b"GET /json/events?queue_id=%3Cx%3E HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
            "BAD_EVENT_QUEUE_ID",
        ),
        (
            b"GET /json/events?queue_id=abc&last_event_id=1x HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
            "BAD_REQUEST",
        ),
        (b"GET /json/events?queue_id=abc HTTP/1.1\r\n\r\n", 400, "BAD_REQUEST"),
        (b"PUT /json/events?queue_id=abc HTTP/1.1\r\nHost: x\r\n\r\n", 405, "BAD_REQUEST"),
        (b"POST /api/v1/events/internal HTTP/1.1\r\nHost: x\r\n\r\n", 403, "UNAUTHORIZED"),
        (b"GET /api/internal/notify_tornado HTTP/1.1\r\nHost: x\r\n\r\n", 403, "UNAUTHORIZED"),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 404, "NOT_FOUND"),
        (b"DELETE /json/events HTTP/1.1\r\nContent-Length: 999999\r\n\r\n", 413, "BAD_REQUEST"),
        (b"\x16\x03\x01garbage\r\n\r\n", 400, "BAD_REQUEST"),
        (b"GET /json/events?queue_id=abc HTTP/1.1\r\nHost: \r\n\r\n", 400, "BAD_REQUEST"),
        (b"GET /json/events?queue_id=abc HTTP/1.1\r\nHost: a\xffb\r\n\r\n", 400, "BAD_REQUEST"),
        (
            b"GET /json/events?queue_id=abc HTTP/1.1\r\nHost: " + b"a" * 300 + b"\r\n\r\n",
            400,
            "BAD_REQUEST",
        ),
        (b"GET /json/events?queue_id=a\x01b HTTP/1.1\r\nHost: x\r\n\r\n", 400, "BAD_REQUEST"),
        (b"GET /json/events?queue_id=abc HTTP/1.1\r\nHost: x\rEvil: 1\r\n\r\n", 400, "BAD_REQUEST"),
    ],
)
def test_bad_requests_get_json_errors(h: Harness, raw: bytes, status: int, code: str) -> None:
    client, ct = h.client()
    client.dataReceived(raw)
    got_status, body = status_and_json(ct.value())
    assert (got_status, body["result"], body["code"]) == (status, "error", code)
    assert h.reactor.tcpClients == []


def test_no_shard_for_the_realm_is_503(h: Harness) -> None:
    h.directory.current = Assignment()
    client, ct = h.client()
    client.dataReceived(get())
    status, body = status_and_json(ct.value())
    assert status == 503 and body["code"] == "SHARD_UNAVAILABLE"


def test_expect_continue(h: Harness) -> None:
    h.route()
    client, ct = h.client()
    client.dataReceived(
        b"DELETE /json/events HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % len(b"queue_id=" + Q1.encode())
    )
    assert ct.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    client.dataReceived(b"queue_id=" + Q1.encode())
    _conn, st = h.shard_connection(9800)
    assert b"Expect" not in st.value()


def test_idle_and_slow_connections_are_reaped_busy_ones_are_not(h: Harness) -> None:
    h.route()
    h.front.startFactory()
    _idle, it = h.client()
    slow, slt = h.client()
    slow.dataReceived(b"GET /json/ev")  # never finishes its head
    busy, bt = h.client()
    busy.dataReceived(get())
    h.reactor.advance(80)
    assert it.disconnecting and slt.disconnecting and not bt.disconnecting
    h.front.stopFactory()


class FakeSocketTransport(FileDescriptor):
    """A FileDescriptor whose kernel takes at most ``room`` bytes per send."""

    def __init__(self, room: int) -> None:
        super().__init__(reactor=MemoryReactorClock())
        self.connected = True
        self.room = room
        self.sent: list[bytes] = []

    def writeSomeData(self, data: bytes) -> int:
        taken = bytes(data[: self.room])
        self.sent.append(taken)
        return len(taken)


def test_send_now_sends_at_once_and_buffers_only_the_rest() -> None:
    whole = FakeSocketTransport(room=100)
    send_now(whole, b"x" * 10)
    assert whole.sent == [b"x" * 10] and not whole._tempDataLen
    partial = FakeSocketTransport(room=4)
    send_now(partial, b"abcdefgh")
    assert partial.sent == [b"abcd"] and partial._tempDataBuffer == [b"efgh"]
    send_now(partial, b"ij")  # something is queued: keep the order, buffer behind it
    assert partial.sent == [b"abcd"] and partial._tempDataBuffer == [b"efgh", b"ij"]


def test_a_slow_head_is_dropped_after_the_header_timeout(h: Harness) -> None:
    h.front.startFactory()
    _idle, it = h.client()
    slow, st = h.client()
    slow.dataReceived(b"GET /json/events?queue_id=abc HTTP/1.1\r\n")
    h.reactor.advance(5)
    slow.dataReceived(b"Host: x\r\n")  # trickling bytes does not reset the clock
    h.reactor.advance(6)
    assert st.disconnecting and not it.disconnecting
    h.front.stopFactory()


def test_no_burst_when_releasing_resumes_after_a_pause(h: Harness) -> None:
    h.parking.max_parked = 100
    h.route()
    h.health.failed("a", "test")
    for client, _ in [h.client() for _ in range(50)]:
        client.dataReceived(get())

    def replayed() -> int:
        return sum(isinstance(c[2], _Connecting) for c in h.reactor.tcpClients)

    h.health.succeeded("a")  # 100/s: 5 now
    assert replayed() == 5
    h.health.failed("a", "flapped")
    h.reactor.advance(3.0)  # a pause: the bucket must not bank these 3 s
    h.health.succeeded("a")
    assert replayed() == 10


def test_an_unmapped_queue_of_a_split_realm_is_looked_for_on_each_of_its_shards(
    h: Harness,
) -> None:
    shards = h.directory.current.shards
    h.directory.current = Assignment(shards, realm_splits={REALM: ("a", "b")})
    client, ct = h.client()
    client.dataReceived(get())
    first, _ = h.shard_connection(9800)  # user 0's shard of the split
    body = json.dumps({"result": "error", "msg": f"Bad event queue ID: {Q1}",
                       "code": "BAD_EVENT_QUEUE_ID", "queue_id": Q1}).encode()  # fmt: skip
    first.dataReceived(ok_reply(body).replace(b"200 OK", b"400 Bad Request"))
    assert ct.value() == b""  # not relayed: the next shard of the realm is asked
    second, st = h.shard_connection(9801)
    assert st.value().startswith(b"GET /json/events?queue_id=")
    second.dataReceived(ok_reply())
    assert ct.value().endswith(OK)
    assert h.store.get(Q1).result == QueueRoute(Q1, "b", REALM, None, 600)


def test_the_last_shard_of_the_realm_has_the_last_word(h: Harness) -> None:
    shards = h.directory.current.shards
    h.directory.current = Assignment(shards, realm_splits={REALM: ("a", "b")})
    client, ct = h.client()
    client.dataReceived(get())
    reject = ok_reply(b'{"result":"error","msg":"no","code":"BAD_EVENT_QUEUE_ID"}').replace(
        b"200 OK", b"400 Bad Request"
    )
    h.shard_connection(9800)[0].dataReceived(reject)
    h.shard_connection(9801)[0].dataReceived(reject)
    assert status_and_json(ct.value())[0] == 400


def test_stopping_answers_waiting_long_polls_and_closes_idle_connections(h: Harness) -> None:
    h.route()
    polling, pt = h.client()
    polling.dataReceived(get())
    _conn, st = h.shard_connection(9800)
    _idle, it = h.client()
    h.front.drain()
    head, _, body = pt.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head
    assert json.loads(body) == {"result": "success", "msg": "", "events": [], "queue_id": Q1}
    assert st.disconnected  # the shard's parked request is dropped with its connection
    assert pt.disconnecting and it.disconnecting


def test_x_accel_redirect_mode_lets_nginx_hold_mapped_long_polls(h: Harness) -> None:
    h.front.accel_prefix = "/internal/tornado/{port}"
    h.route()
    client, ct = h.client()
    client.dataReceived(get())
    head, _, body = ct.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b""
    assert (
        b"X-Accel-Redirect: /internal/tornado/9800/json/events?queue_id=%s&last_event_id=-1"
        % Q1.encode()
    ) in head
    assert h.reactor.tcpClients == []  # kansas does not hold it
    # Unmapped queues and DELETEs are still proxied: kansas must see the answer.
    ct.clear()
    client.dataReceived(get("5b0c6c58-1f8c-4c57-9a4a-00000000ffff"))
    h.shard_connection(9801)
    assert ct.value() == b""


def test_x_accel_redirect_waits_for_a_down_shard_too(h: Harness) -> None:
    h.front.accel_prefix = "/internal/tornado/{port}"
    h.route()
    h.health.failed("a", "restarting")
    client, ct = h.client()
    client.dataReceived(get())
    assert ct.value() == b"" and h.parking.parked("a") == 1
    h.health.succeeded("a")
    assert b"X-Accel-Redirect: /internal/tornado/9800/" in ct.value()


def test_head_and_body_limits_are_the_listeners_settings(h: Harness) -> None:
    h.front.max_head, h.front.max_body = 2048, 10
    client, ct = h.client()
    client.dataReceived(b"GET /json/events?queue_id=x HTTP/1.1\r\nX: " + b"a" * 3000)
    assert status_and_json(ct.value())[0] == 431
    client, ct = h.client()
    client.dataReceived(b"DELETE /json/events HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert status_and_json(ct.value())[0] == 413


def test_only_a_trusted_front_may_name_the_client(h: Harness) -> None:
    h.route()
    h.front.trusted_fronts = frozenset({"10.1.2.3"})  # the harness's client address
    client, _ = h.client()
    client.dataReceived(get())  # carries X-Real-Ip: 6.6.6.6
    _conn, st = h.shard_connection(9800)
    assert b"X-Real-Ip: 6.6.6.6\r\n" in st.value()


def test_a_get_replayed_after_parking_is_answered_within_the_clients_patience(
    h: Harness,
) -> None:
    """A long-poll the shard held for 30 s, cut off (a silent partition noticed, or a
    restart), parked 15 s and replayed: the shard starts its long-poll afresh (up to
    its heartbeat), so kansas answers the empty success 85 s after the request
    arrived instead of letting the client reach its 90 s timeout (seen in the chaos
    run with partitions: one long-poll over 90 s)."""
    h.route()
    client, ct = h.client()
    client.dataReceived(get())
    conn, _ = h.shard_connection(9800)
    h.reactor.advance(30)
    conn.connectionLost(Failure(ConnectionDone()))
    h.health.failed("a", "test")
    assert h.parking.parked("a") == 1
    h.reactor.advance(15)
    h.connected = len(h.reactor.tcpClients)
    h.health.succeeded("a")  # back: the GET is sent again
    _conn, st = h.shard_connection(9800)
    assert st.value().startswith(b"GET ")  # sent again
    h.reactor.advance(39)  # 84 s after arrival: the shard still holds it
    assert ct.value() == b""
    h.reactor.advance(2)  # the deadline (85 s) is checked once a second
    assert ct.value(), "no answer 86 s after the request arrived"
    status, body = status_and_json(ct.value())
    assert (status, body["events"]) == (200, []), body


def test_a_shard_marked_down_replays_its_waiting_gets_and_nothing_else(h: Harness) -> None:
    """A silent partition noticed: the GETs waiting at the shard are parked (a GET is
    safe to send again); a notification waiting there is left alone: it may have been
    processed, and failing it as unreachable would have it held and delivered twice
    (2 duplicated events in the chaos run with partitions)."""
    from kansas.proxy.backend import CollectedResponse

    h.route()
    client, ct = h.client()
    client.dataReceived(get())
    h.shard_connection(9800)
    notify = CollectedResponse()
    payload = b"POST /api/internal/notify_tornado HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    h.pool.send(("127.0.0.1", 9800), payload, notify, False)
    h.shard_connection(9800)
    h.health.on_down.append(lambda shard, why: h.pool.abandon(shard.address, why))
    h.health.failed("a", "a probe could not connect")
    assert ct.value() == b"" and h.parking.parked("a") == 1
    assert not notify.done.called


def test_a_probe_that_began_before_the_shard_answered_cannot_mark_it_down(h: Harness) -> None:
    """A link that heals while a probe's SYN is lost: the probe fails after another one
    found the shard up; that stale failure must not mark it down again (and re-park
    what was just released, as in the chaos run)."""
    h.health.failed("a", "cut")
    h.health.probe("a")
    stale = h.reactor.tcpClients[-1][2]
    h.reactor.advance(1.5)
    h.health.succeeded("a")  # another probe, or an answer, says it is back
    stale.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert not h.health.is_down("a")
