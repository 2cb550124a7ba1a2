"""kansas holds requests for queues a transparent move is switching (no sockets)."""

from __future__ import annotations

import pytest

from kansas.model import QueueRoute
from tests.test_proxy import OK, Q1, REALM, Harness, get, ok_reply, status_and_json

WALL = 1_764_000_000.0


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    # Markers' deadlines are Unix time; this wall clock follows the reactor's.
    harness.router.wall = harness.front.holding.wall = lambda: WALL + harness.reactor.seconds()
    harness.route()  # Q1 on a
    return harness


def mark(h: Harness, until_in: float = 10.0) -> None:
    until = WALL + h.reactor.seconds() + until_in
    marked = h.store.mark_moving(REALM, "{}", [Q1], "a", "b", until)
    assert marked.result == [Q1]  # type: ignore[attr-defined]


def test_a_held_get_goes_to_the_new_shard_once_the_batch_commits(h: Harness) -> None:
    mark(h)
    client, ct = h.client()
    client.dataReceived(get())
    h.reactor.advance(0.2)
    assert len(h.reactor.tcpClients) == 0 and ct.value() == b""  # held: sent nowhere
    assert len(h.front.holding) == 1
    h.store.end_moving(REALM, None, [Q1], "b", [])
    h.reactor.advance(0.05)
    conn, st = h.shard_connection(9801)
    assert st.value().startswith(b"GET /json/events?queue_id=%s" % Q1.encode())
    conn.dataReceived(ok_reply())
    assert ct.value().endswith(OK)
    assert len(h.front.holding) == 0 and h.front.holding.resumed == 1


def test_a_held_get_goes_back_to_the_old_shard_when_the_batch_rolls_back(h: Harness) -> None:
    mark(h)
    client, _ct = h.client()
    client.dataReceived(get())
    h.reactor.advance(0.1)
    h.store.end_moving(REALM, None, [], "b", [Q1])
    h.reactor.advance(0.05)
    h.shard_connection(9800)


def test_a_held_get_gets_an_empty_success_at_the_batch_deadline(h: Harness) -> None:
    mark(h, until_in=3)
    client, ct = h.client()
    client.dataReceived(get())
    h.reactor.advance(2.9)
    assert ct.value() == b""
    h.reactor.advance(0.2)
    status, body = status_and_json(ct.value())
    assert status == 200
    assert body == {"result": "success", "msg": "", "events": [], "queue_id": Q1}
    assert len(h.front.holding) == 0 and h.front.holding.expired == 1
    # The marker has expired: the next GET goes to the route's shard as usual.
    ct.clear()
    client.dataReceived(get())
    h.shard_connection(9800)


def test_a_client_leaving_while_held_is_forgotten_at_once(h: Harness) -> None:
    mark(h)
    client, _ct = h.client()
    client.dataReceived(get())
    assert len(h.front.holding) == 1
    client.connectionLost()
    assert len(h.front.holding) == 0
    h.store.end_moving(REALM, None, [Q1], "b", [])
    h.reactor.advance(0.1)
    assert len(h.reactor.tcpClients) == 0


def test_a_delete_is_held_too_and_then_sent_to_the_new_shard(h: Harness) -> None:
    mark(h)
    client, ct = h.client()
    body = b"queue_id=" + Q1.encode()
    client.dataReceived(
        b"DELETE /json/events HTTP/1.1\r\nHost: chat.example.com\r\nContent-Type: "
        b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    h.reactor.advance(0.1)
    assert len(h.reactor.tcpClients) == 0
    h.store.end_moving(REALM, None, [Q1], "b", [])
    h.reactor.advance(0.05)
    conn, st = h.shard_connection(9801)
    assert st.value().startswith(b"DELETE /json/events HTTP/1.1\r\n")
    conn.dataReceived(ok_reply(b'{"result":"success","msg":""}'))
    assert ct.value().startswith(b"HTTP/1.1 200 ")
    assert h.store.get(Q1).result is None  # type: ignore[attr-defined]


def test_stopping_answers_held_gets_with_an_empty_success(h: Harness) -> None:
    mark(h)
    client, ct = h.client()
    client.dataReceived(get())
    h.front.drain()
    status, body = status_and_json(ct.value())
    assert status == 200 and body["events"] == [] and body["queue_id"] == Q1
    assert len(h.front.holding) == 0


def test_routes_of_realms_not_moving_stay_a_cache_hit(h: Harness) -> None:
    h.table._remember(QueueRoute(Q1, "a", REALM, 1, 600))
    target = h.router.route(Q1, REALM)
    assert not hasattr(target, "addCallback") and target.shard.name == "a"  # type: ignore[union-attr]
