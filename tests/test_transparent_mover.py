"""The mover of transparent moves over the memory stores and two in-process demo shards
(a fake clock, no sockets): batches, rollback, and resuming an interrupted batch."""

from __future__ import annotations

import random
import subprocess
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from kansas.demo.shard import DemoShard, ShardError
from kansas.errors import KansasError
from kansas.model import QueueRoute, Shard
from kansas.stores.memory import MemoryAuthority, MemoryRouteStore
from kansas.stores.postgres import PostgresAuthority
from kansas.testing.servers import not_found_server
from kansas.transparent.mover import (
    COMMITTED,
    MARKED,
    Batch,
    BatchFailed,
    TransparentMover,
    batches_of,
    move_transparently,
    resume_action,
)
from kansas.transparent.protocol import Cut
from tests.test_moves import run

REALM = "chat.example.com"
ORIGIN = "00000000000000aa"
WALL = 1_764_000_000.0


class FakeClient:
    """ShardClient's calls, made straight to in-process demo shards."""

    def __init__(self, shards: dict[str, DemoShard]) -> None:
        self.shards = shards
        self.fail_import: set[int] = set()  # which import calls (1-based) fail
        self.imports = 0
        self.calls: list[str] = []

    async def _fired(self, d: Deferred[Any]) -> Any:
        try:
            return await d
        except ShardError as e:
            raise BatchFailed(f"{e.code}") from None

    async def prepare(self, shard: Shard, batch: str, lease: float) -> dict[str, int]:
        self.calls.append(f"prepare {shard.name}")
        return self.shards[shard.name].prepare(batch, lease)

    async def fence(self, shard: Shard, seen: dict[str, int], timeout: float) -> None:
        self.calls.append(f"fence {shard.name}")
        await self._fired(self.shards[shard.name].fence(seen, timeout))

    async def export(
        self, shard: Shard, batch: str, queues: list[str], lease: float
    ) -> dict[str, Any]:
        self.calls.append(f"export {shard.name}")
        return self.shards[shard.name].export(batch, queues, lease)

    async def import_(
        self, shard: Shard, batch: str, queues: list[Any], cut: dict[str, Any]
    ) -> list[str]:
        self.calls.append(f"import {shard.name}")
        self.imports += 1
        if self.imports in self.fail_import:
            raise BatchFailed(f"import on shard {shard.name}: connection refused")
        return self.shards[shard.name].import_queues(batch, queues, Cut.from_json(cut))

    async def finish(self, shard: Shard, batch: str, commit: bool) -> list[str]:
        self.calls.append(f"finish {shard.name} {'commit' if commit else 'abort'}")
        return self.shards[shard.name].finish(batch, commit)


class World:
    def __init__(self, queues: int = 5) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.shards = {
            name: DemoShard(self.clock, name=name, rng=random.Random(i), heartbeat=30)
            for i, name in enumerate("ab")
        }
        self.authority = MemoryAuthority()
        self.authority.migrate()
        for name in "ab":
            self.authority.add_shard(name, f"http://127.0.0.1:980{'ab'.index(name)}", 100)
        self.authority.pin_realm(REALM, "a")
        self.store = MemoryRouteStore(self.clock)
        self.client = FakeClient(self.shards)
        self.seq = 0
        self.notify(0, [])
        self.queues: dict[int, str] = {}
        for user in range(1, queues + 1):
            q = self.shards["a"].create_queue(user)
            self.queues[user] = q.queue_id
            self.store.put(QueueRoute(q.queue_id, "a", REALM, user, 600))

    def notify(self, n: int, users: list[int]) -> None:
        self.seq += 1
        for shard in self.shards.values():
            shard.notify({"type": "message", "n": n}, users, (ORIGIN, self.seq))

    def wall(self) -> float:
        return WALL + self.clock.seconds()

    def move(self, batch: int = 2) -> Any:
        coro = move_transparently(
            self.authority, self.store, self.client, self.clock, REALM, "b",  # type: ignore[arg-type]
            batch=batch, settle=0, wall=self.wall, say=self.lines.append,
        )  # fmt: skip
        return run(self.clock, coro)

    lines: list[str] = []

    def route(self, user: int) -> QueueRoute:
        route = self.store.get(self.queues[user]).result  # type: ignore[attr-defined]
        assert isinstance(route, QueueRoute)
        return route

    def events(self, shard: str, user: int) -> list[tuple[int, int]]:
        queue = self.shards[shard].queues[self.queues[user]]
        return [(e["id"], e["n"]) for e in queue.events]


@pytest.fixture
def w() -> World:
    World.lines = []
    return World()


def test_batches_group_by_old_shard() -> None:
    rs = [QueueRoute(f"q{i}", "ab"[i % 2], REALM, i) for i in range(5)]
    assert batches_of(rs, 2) == [("a", ["q0", "q2"]), ("a", ["q4"]), ("b", ["q1", "q3"])]


def test_resume_finishes_only_committed_batches() -> None:
    batch = Batch("x", REALM, "a", "b", ["q"], state=MARKED)
    assert resume_action(batch) == "abort"
    assert Batch.from_json(batch.to_json()) == batch
    batch.state = COMMITTED
    assert resume_action(batch) == "commit"


def test_a_realm_moves_in_batches_with_its_events_and_ids(w: World) -> None:
    w.notify(1, [1, 2, 3, 4, 5])
    w.notify(2, [1])
    before = {u: w.events("a", u) for u in w.queues}
    progress = w.move(batch=2)
    assert progress.moved == 5 and progress.batches == 3 and progress.rolled_back == 0
    assert all(w.route(u).shard == "b" and w.route(u).moving_to is None for u in w.queues)
    assert {u: w.events("b", u) for u in w.queues} == before
    assert not w.shards["a"].queues and len(w.shards["a"].tombstones) == 5
    assert w.store.journal(REALM).result is None  # type: ignore[attr-defined]
    assert w.authority.load().realm_pins[REALM] == "b"
    (move,) = w.authority.list_moves()
    assert move.state == "done" and move.invalidated == 5
    w.notify(3, [1])
    assert w.events("b", 1) == [(0, 1), (1, 2), (2, 3)]
    assert "batch 3/3: 1 queue(s) a -> b" in w.lines[-1]


def test_a_failed_batch_rolls_back_and_the_move_resumes_later(w: World) -> None:
    w.notify(1, [1, 2, 3, 4, 5])
    w.client.fail_import = {2}
    with pytest.raises(KansasError, match="batch rolled back: import on shard b"):
        w.move(batch=2)
    on_b = [u for u in w.queues if w.route(u).shard == "b"]
    assert len(on_b) == 2  # the first batch
    for u in w.queues:
        assert w.route(u).moving_to is None
        shard = w.route(u).shard
        assert w.events(shard, u) == [(0, 1)]
        assert w.shards[shard].queues[w.queues[u]].frozen_by is None
    assert not w.shards["b"].recordings and not w.shards["a"].freezes
    assert w.store.journal(REALM).result is None  # type: ignore[attr-defined]
    assert w.authority.load().realm_pins[REALM] == "a"  # new queues go back to a
    assert w.authority.list_moves()[0].state == "interrupted"
    w.notify(2, [1, 2, 3, 4, 5])
    progress = w.move(batch=2)
    assert progress.moved == 3
    assert all(w.events("b", u) == [(0, 1), (1, 2)] for u in w.queues)


def test_a_user_moves_alone(w: World) -> None:
    w.notify(1, [1, 2])
    coro = move_transparently(
        w.authority, w.store, w.client, w.clock, REALM, "b", user_id=1,  # type: ignore[arg-type]
        settle=0, wall=w.wall,
    )  # fmt: skip
    assert run(w.clock, coro).moved == 1
    assert w.route(1).shard == "b" and w.route(2).shard == "a"
    assert w.events("b", 1) == [(0, 1)] and w.events("a", 2) == [(0, 1)]
    assert w.authority.load().user_overrides[(REALM, 1)] == "b"
    assert w.authority.load().realm_pins[REALM] == "a"


def test_an_interrupted_batch_is_rolled_back_or_finished_by_the_next_run(w: World) -> None:
    mover = TransparentMover(w.authority, w.store, w.client, w.clock, REALM,  # type: ignore[arg-type]
                             wall=w.wall)  # fmt: skip
    a, b = w.authority.load().shards["a"], w.authority.load().shards["b"]
    ids = [w.queues[1], w.queues[2]]

    async def crash_after_export() -> None:
        batch = Batch("batch-1", REALM, "a", "b", ids, MARKED, w.wall() + 10)
        await w.client.prepare(b, batch.id, 60)
        await w.store.mark_moving(REALM, batch.to_json(), ids, "a", "b", batch.until)
        await w.client.export(a, batch.id, ids, 20)

    run(w.clock, crash_after_export())
    assert w.shards["a"].queues[w.queues[1]].frozen_by == "batch-1"
    run(w.clock, mover.resume())
    assert w.shards["a"].queues[w.queues[1]].frozen_by is None
    assert w.route(1).shard == "a" and w.route(1).moving_to is None
    assert not w.shards["b"].recordings

    async def crash_after_commit() -> None:
        batch = Batch("batch-2", REALM, "a", "b", ids, COMMITTED, w.wall() + 10)
        seen = await w.client.prepare(b, batch.id, 60)
        await w.client.fence(a, seen, 5)
        await w.store.mark_moving(REALM, batch.to_json(), ids, "a", "b", batch.until)
        exported = await w.client.export(a, batch.id, ids, 20)
        await w.client.import_(b, batch.id, exported["queues"], exported["cut"])
        await w.store.end_moving(REALM, batch.to_json(), ids, "b", [])

    run(w.clock, crash_after_commit())
    run(w.clock, mover.resume())
    assert w.queues[1] not in w.shards["a"].queues and w.queues[1] in w.shards["b"].queues
    assert w.route(1).shard == "b"
    assert not w.shards["b"].recordings and not w.shards["a"].freezes
    assert w.store.journal(REALM).result is None  # type: ignore[attr-defined]


def test_ctl_needs_the_shards_secret(
    postgres_dsn: str, redis_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    from kansas.ctl import main as ctl

    monkeypatch.delenv("KANSAS_SHARD_SECRET", raising=False)
    pg = ["--postgres", postgres_dsn, "--redis", redis_url]
    assert ctl([*pg, "migrate"]) == 0
    assert ctl([*pg, "shard", "add", "b", "http://127.0.0.1:9801"]) == 0
    capsys.readouterr()
    assert ctl([*pg, "realm", "move", REALM, "b", "--transparent"]) == 1
    err = capsys.readouterr().err
    assert err == "kansas-ctl: error: --transparent needs the shards' secret: --secret or " \
        "KANSAS_SHARD_SECRET\n"  # fmt: skip
    assert ctl([*pg, "user", "move", REALM, "7", "nowhere", "--transparent", "--secret", "s"]) == 1
    assert "no shard named 'nowhere'" in capsys.readouterr().err


@pytest_twisted.ensureDeferred
async def test_ctl_says_plainly_when_a_shard_lacks_the_protocol(
    postgres_dsn: str, redis_url: str
) -> None:
    """Unmodified Zulip Tornados answer 404 to the protocol's paths: the move says the
    shard does not support transparent moves and that nothing moved, and rolls back."""
    from twisted.internet import reactor

    from kansas.ctl import main as ctl
    from kansas.stores.redis import RedisRouteStore, parse_redis_url

    pg = ["--postgres", postgres_dsn, "--redis", redis_url]
    store = RedisRouteStore(parse_redis_url(redis_url), reactor)
    with not_found_server() as a_port, not_found_server() as b_port:
        assert ctl([*pg, "migrate"]) == 0
        assert ctl([*pg, "shard", "add", "a", f"http://127.0.0.1:{a_port}"]) == 0
        assert ctl([*pg, "shard", "add", "b", f"http://127.0.0.1:{b_port}"]) == 0
        assert ctl([*pg, "realm", "pin", REALM, "a"]) == 0
        before = [QueueRoute(f"q{i}", "a", REALM, i, 600) for i in range(3)]
        for route in before:
            await store.put(route)
        moved = subprocess.run(
            [sys.executable, "-m", "kansas.ctl", *pg, "realm", "move", REALM, "b",
             "--transparent", "--secret", "s", "--settle", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    try:
        assert moved.returncode == 1, moved.stdout + moved.stderr
        assert moved.stderr == (
            "kansas-ctl: error: shard b does not support transparent moves: it answered 404 "
            "to /api/internal/kansas/prepare, as a Tornado without the shard protocol "
            "(docs/transparent-moves.md) does, an unmodified Zulip's among them. Nothing was "
            "moved: every queue stays on its shard\n"
        )
        # The rollback it always did, and no noise from the shards that know no protocol.
        assert "rolled back, its queues stay on a" in moved.stdout, moved.stdout
        assert f"realm {REALM} pinned back to a" in moved.stdout, moved.stdout
        assert "warning" not in moved.stdout, moved.stdout
        assert sorted(await store.routes(REALM), key=lambda r: r.queue_id) == before
        assert await store.journal(REALM) is None
    finally:
        await store.close()
    authority = PostgresAuthority(postgres_dsn)
    try:
        assert authority.load().realm_pins[REALM] == "a"
        assert authority.list_moves()[0].state == "interrupted"
    finally:
        authority.close()
