"""The queue -> shard table as the proxy sees it: an in-process cache over the store.

The cache answers almost every request without I/O. The store (Redis) is asked on a
miss, written when a queue is created or found, and its expiry pushed back at most once
per ``touch_interval`` per queue, so the hot path does not write on every request.
Store failures are logged and survived: the cache and the realm fallback carry on.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
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
    ) -> None:
        self.store = store
        self._clock = clock
        self.max_cached = max_cached
        self.touch_interval = touch_interval
        # queue_id -> [route, when the store's expiry was last pushed back]
        self._cache: dict[str, list[Any]] = {}
        self.store_errors = 0

    def cached(self, queue_id: str) -> QueueRoute | None:
        entry = self._cache.get(queue_id)
        return None if entry is None else entry[0]  # type: ignore[no-any-return]

    def _remember(self, route: QueueRoute) -> None:
        cache = self._cache
        if len(cache) >= self.max_cached and route.queue_id not in cache:
            del cache[next(iter(cache))]  # oldest first: dicts keep insertion order
        cache[route.queue_id] = [route, self._clock.seconds()]

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

    def record(self, route: QueueRoute) -> Deferred[None]:
        """Cache a route and write it to the store; fires once written (or failed)."""
        self._remember(route)
        d = self.store.put(route)
        d.addErrback(self._store_failed, "write")
        return d

    def seen(self, route: QueueRoute) -> None:
        """A request used this route: keep the stored mapping alive as long as the queue."""
        entry = self._cache.get(route.queue_id)
        now = self._clock.seconds()
        if entry is None or now - entry[1] < self.touch_interval:
            return
        entry[1] = now
        self.store.touch(route).addErrback(self._store_failed, "touch")

    def forget(self, queue_id: str) -> Deferred[None]:
        self._cache.pop(queue_id, None)
        d = self.store.delete(queue_id)
        d.addErrback(self._store_failed, "delete")
        return d

    def __len__(self) -> int:
        return len(self._cache)
