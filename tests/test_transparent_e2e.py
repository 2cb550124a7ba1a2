"""Transparent moves end to end, with real processes: Redis, PostgreSQL, kansas, two demo
shards, ``kansas-ctl realm move --transparent`` as operators run it, and hundreds of
simulated Zulip clients (``kansas.load``, in this process) long-polling while events flow.

Every client must get every event exactly once and in order, and no client may see an
error, a ``BAD_EVENT_QUEUE_ID`` or a re-registration: the move is invisible but for a
short pause, which is measured and printed.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from kansas.ctl import main as ctl
from kansas.load import LoadConfig, LoadReport, LoadRun
from kansas.testing.client import call
from kansas.testing.processes import CHECKOUT, DemoShardProcess, KansasProcess

SECRET = "transparent-secret"
REALM = "chat.example.com"


class Stack:
    def __init__(self, tmp: Path, dsn: str, redis: str, die_on_import: int | None) -> None:
        self.tmp, self.dsn, self.redis = tmp, dsn, redis
        self.a = DemoShardProcess("a", tmp, SECRET).start()
        self.b = DemoShardProcess("b", tmp, SECRET)
        if die_on_import is not None:
            self.b.argv += ["--die-on-import", str(die_on_import)]
        self.b.start()
        pg = ["--postgres", dsn, "--redis", redis]
        for args in (["migrate"], ["shard", "add", "a", self.a.url],
                     ["shard", "add", "b", self.b.url], ["realm", "pin", REALM, "a"]):  # fmt: skip
            assert ctl([*pg, *args]) == 0
        self.kansas = KansasProcess(tmp, dsn, redis).start()

    def queues(self, shard: DemoShardProcess) -> list[dict[str, Any]]:
        return list(call(shard.port, "GET", "/demo/queues", timeout=30).json["queues"])

    def move(self, batch: int = 50) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "kansas.ctl", "--postgres", self.dsn, "--redis", self.redis,
                "realm", "move", REALM, "b", "--transparent", "--batch", str(batch),
                "--settle", "1", "--secret", SECRET]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=CHECKOUT)

    def stop(self) -> None:
        self.kansas.stop()
        self.a.stop()
        self.b.stop()


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path, postgres_dsn: str,
          redis_url: str) -> Iterator[Stack]:  # fmt: skip
    s = Stack(tmp_path, postgres_dsn, redis_url, getattr(request, "param", None))
    try:
        yield s
    finally:
        s.stop()


class Watch:
    """kansas-load in this process, with each delivery's latency kept per client."""

    def __init__(self, stack: Stack, clients: int, duration: float) -> None:
        from twisted.internet import reactor

        # drain: the wait for the last deliveries ends as soon as they are all in; 60 s
        # leaves room for a move still switching batches when the run ends on a busy
        # machine (30 s once ran out there, and its undelivered events counted as lost).

        self.reactor: Any = reactor
        config = LoadConfig(
            public=f"http://127.0.0.1:{stack.kansas.public_port}",
            internal=f"http://127.0.0.1:{stack.kansas.internal_port}",
            secret=SECRET, realms=[REALM], clients=clients, duration=duration,
            event_rate=20, recipients=(25, 25), drain=60, seed=6,
        )  # fmt: skip
        self.run = LoadRun(reactor, config, None)
        #: (user, sent at, latency) of every delivery
        self.deliveries: list[tuple[int, float, float]] = []
        accounting = self.run.accounting
        deliver = accounting.deliver

        #: per user: (seq, event id, queue) of each delivery, to explain an anomaly
        self.trail: dict[int, list[tuple[Any, Any, Any]]] = {}

        def recording(user_id: int, gen: Any, event: dict[str, Any], now: float) -> None:
            seq = event.get("seq")
            if isinstance(seq, int) and 0 <= seq < len(accounting.events):
                sent = accounting.events[seq].sent_at
                self.deliveries.append((user_id, sent, now - sent))
            self.trail.setdefault(user_id, []).append((seq, event.get("id"), gen.queue_id))
            deliver(user_id, gen, event, now)

        accounting.deliver = recording  # type: ignore[method-assign]
        self.done = ensureDeferred(self.run.run())

    async def running(self) -> None:
        """Until every client is registered and events flow (bounded)."""
        deadline = self.reactor.seconds() + 60
        while self.run.phase != "run":
            assert self.reactor.seconds() < deadline and not self.done.called
            await deferLater(self.reactor, 0.05, lambda: None)

    async def move(self, stack: Stack) -> tuple[subprocess.CompletedProcess[str], float, float]:
        started = self.reactor.seconds()
        result = await deferToThread(stack.move)
        return result, started, self.reactor.seconds()

    async def report(self) -> LoadReport:
        report: LoadReport = await self.done
        return report

    def duplicates(self) -> str:
        """Each client that got an event twice: its deliveries, ``seq/id``."""
        out = []
        for user, trail in self.trail.items():
            seqs = [seq for seq, _, _ in trail]
            if len(seqs) != len(set(seqs)):
                out.append(f"user {user}: " + " ".join(f"{s}/{i}" for s, i, _ in trail))
        return "\n".join(out)

    def pauses(self, start: float, end: float) -> list[float]:
        """Per client, the longest any event sent during [start, end] took to arrive."""
        worst: dict[int, float] = {}
        for user, sent, latency in self.deliveries:
            if start <= sent <= end:
                worst[user] = max(worst.get(user, 0.0), latency)
        return sorted(worst.values())


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    return values[max(0, math.ceil(p * len(values)) - 1)] * 1000 if values else 0.0


def summary(name: str, values: list[float]) -> str:
    values = sorted(values)
    return (f"{name}: n={len(values)} p50 {pct(values, 0.5):.0f} ms, p99 {pct(values, 0.99):.0f}"
            f" ms, max {max(values, default=0) * 1000:.0f} ms")  # fmt: skip


def assert_invisible(report: LoadReport) -> None:
    assert report.errors == {}, report.errors  # not one non-200 answer, nor a dropped connection
    assert report.reregistrations == 0  # no BAD_EVENT_QUEUE_ID, no page reload
    assert report.lost == report.duplicated == report.out_of_order == report.unexpected == 0
    assert report.deliveries_expected == report.delivered > 0
    assert report.ok, report.failures


@pytest.mark.timeout(180)
@pytest_twisted.ensureDeferred
async def test_500_clients_never_notice_their_realm_moving(stack: Stack) -> None:
    watch = Watch(stack, clients=500, duration=12)
    await watch.running()
    await deferLater(watch.reactor, 1.0, lambda: None)  # events flow before the move
    moved, start, end = await watch.move(stack)
    print(moved.stdout)
    assert moved.returncode == 0, moved.stderr + moved.stdout
    report = await watch.report()
    print(report.text())
    assert report.duplicated == 0, watch.duplicates()
    assert_invisible(report)
    assert "batch 10/10: 50 queue(s) a -> b" in moved.stdout
    assert len(stack.queues(stack.b)) == 500 and stack.queues(stack.a) == []
    held = [float(ms) for ms in re.findall(r"^batch .* requests held (\d+) ms", moved.stdout, re.M)]
    pauses = watch.pauses(start, end)
    kansas_log = stack.kansas.log_text()
    found = re.findall(r"routed again, the longest after (\d+) ms", kansas_log)
    longest = [float(m) for m in found]
    print(summary("per batch, requests held (mover)", [h / 1000 for h in held]))
    print(summary("per client, worst event latency during the move", pauses))
    print(summary("per release, longest hold (kansas)", [m / 1000 for m in longest]))
    assert len(held) == 10 and max(held) < 10_000  # within the batch deadline
    assert "Traceback" not in kansas_log


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stack", [1], indirect=True)  # b dies at its first import
@pytest_twisted.ensureDeferred
async def test_the_new_shard_dying_mid_batch_rolls_the_batch_back(stack: Stack) -> None:
    watch = Watch(stack, clients=300, duration=15)
    await watch.running()
    failed, start, end = await watch.move(stack)
    print(failed.stdout, failed.stderr)
    assert failed.returncode == 1
    assert "batch rolled back: import on shard b" in failed.stderr
    assert "realm chat.example.com pinned back to a" in failed.stdout
    assert not stack.b.alive()
    # Every queue is still on a, live (not frozen), and its mapping names a.
    on_a = stack.queues(stack.a)
    assert len(on_a) == 300 and not any(q.get("frozen") for q in on_a)
    stack.b.argv = stack.b.argv[: stack.b.argv.index("--die-on-import")]
    stack.b.start()  # empty: it was killed
    moved, _, end = await watch.move(stack)
    print(moved.stdout)
    assert moved.returncode == 0, moved.stderr + moved.stdout
    report = await watch.report()
    print(report.text())
    assert_invisible(report)
    assert len(stack.queues(stack.b)) == 300 and stack.queues(stack.a) == []
    print(summary("per client, worst event latency from the failed batch to the end of the "
                  "second move", watch.pauses(start, end)))  # fmt: skip
