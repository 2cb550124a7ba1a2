"""Moves with a page reload: the pure parts, the mover over the memory stores (with a
fake clock), and the router's answer for an invalidated queue."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import Clock

from kansas.errors import KansasError
from kansas.model import Assignment, QueueRoute, Shard
from kansas.moves import (
    Mover,
    drain_shard,
    misplaced,
    move_realm,
    move_user,
    pace,
    restart_schedule,
)
from kansas.proxy.forwarding import EventRouter, QueueInvalidated, Target
from kansas.routes import RouteTable
from kansas.stores.memory import MemoryAuthority, MemoryRouteStore

T = TypeVar("T")
REALM = "chat.example.com"


def run(clock: Clock, coro: Coroutine[Any, Any, T], step: float = 0.01, limit: float = 600) -> T:
    """Drive a coroutine to its end by advancing the fake clock (bounded)."""
    d: Deferred[T] = ensureDeferred(coro)
    result: list[Any] = []
    d.addBoth(result.append)
    waited = 0.0
    while not result:
        assert waited < limit, "the coroutine did not finish"
        clock.advance(step)
        waited += step
    if isinstance(result[0], BaseException) or hasattr(result[0], "raiseException"):
        result[0].raiseException()
    return result[0]  # type: ignore[no-any-return]


def routes(n: int, shard: str = "a", realm: str = REALM) -> list[QueueRoute]:
    return [QueueRoute(f"q{i:04d}", shard, realm, i, 600) for i in range(n)]


def stocked(clock: Clock, rs: list[QueueRoute]) -> MemoryRouteStore:
    store = MemoryRouteStore(clock)
    for r in rs:
        store.put(r)
    return store


def authority() -> MemoryAuthority:
    auth = MemoryAuthority()
    auth.migrate()
    auth.add_shard("a", "http://127.0.0.1:9800", 100)
    auth.add_shard("b", "http://127.0.0.1:9801", 100)
    auth.pin_realm(REALM, "a")
    return auth


def test_pace_is_a_fixed_schedule() -> None:
    assert pace(10.0, 0, 50, 10.0) == 0
    assert pace(10.0, 5, 50, 10.0) == pytest.approx(0.1)
    assert pace(10.0, 5, 50, 10.2) == 0  # late: no wait...
    # ...and after a pause the schedule starts again from now: no burst to catch up.
    assert restart_schedule(10.0, 5, 50, 12.0) == pytest.approx(11.9)
    assert pace(11.9, 5, 50, 12.0) == 0 and pace(11.9, 6, 50, 12.0) == pytest.approx(0.02)
    assert restart_schedule(10.0, 5, 50, 10.11) == 10.0  # a little late: the schedule stands
    with pytest.raises(KansasError):
        Mover(MemoryRouteStore(Clock()), Clock(), REALM, 0)


def test_misplaced_follows_the_rules() -> None:
    shards = {n: Shard(n, f"http://127.0.0.1:{p}") for n, p in (("a", 9800), ("b", 9801))}
    assignment = Assignment(shards, {REALM: "b"}, {(REALM, 7): "a"})
    assert misplaced(assignment, QueueRoute("x", "a", REALM, 1))
    assert not misplaced(assignment, QueueRoute("x", "b", REALM, 1))
    assert not misplaced(assignment, QueueRoute("x", "a", REALM, 7))  # the user's override
    assert not misplaced(assignment, QueueRoute("x", "a", REALM, 1, invalid=True))


def test_mover_invalidates_at_the_rate_and_never_twice() -> None:
    clock = Clock()
    clock.advance(1000)
    store = stocked(clock, routes(100))
    mover = Mover(store, clock, REALM, rate=50)
    run(clock, mover.lock())
    assert run(clock, mover.run(lambda r: r.shard == "a")) == 100
    p = mover.progress
    assert p.first is not None and p.last is not None
    assert p.last - p.first == pytest.approx(99 / 50, rel=0.02)  # 50/s, not faster
    assert p.rate() == pytest.approx(50, rel=0.05)
    stored = run(clock, store.routes(REALM))
    assert all(r.invalid for r in stored)
    # Again (a resumed move, or a second mover): nothing left to do.
    again = Mover(store, clock, REALM, rate=50)
    assert run(clock, again.run(lambda r: True)) == 0
    assert run(clock, store.invalidate("q0001")) is False


def test_an_interrupted_move_resumes_where_it_stopped() -> None:
    clock = Clock()
    store = stocked(clock, routes(20))
    first = Mover(store, clock, REALM, rate=10)
    run(clock, first.lock())
    d = ensureDeferred(first.run(lambda r: True))
    for _ in range(95):  # about 10 invalidated, then the operator presses Ctrl-C
        clock.advance(0.01)
    done_first = sum(r.invalid for r in run(clock, store.routes(REALM)))
    assert 9 <= done_first <= 11
    d.addErrback(lambda f: f.trap(CancelledError))
    d.cancel()
    clock.advance(LOCK := 11)  # the lock of the interrupted mover expires
    assert LOCK > 10
    second = Mover(store, clock, REALM, rate=10)
    run(clock, second.lock())
    assert run(clock, second.run(lambda r: True)) == 20 - done_first
    assert all(r.invalid for r in run(clock, store.routes(REALM)))


def test_one_mover_per_realm() -> None:
    clock = Clock()
    store = stocked(clock, routes(3))
    run(clock, Mover(store, clock, REALM, 10, owner="one").lock())
    with pytest.raises(KansasError, match="another move"):
        run(clock, Mover(store, clock, REALM, 10, owner="two").lock())
    run(clock, Mover(store, clock, "other.example.com", 10, owner="two").lock())  # fine


def test_realm_move_pins_then_reloads_only_what_moved() -> None:
    clock = Clock()
    auth = authority()
    auth.move_user(REALM, 3, "a")  # an override elsewhere...
    auth.add_shard("c", "http://127.0.0.1:9802", 100)
    auth.move_user(REALM, 4, "c")  # ...and one that stays put
    rs = [*routes(6), QueueRoute("other", "a", "other.example.com", 1, 600)]
    store = stocked(clock, rs)
    lines: list[str] = []
    progress = run(clock, move_realm(auth, store, clock, REALM, "b", 10, say=lines.append))
    after = auth.load()
    assert after.realm_pins[REALM] == "b"
    assert (REALM, 3) in after.user_overrides and (REALM, 4) in after.user_overrides
    assert after.moving_realms == frozenset()  # the move is over
    invalid = {r.queue_id for r in run(clock, store.routes()) if r.invalid}
    # User 3 keeps its override (to a): it stays. User 4's queue was on a, but its
    # override says c: misplaced, it reloads too (to c). The other realm is untouched.
    assert invalid == {"q0000", "q0001", "q0002", "q0004", "q0005"}
    assert progress.invalidated == 5
    assert [m.state for m in auth.list_moves()] == ["done"]


def test_piecewise_realm_move_goes_by_batches_of_users() -> None:
    clock = Clock()
    auth = authority()
    store = stocked(clock, routes(10))
    seen_overrides: list[int] = []
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if line.startswith("batch"):
            seen_overrides.append(len(auth.load().user_overrides))
        assert auth.load().moving_realms == {REALM}

    job = move_realm(auth, store, clock, REALM, "b", 100, batch=4, interval=1, say=say)
    progress = run(clock, job, step=0.001)
    rate = progress.rate()
    assert rate is not None and rate == pytest.approx(100, rel=0.1)  # no burst after pauses
    batch_lines = [line for line in lines if line.startswith("batch")]
    assert batch_lines == [
        "batch 1/3: 4 user(s) moved, 4 queue(s) invalidated so far",
        "batch 2/3: 4 user(s) moved, 8 queue(s) invalidated so far",
        "batch 3/3: 2 user(s) moved, 10 queue(s) invalidated so far",
    ]
    assert seen_overrides == [4, 8, 10]  # overrides grow batch by batch
    after = auth.load()
    assert after.realm_pins[REALM] == "b" and not after.user_overrides  # the pin replaces them
    assert all(r.invalid for r in run(clock, store.routes(REALM)))


def test_user_move_reloads_that_user_only() -> None:
    clock = Clock()
    auth = authority()
    store = stocked(clock, [*routes(4), QueueRoute("again", "a", REALM, 2, 600)])
    progress = run(clock, move_user(auth, store, clock, REALM, 2, "b", 10))
    assert progress.invalidated == 2
    assert {r.queue_id for r in run(clock, store.routes(REALM)) if r.invalid} == {"q0002", "again"}
    with pytest.raises(KansasError):
        run(clock, move_user(auth, store, clock, REALM, 2, "nope", 10))


def test_drain_moves_pinned_and_hashed_realms_away_at_the_rate() -> None:
    clock = Clock()
    auth = authority()  # REALM pinned to a
    auth.add_shard("c", "http://127.0.0.1:9802", 100)
    auth.split_realm("split.example.com", ["a", "c"])  # left alone: remove lists it
    hashed = [f"h{i}.example.com" for i in range(40)]
    on_a = [r for r in hashed if _hash_home(auth, r) == "a"]
    assert on_a
    rs = [*routes(5), *(QueueRoute(f"x-{r}", "a", r, 1, 600) for r in on_a),
          QueueRoute("s1", "a", "split.example.com", 0, 600)]  # fmt: skip
    store = stocked(clock, rs)
    lines: list[str] = []
    progress = run(clock, drain_shard(auth, store, clock, "a", 50, settle=0, say=lines.append))
    after = auth.load()
    assert after.shards["a"].weight == 0 and auth.drained_shards() == {"a": 100}
    assert after.realm_pins[REALM] in ("b", "c")
    assert f"realm {REALM} pinned to {after.realm_pins[REALM]}" in lines
    invalid = {r.queue_id for r in run(clock, store.routes()) if r.invalid}
    assert invalid == {r.queue_id for r in rs if r.realm != "split.example.com"}
    assert progress.invalidated == len(invalid)
    rate = progress.rate()
    assert rate is not None and rate <= 50 * 1.1
    assert after.moving_realms == frozenset()
    # Run again: nothing left to do; undrain gives the weight back.
    assert run(clock, drain_shard(auth, store, clock, "a", 50, settle=0)).invalidated == 0
    assert auth.undrain_shard("a") == 100


def _hash_home(auth: MemoryAuthority, realm: str) -> str | None:
    from kansas.router import place_queue

    decision = place_queue(auth.load(), realm, None)
    return None if decision is None else decision.shard


class _Directory:
    def __init__(self, assignment: Assignment) -> None:
        self.current = assignment


def _router(clock: Clock, moving: frozenset[str]) -> tuple[EventRouter, MemoryRouteStore]:
    shards = {n: Shard(n, f"http://127.0.0.1:{p}") for n, p in (("a", 9800), ("b", 9801))}
    store = MemoryRouteStore(clock)
    table = RouteTable(store, clock)
    return EventRouter(
        table, _Directory(Assignment(shards, {REALM: "b"}, moving_realms=moving))
    ), store


def _result(value: Target | Deferred[Target]) -> Any:
    if not isinstance(value, Deferred):
        return value
    out: list[Any] = []
    value.addBoth(out.append)
    return out[0]


def test_a_cached_route_of_a_moving_realm_is_read_again() -> None:
    clock = Clock()
    router, store = _router(clock, frozenset({REALM}))
    route = QueueRoute("q1", "a", REALM, 1)
    router.table.record(route)
    assert isinstance(router.route("q1", REALM), Deferred)  # asks Redis: the realm moves
    assert _result(router.route("q1", REALM)).shard.name == "a"
    store.invalidate("q1")  # by a mover, maybe through another kansas
    failure = _result(router.route("q1", REALM))
    assert failure.check(QueueInvalidated)
    assert failure.value.route.queue_id == "q1" and failure.value.shard.name == "a"


def test_a_realm_not_moving_is_served_from_the_cache_and_uncached_when_a_move_ends() -> None:
    clock = Clock()
    router, store = _router(clock, frozenset())
    router.table.record(QueueRoute("q1", "a", REALM, 1))
    router.table.record(QueueRoute("q2", "a", "other.example.com", 1))
    assert isinstance(router.route("q1", REALM), Target)  # the hot path: no Deferred
    store.invalidate("q1")
    directory: Any = router.directory
    moving = Assignment(directory.current.shards, {REALM: "b"}, moving_realms={REALM})
    router.assignment_changed(moving)
    directory.current = moving
    assert router.table.cached("q1") is not None
    done = Assignment(directory.current.shards, {REALM: "b"})
    router.assignment_changed(done)
    directory.current = done
    assert router.table.cached("q1") is None  # the move is over: cached routes dropped
    assert router.table.cached("q2") is not None
    assert _result(router.route("q1", REALM)).check(QueueInvalidated)
    with pytest.raises(QueueInvalidated):
        router.route("q1", REALM)  # now cached as invalid: answered at once
