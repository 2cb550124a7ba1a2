"""A move with a reload answers the long-polls it invalidates at its own pace.

The mover marks queues invalid in Redis at ``--reload-rate``; kansas, which holds the
long-polls of those queues at the old shard, answers each with BAD_EVENT_QUEUE_ID
within a check interval of its marking (not at the old shard's heartbeat), cancels
it there, and DELETEs the queue with the client's credentials.
"""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from kansas.model import Assignment, QueueRoute
from kansas.proxy.invalidation import INTERVAL, LINGER
from tests.test_proxy import OK, REALM, Harness, get, ok_reply, status_and_json

QUEUES = [f"5b0c6c58-1f8c-4c57-9a4a-{n:012d}" for n in range(1, 6)]


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.front.startFactory()
    yield harness
    harness.front.stopFactory()


def moving(h: Harness, realms: frozenset[str] = frozenset({REALM})) -> None:
    current = h.directory.current
    h.directory.current = Assignment(current.shards, current.realm_pins, moving_realms=realms)


def long_polls(h: Harness, count: int) -> list[tuple[object, object, object]]:
    """``count`` clients long-polling their own queue on shard a."""
    polls = []
    for queue_id in QUEUES[:count]:
        h.store.put(QueueRoute(queue_id, "a", REALM, 1, 600))
        client, ct = h.client()
        client.dataReceived(get(queue_id))
        conn, st = h.shard_connection(9800)
        polls.append((ct, conn, st))
    return polls


def test_invalidated_long_polls_are_answered_as_the_mover_marks_them(h: Harness) -> None:
    moving(h)
    polls = long_polls(h, 3)
    h.reactor.advance(INTERVAL)
    assert all(ct.value() == b"" for ct, _, _ in polls)  # nothing invalid yet

    h.store.invalidate(QUEUES[0])  # the mover, at its rate: one now...
    h.reactor.advance(INTERVAL)
    ct, _conn, st = polls[0]
    status, body = status_and_json(ct.value())
    assert (status, body["code"], body["queue_id"]) == (400, "BAD_EVENT_QUEUE_ID", QUEUES[0])
    assert st.disconnected  # cancelled at the old shard
    assert polls[1][0].value() == b"" and polls[2][0].value() == b""

    # ...and its DELETE, with the client's own head, on a new connection to the old shard
    _delete_conn, dt = h.shard_connection(9800)
    assert dt.value().startswith(b"DELETE /json/events?queue_id=%s" % QUEUES[0].encode())
    assert b"X-Real-Ip: 10.1.2.3\r\n" in dt.value()
    counts = {tuple(k): n for k, n in h.front.recorder.counters()[
        "kansas_invalidated_answers_total"]}  # fmt: skip
    assert counts == {("a",): 1}

    h.store.invalidate(QUEUES[1])  # ...the next one later
    h.reactor.advance(INTERVAL)
    assert status_and_json(polls[1][0].value())[0] == 400
    assert polls[2][0].value() == b""


def test_the_last_marks_of_a_move_that_ends_at_once_are_answered(h: Harness) -> None:
    """A one-user move marks its queue and ends before the next check (seen against a
    live Zulip: the long-poll then waited for Tornado's heartbeat)."""
    moving(h)
    (ct, _conn, st), = long_polls(h, 1)  # fmt: skip
    h.reactor.advance(INTERVAL)
    h.store.invalidate(QUEUES[0])
    moving(h, frozenset())  # the move ended before the next check
    h.reactor.advance(INTERVAL)
    status, body = status_and_json(ct.value())
    assert (status, body["code"]) == (400, "BAD_EVENT_QUEUE_ID")
    assert st.disconnected
    # LINGER later the realm is not read any more.
    for _ in range(int(LINGER / INTERVAL)):
        h.reactor.advance(INTERVAL)
    reads = []
    h.store.get_many = lambda ids: reads.append(ids)  # type: ignore[method-assign]
    long_polls(h, 2)
    h.reactor.advance(INTERVAL * 4)
    assert reads == []


def test_long_polls_of_realms_not_moving_are_not_read(h: Harness) -> None:
    polls = long_polls(h, 1)
    h.store.invalidate(QUEUES[0])
    reads = []
    h.store.get_many = lambda ids: reads.append(ids)  # type: ignore[method-assign]
    h.reactor.advance(INTERVAL * 4)
    assert reads == [] and polls[0][0].value() == b""


def test_an_answer_already_on_its_way_is_left_alone(h: Harness) -> None:
    moving(h)
    (ct, conn, st), = long_polls(h, 1)  # fmt: skip
    conn.dataReceived(ok_reply()[:-5])  # the shard's answer has started reaching the client
    h.store.invalidate(QUEUES[0])
    h.reactor.advance(INTERVAL)
    assert not st.disconnected
    conn.dataReceived(ok_reply()[-5:])
    assert ct.value().endswith(OK)


def test_a_long_poll_parked_for_a_down_shard_is_answered_too(h: Harness) -> None:
    moving(h)
    (ct, conn, _st), = long_polls(h, 1)  # fmt: skip
    conn.connectionLost(Failure(ConnectionDone()))  # the old shard restarts: parked
    assert ct.value() == b""
    h.store.invalidate(QUEUES[0])
    h.reactor.advance(INTERVAL)
    assert status_and_json(ct.value())[1]["code"] == "BAD_EVENT_QUEUE_ID"
    assert h.parking.parked("a") == 0
