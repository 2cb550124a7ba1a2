"""Restarting kansas under load drops nothing (master and workers, real processes).

kansas-load keeps 1,000 simulated Zulip clients long-polling through a kansas master
with two workers (plus a few clients polling with ``dont_block`` back to back), while
the master is sent SIGHUP ten times, 3 s apart: every request must get its 200, every
event must arrive exactly once, and every generation of workers must be new processes.
A worker killed with SIGKILL is respawned, and only requests it held may fail.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from kansas.ctl import main as ctl
from kansas.testing.client import call
from kansas.testing.load import LoadRun
from kansas.testing.processes import DemoShardProcess, KansasProcess

SECRET = "hot-restart-secret"
REALMS = "one.example.com,two.example.com,three.example.com"


class Rig:
    def __init__(self, tmp: Path, dsn: str, redis: str) -> None:
        self.tmp = tmp
        # Long-polls end every 5 s (Zulip: ~50 s), so retired workers drain quickly.
        self.shards = [DemoShardProcess(n, tmp, SECRET, heartbeat=5).start() for n in "ab"]
        assert ctl(["--postgres", dsn, "--redis", redis, "migrate"]) == 0
        for shard in self.shards:
            assert ctl(["--postgres", dsn, "shard", "add", shard.name, shard.url]) == 0
        self.kansas = KansasProcess(
            tmp, dsn, redis, workers=2, extra=["--drain-timeout", "30"]
        ).start()

    def load(self, clients: int, duration: float) -> LoadRun:
        extra = ["--dont-block-share", "0.003", "--connect-rate", "400"]
        return LoadRun(self.kansas, self.tmp / "load.json", SECRET, REALMS, clients, duration,
                       extra)  # fmt: skip

    def stop(self) -> None:
        self.kansas.stop(timeout=60)
        for shard in self.shards:
            shard.stop()


@pytest.fixture
def rig(tmp_path: Path, postgres_dsn: str, redis_url: str) -> Iterator[Rig]:
    r = Rig(tmp_path, postgres_dsn, redis_url)
    try:
        yield r
    finally:
        r.stop()


def scenario_over(load: LoadRun) -> dict[str, Any]:
    """The restarts are done: the load stops injecting events, drains and reports."""
    load.running()
    load.proc.send_signal(signal.SIGUSR1)
    return load.finish()[1]


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


@pytest.mark.timeout(300)
def test_ten_reloads_under_load_drop_nothing(rig: Rig) -> None:
    load = rig.load(clients=1000, duration=240)
    load.wait_parked(rig.shards, 990)  # a few clients poll with dont_block instead
    for n in range(2, 12):
        sent = time.monotonic()
        offset = len(rig.kansas.log_text())
        rig.kansas.send_signal(signal.SIGHUP)
        rig.kansas.wait_for(rf"generation {n} ready", after=offset)
        load.hold(max(0.0, sent + 3 - time.monotonic()))  # the scenario's pace
    report = scenario_over(load)

    assert report["errors"] == {}, report["errors"]  # no failed request, no reset
    # Requests a client had to send again (a kept-alive connection closed under them, as
    # Django and every HTTP client retry): the drain keeps these rare.
    assert report["stale_retries"] <= 50
    assert report["reregistrations"] == 0
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["out_of_order"] == 0
    assert report["deliveries_expected"] == report["delivered"] > 0
    assert report["long_polls"] > 2000 and report["dont_block_polls"] > 1000
    generations = rig.kansas.generations()
    assert [g for g, _ in generations] == list(range(1, 12))
    every_pid = [pid for _, pids in generations for pid in pids]
    assert len(set(every_pid)) == 22  # each generation is new processes
    # Every retired worker drains (its long-polls end within the 5 s heartbeat) and exits.
    deadline = time.monotonic() + 30
    while pids_alive(every_pid[:-2]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids_alive(every_pid[:-2]) == []
    assert len(pids_alive(generations[-1][1])) == 2


@pytest.mark.timeout(120)
def test_a_generation_that_cannot_start_is_abandoned_and_the_old_one_serves_on(
    rig: Rig, postgres_dsn: str
) -> None:
    # As if new code needed a schema the database does not have yet.
    conn = psycopg2.connect(postgres_dsn)
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE kansas_schema_version SET version = version - 1")
    conn.close()
    ((_, pids),) = rig.kansas.generations()
    offset = len(rig.kansas.log_text())
    rig.kansas.send_signal(signal.SIGHUP)
    failed = rig.kansas.wait_for(
        r"new generation 2 failed \((.*)\); generation 1 keeps", after=offset
    )
    assert "exit code 1" in failed.group(1)
    assert "run `kansas-ctl --postgres DSN migrate`" in rig.kansas.log_text()[offset:]
    assert pids_alive(pids) == pids
    form = {"secret": SECRET, "user_profile_id": 5, "dont_block": "true"}
    made = call(rig.kansas.internal_port, "POST", "/api/v1/events/internal",
                host="one.example.com", form=form)  # fmt: skip
    assert made.status == 200, made
    got = call(rig.kansas.public_port, "GET", "/json/events", host="one.example.com",
               params={"queue_id": made.json["queue_id"], "dont_block": "true"})  # fmt: skip
    assert got.status == 200 and got.json["result"] == "success", got


@pytest.mark.timeout(120)
def test_metrics_scraped_from_one_worker_cover_every_worker(rig: Rig) -> None:
    for _ in range(20):  # spread over both workers by the shared accept queue
        call(rig.kansas.public_port, "GET", "/json/events", host="one.example.com",
             params={"queue_id": "not-a-queue", "last_event_id": -1})  # fmt: skip
    scraped = call(rig.kansas.internal_port, "GET", "/metrics").body.decode()
    assert "kansas_workers 2.0" in scraped, scraped[:2000]
    pids = {pid for _, pids in rig.kansas.generations() for pid in pids}
    for pid in pids:
        assert f'worker="{pid}"' in scraped


@pytest.mark.timeout(240)
def test_a_killed_worker_is_respawned_and_new_connections_never_fail(rig: Rig) -> None:
    load = rig.load(clients=300, duration=240)
    load.wait_parked(rig.shards, 298)
    ((_, pids),) = rig.kansas.generations()
    offset = len(rig.kansas.log_text())
    os.kill(pids[0], signal.SIGKILL)
    rig.kansas.wait_for(r"died .* respawning", after=offset)
    back = rig.kansas.wait_for(r"worker 1\.0 \(pid (\d+)\) is back", after=offset)
    load.hold(3)  # the scenario: the load carries on against the respawned worker
    report = scenario_over(load)

    assert int(back.group(1)) not in pids
    # Only what the killed worker held could fail (its connections were cut); no new
    # connection was ever refused, and every event still arrived once.
    errors = report["errors"]
    assert set(errors) <= {"connection"}, errors
    assert errors.get("connection", 0) <= 300
    assert not any(k.endswith("connect") for k in errors)
    assert report["lost"] == 0 and report["duplicated"] == 0
    assert report["deliveries_expected"] == report["delivered"] > 0
    assert len(pids_alive([pids[1], int(back.group(1))])) == 2
