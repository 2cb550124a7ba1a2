"""Where kansas holds requests for queues a transparent move is switching.

A queue whose mapping carries a ``moving`` marker is being switched to another shard:
its requests must reach neither shard until the switch is committed or rolled back.
They wait here, per queue. Every ``interval`` (50 ms) one ``MGET`` reads the mappings of
every queue with waiting requests; a queue whose marker is gone (committed: the mapping
names the new shard; rolled back: the old one) has its requests routed again. A request
whose deadline passes first is answered by its caller (an empty success for a GET).

Polling rather than a Redis subscription: nothing to miss across Redis reconnects or
kansas restarts, and the cost is one round trip per tick, only while something waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kansas.model import QueueRoute
from kansas.stores.interface import IRouteStore

log = Logger()

#: How often the mappings of held queues are read.
POLL_INTERVAL = 0.05


class Held:
    __slots__ = ("expire", "live", "queue_id", "resume", "since", "timer")

    def __init__(
        self,
        queue_id: str,
        since: float,
        resume: Callable[[QueueRoute | None], None],
        expire: Callable[[], None],
    ) -> None:
        self.queue_id = queue_id
        self.since = since
        self.resume = resume
        self.expire = expire
        self.timer: IDelayedCall | None = None
        self.live = True


class MoveHolding:
    def __init__(
        self,
        store: IRouteStore,
        clock: Any,
        wall: Callable[[], float] = time.time,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.store = store
        self.clock = clock
        #: Unix time, which the markers' deadlines are written in.
        self.wall = wall
        self.interval = interval
        self.waiting: dict[str, list[Held]] = {}
        self.held = 0
        self.resumed = 0
        self.expired = 0
        #: Longest a resumed request waited, since the last log line.
        self._longest = 0.0
        self._reading = False
        self._poller = LoopingCall(self._poll)
        self._poller.clock = clock

    def __len__(self) -> int:
        return sum(len(w) for w in self.waiting.values())

    def deadline(self, route: QueueRoute) -> float:
        """The marker's deadline on this process's clock."""
        return self.clock.seconds() + max(0.0, route.moving_until - self.wall())  # type: ignore[no-any-return]

    def hold(
        self,
        queue_id: str,
        deadline: float,
        resume: Callable[[QueueRoute | None], None],
        expire: Callable[[], None],
    ) -> Held:
        """Hold a request on ``queue_id`` until its marker goes (``resume``, with the
        mapping just read, None if it is gone) or until ``deadline`` on the reactor's
        clock (``expire``)."""
        now = self.clock.seconds()
        held = Held(queue_id, now, resume, expire)
        held.timer = self.clock.callLater(max(0.0, deadline - now), self._expired, held)
        self.waiting.setdefault(queue_id, []).append(held)
        self.held += 1
        if not self._poller.running:
            self._poller.start(self.interval, now=False)
        return held

    def release(self, held: Held) -> None:
        """The client went away."""
        if held.live:
            self._drop(held)

    def _drop(self, held: Held) -> None:
        held.live = False
        if held.timer is not None and held.timer.active():
            held.timer.cancel()
        held.timer = None
        waiting = self.waiting.get(held.queue_id)
        if waiting is not None:
            waiting.remove(held)
            if not waiting:
                del self.waiting[held.queue_id]

    def _expired(self, held: Held) -> None:
        held.timer = None
        if held.live:
            self._drop(held)
            self.expired += 1
            held.expire()

    def _poll(self) -> None:
        if not self.waiting:
            self._poller.stop()
            return
        if self._reading:
            return  # a slow Redis: one read at a time
        self._reading = True
        ids = list(self.waiting)
        d = self.store.get_many(ids)
        d.addCallbacks(self._read, self._failed, callbackArgs=(ids,))

    def _read(self, routes: dict[str, QueueRoute], ids: list[str]) -> None:
        self._reading = False
        now = self.clock.seconds()
        released = 0
        for queue_id in ids:
            route = routes.get(queue_id)
            if route is not None and route.moving_to is not None:
                continue  # not switched yet (past its deadline, the timer answers)
            for held in list(self.waiting.get(queue_id, ())):
                self._drop(held)
                self.resumed += 1
                released += 1
                self._longest = max(self._longest, now - held.since)
                held.resume(route)
        if released:
            log.info("move: {n} held request(s) routed again, the longest after {ms:.0f} ms",
                     n=released, ms=self._longest * 1000)  # fmt: skip
            self._longest = 0.0

    def _failed(self, failure: Failure) -> None:
        # Redis unreachable: keep holding; the deadlines bound the wait.
        self._reading = False
        log.warn("move: cannot read held queues' mappings: {e}", e=failure.getErrorMessage())

    def stop(self) -> None:
        if self._poller.running:
            self._poller.stop()
