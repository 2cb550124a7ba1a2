"""Zulip's own port check, met by kansas in front of an unmodified Zulip.

A Tornado process answers a GET of a user it does not own (a realm split over several
ports) with 200, an empty body and ``X-Accel-Redirect: /internal/tornado/<port>...``,
for nginx to replay. kansas follows it to the shard of that port (once), learns the
queue's shard from the answer, and relays what that shard says, BAD_EVENT_QUEUE_ID
included. What it cannot follow is a 502 that is logged and counted.
"""

from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from kansas.model import Assignment, QueueRoute
from tests.test_proxy import OK, Q1, REALM, Harness, get, ok_reply, status_and_json


def redirect(port: int, queue_id: str = Q1) -> bytes:
    location = b"/internal/tornado/%d/json/events?queue_id=%s&last_event_id=-1" % (
        port,
        queue_id.encode(),
    )
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"X-Accel-Redirect: %s\r\nContent-Length: 0\r\n\r\n" % location
    )


def bad_queue() -> bytes:
    body = json.dumps({"result": "error", "msg": f"Bad event queue ID: {Q1}",
                       "code": "BAD_EVENT_QUEUE_ID", "queue_id": Q1}).encode()  # fmt: skip
    return ok_reply(body).replace(b"200 OK", b"400 Bad Request")


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    shards = harness.directory.current.shards
    harness.directory.current = Assignment(shards, realm_splits={REALM: ("a", "b")})
    return harness


def counters(h: Harness, name: str) -> dict[tuple[str, ...], int]:
    return {tuple(k): n for k, n in h.front.recorder.counters()[name]}


def test_a_redirect_is_followed_and_the_queue_is_learned(h: Harness) -> None:
    client, ct = h.client()
    client.dataReceived(get())
    h.shard_connection(9800)[0].dataReceived(redirect(9801))
    assert ct.value() == b""  # neither the redirect nor its empty body reach the client
    owner, st = h.shard_connection(9801)
    assert st.value().startswith(b"GET /json/events?queue_id=%s&last_event_id=-1 " % Q1.encode())
    owner.dataReceived(ok_reply())
    assert ct.value().startswith(b"HTTP/1.1 200 OK\r\n") and ct.value().endswith(OK)
    assert h.store.get(Q1).result == QueueRoute(Q1, "b", REALM, None, 600)
    assert counters(h, "kansas_tornado_redirects_total") == {("a", "b"): 1}
    assert counters(h, "kansas_routed_total")  # recorded under its rule
    assert ("public", "tornado-redirect") in counters(h, "kansas_routed_total")

    ct.clear()
    st.clear()
    client.dataReceived(get())  # learned: straight to b, no redirect
    assert st.value().startswith(b"GET ")
    owner.dataReceived(ok_reply())
    assert ct.value().endswith(OK)
    assert counters(h, "kansas_tornado_redirects_total") == {("a", "b"): 1}


def test_an_unknown_queue_of_a_redirected_user_is_bad_event_queue_id(h: Harness) -> None:
    client, ct = h.client()
    client.dataReceived(get())
    h.shard_connection(9800)[0].dataReceived(redirect(9801))
    h.shard_connection(9801)[0].dataReceived(bad_queue())
    status, body = status_and_json(ct.value())
    assert (status, body["code"], body["queue_id"]) == (400, "BAD_EVENT_QUEUE_ID", Q1)
    assert h.store.get(Q1).result is None
    assert len(h.reactor.tcpClients) == 2  # the owner's word is final: nobody else asked


def test_a_user_of_the_first_shard_found_by_way_of_the_second(h: Harness) -> None:
    """The first shard does not know the queue, the second sends the user back to it:
    its answer (here: the queue is gone) is what the client gets."""
    client, ct = h.client()
    client.dataReceived(get())
    first, _ = h.shard_connection(9800)
    first.dataReceived(bad_queue())
    h.shard_connection(9801)[0].dataReceived(redirect(9800))
    first.dataReceived(bad_queue())  # the idle connection to a, reused
    status, body = status_and_json(ct.value())
    assert (status, body["code"]) == (400, "BAD_EVENT_QUEUE_ID")


def test_a_mapped_queue_whose_shard_redirects_is_moved_to_the_new_shard(h: Harness) -> None:
    h.route(shard="a")
    client, ct = h.client()
    client.dataReceived(get())
    h.shard_connection(9800)[0].dataReceived(redirect(9801))
    h.shard_connection(9801)[0].dataReceived(ok_reply())
    assert ct.value().endswith(OK)
    assert h.store.get(Q1).result.shard == "b"


def test_a_second_redirect_is_a_502_never_a_loop(h: Harness) -> None:
    seen: list[dict[str, object]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        client, ct = h.client()
        client.dataReceived(get())
        h.shard_connection(9800)[0].dataReceived(redirect(9801))
        h.shard_connection(9801)[0].dataReceived(redirect(9800))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    status, body = status_and_json(ct.value())
    assert (status, body["code"]) == (502, "BAD_GATEWAY")
    assert "redirected a request that another shard redirected to it" in body["msg"]
    assert len(h.reactor.tcpClients) == 2
    assert counters(h, "kansas_shard_unusable_answers_total") == {("b", "redirect-loop"): 1}
    warnings = [e for e in seen if e.get("log_level") == LogLevel.warn]
    assert any("redirected a request" in str(e.get("message")) for e in warnings)


@pytest.mark.parametrize(
    ("answer", "problem", "said"),
    [
        (redirect(9999), "redirect-port", "port 9999, which is no known shard's"),
        (redirect(9801).replace(b"/internal/tornado/9801", b"/elsewhere"), "redirect-target",
         "redirected to '/elsewhere"),
    ],
)  # fmt: skip
def test_a_redirect_kansas_cannot_follow_is_a_clear_502(
    h: Harness, answer: bytes, problem: str, said: str
) -> None:
    client, ct = h.client()
    client.dataReceived(get())
    h.shard_connection(9800)[0].dataReceived(answer)
    status, body = status_and_json(ct.value())
    assert status == 502 and said in body["msg"]
    assert b"X-Accel-Redirect" not in ct.value()  # never handed to the front
    assert counters(h, "kansas_shard_unusable_answers_total") == {("a", problem): 1}


def test_answers_that_are_not_json_are_logged_once_a_minute_and_counted(h: Harness) -> None:
    h.route()
    seen: list[dict[str, object]] = []
    globalLogPublisher.addObserver(seen.append)
    html = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nhi"
    try:
        for when in (0, 1, 2, 62):
            h.reactor.advance(when - h.reactor.seconds())
            client, ct = h.client()
            client.dataReceived(get())
            conn, st = h.shard_connection(9800)
            conn.dataReceived(html)
            assert status_and_json(ct.value())[0] == 502 and st.disconnected
            conn.connectionLost(Failure(ConnectionDone()))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [str(e["message"]) for e in seen if e.get("log_level") == LogLevel.warn]
    assert len(lines) == 2, lines
    assert "not JSON" in lines[0] and "and 2 more like it" in lines[1]
    assert counters(h, "kansas_shard_unusable_answers_total") == {("a", "not-json"): 4}
