"""A Tornado shard restart is invisible to clients (real processes end to end).

300 simulated Zulip clients (kansas-load, a subprocess) long-poll through kansas on one
demo shard while events flow; the shard is stopped with SIGTERM (it dumps its queues),
and started again (it reloads them). Every event, sent before, during or after the
outage, must arrive exactly once, and no GET may see anything but a 200.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kansas.ctl import main as ctl
from kansas.testing.client import Reply, call
from kansas.testing.load import LoadRun
from kansas.testing.processes import DemoShardProcess, KansasProcess

SECRET = "restart-secret"
REALM = "chat.example.com"


class Rig:
    def __init__(self, tmp: Path, dsn: str, redis: str) -> None:
        self.tmp = tmp
        self.shard = DemoShardProcess("a", tmp, SECRET).start()
        for args in (["migrate"], ["shard", "add", "a", self.shard.url]):
            assert ctl(["--postgres", dsn, "--redis", redis, *args]) == 0
        self.kansas = KansasProcess(tmp, dsn, redis).start()

    def load(self, clients: int, duration: float) -> LoadRun:
        return LoadRun(self.kansas, self.tmp / "load.json", SECRET, REALM, clients, duration)

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


def finish(load: LoadRun) -> dict[str, Any]:
    code, report = load.finish()
    assert code == 0, report
    return report


@pytest.mark.timeout(240)
def test_300_clients_do_not_notice_a_shard_restart(rig: Rig) -> None:
    form = {"secret": SECRET, "user_profile_id": 9999, "dont_block": "true"}
    spare = call(rig.kansas.internal_port, "POST", "/api/v1/events/internal", host=REALM, form=form)
    load = rig.load(clients=300, duration=25)
    load.wait_parked([rig.shard], 300)
    rig.shard.stop()  # SIGTERM: the shard dumps its queues and drops its long-polls
    # A DELETE cannot be held and replayed: it gets a clean 502 during the outage.
    gone = call(rig.kansas.public_port, "DELETE", "/json/events", host=REALM,
                params={"queue_id": spare.json["queue_id"]})  # fmt: skip
    assert gone.status == 502 and gone.json["code"] == "BAD_GATEWAY", gone
    load.hold(5)  # the outage
    rig.shard.start()  # reloads the queues: same ids, same event ids
    report = finish(load)

    assert report["errors"] == {}  # not one non-200 answer, nor a dropped connection
    assert report["reregistrations"] == 0
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["out_of_order"] == 0
    assert report["deliveries_expected"] == report["delivered"] > 0
    assert report["events_injected"] > 300  # 20/s for 25 s, before, during and after
    assert b"is up again after" in rig.kansas.log_path.read_bytes()


@pytest.mark.timeout(300)
def test_a_shard_down_for_a_minute_gets_empty_answers_at_50_s(rig: Rig) -> None:
    load = rig.load(clients=50, duration=80)
    load.wait_parked([rig.shard], 50)
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
    load.hold(60)  # the outage
    rig.shard.start()
    poller.join(timeout=60)
    took, reply = answer[0]
    assert reply.status == 200
    assert reply.json == {"result": "success", "msg": "", "events": [], "queue_id": queue_id}
    assert 49 <= took <= 53, took
    report = finish(load)
    assert report["errors"] == {} and report["lost"] == 0 and report["duplicated"] == 0
    assert report["deliveries_expected"] == report["delivered"] > 0
