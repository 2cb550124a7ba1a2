"""The queue -> shard table as the proxy sees it: an in-process cache over the store.

The cache answers almost every request without I/O. The store (Redis) is asked on a
miss, written when a queue is created or found, and its expiry pushed back at most once
per ``touch_interval`` per queue, so the hot path does not write on every request.
Store failures are logged and survived: the cache and the realm fallback carry on.

A mapping that cannot be written (Redis down or restarting) goes into a write-behind
journal, replayed once a second until Redis takes it, so a queue created during an
outage is durable once Redis is back. The journal is bounded (``max_journal``): when
full, its oldest entries are dropped (logged and counted). Such a queue is still
served from this process's cache, and after a restart it is found on its realm's
shards (the fallback) and recorded then; only its user's override could be missed.
Entries older than their queue's timeout are dropped as pointless.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kansas.model import QueueRoute
from kansas.stores.interface import IRouteStore

log = Logger()


class RouteTable:
    def __init__(
        self,
        store: IRouteStore,
        clock: IReactorTime,
        max_cached: int = 500_000,
        touch_interval: float = 60.0,
        max_journal: int = 100_000,
        replay_interval: float = 1.0,
        replay_batch: int = 500,
        recent_seconds: float = 30.0,
    ) -> None:
        self.store = store
        self._clock = clock
        self.max_cached = max_cached
        self.touch_interval = touch_interval
        # queue_id -> [route, when the store's expiry was last pushed back]
        self._cache: dict[str, list[Any]] = {}
        self.store_errors = 0
        #: requests routed from the cache, or not (EventRouter counts; /metrics reads)
        self.hits = 0
        self.misses = 0
        #: cached routes dropped because their realm's move ended
        self.uncached_by_moves = 0
        # queue_id -> (route, when it was recorded): writes Redis has not taken yet
        self._journal: dict[str, tuple[QueueRoute, float]] = {}
        self.max_journal = max_journal
        self.journal_dropped = 0
        self.replay_batch = replay_batch
        self._replaying = False
        self._replayer = LoopingCall(self._replay)
        self._replayer.clock = clock
        self._replay_interval = replay_interval
        #: queue_id -> (route, when): mappings recorded in the last ``recent_seconds``,
        #: written again after a Redis failover (they may have gone to the old master)
        self._recent: dict[str, tuple[QueueRoute, float]] = {}
        self.recent_seconds = recent_seconds
        listeners = getattr(store, "on_master_change", None)
        if listeners is not None:
            listeners.append(self.master_changed)

    def cached(self, queue_id: str) -> QueueRoute | None:
        entry = self._cache.get(queue_id)
        return None if entry is None else entry[0]  # type: ignore[no-any-return]

    def _remember(self, route: QueueRoute) -> None:
        cache = self._cache
        if len(cache) >= self.max_cached and route.queue_id not in cache:
            del cache[next(iter(cache))]  # oldest first: dicts keep insertion order
        cache[route.queue_id] = [route, self._clock.seconds()]

    def remember(self, route: QueueRoute) -> None:
        """Cache a route just read from the store by someone else (no write)."""
        self._remember(route)

    def _store_failed(self, failure: Failure, what: str) -> None:
        self.store_errors += 1
        log.warn("route store {what} failed: {err}", what=what, err=failure.getErrorMessage())

    def fetch(self, queue_id: str) -> Deferred[QueueRoute | None]:
        """Ask the store; None when it has no route or cannot answer."""

        def found(route: QueueRoute | None) -> QueueRoute | None:
            if route is not None:
                self._remember(route)
            return route

        def failed(failure: Failure) -> None:
            self._store_failed(failure, "read")
            return None

        return self.store.get(queue_id).addCallbacks(found, failed)

    def refetch(self, cached: QueueRoute) -> Deferred[QueueRoute]:
        """Read a cached route again from the store (its realm is being moved, so it
        may have been invalidated); if the store cannot answer, or has lost the
        route, the cached one stands."""

        def found(route: QueueRoute | None) -> QueueRoute:
            if route is None:
                return cached
            entry = self._cache.get(route.queue_id)
            if entry is not None:
                entry[0] = route
            return route

        def failed(failure: Failure) -> QueueRoute:
            self._store_failed(failure, "read")
            return cached

        return self.store.get(cached.queue_id).addCallbacks(found, failed)

    def uncache(self, queue_id: str) -> None:
        """Drop a route from the cache only (the store keeps it)."""
        self._cache.pop(queue_id, None)

    def uncache_realms(self, realms: frozenset[str] | set[str]) -> int:
        """Drop every cached route of these realms; how many."""
        gone = [qid for qid, entry in self._cache.items() if entry[0].realm in realms]
        for queue_id in gone:
            del self._cache[queue_id]
        return len(gone)

    def record(self, route: QueueRoute) -> Deferred[None]:
        """Cache a route and write it to the store; fires once written, or once it is
        in the journal for a later write."""
        self._remember(route)
        now = self._clock.seconds()
        recent = self._recent
        recent.pop(route.queue_id, None)
        recent[route.queue_id] = (route, now)
        while recent:
            oldest = next(iter(recent))
            if now - recent[oldest][1] <= self.recent_seconds:
                break
            del recent[oldest]
        d = self.store.put(route)
        d.addErrback(self._write_failed, route)
        return d

    @property
    def journal_size(self) -> int:
        return len(self._journal)

    def _write_failed(self, failure: Failure, route: QueueRoute) -> None:
        self._store_failed(failure, "write")
        if not self._journal:
            log.warn("Redis is not taking writes: queue mappings are journalled for replay")
        self._journal.pop(route.queue_id, None)
        self._journal[route.queue_id] = (route, self._clock.seconds())
        if len(self._journal) > self.max_journal:
            del self._journal[next(iter(self._journal))]  # the oldest goes first
            self.journal_dropped += 1
            if self.journal_dropped % 1000 == 1:
                log.warn("the mapping journal is full: {n} dropped so far", n=self.journal_dropped)
        if not self._replayer.running:
            self._replayer.start(self._replay_interval, now=False)

    def _replay(self) -> None:
        if self._replaying:
            return
        if not self._journal:
            self._replayer.stop()
            return
        now = self._clock.seconds()
        batch = []
        for queue_id, (route, recorded) in list(self._journal.items())[: self.replay_batch]:
            if now - recorded > route.timeout:
                del self._journal[queue_id]  # the shard has dropped the queue by now
                continue
            batch.append((queue_id, route, recorded))
        if not batch:
            return
        self._replaying = True

        def written(_: object, queue_id: str, recorded: float) -> None:
            entry = self._journal.get(queue_id)
            if entry is not None and entry[1] == recorded:  # not re-recorded meanwhile
                del self._journal[queue_id]

        puts = [
            self.store.put(route).addCallback(written, queue_id, recorded)
            for queue_id, route, recorded in batch
        ]

        def done(results: list[tuple[bool, Any]]) -> None:
            self._replaying = False
            if all(ok for ok, _ in results) and not self._journal:
                log.info("journalled queue mappings replayed to Redis")

        DeferredList(puts, consumeErrors=True).addCallback(done)

    def stop(self) -> None:
        if self._replayer.running:
            self._replayer.stop()

    def seen(self, route: QueueRoute) -> None:
        """A request used this route: keep the stored mapping alive as long as the queue."""
        entry = self._cache.get(route.queue_id)
        now = self._clock.seconds()
        if entry is None or now - entry[1] < self.touch_interval:
            return
        entry[1] = now
        self.store.touch(route).addErrback(self._store_failed, "touch")

    def master_changed(self, old: object, new: object) -> None:
        """Redis failed over: the mappings written in the last ``recent_seconds`` may
        have reached only the old master, and are lost with its data when it becomes a
        replica (or dies). They go into the journal, which writes them to the new one."""
        now = self._clock.seconds()
        again = 0
        for queue_id, (route, at) in list(self._recent.items()):
            if now - at <= self.recent_seconds and queue_id not in self._journal:
                self._journal[queue_id] = (route, at)
                again += 1
        log.warn("Redis failed over: writing the {n} mappings of the last {s:.0f} s again",
                 n=again, s=self.recent_seconds)  # fmt: skip
        if self._journal and not self._replayer.running:
            self._replayer.start(self._replay_interval, now=False)

    def forget(self, queue_id: str) -> Deferred[None]:
        self._cache.pop(queue_id, None)
        self._journal.pop(queue_id, None)
        self._recent.pop(queue_id, None)
        d = self.store.delete(queue_id)
        d.addErrback(self._store_failed, "delete")
        return d

    def __len__(self) -> int:
        return len(self._cache)

    # -- a worker's successor takes over its table (kansas.process) ----------------------
    def handover(self, limit: int = 100_000) -> dict[str, list[list[Any]]]:
        """The newest cached routes (a successor starts warm) and every journalled
        mapping Redis has not taken yet (so none is lost with this process)."""
        newest = list(self._cache.values())[-limit:]
        return {
            "routes": [[r.queue_id, r.to_json(), touched] for r, touched in newest],
            "journal": [[r.queue_id, r.to_json(), at] for r, at in self._journal.values()],
        }

    def take_over(self, state: dict[str, Any], skip_realms: frozenset[str]) -> int:
        """Adopt a predecessor's ``handover``; what this process knows already wins, and
        realms being moved are left for Redis to answer. Returns the routes taken."""
        taken = 0
        for queue_id, raw, touched in state.get("routes", ()):
            if queue_id not in self._cache:
                route = QueueRoute.from_json(queue_id, raw)
                if route.realm not in skip_realms and len(self._cache) < self.max_cached:
                    self._cache[queue_id] = [route, float(touched)]
                    taken += 1
        for queue_id, raw, recorded in state.get("journal", ()):
            if queue_id not in self._journal:
                self._journal[queue_id] = (QueueRoute.from_json(queue_id, raw), float(recorded))
        if self._journal and not self._replayer.running:
            self._replayer.start(self._replay_interval, now=False)
        return taken
