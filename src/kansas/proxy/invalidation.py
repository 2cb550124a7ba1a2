"""Long-polls on queues a move invalidates are answered when it does, not at heartbeat.

A move with a reload (``kansas.moves``) marks the queues of a realm invalid at its
``--reload-rate``; a request on such a queue gets ``BAD_EVENT_QUEUE_ID`` from kansas
and its client registers again, on the new shard. But a client whose long-poll is
already parked at the old shard would hear of it only when that long-poll ends on its
own, at Tornado's heartbeat 45-55 s later: the reloads would come when the heartbeats
fall, not at the move's rate, and the old shard would keep the long-poll.

So while a realm is moving, every ``interval`` one ``MGET`` reads the mappings of the
long-polls this process holds in that realm; each one found invalid is answered at
once (its caller cancels it at the old shard). Since the mover marks queues at its
rate, the answers follow at that rate. Polling, as ``kansas.transparent.holding`` does:
nothing to miss across Redis reconnects, and no cost while nothing moves.

A realm is watched for ``LINGER`` seconds more after its move ends: a small move
(one user, a few queues) marks its last queues and ends within milliseconds, often
before the next check, and those long-polls would otherwise wait for the heartbeat.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kansas.model import QueueRoute
from kansas.stores.interface import IRouteStore

log = Logger()

#: How often the long-polls of moving realms are checked.
INTERVAL = 0.25
#: How long a realm is still watched after its move ended (its last marks).
LINGER = 2.0
#: Mappings read per check (a realm's long-polls beyond it wait for the next checks).
MAX_PER_CHECK = 2000


class InFlight(Protocol):
    def invalidated_in_flight(self, route: QueueRoute) -> None:
        """Answer BAD_EVENT_QUEUE_ID now, if the long-poll is still waiting."""


class InvalidationWatch:
    def __init__(
        self,
        store: IRouteStore,
        clock: Any,
        moving_realms: Callable[[], frozenset[str]],
        long_polls: Callable[[frozenset[str]], Mapping[str, InFlight]],
        interval: float = INTERVAL,
    ) -> None:
        self.store = store
        self.moving_realms = moving_realms
        #: realms -> {queue id: its waiting long-poll} held by this process
        self.long_polls = long_polls
        self._checking = False
        self._clock = clock
        #: realms seen moving at the last check, and realm -> until when it lingers
        self._was_moving: frozenset[str] = frozenset()
        self._lingering: dict[str, float] = {}
        self._cursor = 0  # where the next check starts, when there are too many to read
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock
        self.interval = interval

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _watched(self) -> frozenset[str]:
        """The moving realms, and those whose move ended less than LINGER ago."""
        moving = self.moving_realms()
        now = self._clock.seconds()
        for realm in self._was_moving - moving:
            self._lingering[realm] = now + LINGER
        self._was_moving = moving
        for realm, until in list(self._lingering.items()):
            if until <= now or realm in moving:
                del self._lingering[realm]
        return moving | frozenset(self._lingering) if self._lingering else moving

    def check(self) -> None:
        moving = self._watched()
        if not moving or self._checking:
            return
        waiting = self.long_polls(moving)
        if not waiting:
            return
        self._checking = True
        queue_ids = list(waiting)
        if len(queue_ids) > MAX_PER_CHECK:  # in turns, so that every one is read
            start = self._cursor % len(queue_ids)
            queue_ids = (queue_ids[start:] + queue_ids[:start])[:MAX_PER_CHECK]
            self._cursor = start + MAX_PER_CHECK
        d = self.store.get_many(queue_ids)

        def found(routes: dict[str, QueueRoute]) -> None:
            for queue_id, route in routes.items():
                if route.invalid:
                    waiting[queue_id].invalidated_in_flight(route)

        def failed(failure: Failure) -> None:
            log.warn("checking long-polls of moving realms: {e}", e=failure.getErrorMessage())

        def done(_: object) -> None:
            self._checking = False

        d.addCallbacks(found, failed).addBoth(done)
