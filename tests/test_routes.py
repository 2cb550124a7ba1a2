"""The route table over its store: cache, coalesced expiry pushes, write-behind journal."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from zope.interface import implementer

from kansas.model import QueueRoute
from kansas.routes import RouteTable
from kansas.stores.interface import IRouteStore
from kansas.stores.memory import MemoryRouteStore


@implementer(IRouteStore)
class FlakyStore(MemoryRouteStore):
    """The memory store, with Redis's outages: while ``down``, every call fails."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.down = False
        self.touches = 0

    def put(self, route: QueueRoute) -> Deferred[None]:
        return fail(ConnectionError("redis down")) if self.down else super().put(route)

    def touch(self, route: QueueRoute) -> Deferred[None]:
        self.touches += 1
        return super().touch(route)


def route(n: int, timeout: int = 600) -> QueueRoute:
    return QueueRoute(f"q{n}", "a", "r.example.com", n, timeout)


def make() -> tuple[Clock, FlakyStore, RouteTable]:
    clock = Clock()
    store = FlakyStore(clock)
    return clock, store, RouteTable(store, clock, max_journal=3)


def test_writes_during_an_outage_are_replayed_when_the_store_is_back() -> None:
    clock, store, table = make()
    store.down = True
    table.record(route(1))
    table.record(route(2))
    assert table.journal_size == 2 and table.cached("q1") == route(1)
    clock.advance(1)  # still down: kept
    assert table.journal_size == 2
    store.down = False
    clock.advance(1)
    assert store.get("q1").result == route(1) and store.get("q2").result == route(2)
    assert table.journal_size == 0
    clock.advance(1)  # nothing left: the replayer stops
    assert not clock.getDelayedCalls()


def test_the_journal_is_bounded_and_drops_the_oldest() -> None:
    clock, store, table = make()
    store.down = True
    for n in range(1, 6):
        table.record(route(n))
    assert table.journal_size == 3 and table.journal_dropped == 2
    store.down = False
    clock.advance(1)
    assert store.get("q1").result is None and store.get("q5").result == route(5)


def test_forgotten_and_expired_entries_are_not_replayed() -> None:
    clock, store, table = make()
    store.down = True
    table.record(route(1))
    table.record(route(2, timeout=10))
    table.forget("q1")  # deleted during the outage
    clock.advance(11)  # q2's queue has expired at its shard by now
    store.down = False
    clock.advance(1)
    assert store.get("q1").result is None and store.get("q2").result is None
    assert table.journal_size == 0


def test_expiry_pushes_are_coalesced() -> None:
    clock, store, table = make()
    table.record(route(1))
    for _ in range(100):
        table.seen(route(1))
    assert store.touches == 0  # just written: nothing to push yet
    clock.advance(61)
    for _ in range(100):
        table.seen(route(1))
    assert store.touches == 1
