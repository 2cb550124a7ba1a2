"""Request ids, counts, trace records and access-log lines of the public listener, without
sockets (the harness of test_proxy: StringTransports on a MemoryReactorClock)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure

from kansas.model import QueueRoute
from kansas.observe import access_log
from kansas.observe.access_log import AccessLog, parse_line
from kansas.observe.live import LiveMetrics
from kansas.observe.recorder import RequestRecorder
from kansas.observe.request_id import RequestIds
from kansas.observe.trace import RecentRequests
from tests.test_proxy import OK, Q1, REALM, Harness, get, ok_reply, refuse, status_and_json

Q2 = "5b0c6c58-1f8c-4c57-9a4a-000000000002"


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.front.recorder = RequestRecorder(None, RecentRequests(), RequestIds(b"test"))
    harness.front.ids = harness.front.recorder.ids
    return harness


def metrics(h: Harness) -> dict[str, Any]:
    live = LiveMetrics(h.front.recorder, h.reactor, front=h.front, parking=h.parking,
                       health=h.health, directory=h.directory, table=h.table,
                       with_process=False)  # fmt: skip
    return {name: {tuple(labels): value for labels, value in samples}
            for name, samples in live.snapshot()["metrics"].items()}  # fmt: skip


def header(raw: bytes, name: bytes) -> list[bytes]:
    head = raw.partition(b"\r\n\r\n")[0]
    return [
        line.partition(b": ")[2]
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(name.lower() + b":")
    ]


def test_a_request_id_goes_to_the_shard_and_back_and_a_forged_one_is_replaced(
    h: Harness,
) -> None:
    h.route()
    client, ct = h.client()  # from 10.1.2.3: not a trusted front
    client.dataReceived(get(extra=b"X-Request-Id: forged-by-a-client\r\n"))
    conn, st = h.shard_connection(9800)
    assert header(st.value(), b"X-Request-Id") == [b"test-1"]  # only kansas's own
    conn.dataReceived(ok_reply(extra=b"X-Request-Id: the-shards-own\r\n"))
    assert header(ct.value(), b"X-Request-Id") == [b"test-1"]  # the same, once
    assert ct.value().endswith(OK)


def test_a_trusted_front_may_name_the_request_if_the_id_is_sane(h: Harness) -> None:
    h.route()
    h.front.trusted_fronts = frozenset({"10.1.2.3"})
    client, ct = h.client()
    client.dataReceived(get(extra=b"X-Request-Id: nginx-8f2e.1\r\n"))
    conn, st = h.shard_connection(9800)
    assert header(st.value(), b"X-Request-Id") == [b"nginx-8f2e.1"]
    conn.dataReceived(ok_reply())
    assert header(ct.value(), b"X-Request-Id") == [b"nginx-8f2e.1"]
    for insane in (b"a" * 129, b"a b", b"-x", b'a"b', b"caf\xc3\xa9"):
        ct.clear()
        st.clear()
        client.dataReceived(get(extra=b"X-Request-Id: %s\r\n" % insane))
        assert header(st.value(), b"X-Request-Id")[0].startswith(b"test-")
        conn.dataReceived(ok_reply())
        assert header(ct.value(), b"X-Request-Id")[0].startswith(b"test-")


def test_answers_kansas_makes_itself_carry_an_id_too(h: Harness) -> None:
    client, ct = h.client()
    client.dataReceived(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    client.dataReceived(b"GET /json/events?queue_id=%20 HTTP/1.1\r\nHost: x\r\n\r\n")
    first, second = ct.value().split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"404 ") and b"\r\nX-Request-Id: test-1\r\n" in first
    assert second.startswith(b"400 ") and b"\r\nX-Request-Id: test-2\r\n" in second


def test_counts_per_shard_match_what_was_done(h: Harness) -> None:
    h.route(Q1, "a")  # mapped on a; Q2 unmapped: the realm's home, b
    client, ct = h.client()
    client.dataReceived(get(Q1))
    conn_a, _ = h.shard_connection(9800)
    conn_a.dataReceived(ok_reply())
    client.dataReceived(get(Q1))
    conn_a.dataReceived(ok_reply())
    client.dataReceived(get(Q2))
    conn_b, _ = h.shard_connection(9801)
    conn_b.dataReceived(ok_reply())
    client.dataReceived(b"POST /json/events HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    client.dataReceived(b"GET /api/internal/notify_tornado HTTP/1.1\r\nHost: x\r\n\r\n")
    # A long-poll held by shard a right now.
    holder, _ = h.client()
    holder.dataReceived(get(Q1))
    got = metrics(h)
    requests = got["kansas_requests_total"]
    assert requests == {
        ("public", "a", "GET", "events", "200"): 2,
        ("public", "b", "GET", "events", "200"): 1,
        ("public", "none", "POST", "events", "405"): 1,
        ("public", "none", "GET", "internal", "403"): 1,
    }
    assert got["kansas_routed_total"] == {("public", "queue-mapping"): 2, ("public", "fallback"): 1}
    # get() polls without dont_block: long-polls, in their own histogram.
    assert got["kansas_longpoll_duration_seconds"][("a",)][0][0] == 2  # <= 10 ms (no time)
    assert got["kansas_longpolls_held"] == {("a",): 1, ("b",): 0}
    assert got["kansas_client_connections"] == {(): 2}
    # Q1 was found in the store once, then served from the cache; Q2 was not in either.
    assert got["kansas_route_cache_hits_total"] == {(): 2}
    assert got["kansas_route_cache_misses_total"] == {(): 2}
    assert got["kansas_shard_up"] == {("a",): 1, ("b",): 1}
    assert ct.value().count(b"HTTP/1.1 ") == 5


def test_parked_requests_and_health_per_shard(h: Harness) -> None:
    h.route()
    client, _ = h.client()
    client.dataReceived(get())
    refuse(h, 0)
    got = metrics(h)
    assert got["kansas_parked_requests"] == {("a",): 1, ("b",): 0}
    assert got["kansas_shard_up"] == {("a",): 0, ("b",): 1}
    assert got["kansas_longpolls_held"] == {("a",): 0, ("b",): 0}
    h.reactor.advance(50)  # its deadline: the empty success
    got = metrics(h)
    assert got["kansas_parked_requests"] == {("a",): 0, ("b",): 0}
    assert got["kansas_parked_expired_total"] == {(): 1}
    assert got["kansas_requests_total"] == {("public", "a", "GET", "events", "200"): 1}
    assert got["kansas_longpoll_duration_seconds"][("a",)][1] == 50.0  # parking included


def test_a_client_that_leaves_is_counted_499_and_a_cut_answer_502(h: Harness) -> None:
    h.route()
    client, _ = h.client()
    client.dataReceived(get())
    h.shard_connection(9800)
    client.connectionLost(Failure(ConnectionDone()))
    other, _ = h.client()
    other.dataReceived(get())
    conn2, _ = h.shard_connection(9800)
    conn2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{")  # fmt: skip
    conn2.connectionLost(Failure(ConnectionDone()))  # the shard hangs up mid-answer
    other.connectionLost(Failure(ConnectionDone()))
    assert metrics(h)["kansas_requests_total"] == {
        ("public", "a", "GET", "events", "499"): 1,
        ("public", "a", "GET", "events", "502"): 1,
    }


def test_an_invalidated_queue_is_counted_by_its_old_shard(h: Harness) -> None:
    h.store.put(QueueRoute(Q1, "a", REALM, 1, 600, invalid=True))
    client, ct = h.client()
    client.dataReceived(get())
    assert status_and_json(ct.value())[1]["code"] == "BAD_EVENT_QUEUE_ID"
    got = metrics(h)
    assert got["kansas_invalidated_answers_total"] == {("a",): 1}
    assert got["kansas_requests_total"] == {("public", "a", "GET", "events", "400"): 1}
    assert "kansas_routed_total" not in got or not got["kansas_routed_total"]  # not sent
    recent = h.front.recorder.recent
    assert recent is not None
    [record] = recent.get(Q1)
    assert (record["shard"], record["rule"], record["status"]) == ("a", "invalidated", 400)
    _conn, st = h.shard_connection(9800)  # kansas's own DELETE, with the request's id
    assert st.value().startswith(b"DELETE ") and header(st.value(), b"X-Request-Id") == [b"test-1"]


def test_recent_requests_of_a_queue(h: Harness) -> None:
    h.route()
    client, _ = h.client()
    client.dataReceived(get())
    conn, _ = h.shard_connection(9800)
    h.reactor.advance(0.25)
    conn.dataReceived(ok_reply())
    recent = h.front.recorder.recent
    assert recent is not None
    assert recent.get(Q1) == [
        {"ts": 0.25, "id": "test-1", "listener": "public", "method": "GET", "status": 200,
         "shard": "a", "rule": "queue-mapping", "realm": REALM, "route_ms": 0.0,
         "backend_ms": 250.0, "total_ms": 250.0}
    ]  # fmt: skip


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_access_log_lines_say_which_rule_chose_the_shard(
    h: Harness, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(access_log, "log", Logger(access_log.NAMESPACE, observer=events.append))
    h.front.recorder.access_log = AccessLog(fmt)
    h.route(Q1, "a")
    client, _ = h.client()
    client.dataReceived(get(Q1) + get(Q2))
    conn_a, _ = h.shard_connection(9800)
    h.reactor.advance(0.5)
    conn_a.dataReceived(ok_reply())
    conn_b, _ = h.shard_connection(9801)
    conn_b.dataReceived(ok_reply())
    assert [e["log_level"].name for e in events] == ["info", "info"]
    lines = [formatEvent(e) for e in events]
    if fmt == "text":
        assert lines[0] == (
            f"test-1 public GET events queue={Q1} realm={REALM} shard=a rule=queue-mapping "
            "status=200 route=0.0ms backend=500.0ms total=500.0ms bytes=134"
        )
        assert "shard=b rule=fallback status=200" in lines[1]
        return
    first, second = (json.loads(line) for line in lines)
    assert first == {
        "ts": "1970-01-01T00:00:00.500Z", "id": "test-1", "listener": "public",
        "method": "GET", "kind": "events", "longpoll": True, "queue": Q1, "realm": REALM,
        "shard": "a", "rule": "queue-mapping", "status": 200, "route_ms": 0.0,
        "backend_ms": 500.0, "total_ms": 500.0, "bytes": 134,
    }  # fmt: skip
    assert (second["id"], second["shard"], second["rule"]) == ("test-2", "b", "fallback")
    # As twistd's file observer writes it, and read back:
    line = f"2026-11-25T10:40:07+0000 [kansas.access#info] {json.dumps(first)}"
    assert parse_line(line) == first
    assert parse_line("2026-11-25T10:40:07+0000 [kansas.tap#info] {}") is None


def test_no_access_log_line_unless_asked(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(access_log, "log", Logger(access_log.NAMESPACE, observer=events.append))
    h.route()
    client, _ = h.client()
    client.dataReceived(get())
    conn, _ = h.shard_connection(9800)
    conn.dataReceived(ok_reply())
    assert events == []
