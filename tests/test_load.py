"""kansas-load: its accounting (unit), and real runs through kansas and against a shard."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

from kansas.ctl import main as ctl
from kansas.load import Accounting, LoadConfig, parse_args, run_load
from kansas.testing.client import call
from kansas.testing.processes import CHECKOUT, DemoShardProcess, KansasProcess

SECRET = "load-secret"
ONE, TWO = "one.example.com", "two.example.com"


# -- accounting, no servers ---------------------------------------------------------------


def test_a_duplicate_delivery_is_reported() -> None:
    acc = Accounting(clients=2)
    gen = acc.registering(1)
    acc.registered(gen, "q1")
    seq = acc.new_event([1])
    acc.sending(seq, now=0.0)
    acc.sent(seq, ok=True)
    acc.deliver(1, gen, {"type": "message", "seq": seq, "id": 0}, now=0.01)
    assert acc.outstanding == 0
    acc.deliver(1, gen, {"type": "message", "seq": seq, "id": 1}, now=0.02)  # again
    acc.finish()
    counts = acc.counts()
    assert counts["duplicated"] == 1
    assert counts["delivered"] == counts["deliveries_expected"] == 1
    assert counts["lost"] == 0


def test_lost_misdelivered_and_reordered_events_are_reported() -> None:
    acc = Accounting(clients=3)
    one = acc.registering(1)
    acc.registered(one, "q1")
    two = acc.registering(2)
    acc.registered(two, "q2")
    first, second, third = (acc.new_event([1]) for _ in range(3))
    for seq in (first, second, third):
        acc.sending(seq, now=0.0)
        acc.sent(seq, ok=True)  # each notify ended before the next was sent
    acc.deliver(1, one, {"seq": second}, now=0.1)
    acc.deliver(1, one, {"seq": first}, now=0.1)  # must have come before `second`
    acc.deliver(2, two, {"seq": third}, now=0.1)  # sent to user 1 only
    acc.finish()
    counts = acc.counts()
    assert counts["out_of_order"] == 1
    assert counts["unexpected"] == 1
    assert counts["lost"] == 1  # `third` never reached user 1
    assert counts["deliveries_expected"] == 3


def test_expectations_follow_registration_and_notify_outcome() -> None:
    acc = Accounting(clients=1)
    early = acc.new_event([1])
    acc.sending(early, now=0.0)
    acc.sent(early, ok=True)  # before the queue existed: never expected
    gen = acc.registering(1)
    racing = acc.new_event([1])
    acc.sending(racing, now=0.0)  # while registering: may or may not arrive
    acc.registered(gen, "q")
    failed = acc.new_event([1])
    acc.sending(failed, now=0.0)
    acc.sent(failed, ok=False)  # a failed notify is not expected
    acc.sent(racing, ok=True)
    acc.deliver(1, gen, {"seq": racing}, now=0.1)
    acc.deliver(1, gen, {"seq": early}, now=0.1)
    kept = acc.new_event([1])
    acc.sending(kept, now=0.0)
    acc.sent(kept, ok=True)
    assert acc.outstanding == 1
    assert acc.counts()["failed_notify_missing"] == 1  # `failed` never came
    new_gen = acc.registering(1)  # BAD_EVENT_QUEUE_ID: `kept` is given up with the queue
    acc.registered(new_gen, "q2")
    assert acc.outstanding == 0
    acc.finish()
    counts = acc.counts()
    assert counts["uncertain"] == 1
    assert counts["failed_notify_missing"] == 0  # given up with the queue
    assert counts["unexpected"] == 1
    assert counts["abandoned"] == 1
    assert counts["deliveries_expected"] == 1
    assert counts["lost"] == 0


def test_cli_options() -> None:
    config = parse_args(
        ["--public", "http://127.0.0.1:1", "--internal", "http://127.0.0.1:2",
         "--realms", "a.example.com, b.example.com", "--recipients", "2..5",
         "--tolerate", "http-502,connection", "--dont-block-share", "0.5"]
    )  # fmt: skip
    assert config.realms == ["a.example.com", "b.example.com"]
    assert config.recipient_range() == (2, 5)
    assert config.tolerate == {"http-502", "connection"}
    assert LoadConfig("http://h:1", "http://h:2", clients=4).recipient_range() == (1, 4)
    with pytest.raises(SystemExit):
        parse_args(["--public", "https://x", "--internal", "http://127.0.0.1:2"])


# -- real runs --------------------------------------------------------------------------


class Stack:
    """Two demo shards, one realm pinned to each, and kansas in front."""

    def __init__(self, tmp: Path, postgres_dsn: str, redis_url: str) -> None:
        self.dsn, self.redis = postgres_dsn, redis_url
        self.shards: list[DemoShardProcess] = []
        self.kansas: KansasProcess | None = None
        for name in ("a", "b"):
            self.shards.append(DemoShardProcess(name, tmp, SECRET, heartbeat=1.5).start())
        self.ctl("migrate")
        for shard, realm in zip(self.shards, (ONE, TWO), strict=True):
            self.ctl("shard", "add", shard.name, shard.url)
            self.ctl("realm", "pin", realm, shard.name)
        self.kansas = KansasProcess(tmp, postgres_dsn, redis_url).start()

    def ctl(self, *args: str) -> None:
        assert ctl(["--postgres", self.dsn, "--redis", self.redis, *args]) == 0

    def stop(self) -> None:
        if self.kansas is not None:
            self.kansas.stop()
        for shard in self.shards:
            shard.stop()


@pytest.fixture
def stack(tmp_path: Path, postgres_dsn: str, redis_url: str) -> Iterator[Stack]:
    s = Stack(tmp_path, postgres_dsn, redis_url)
    try:
        yield s
    finally:
        s.stop()


@pytest_twisted.ensureDeferred
async def test_load_through_kansas_delivers_every_event_once(stack: Stack) -> None:
    from twisted.internet import reactor

    assert stack.kansas is not None
    config = LoadConfig(
        public=f"http://127.0.0.1:{stack.kansas.public_port}",
        internal=f"http://127.0.0.1:{stack.kansas.internal_port}",
        secret=SECRET,
        realms=[ONE, TWO],
        clients=50,
        duration=5.0,
        event_rate=20.0,
        dont_block_share=0.2,
        drain=10.0,
        seed=1,
    )
    report = await run_load(reactor, config)
    summary = report.text()
    print(summary)
    assert report.ok, summary
    assert report.errors == {}, summary
    assert report.clients_registered == 50
    assert report.lost == report.duplicated == report.out_of_order == report.unexpected == 0
    assert report.events_injected >= 90
    assert report.deliveries_expected > report.events_injected  # 1..10 recipients each
    assert report.delivered == report.deliveries_expected, summary
    assert report.drained
    assert report.dont_block_polls > 1000 and report.long_polls > 50, summary
    assert report.heartbeats > 0  # 1.5 s heartbeats on the shards: acked, not counted
    assert report.event_latency.count == report.delivered
    # One realm is pinned to each shard: both hold queues.
    for shard in stack.shards:
        held = call(shard.port, "GET", "/demo/queues").json["queues"]
        assert len(held) >= 25, shard.name


@pytest.fixture
def shard(tmp_path: Path) -> Iterator[DemoShardProcess]:
    s = DemoShardProcess("solo", tmp_path, SECRET).start()
    try:
        yield s
    finally:
        s.stop()


def test_cli_against_a_shard_writes_a_json_report(shard: DemoShardProcess, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    argv = [sys.executable, "-m", "kansas.load", "--public", shard.url, "--internal", shard.url,
            "--secret", SECRET, "--clients", "20", "--duration", "1.5", "--event-rate", "30",
            "--dont-block-share", "0.5", "--drain", "5",
            "--json-report", str(report_path)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=CHECKOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kansas-load: OK" in done.stdout
    assert "req/s" in done.stderr  # the progress line
    report = json.loads(report_path.read_text())
    assert report["ok"] is True
    assert report["lost"] == report["duplicated"] == 0
    assert report["delivered"] == report["deliveries_expected"] > 0
    assert report["requests"] > 0
    assert set(report["request_latency"]) == {"count", "p50_ms", "p90_ms", "p99_ms", "max_ms"}


def test_cli_fails_on_errors_it_was_not_told_to_tolerate(tmp_path: Path) -> None:
    # Nothing listens on the internal URL: every queue creation is a connection error.
    from kansas.testing.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    report_path = tmp_path / "report.json"
    argv = [sys.executable, "-m", "kansas.load", "--public", url, "--internal", url,
            "--clients", "2", "--duration", "0.2", "--connect-rate", "1000", "--quiet",
            "--drain", "0.2", "--connect-deadline", "1", "--max-backoff", "0.1",
            "--json-report", str(report_path)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=CHECKOUT)
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert report["errors"].get("register:connect", 0) > 0
    assert report["clients_registered"] == 0
