"""The shard side of transparent moves: the reception state, and a batch between two
demo shards on a fake clock (no sockets)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from kansas.demo.shard import DemoShard, ShardError
from kansas.transparent.protocol import GAP_SECONDS, Cut, Reception, parse_notification_id

JSONDict = dict[str, Any]
ORIGIN = "0123456789abcdef"


def outcome(d: Deferred[JSONDict]) -> JSONDict | Failure | None:
    """What a Deferred fired with so far (None: not yet)."""
    out: list[Any] = []

    def keep(result: Any) -> Any:
        out.append(result)
        return result

    d.addBoth(keep)
    if isinstance(out[0] if out else None, Failure):
        d.addErrback(lambda _: None)  # looked at: not an unhandled error
    return out[0] if out else None


def reply(d: Deferred[JSONDict]) -> JSONDict:
    got = outcome(d)
    assert isinstance(got, dict), got
    return got


# -- reception state ----------------------------------------------------------------


def test_notification_ids_are_parsed_strictly() -> None:
    assert parse_notification_id(f"{ORIGIN}:42") == (ORIGIN, 42)
    for bad in (None, "", "x:1", f"{ORIGIN}:0", f"{ORIGIN}:-1", f"{ORIGIN}", f"{ORIGIN}:1:2"):
        assert parse_notification_id(bad) is None


def test_the_watermark_rises_only_over_a_contiguous_run() -> None:
    r = Reception()
    r.receive("o", 10, now=0.0)  # first contact: what came before is not ours
    assert r.watermarks(0.0) == {"o": 10}
    r.receive("o", 12, now=0.0)
    assert r.watermarks(0.0) == {"o": 10} and r.seen() == {"o": 12}
    assert not r.covers({"o": 12}, now=0.0)
    assert r.covers({"o": 10}, now=0.0)
    cut = r.cut(0.0)
    assert ("o", 9) in cut and ("o", 12) in cut and ("o", 11) not in cut
    assert ("other", 1) not in cut
    r.receive("o", 11, now=1.0)
    assert r.covers({"o": 12}, now=1.0)
    assert not r.covers({"o": 12, "unknown": 1}, now=1.0)


def test_a_gap_that_cannot_be_filled_any_more_is_skipped() -> None:
    r = Reception()
    r.receive("o", 1, now=0.0)
    r.receive("o", 3, now=0.0)
    assert not r.covers({"o": 3}, now=GAP_SECONDS - 1)
    assert r.covers({"o": 3}, now=GAP_SECONDS + 1)


def test_a_cut_survives_json() -> None:
    r = Reception()
    for seq in (5, 6, 8):
        r.receive("o", seq, now=0.0)
    cut = r.cut(0.0)
    again = Cut.from_json(cut.to_json())
    assert again == cut
    with pytest.raises(ValueError):
        Cut.from_json([1])


# -- a batch between two shards -------------------------------------------------------


class Pair:
    """An old shard ``a`` and a new shard ``b`` fed the same notifications."""

    def __init__(self, heartbeat: float = 5) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.a = DemoShard(self.clock, name="a", rng=random.Random(1), heartbeat=heartbeat)
        self.b = DemoShard(self.clock, name="b", rng=random.Random(2), heartbeat=heartbeat)
        self.seq = 0

    def stamp(self) -> tuple[str, int]:
        self.seq += 1
        return (ORIGIN, self.seq)

    def send(self, n: int, users: list[int], to: tuple[DemoShard, ...] | None = None) -> None:
        nid = self.stamp()
        for shard in to if to is not None else (self.a, self.b):
            shard.notify({"type": "message", "n": n}, users, nid)


def ns(events: list[JSONDict]) -> list[int]:
    return [e["n"] for e in events if e["type"] == "message"]


def test_a_batch_moves_a_queue_with_its_ids_and_every_event_once() -> None:
    p = Pair()
    p.send(0, [7])  # both shards learn the origin
    q = p.a.create_queue(7)
    other = p.a.create_queue(8)  # stays on a
    p.send(1, [7])
    p.send(2, [7])
    got = reply(p.a.get_events(q.queue_id, last_event_id=-1))
    assert ns(got["events"]) == [1, 2] and [e["id"] for e in got["events"]] == [0, 1]
    # The client acknowledged both and long-polls.
    poll = p.a.get_events(q.queue_id, last_event_id=1)
    assert outcome(poll) is None

    # In flight: 3 reached b before it started recording, a only later.
    late = p.stamp()
    p.b.notify({"type": "message", "n": 3}, [7], late)
    seen = p.b.prepare("batch-1", lease=30)
    assert seen == {ORIGIN: late[1]}
    fence = p.a.fence(seen, timeout=5)
    assert outcome(fence) is None  # a has not received 3 yet
    p.a.notify({"type": "message", "n": 3}, [7], late)
    assert reply(fence)["received"] == {ORIGIN: late[1]}
    assert ns(reply(poll)["events"]) == [3]

    # 4 reaches both before the freeze: in the export and in b's recording.
    p.send(4, [7])
    exported = p.a.export("batch-1", [q.queue_id, "gone"], lease=30)
    assert exported["missing"] == ["gone"] and exported["moved"] == []
    (state,) = exported["queues"]
    assert ns(state["events"]) == [3, 4] and state["next_event_id"] == 4

    # While frozen: events are kept, not sent; no heartbeat event; GETs do not get events.
    p.send(5, [7, 8])
    frozen_poll = p.a.get_events(q.queue_id, last_event_id=1)
    p.clock.advance(5)  # the heartbeat: an empty answer, not an event
    assert reply(frozen_poll)["events"] == []
    assert reply(p.a.get_events(q.queue_id, dont_block=True))["events"] == []
    assert ns(p.a.queues[other.queue_id].events) == [5]

    imported = p.b.import_queues("batch-1", exported["queues"], Cut.from_json(exported["cut"]))
    assert imported == [q.queue_id]
    moved = p.b.queues[q.queue_id]
    # 3 and 4 from a; 5 from b's recording; 3 and 4 only once.
    assert ns(moved.events) == [3, 4, 5]
    assert [e["id"] for e in moved.events] == [2, 3, 4]
    assert p.a.finish("batch-1", commit=True) == [q.queue_id]
    assert p.b.finish("batch-1", commit=True) == [q.queue_id]
    assert q.queue_id not in p.a.queues

    # The client's next GET continues where it was, on b; later events follow.
    p.send(6, [7])
    after = reply(p.b.get_events(q.queue_id, last_event_id=2))
    assert ns(after["events"]) == [4, 5, 6]
    assert [e["id"] for e in after["events"]] == [3, 4, 5]
    # A stale route to a: "poll again", never BAD_EVENT_QUEUE_ID.
    stale = reply(p.a.get_events(q.queue_id, last_event_id=5))
    assert stale == {"result": "success", "msg": "", "events": [], "queue_id": q.queue_id}
    assert p.a.export("batch-2", [q.queue_id], lease=30)["moved"] == [q.queue_id]


def test_a_rolled_back_batch_leaves_the_old_shard_with_every_event() -> None:
    p = Pair()
    p.send(0, [7])
    q = p.a.create_queue(7)
    p.b.prepare("batch-1", lease=30)
    first = p.a.get_events(q.queue_id, last_event_id=-1)
    exported = p.a.export("batch-1", [q.queue_id], lease=30)
    assert reply(first) == {"result": "success", "msg": "", "events": [], "queue_id": q.queue_id}
    p.send(1, [7])
    poll = p.a.get_events(q.queue_id, last_event_id=-1)
    assert outcome(poll) is None  # parked while frozen, though an event is pending
    p.send(2, [7])
    p.b.import_queues("batch-1", exported["queues"], Cut.from_json(exported["cut"]))
    assert q.queue_id in p.b.queues
    assert p.b.finish("batch-1", commit=False) == [q.queue_id]
    assert q.queue_id not in p.b.queues
    assert p.a.finish("batch-1", commit=False) == [q.queue_id]
    got = reply(poll)
    assert ns(got["events"]) == [1, 2] and [e["id"] for e in got["events"]] == [0, 1]
    p.send(3, [7])
    assert ns(p.a.queues[q.queue_id].events) == [1, 2, 3]


def test_every_step_is_idempotent() -> None:
    p = Pair()
    p.send(0, [7])
    q = p.a.create_queue(7)
    seen = p.b.prepare("batch-1", lease=30)
    p.send(1, [7])
    assert p.b.prepare("batch-1", lease=30) == seen
    first = p.a.export("batch-1", [q.queue_id], lease=30)
    p.send(2, [7])
    assert p.a.export("batch-1", [q.queue_id], lease=30) == first
    cut = Cut.from_json(first["cut"])
    assert p.b.import_queues("batch-1", first["queues"], cut) == [q.queue_id]
    events = list(p.b.queues[q.queue_id].events)
    assert p.b.import_queues("batch-1", first["queues"], cut) == [q.queue_id]
    assert p.b.queues[q.queue_id].events == events  # merged once
    assert ns(events) == [1, 2]
    assert p.a.finish("batch-1", commit=True) == [q.queue_id]
    assert p.a.finish("batch-1", commit=True) == []
    assert p.b.finish("batch-1", commit=True) == [q.queue_id]
    assert p.b.finish("nothing", commit=False) == []


def test_refusals() -> None:
    p = Pair()
    q = p.a.create_queue(7)
    exported = p.a.export("batch-1", [q.queue_id], lease=30)
    with pytest.raises(ShardError) as e:
        p.b.import_queues("batch-1", exported["queues"], Cut({}))
    assert e.value.code == "NOT_PREPARED"  # b restarted, say: its recording is gone
    with pytest.raises(ShardError) as e:
        p.a.export("batch-2", [q.queue_id], lease=30)
    assert e.value.code == "QUEUE_MOVING"
    # b has not yet received a notification a had applied before the freeze.
    p.b.prepare("batch-0", lease=30)
    with pytest.raises(ShardError) as e:
        p.b.import_queues("batch-0", exported["queues"], Cut({ORIGIN: (3, frozenset())}))
    assert e.value.code == "NOT_CAUGHT_UP"
    # A queue b holds already, not imported by this batch.
    p.b.prepare("batch-1", lease=30)
    p.b.queues[q.queue_id] = p.b.create_queue(7)
    with pytest.raises(ShardError) as e:
        p.b.import_queues("batch-1", exported["queues"], Cut({}))
    assert e.value.code == "QUEUE_EXISTS"


def test_a_fence_times_out_with_what_is_missing() -> None:
    p = Pair()
    p.send(0, [7])
    wanted = {ORIGIN: 5}
    d = p.a.fence(wanted, timeout=2)
    p.clock.advance(2)
    failure = outcome(d)
    assert isinstance(failure, Failure) and isinstance(failure.value, ShardError)
    assert failure.value.status == 409 and failure.value.code == "FENCE_TIMEOUT"
    assert failure.value.extra == {"received": {ORIGIN: 1}, "wanted": wanted}


def test_leases_roll_a_forgotten_batch_back() -> None:
    p = Pair(heartbeat=100)
    p.send(0, [7])
    q = p.a.create_queue(7)
    p.b.prepare("batch-1", lease=10)
    exported = p.a.export("batch-1", [q.queue_id], lease=20)
    p.b.import_queues("batch-1", exported["queues"], Cut.from_json(exported["cut"]))
    poll = p.a.get_events(q.queue_id, last_event_id=-1)
    p.send(1, [7])
    p.clock.advance(10)
    assert q.queue_id not in p.b.queues and not p.b.recordings
    assert outcome(poll) is None
    p.clock.advance(10)
    assert ns(reply(poll)["events"]) == [1]  # unfrozen, served as usual
    assert p.a.queues[q.queue_id].frozen_by is None
