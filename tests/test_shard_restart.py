"""A Tornado shard restart is invisible to clients (real processes end to end).

300 simulated Zulip clients (kansas-load, a subprocess) long-poll through kansas on one
demo shard while events flow; the shard is stopped with SIGTERM (it dumps its queues),
and started again (it reloads them). Every event, sent before, during or after the
outage, must arrive exactly once, and no GET may see anything but a 200.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kansas.ctl import main as ctl
from kansas.testing.client import Reply, call
from kansas.testing.processes import CHECKOUT, DemoShardProcess, KansasProcess

SECRET = "restart-secret"
REALM = "chat.example.com"


class Rig:
    def __init__(self, tmp: Path, dsn: str, redis: str) -> None:
        self.tmp = tmp
        self.shard = DemoShardProcess("a", tmp, SECRET).start()
        for args in (["migrate"], ["shard", "add", "a", self.shard.url]):
            assert ctl(["--postgres", dsn, "--redis", redis, *args]) == 0
        self.kansas = KansasProcess(tmp, dsn, redis).start()

    def parked_at_shard(self) -> int:
        queues = call(self.shard.port, "GET", "/demo/queues", timeout=30).json["queues"]
        return sum(1 for q in queues if q["parked"])

    def wait_parked(self, n: int, load: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 60
        while self.parked_at_shard() < n:
            assert load.poll() is None, load.communicate()
            assert time.monotonic() < deadline, "the clients never all long-polled"
            time.sleep(0.1)

    def load(self, clients: int, duration: float) -> tuple[subprocess.Popen[str], Path]:
        report = self.tmp / "load.json"
        argv = [sys.executable, "-m", "kansas.load", "--quiet", "--json-report", str(report),
                "--public", f"http://127.0.0.1:{self.kansas.public_port}",
                "--internal", f"http://127.0.0.1:{self.kansas.internal_port}",
                "--secret", SECRET, "--realms", REALM, "--clients", str(clients),
                "--duration", str(duration), "--event-rate", "20", "--drain", "40"]  # fmt: skip
        proc = subprocess.Popen(argv, cwd=CHECKOUT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        return proc, report

    def stop(self) -> None:
        self.kansas.stop()
        self.shard.stop()


@pytest.fixture
def rig(tmp_path: Path, postgres_dsn: str, redis_url: str) -> Iterator[Rig]:
    r = Rig(tmp_path, postgres_dsn, redis_url)
    try:
        yield r
    finally:
        r.stop()


def finish(load: subprocess.Popen[str], report_path: Path) -> dict[str, Any]:
    output, _ = load.communicate(timeout=180)
    report = json.loads(report_path.read_text())
    assert load.returncode == 0, output
    return report


def outage(seconds: float, load: subprocess.Popen[str]) -> None:
    """Keep the shard down this long (the scenario's length, not a synchronisation)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert load.poll() is None, load.communicate()
        time.sleep(0.1)


@pytest.mark.timeout(240)
def test_300_clients_do_not_notice_a_shard_restart(rig: Rig) -> None:
    form = {"secret": SECRET, "user_profile_id": 9999, "dont_block": "true"}
    spare = call(rig.kansas.internal_port, "POST", "/api/v1/events/internal", host=REALM, form=form)
    load, report_path = rig.load(clients=300, duration=25)
    rig.wait_parked(300, load)
    rig.shard.stop()  # SIGTERM: the shard dumps its queues and drops its long-polls
    # A DELETE cannot be held and replayed: it gets a clean 502 during the outage.
    gone = call(rig.kansas.public_port, "DELETE", "/json/events", host=REALM,
                params={"queue_id": spare.json["queue_id"]})  # fmt: skip
    assert gone.status == 502 and gone.json["code"] == "BAD_GATEWAY", gone
    outage(5, load)
    rig.shard.start()  # reloads the queues: same ids, same event ids
    report = finish(load, report_path)

    assert report["errors"] == {}  # not one non-200 answer, nor a dropped connection
    assert report["reregistrations"] == 0
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["out_of_order"] == 0
    assert report["deliveries_expected"] == report["delivered"] > 0
    assert report["events_injected"] > 300  # 20/s for 25 s, before, during and after
    assert b"is up again after" in rig.kansas.log_path.read_bytes()


@pytest.mark.timeout(300)
def test_a_shard_down_for_a_minute_gets_empty_answers_at_50_s(rig: Rig) -> None:
    load, report_path = rig.load(clients=50, duration=80)
    rig.wait_parked(50, load)
    queue_id = call(rig.kansas.internal_port, "POST", "/api/v1/events/internal", host=REALM,
                    form={"secret": SECRET, "user_profile_id": 9999,
                          "dont_block": "true"}).json["queue_id"]  # fmt: skip
    rig.shard.stop()
    answer: list[tuple[float, Reply]] = []

    def long_poll() -> None:
        started = time.monotonic()
        reply = call(rig.kansas.public_port, "GET", "/json/events", host=REALM, timeout=90,
                     params={"queue_id": queue_id, "last_event_id": -1})  # fmt: skip
        answer.append((time.monotonic() - started, reply))

    poller = threading.Thread(target=long_poll)
    poller.start()
    outage(60, load)
    rig.shard.start()
    poller.join(timeout=60)
    took, reply = answer[0]
    assert reply.status == 200
    assert reply.json == {"result": "success", "msg": "", "events": [], "queue_id": queue_id}
    assert 49 <= took <= 53, took
    report = finish(load, report_path)
    assert report["errors"] == {} and report["lost"] == 0 and report["duplicated"] == 0
    assert report["deliveries_expected"] == report["delivered"] > 0
