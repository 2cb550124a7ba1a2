"""kansas on hostile networks (issue 22, part 2): real partitions, delay and loss.

Redis, PostgreSQL or a shard runs on a test host of its own (a network namespace
joined to ours by a veth pair, kansas.testing.netns); kansas runs here and reaches it
over that link, which the test cuts silently (every packet dropped, both ways: no RST,
no ICMP), or makes slow and lossy. Namespaces, links and rules are removed by the
fixtures, even on failure; a crashed run's are removed by the next one. Without root
(CAP_NET_ADMIN) these tests skip.

Outages are shorter here than in the issue (30 s) to keep ``make test`` short:
``KANSAS_PARTITION_SECONDS`` sets them (docs/reliability.md has the 30 s figures).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from kansas.ctl import main as ctl
from kansas.testing.client import call
from kansas.testing.netns import TestHost, available, cleanup_stale
from kansas.testing.processes import DemoShardProcess, KansasProcess

SECRET = "partition-secret"
ONE, TWO = "one.example.com", "two.example.com"
#: How long each partition lasts (the issue's is 30 s; KANSAS_PARTITION_SECONDS=30).
OUTAGE = float(os.environ.get("KANSAS_PARTITION_SECONDS", "12"))


@pytest.fixture(scope="module")
def netns_ok() -> None:
    why = available()
    if why is not None:
        pytest.skip(f"no test hosts on their own network here: {why}")
    cleanup_stale()


@pytest.fixture
def test_host(netns_ok: None) -> Iterator[Callable[[str], TestHost]]:
    made: list[TestHost] = []

    def make(role: str) -> TestHost:
        host = TestHost(role)
        made.append(host)
        return host.create()

    try:
        yield make
    finally:
        for host in made:
            host.remove()


def until(condition: Callable[[], Any], seconds: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not after {seconds} s"
        time.sleep(step)


def request(host: str, port: int, method: str, path: str, *, realm: str = "x",
         params: dict[str, Any] | None = None, form: dict[str, Any] | None = None,
         timeout: float = 10.0) -> tuple[int, Any]:  # fmt: skip
    """One request to any address: status and decoded JSON body."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        body = urlencode(form).encode() if form is not None else None
        # As from Zulip on the shard's own host (the demo, as Tornado, trusts X-Real-Ip).
        headers = {"Host": realm, "X-Real-Ip": "127.0.0.1"}
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path + ("?" + urlencode(params) if params else ""), body, headers)
        response = conn.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data
    finally:
        conn.close()


class Stack:
    """Demo shards a and b (a wherever the test puts it), kansas processes, and the
    PostgreSQL and Redis they use."""

    def __init__(self, tmp: Path, dsn: str, redis: str, shard_a: DemoShardProcess | None = None,
                 heartbeat: float = 3.0) -> None:  # fmt: skip
        self.tmp, self.dsn, self.redis = tmp, dsn, redis
        self.shards = {
            "a": shard_a or DemoShardProcess("a", tmp, SECRET, heartbeat=heartbeat),
            "b": DemoShardProcess("b", tmp, SECRET, heartbeat=heartbeat),
        }
        self.kansases: list[KansasProcess] = []
        for shard in self.shards.values():
            shard.start()
        self.ctl("migrate")
        for name, shard in self.shards.items():
            self.ctl("shard", "add", name, shard.url)
        self.ctl("realm", "pin", ONE, "a")
        self.ctl("realm", "pin", TWO, "b")

    def ctl(self, *args: str) -> None:
        assert ctl(["--postgres", self.dsn, "--redis", self.redis, *args]) == 0, args

    def kansas(self, extra: list[str] | None = None) -> KansasProcess:
        k = KansasProcess(self.tmp, self.dsn, self.redis, extra=extra)
        self.kansases.append(k.start())
        return k

    def stop(self) -> None:
        for k in self.kansases:
            k.stop()
        for shard in self.shards.values():
            shard.stop()

    def create_queue(self, k: KansasProcess, realm: str, user: int) -> str:
        form = {"secret": SECRET, "user_profile_id": user, "dont_block": "true"}
        reply = call(k.internal_port, "POST", "/api/v1/events/internal", host=realm, form=form)
        assert reply.status == 200, reply
        return str(reply.json["queue_id"])

    def queues_at(self, name: str) -> list[dict[str, Any]]:
        shard = self.shards[name]
        status, body = request(shard.interface, shard.port, "GET", "/demo/queues", timeout=30)
        assert status == 200, body
        return list(body["queues"])


@dataclass
class Request:
    started: float
    took: float
    status: int  # 0: no answer (the error says why)
    error: str = ""


@dataclass
class Poller:
    """A Zulip client: long-polls its queue through kansas, again and again."""

    port: int
    queue_id: str
    realm: str
    timeout: float = 60.0  # below Zulip's 90 s, to keep a failing test short
    requests: list[Request] = field(default_factory=list)
    last_event_id: int = -1
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            params = {"queue_id": self.queue_id, "last_event_id": self.last_event_id}
            started = time.monotonic()
            try:
                status, body = request("127.0.0.1", self.port, "GET", "/json/events",
                                    realm=self.realm, params=params,
                                    timeout=self.timeout)  # fmt: skip
            except OSError as e:
                self.requests.append(Request(started, time.monotonic() - started, 0, repr(e)))
                time.sleep(0.5)
                continue
            took = time.monotonic() - started
            self.requests.append(Request(started, took, status, "" if status == 200 else str(body)))
            if status == 200 and isinstance(body, dict):
                for event in body.get("events", []):
                    self.last_event_id = max(self.last_event_id, int(event["id"]))
            else:
                time.sleep(0.5)


def start_pollers(k: KansasProcess, queues: list[str], realm: str) -> list[Poller]:
    pollers = [Poller(k.public_port, q, realm) for q in queues]
    for p in pollers:
        threading.Thread(target=p.run, daemon=True).start()
    return pollers


def stop_pollers(pollers: list[Poller], seconds: float = 70) -> None:
    for p in pollers:
        p.stop.set()
    deadline = time.monotonic() + seconds
    for p in pollers:  # each ends with its request in flight
        while (not p.requests or p.requests[-1].started + p.requests[-1].took
               < deadline - seconds) and time.monotonic() < deadline:  # fmt: skip
            time.sleep(0.05)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def released(k: KansasProcess, after: int = 0) -> list[tuple[int, float, float]]:
    """(count, seconds, rate) of each release of parked requests kansas logged."""
    pattern = r"released (\d+) parked requests to shard \w+ in ([\d.]+) s \(([\d.]+)/s\)"
    return [(int(n), float(t), float(r)) for n, t, r in re.findall(pattern, k.log_text()[after:])]


# -- kansas <-> a shard ---------------------------------------------------------------------


def test_a_silently_partitioned_shard_parks_gets_502s_deletes_and_releases_at_the_rate(
    tmp_path: Path, postgres_dsn: str, redis_url: str, test_host: Callable[[str], TestHost]
) -> None:
    """The link to shard a drops every packet for OUTAGE s. Long-polls in flight there
    and GETs sent during the partition are parked as for a shard restart and replayed
    when the link heals, at --release-rate; DELETEs are 502; shard b is not affected."""
    host = test_host("shard")
    shard_a = DemoShardProcess("a", tmp_path, SECRET, heartbeat=3.0, interface=host.address,
                               prefix=host.prefix)  # fmt: skip
    stack = Stack(tmp_path, postgres_dsn, redis_url, shard_a=shard_a)
    try:
        rate = 20
        k = stack.kansas(["--release-rate", str(rate)])
        queues = [stack.create_queue(k, ONE, user) for user in range(1, 41)]
        others = [stack.create_queue(k, TWO, user) for user in range(41, 51)]
        doomed = [stack.create_queue(k, ONE, user) for user in range(51, 54)]
        pollers = start_pollers(k, queues, ONE)
        bystanders = start_pollers(k, others, TWO)
        until(lambda: sum(q["parked"] for q in stack.queues_at("a")) == len(queues), 30,
              "every client long-polls at shard a")  # fmt: skip
        offset = len(k.log_text())
        rss_before = rss_kib(k.proc.pid)  # type: ignore[union-attr]
        cut = time.monotonic()
        host.partition()
        try:
            k.wait_for(r"shard a is down", after=offset)
            noticed = time.monotonic() - cut
            # DELETEs cannot be held and replayed: 502 at once, once kansas knows.
            for queue_id in doomed:
                started = time.monotonic()
                status, body = request("127.0.0.1", k.public_port, "DELETE", "/json/events",
                                    realm=ONE, params={"queue_id": queue_id})  # fmt: skip
                assert status == 502 and body["code"] == "BAD_GATEWAY", body
                assert time.monotonic() - started < 1.0
            # Every client's GET waits for the shard (parked), none is answered with an
            # error meanwhile; shard b's clients carry on.
            until(lambda: time.monotonic() - cut >= OUTAGE, OUTAGE + 1, "the outage", 0.2)
            rss_during = rss_kib(k.proc.pid)  # type: ignore[union-attr]
        finally:
            host.heal()
        healed = time.monotonic()
        k.wait_for(r"shard a is up again", after=offset)
        back = time.monotonic() - healed
        # Every parked client is answered after the heal, at the release rate.
        until(
            lambda: all(any(r.started + r.took > healed for r in p.requests) for p in pollers),
            30,
            "every client was answered after the heal",
        )
        stop_pollers(pollers + bystanders)
        requests = [r for p in pollers for r in p.requests]
        failed = [r for r in requests if r.status != 200]
        assert not failed, failed[:5]
        during = [r for r in requests if r.started < healed and r.started + r.took > cut]
        waited = max(r.took for r in during)
        assert waited < OUTAGE + 15, f"a GET waited {waited:.1f} s"
        releases = released(k, offset)
        print(
            f"shard partition {OUTAGE:.0f} s: noticed after {noticed:.1f} s, link back"
            f" -> shard up after {back:.1f} s; {len(during)} GETs across it, longest"
            f" {waited:.1f} s; released {releases}; RSS {rss_before} -> {rss_during} KiB"
        )
        assert releases, "nothing was parked"
        count = sum(n for n, _, _ in releases)
        assert count >= len(queues), releases
        assert all(r <= rate * 1.25 for _, t, r in releases if t >= 1), releases
        side = [r for p in bystanders for r in p.requests if cut < r.started < healed]
        assert side and all(r.status == 200 for r in side), side[:5]
        assert "Traceback" not in k.log_text()
    finally:
        stack.stop()
