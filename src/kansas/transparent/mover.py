"""The mover of transparent moves (``kansas-ctl … move --transparent``).

A move commits the new placement first (new queues go to the new shard at once), then
moves the existing queues in batches, each one all or nothing:

    preparing -> (prepare, fence) -> marked -> (export, import) -> committed -> (finish)

The batch's state lives in the realm's journal in Redis, written in the same atomic
step as the markers (``marked``) and as the switch of the mappings (``committed``), so a
mover that dies anywhere leaves a state the next run can act on: a batch not yet
committed is rolled back, a committed one is finished. Every shard call is idempotent,
so doing a step twice is harmless. See docs/transparent-moves.md.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlencode

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from kansas.errors import KansasError
from kansas.model import QueueRoute, Shard
from kansas.proxy.backend import BackendPool, CollectedResponse, ShardFailure
from kansas.stores.interface import IAuthority, IRouteStore
from kansas.transparent.protocol import (
    DEFAULT_BATCH,
    DEFAULT_DEADLINE,
    EXPORT_PATH,
    FENCE_PATH,
    FINISH_PATH,
    IMPORT_PATH,
    PREPARE_PATH,
    Cut,
)

log = Logger()

#: How long the old shard may take to receive what the new one had seen.
DEFAULT_FENCE_TIMEOUT = 10.0
#: No commit this close to the batch's deadline: the old shard's freeze lease ends
#: LEASE_SLACK after it, so a commit never races the old shard unfreezing.
COMMIT_MARGIN = 1.0
LEASE_SLACK = 10.0
LOCK_SECONDS = 10.0
#: A batch whose requests were held longer than this names its slowest shard call.
SLOW_PAUSE = 0.25
MAX_PASSES = 3

#: Journal states.
PREPARING, MARKED, COMMITTED, ABORTING = "preparing", "marked", "committed", "aborting"


class BatchFailed(KansasError):
    """A batch could not complete (and was rolled back)."""


class ShardUnsupported(BatchFailed):
    """A shard answered 404 to a path of the shard protocol: it does not implement it
    (an unmodified Zulip Tornado answers 404 to every path it does not know)."""


@dataclass
class Batch:
    """One batch, as kept in the realm's journal."""

    id: str
    realm: str
    old: str
    new: str
    queues: list[str]
    state: str = PREPARING
    #: Unix time: the markers' deadline
    until: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Batch:
        data = json.loads(text)
        return cls(**{k: data[k] for k in ("id", "realm", "old", "new", "queues", "state",
                                            "until")})  # fmt: skip


def resume_action(batch: Batch) -> str:
    """What the next run does with a batch found in the journal: ``commit`` (finish a
    committed batch) or ``abort`` (roll back anything short of that)."""
    return "commit" if batch.state == COMMITTED else "abort"


def batches_of(routes: Sequence[QueueRoute], size: int) -> list[tuple[str, list[str]]]:
    """(old shard, queue ids) batches of at most ``size``, one old shard per batch."""
    by_shard: dict[str, list[str]] = {}
    for route in routes:
        by_shard.setdefault(route.shard, []).append(route.queue_id)
    out = []
    for shard in sorted(by_shard):
        ids = by_shard[shard]
        out += [(shard, ids[i : i + size]) for i in range(0, len(ids), size)]
    return out


# -- talking to shards -----------------------------------------------------------------


class ShardClient:
    """The shard-side protocol's calls, over kansas's backend pool."""

    def __init__(self, reactor: Any, secret: str, timeout: float = 60.0) -> None:
        self.pool = BackendPool(reactor, connect_timeout=5.0, response_timeout=timeout)
        self.secret = secret

    async def call(self, shard: Shard, path: bytes, form: dict[str, Any]) -> dict[str, Any]:
        body = urlencode({"secret": self.secret, **form}).encode()
        head = (
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/x-www-form-urlencoded"
            b"\r\nContent-Length: %d\r\n\r\n" % (path, shard.address[0].encode(), len(body))
        )
        sink = CollectedResponse()
        self.pool.send(shard.address, head + body, sink, retry_safe=True)
        what = path.decode().rsplit("/", 1)[-1]
        try:
            reply = await sink.done
        except ShardFailure as e:
            raise BatchFailed(f"{what} on shard {shard.name}: {e}") from None
        if reply.status == 404:  # the protocol's paths are no error a shard may answer
            raise ShardUnsupported(
                f"shard {shard.name} does not support transparent moves: it answered 404 to "
                f"{path.decode()}, as a Tornado without the shard protocol "
                "(docs/transparent-moves.md) does, an unmodified Zulip's among them"
            )
        data = reply.json()
        if reply.status != 200 or data is None or data.get("result") != "success":
            detail = (data or {}).get("code") or f"status {reply.status}"
            msg = (data or {}).get("msg", "")
            raise BatchFailed(f"{what} on shard {shard.name}: {detail} {msg}".rstrip())
        return data

    async def prepare(self, shard: Shard, batch: str, lease: float) -> dict[str, int]:
        data = await self.call(shard, PREPARE_PATH, {"batch": batch, "lease": lease})
        return dict(data["seen"])

    async def fence(self, shard: Shard, seen: dict[str, int], timeout: float) -> None:
        await self.call(shard, FENCE_PATH, {"seen": json.dumps(seen), "timeout": timeout})

    async def export(
        self, shard: Shard, batch: str, queues: list[str], lease: float
    ) -> dict[str, Any]:
        form = {"batch": batch, "queues": json.dumps(queues), "lease": lease}
        return await self.call(shard, EXPORT_PATH, form)

    async def import_(
        self, shard: Shard, batch: str, queues: list[Any], cut: dict[str, Any]
    ) -> list[str]:
        form = {"batch": batch, "queues": json.dumps(queues), "cut": json.dumps(cut)}
        data = await self.call(shard, IMPORT_PATH, form)
        return list(data["imported"])

    async def finish(self, shard: Shard, batch: str, commit: bool) -> list[str]:
        form = {"batch": batch, "outcome": "commit" if commit else "abort"}
        data = await self.call(shard, FINISH_PATH, form)
        return list(data["done"])

    def close(self) -> None:
        self.pool.close()


# -- the move --------------------------------------------------------------------------


@dataclass
class TransparentProgress:
    moved: int = 0
    batches: int = 0
    #: per batch: how long its markers held requests (the longest pause a client of
    #: the batch could see, poll interval aside), seconds
    pauses: list[float] = field(default_factory=list)
    rolled_back: int = 0
    #: the last batch's shard calls while requests were held: name -> seconds
    steps: dict[str, float] = field(default_factory=dict)


async def sleep(clock: IReactorTime, seconds: float) -> None:
    if seconds > 0:
        await deferLater(clock, seconds, lambda: None)


class TransparentMover:
    def __init__(
        self,
        authority: IAuthority,
        store: IRouteStore,
        client: ShardClient,
        clock: IReactorTime,
        realm: str,
        *,
        deadline: float = DEFAULT_DEADLINE,
        fence_timeout: float = DEFAULT_FENCE_TIMEOUT,
        wall: Callable[[], float] = time.time,
        say: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.authority = authority
        self.store = store
        self.client = client
        self.clock = clock
        self.realm = realm
        self.deadline = deadline
        self.fence_timeout = fence_timeout
        self.wall = wall
        self.say = say
        self.progress = TransparentProgress()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._lock = f"move:{realm}"
        self._locked_at = 0.0

    # -- lock --------------------------------------------------------------------
    async def lock(self) -> None:
        if not await self.store.acquire(self._lock, self.owner, LOCK_SECONDS):
            raise KansasError(f"another move of realm {self.realm!r} is running (Redis lock)")
        self._locked_at = self.clock.seconds()

    async def renew(self) -> None:
        now = self.clock.seconds()
        if now - self._locked_at > LOCK_SECONDS / 3:
            if not await self.store.acquire(self._lock, self.owner, LOCK_SECONDS):
                raise KansasError(f"lost the move lock of realm {self.realm!r}")
            self._locked_at = now

    async def unlock(self) -> None:
        await self.store.release(self._lock, self.owner)

    def _shard(self, name: str) -> Shard:
        shard = self.authority.load().shards.get(name)
        if shard is None:
            raise BatchFailed(f"no shard named {name!r} any more")
        return shard

    # -- resume ------------------------------------------------------------------
    async def resume(self) -> None:
        """Act on a batch a previous run left in the journal."""
        text = await self.store.journal(self.realm)
        if text is None:
            return
        batch = Batch.from_json(text)
        if resume_action(batch) == "commit":
            self.say(f"finishing batch {batch.id} (committed by an interrupted run)")
            await self._finish(batch, commit=True)
            await self.store.end_moving(self.realm, None, [], batch.new, [])
        else:
            self.say(f"rolling back batch {batch.id} (left {batch.state} by an interrupted run)")
            await self._abort(batch)

    # -- one batch ---------------------------------------------------------------
    async def run_batch(self, old_name: str, new_name: str, queue_ids: list[str]) -> int:
        """Move these queues from ``old_name`` to ``new_name``; how many moved. Raises
        BatchFailed after rolling the batch back."""
        await self.renew()
        batch = Batch(uuid.uuid4().hex, self.realm, old_name, new_name, list(queue_ids))
        store, client = self.store, self.client
        await store.end_moving(self.realm, batch.to_json(), [], new_name, [])  # journal
        try:
            old, new = self._shard(old_name), self._shard(new_name)
            lease = self.fence_timeout + self.deadline + LEASE_SLACK * 3
            seen = await client.prepare(new, batch.id, lease)
            await client.fence(old, seen, self.fence_timeout)
            batch.state, batch.until = MARKED, self.wall() + self.deadline
            marked = await store.mark_moving(
                self.realm, batch.to_json(), queue_ids, old_name, new_name, batch.until
            )
            marked_at = self.clock.seconds()
            if not marked:
                raise _Nothing()
            await self.renew()  # a slow fence must not let the lock lapse mid-batch
            steps = self.progress.steps = {}
            step = self.clock.seconds()
            exported = await client.export(old, batch.id, marked, self.deadline + LEASE_SLACK)
            steps[f"export on {old_name}"], step = self.clock.seconds() - step, self.clock.seconds()
            # The other way round: the new shard must have received every notification
            # the old one had applied (the cut), or one could reach it again later.
            left = batch.until - COMMIT_MARGIN - self.wall()
            await client.fence(new, Cut.from_json(exported["cut"]).high(), max(0.1, left))
            steps[f"fence on {new_name}"], step = self.clock.seconds() - step, self.clock.seconds()
            imported = await client.import_(new, batch.id, exported["queues"], exported["cut"])
            steps[f"import on {new_name}"] = self.clock.seconds() - step
            if self.wall() > batch.until - COMMIT_MARGIN:
                raise BatchFailed(f"batch took longer than its deadline ({self.deadline:g} s)")
            batch.state = COMMITTED
            commit = [q for q in marked if q in set(imported)]
            unmark = [q for q in marked if q not in set(imported)]
            await store.end_moving(self.realm, batch.to_json(), commit, new_name, unmark)
        except _Nothing:
            await self._abort(batch, quiet=True)
            return 0
        except BaseException as e:
            reason = str(e) if isinstance(e, KansasError) else repr(e)
            if batch.state != COMMITTED:
                await self._abort(batch)
                self.progress.rolled_back += 1
                if isinstance(e, ShardUnsupported):
                    raise  # it says why; the move says what did not move
                raise BatchFailed(f"batch rolled back: {reason}") from None
            raise
        self.progress.pauses.append(self.clock.seconds() - marked_at)
        await self._finish(batch, commit=True)
        await store.end_moving(self.realm, None, [], new_name, [])
        self.progress.moved += len(commit)
        self.progress.batches += 1
        return len(commit)

    async def _finish(self, batch: Batch, commit: bool) -> None:
        for name in (batch.old, batch.new):
            try:
                await self.client.finish(self._shard(name), batch.id, commit)
            except ShardUnsupported:
                pass  # a shard without the protocol holds nothing of the batch
            except KansasError as e:
                # Leases clean up on the shard (a restarted one has nothing to clean).
                self.say(f"warning: {e} (left to the shard's lease)")

    async def _abort(self, batch: Batch, quiet: bool = False) -> None:
        batch.state = ABORTING
        await self.store.end_moving(self.realm, batch.to_json(), [], batch.new, batch.queues)
        await self._finish(batch, commit=False)
        await self.store.end_moving(self.realm, None, [], batch.new, [])
        if not quiet:
            self.say(f"batch {batch.id}: rolled back, its queues stay on {batch.old}")


class _Nothing(Exception):
    """None of the batch's queues was left to move."""


async def move_transparently(
    authority: IAuthority,
    store: IRouteStore,
    client: ShardClient,
    clock: IReactorTime,
    realm: str,
    shard: str,
    *,
    user_id: int | None = None,
    batch: int = DEFAULT_BATCH,
    interval: float = 0.0,
    deadline: float = DEFAULT_DEADLINE,
    settle: float = 2.0,
    wall: Callable[[], float] = time.time,
    say: Callable[[str], None] = lambda line: None,
) -> TransparentProgress:
    """``kansas-ctl realm move --transparent`` (``user_id`` None) and ``user move
    --transparent``: commit the placement, then move the queues in batches."""
    before = authority.load()
    if shard not in before.shards:
        raise KansasError(f"no shard named {shard!r}")
    if batch <= 0 or deadline <= COMMIT_MARGIN:
        raise KansasError(f"bad batch {batch} or deadline {deadline:g} s")
    mover = TransparentMover(authority, store, client, clock, realm, deadline=deadline,
                             wall=wall, say=say)  # fmt: skip
    await mover.lock()
    try:
        await mover.resume()
        if user_id is None:
            with authority.atomic():
                authority.pin_realm(realm, shard)
                authority.clear_user_overrides(realm, shard)
        else:
            authority.move_user(realm, user_id, shard)
        move = authority.start_move(realm, user_id, shard, float(batch))
        try:
            await sleep(clock, settle)  # every kansas reads the realm's mappings from Redis
            for _ in range(MAX_PASSES):
                routes = await store.routes(realm)
                todo = [r for r in routes if r.shard != shard and not r.invalid
                        and (user_id is None or r.user_id == user_id)]  # fmt: skip
                if not todo:
                    break
                groups = batches_of(todo, batch)
                for number, (old, ids) in enumerate(groups, start=1):
                    started = clock.seconds()
                    moved = await mover.run_batch(old, shard, ids)
                    authority.update_move(move.id, mover.progress.moved)
                    pause = mover.progress.pauses[-1] * 1000 if moved else 0.0
                    slow = ""
                    if pause > SLOW_PAUSE * 1000 and mover.progress.steps:
                        name, took = max(mover.progress.steps.items(), key=lambda s: s[1])
                        slow = f" (slowest: {name}, {took * 1000:.0f} ms)"
                    say(f"batch {number}/{len(groups)}: {moved} queue(s) {old} -> {shard} in "
                        f"{(clock.seconds() - started) * 1000:.0f} ms, requests held "
                        f"{pause:.0f} ms{slow}; {mover.progress.moved} moved")  # fmt: skip
                    if number < len(groups):
                        await sleep(clock, interval)
        except BaseException as e:
            authority.update_move(move.id, mover.progress.moved, "interrupted")
            if user_id is None and mover.progress.rolled_back:
                _restore_placement(authority, realm, before.realm_pins.get(realm),
                                   before.realm_splits.get(realm), say)  # fmt: skip
            if isinstance(e, ShardUnsupported):
                moved = mover.progress.moved
                raise ShardUnsupported(
                    f"{e}. Nothing was moved: every queue stays on its shard"
                    if not moved
                    else f"{e}. Only the {moved} queue(s) of earlier batches moved; the "
                    "others stay on their shard"
                ) from None
            raise
        authority.update_move(move.id, mover.progress.moved, "done")
    finally:
        await mover.unlock()
    return mover.progress


def _restore_placement(
    authority: IAuthority,
    realm: str,
    pin: str | None,
    split: tuple[str, ...] | None,
    say: Callable[[str], None],
) -> None:
    """After a rollback: new queues go where they went before the move began."""
    if pin is not None:
        authority.pin_realm(realm, pin)
        say(f"realm {realm} pinned back to {pin}")
    elif split is not None:
        authority.split_realm(realm, split)
        say(f"realm {realm} split again over {' '.join(split)}")
    else:
        authority.unpin_realm(realm)
        say(f"realm {realm} unpinned (placed by its rules again)")


def describe(progress: TransparentProgress) -> str:
    pauses = sorted(progress.pauses)
    if not pauses:
        return f"{progress.moved} queue(s) moved"
    p50 = pauses[len(pauses) // 2] * 1000
    return (f"{progress.moved} queue(s) moved in {progress.batches} batch(es), requests held "
            f"{p50:.0f} ms per batch (median), {pauses[-1] * 1000:.0f} ms at most")  # fmt: skip


__all__ = [
    "Batch",
    "ShardClient",
    "ShardUnsupported",
    "TransparentMover",
    "move_transparently",
    "resume_action",
]
