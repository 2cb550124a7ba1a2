"""Where GETs wait while their shard is down, and how they go back to it.

A restarting Tornado shard keeps its queues (it dumps them on SIGTERM and reloads them),
so a GET for it is safe to hold and replay: the shard re-sends whatever the client has
not acknowledged. Each shard has a lot, bounded in size; a parked request leaves it
when the client goes away (at once, no leak), when its deadline passes (the caller
answers an empty success, which every Zulip client takes as "poll again"), or when the
shard is back — then at ``release_rate`` per second, so that a shard just restarted is
not hit by every parked client at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from kansas.health import HealthMonitor

log = Logger()

#: How often parked requests are released while a shard is up (rate / tick each time).
RELEASE_TICK = 0.05


class Parked:
    __slots__ = ("expire", "live", "lot", "resume", "timer")

    def __init__(self, lot: Lot, resume: Callable[[], None], expire: Callable[[], None]) -> None:
        self.lot = lot
        self.resume = resume
        self.expire = expire
        self.timer: IDelayedCall | None = None
        self.live = True


class Lot:
    __slots__ = (
        "budget",
        "last_refill",
        "live",
        "name",
        "release_started",
        "released",
        "waiting",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.waiting: deque[Parked] = deque()
        self.live = 0  # parked and still waiting (the deque may hold dead entries too)
        self.budget = 0.0  # releases allowed now, refilled at the release rate
        self.last_refill: float | None = None  # None: not releasing
        self.released = 0  # in the current release, for the log line at its end
        self.release_started = 0.0

    def __len__(self) -> int:
        return self.live


class Parking:
    def __init__(
        self,
        clock: Any,
        health: HealthMonitor,
        max_parked: int = 10_000,
        release_rate: float = 200.0,
    ) -> None:
        self.clock = clock
        self.health = health
        self.max_parked = max_parked
        self.release_rate = release_rate
        self.lots: dict[str, Lot] = {}
        self.released = 0
        self.expired = 0
        self._releaser = LoopingCall(self._release)
        self._releaser.clock = clock
        health.on_healthy.append(self._shard_up)

    def parked(self, name: str | None = None) -> int:
        if name is not None:
            lot = self.lots.get(name)
            return 0 if lot is None else lot.live
        return sum(lot.live for lot in self.lots.values())

    def park(
        self,
        name: str,
        deadline: float,
        resume: Callable[[], None],
        expire: Callable[[], None],
    ) -> Parked | None:
        """Hold a request for shard ``name`` until ``deadline``; None if the lot is full."""
        lot = self.lots.get(name)
        if lot is None:
            lot = self.lots[name] = Lot(name)
        if lot.live >= self.max_parked:
            return None
        parked = Parked(lot, resume, expire)
        parked.timer = self.clock.callLater(
            max(0.0, deadline - self.clock.seconds()), self._expired, parked
        )
        lot.waiting.append(parked)
        lot.live += 1
        # Released when the health monitor next confirms the shard answers (a cut
        # long-poll triggers a probe at once), not before: it may be going away.
        return parked

    def unpark(self, parked: Parked) -> None:
        """The client went away."""
        if parked.live:
            self._drop(parked)

    def _drop(self, parked: Parked) -> None:
        parked.live = False
        lot = parked.lot
        lot.live -= 1
        if parked.timer is not None and parked.timer.active():
            parked.timer.cancel()
        parked.timer = None
        # Dead entries are skipped on release; compact when they dominate a long outage.
        if len(lot.waiting) > 64 and lot.live < len(lot.waiting) // 2:
            lot.waiting = deque(p for p in lot.waiting if p.live)

    def _expired(self, parked: Parked) -> None:
        parked.timer = None
        if parked.live:
            self._drop(parked)
            self.expired += 1
            parked.expire()

    def _shard_up(self, name: str) -> None:
        if self.parked(name):
            self._start()

    def _start(self) -> None:
        if not self._releaser.running:
            self._releaser.start(RELEASE_TICK, now=True)

    def _release(self) -> None:
        releasable = False
        now = self.clock.seconds()
        for lot in self.lots.values():
            if not lot.live or self.health.is_down(lot.name):
                lot.budget, lot.last_refill = 0.0, None
                continue
            # A token bucket: it refills with the time that passed (a late tick catches
            # up) but holds at most two ticks' worth, so no burst outruns the rate.
            since = now - lot.last_refill if lot.last_refill is not None else RELEASE_TICK
            lot.last_refill = now
            per_tick = self.release_rate * RELEASE_TICK
            lot.budget = min(lot.budget + since * self.release_rate, max(1.0, 2 * per_tick))
            if not lot.released:
                lot.release_started = self.clock.seconds()
            while lot.budget >= 1.0 and lot.live:
                parked = lot.waiting.popleft()
                if not parked.live:
                    continue
                lot.budget -= 1.0
                self._drop(parked)
                self.released += 1
                lot.released += 1
                parked.resume()
            if not lot.live and lot.released:
                took = self.clock.seconds() - lot.release_started
                rate = lot.released / took if took > 0 else float(lot.released)
                log.info("released {n} parked requests to shard {s} in {t:.1f} s ({r:.0f}/s)",
                         n=lot.released, s=lot.name, t=took, r=rate)  # fmt: skip
                lot.released = 0
            releasable = releasable or bool(lot.live)
        if not releasable and self._releaser.running:
            self._releaser.stop()  # until a shard with parked requests comes back

    def stop(self) -> None:
        if self._releaser.running:
            self._releaser.stop()
