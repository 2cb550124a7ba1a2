"""Moving realms and users between shards, with a page reload at a bounded rate.

A move commits the new placement in PostgreSQL (new queues go to the new shard at once,
in every kansas, through ``NOTIFY``) together with a running row in ``kansas_moves``;
while a realm has a running move, every kansas reads its queues' mappings from Redis on
each request instead of trusting its cache. Then the queues of the realm that the rules
no longer place where they live are *invalidated* at ``reload_rate`` per second: their
mapping in Redis gets ``"invalid":true``. The next request on such a queue, through any
kansas, is answered ``400 BAD_EVENT_QUEUE_ID`` by kansas itself (the client re-registers,
on the new shard), and kansas DELETEs the queue on its old shard with the client's own
credentials — Tornado authenticates queue deletion, so kansas cannot do it earlier on
its own. A long-poll already waiting at the old shard is answered as soon as its queue
is marked (``kansas.proxy.invalidation``), so the reloads come at this rate rather than
at the old shard's heartbeats. A queue whose client never comes back is freed by its
shard's idle timeout.

The invalidation marker lives in the mapping itself, set by one atomic Lua step that
reports whether this call set it: a queue is never invalidated twice, and an interrupted
move simply resumes (``kansas-ctl realm move`` again) with the queues not yet marked.
One mover per realm at a time: a Redis lock with an expiry (``kansas:lock:move:<realm>``).

The worker runs in ``kansas-ctl``, in the foreground: it shows progress, stops on Ctrl-C
and resumes when run again, and the kansas processes stay free of move state (a kansas
restart in the middle changes nothing).
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from kansas.errors import KansasError
from kansas.hashing import pick
from kansas.model import Assignment, QueueRoute
from kansas.router import place_queue
from kansas.stores.interface import IAuthority, IRouteStore

#: Zulip's own reload-clients rate.
DEFAULT_RELOAD_RATE = 50.0
#: The lock of a realm's mover expires this long after its last renewal.
LOCK_SECONDS = 10.0
#: How long every kansas is given to apply a change (NOTIFY arrives well within 1 s).
DEFAULT_SETTLE_SECONDS = 2.0
#: Passes over a realm's queues: later ones catch queues created on the old shard by a
#: kansas that had not yet heard of the change.
MAX_PASSES = 3


def misplaced(assignment: Assignment, route: QueueRoute) -> bool:
    """True if the rules now place this queue's user on another shard than its own."""
    if route.invalid:
        return False
    decision = place_queue(assignment, route.realm, route.user_id)
    return decision is not None and decision.shard != route.shard


def pace(start: float, done: int, rate: float, now: float) -> float:
    """Seconds to wait before the next invalidation, the ``done``-th so far: the k-th
    goes at ``start + k / rate`` (a fixed schedule, so the rate holds on average)."""
    return max(0.0, start + done / rate - now)


def restart_schedule(start: float, done: int, rate: float, now: float) -> float:
    """The schedule's start, moved so that a pause (a settle, a batch interval, a slow
    Redis) earns at most one slot of credit: the mover never bursts to catch up. A
    little lateness (timer jitter) is absorbed by the fixed schedule."""
    return now - done / rate if now > start + (done + 1) / rate else start


def lock_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


@dataclass
class Progress:
    invalidated: int = 0
    seen: int = 0  # misplaced queues found
    #: clock times of the first and the last invalidation
    first: float | None = None
    last: float | None = None
    #: time spent invalidating (first to last invalidation of each pass, so settles
    #: and batch intervals are left out) and how many gaps between invalidations
    #: that covers: the rate actually applied
    busy: float = 0.0
    gaps: int = 0

    def add(self, now: float) -> None:
        self.invalidated += 1
        self.last = now
        if self.first is None:
            self.first = now

    def add_pass(self, first: float, last: float, count: int) -> None:
        if count > 1:
            self.busy += last - first
            self.gaps += count - 1

    def rate(self) -> float | None:
        """Invalidations per second while invalidating (batch pauses left out)."""
        return self.gaps / self.busy if self.gaps and self.busy > 0 else None


class Mover:
    """Invalidates a realm's misplaced queues at a bounded rate (Twisted, async)."""

    def __init__(
        self,
        store: IRouteStore,
        clock: IReactorTime,
        realm: str,
        rate: float,
        owner: str | None = None,
        report: Callable[[Progress], None] | None = None,
    ) -> None:
        if rate <= 0:
            raise KansasError(f"bad reload rate {rate}: must be > 0")
        self.store = store
        self.clock = clock
        self.realm = realm
        self.rate = rate
        self.owner = owner or lock_owner()
        self.report = report
        self.progress = Progress()
        self._lock_name = f"move:{realm}"
        self._locked_at = 0.0
        #: invalidations are paced from this schedule start
        self._start = 0.0
        self._scheduled = 0

    async def lock(self) -> None:
        if not await self.store.acquire(self._lock_name, self.owner, LOCK_SECONDS):
            raise KansasError(f"another move of realm {self.realm!r} is running (Redis lock)")
        self._locked_at = self.clock.seconds()
        self._start = self._locked_at

    async def unlock(self) -> None:
        await self.store.release(self._lock_name, self.owner)

    async def _renew(self) -> None:
        now = self.clock.seconds()
        if now - self._locked_at > LOCK_SECONDS / 3:
            if not await self.store.acquire(self._lock_name, self.owner, LOCK_SECONDS):
                raise KansasError(f"lost the move lock of realm {self.realm!r}")
            self._locked_at = now

    async def run(self, wanted: Callable[[QueueRoute], bool], passes: int = MAX_PASSES) -> int:
        """Invalidate every queue of the realm for which ``wanted`` says so; pass again
        (at most ``passes`` times) while a pass finds some. Returns how many this call
        invalidated. Call ``lock`` first."""
        total = 0
        for _ in range(passes):
            routes = await self.store.routes(self.realm)
            todo = [r for r in routes if not r.invalid and wanted(r)]
            if not todo:
                break
            self.progress.seen += len(todo)
            first: float | None = None
            count = 0
            for route in todo:
                await self._renew()
                now = self.clock.seconds()
                self._start = restart_schedule(self._start, self._scheduled, self.rate, now)
                delay = pace(self._start, self._scheduled, self.rate, now)
                if delay > 0:
                    await deferLater(self.clock, delay, lambda: None)
                if await self.store.invalidate(route.queue_id):
                    self._scheduled += 1
                    total += 1
                    now = self.clock.seconds()
                    self.progress.add(now)
                    first = now if first is None else first
                    count += 1
                    if self.report is not None:
                        self.report(self.progress)
            if first is not None and self.progress.last is not None:
                self.progress.add_pass(first, self.progress.last, count)
        return total


@asynccontextmanager
async def _recorded(authority: IAuthority, move_id: int, mover: Mover) -> AsyncIterator[None]:
    """Run a move's work: its row says "done" or "interrupted" after, and the realm's
    mover lock is given back either way."""
    try:
        yield
    except BaseException:
        authority.update_move(move_id, mover.progress.invalidated, "interrupted")
        await mover.unlock()
        raise
    authority.update_move(move_id, mover.progress.invalidated, "done")
    await mover.unlock()


async def sleep(clock: IReactorTime, seconds: float) -> None:
    if seconds > 0:
        await deferLater(clock, seconds, lambda: None)


def _in_batch(users: set[int], shard: str, route: QueueRoute) -> bool:
    return route.user_id in users and route.shard != shard


def batches(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


async def move_realm(
    authority: IAuthority,
    store: IRouteStore,
    clock: IReactorTime,
    realm: str,
    shard: str,
    rate: float = DEFAULT_RELOAD_RATE,
    batch: int | None = None,
    interval: float = 0.0,
    settle: float = DEFAULT_SETTLE_SECONDS,
    say: Callable[[str], None] = lambda line: None,
) -> Progress:
    """``kansas-ctl realm move``: pin ``realm`` to ``shard`` and reload its queues
    elsewhere at ``rate``. With ``batch``, users first: ``batch`` users at a time get an
    override to ``shard`` and their queues are invalidated, ``interval`` seconds apart;
    then the pin, the overrides made redundant by it removed, and a last pass."""
    if shard not in authority.load().shards:
        raise KansasError(f"no shard named {shard!r}")
    mover = Mover(store, clock, realm, rate, report=_reporter(say, clock))
    await mover.lock()
    move = authority.start_move(realm, None, shard, rate)
    async with _recorded(authority, move.id, mover):
        if batch:
            routes = await store.routes(realm)
            users = sorted({r.user_id for r in routes if r.user_id is not None
                            and not r.invalid and r.shard != shard})  # fmt: skip
            groups = batches(users, batch)
            for number, group in enumerate(groups, start=1):
                with authority.atomic():
                    for user in group:
                        authority.move_user(realm, user, shard)
                await sleep(clock, settle)
                await mover.run(partial(_in_batch, set(group), shard))
                authority.update_move(move.id, mover.progress.invalidated)
                say(f"batch {number}/{len(groups)}: {len(group)} user(s) moved, "
                    f"{mover.progress.invalidated} queue(s) invalidated so far")  # fmt: skip
                if number < len(groups):
                    await sleep(clock, interval)
        with authority.atomic():
            authority.pin_realm(realm, shard)
            authority.clear_user_overrides(realm, shard)
        await sleep(clock, settle)
        assignment = authority.load()
        await mover.run(lambda r: misplaced(assignment, r))
    return mover.progress


async def move_user(
    authority: IAuthority,
    store: IRouteStore,
    clock: IReactorTime,
    realm: str,
    user_id: int,
    shard: str,
    rate: float = DEFAULT_RELOAD_RATE,
    settle: float = DEFAULT_SETTLE_SECONDS,
    say: Callable[[str], None] = lambda line: None,
) -> Progress:
    """``kansas-ctl user move``: an override to ``shard``, then the user's queues
    elsewhere are invalidated at ``rate``."""
    mover = Mover(store, clock, realm, rate, report=_reporter(say, clock))
    authority.move_user(realm, user_id, shard)  # UnknownShard before anything else
    await mover.lock()
    move = authority.start_move(realm, user_id, shard, rate)
    async with _recorded(authority, move.id, mover):
        await sleep(clock, settle)
        await mover.run(lambda r: r.user_id == user_id and r.shard != shard)
    return mover.progress


async def drain_shard(
    authority: IAuthority,
    store: IRouteStore,
    clock: IReactorTime,
    shard: str,
    rate: float = DEFAULT_RELOAD_RATE,
    settle: float = DEFAULT_SETTLE_SECONDS,
    say: Callable[[str], None] = lambda line: None,
) -> Progress:
    """``kansas-ctl shard drain``: weight 0 (no new queues by hashing), its pinned realms
    pinned where the hash now sends them, then every queue on it that the rules place
    elsewhere is invalidated, realm after realm, ``rate`` per second overall. Splits,
    regex rules and user overrides naming the shard are left alone (and so are their
    queues): ``shard remove`` lists them. Run again, it carries on."""
    if authority.drain_shard(shard):
        say(f"shard {shard} drained: weight 0, no new queues by hashing")
    before = authority.load()
    others = [(s.name, s.weight) for s in before.shards.values() if s.name != shard]
    pinned = sorted(realm for realm, name in before.realm_pins.items() if name == shard)
    with authority.atomic():
        for realm in pinned:
            target = pick(realm, others)
            if target is None:
                raise KansasError(f"no other shard with a weight > 0 for realm {realm!r}")
            authority.pin_realm(realm, target)
            say(f"realm {realm} pinned to {target}")
    total = Progress()
    routes = await store.routes()
    realms = sorted({r.realm for r in routes if r.shard == shard and not r.invalid})
    assignment = authority.load()
    for number, realm in enumerate(realms, start=1):
        decision = place_queue(assignment, realm, None)
        if decision is None:
            raise KansasError(f"no shard can take realm {realm!r}")
        mover = Mover(store, clock, realm, rate, report=_reporter(say, clock))
        await mover.lock()
        move = authority.start_move(realm, None, decision.shard, rate)
        async with _recorded(authority, move.id, mover):
            await sleep(clock, settle)  # every kansas reads the realm's mappings anew
            await mover.run(partial(_drained_from, assignment, shard))
        p = mover.progress
        total.invalidated += p.invalidated
        total.busy += p.busy
        total.gaps += p.gaps
        say(f"realm {number}/{len(realms)} {realm}: {p.invalidated} queue(s) invalidated")
    return total


def _drained_from(assignment: Assignment, shard: str, route: QueueRoute) -> bool:
    return route.shard == shard and misplaced(assignment, route)


def _reporter(say: Callable[[str], None], clock: IReactorTime) -> Callable[[Progress], None]:
    last = [0.0]

    def report(p: Progress) -> None:
        now = clock.seconds()
        if now - last[0] >= 1.0:
            last[0] = now
            say(f"{p.invalidated} queue(s) invalidated")

    return report


def describe(progress: Progress) -> str:
    rate = progress.rate()
    measured = "" if rate is None else f" at {rate:.1f}/s"
    return f"{progress.invalidated} queue(s) invalidated{measured}"


__all__: list[Any] = [
    "DEFAULT_RELOAD_RATE",
    "Mover",
    "Progress",
    "misplaced",
    "move_realm",
    "move_user",
    "pace",
]
