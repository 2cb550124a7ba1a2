"""Observability end to end: real twistd kansas, two demo shards, Redis and PostgreSQL.

A known set of requests, then: /metrics says exactly that, per shard; the JSON access
log says which rule chose each shard; request ids make the round trip; kansas-ctl
status and trace read the running kansas.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kansas.ctl import main as ctl
from kansas.observe.access_log import parse_line
from kansas.testing.client import Reply, call
from kansas.testing.processes import DemoShardProcess, KansasProcess
from tests.test_end_to_end import ONE, SECRET, THREE, TWO, Stack

UNKNOWN = "0b0c6c58-1f8c-4c57-9a4a-00000000dead"


class ObservedStack(Stack):
    """Stack with a pinned realm per shard, a user override, and the JSON access log."""

    def __init__(self, tmp: Path, postgres_dsn: str, redis_url: str) -> None:
        self.tmp, self.dsn, self.redis = tmp, postgres_dsn, redis_url
        self.shards = {
            name: DemoShardProcess(name, tmp, SECRET, heartbeat=30).start() for name in ("a", "b")
        }
        self.ctl("migrate")
        for name, shard in self.shards.items():
            self.ctl("shard", "add", name, shard.url)
        self.ctl("realm", "pin", ONE, "a")
        self.ctl("realm", "pin", TWO, "b")
        self.ctl("user", "move", THREE, "5", "b", "--no-reload")
        self.kansas = KansasProcess(tmp, postgres_dsn, redis_url,
                                    extra=["--access-log", "json"]).start()  # fmt: skip

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        reply = call(self.kansas.internal_port, "GET", "/metrics")
        assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.body.decode())
            for s in family.samples
        }

    def ctl_output(self, *args: str) -> tuple[int, str]:
        out = io.StringIO()
        code = ctl(["--postgres", self.dsn, "--redis", self.redis, *args], out=out)
        return code, out.getvalue()

    def ctl_process(self, *args: str) -> tuple[int, str]:
        """kansas-ctl in a process of its own (commands that read Redis run a reactor,
        which a test process can run only once)."""
        done = subprocess.run(
            [sys.executable, "-m", "kansas.ctl", "--postgres", self.dsn, "--redis", self.redis,
             *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr


@pytest.fixture
def stack(tmp_path: Path, postgres_dsn: str, redis_url: str) -> Iterator[ObservedStack]:
    s = ObservedStack(tmp_path, postgres_dsn, redis_url)
    try:
        yield s
    finally:
        s.stop()


def requests_total(got: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    """kansas_requests_total as "listener shard method kind status" -> count."""
    out = {}
    for (name, labels), value in got.items():
        if name == "kansas_requests_total":
            d = dict(labels)
            key = f"{d['listener']} {d['shard']} {d['method']} {d['kind']} {d['status']}"
            out[key] = value
    return out


def test_metrics_logs_and_ids_match_what_was_done(stack: ObservedStack) -> None:
    # Queue creation (Django, internal listener): one queue per rule.
    q1 = stack.create_queue(ONE, 1)  # realm pin -> a
    q2 = stack.create_queue(TWO, 2)  # realm pin -> b
    q3 = stack.create_queue(THREE, 5)  # user override -> b
    q4 = stack.create_queue(THREE, 6)  # hash -> wherever the hash says
    hashed = stack.ctl_output("where", THREE, "6")[1].split()[0]
    assert q4 in stack.held_by(hashed)

    # Clients (public listener).
    forged = stack.get(q1, ONE, headers={"X-Request-Id": "forged-by-a-client"})
    assert forged.status == 200
    assert forged.headers["x-request-id"] != "forged-by-a-client"  # replaced: not trusted
    ids = {forged.headers["x-request-id"]}
    for queue_id, realm in ((q1, ONE), (q1, ONE), (q2, TWO), (q2, TWO), (q3, THREE)):
        reply = stack.get(queue_id, realm)
        assert reply.status == 200
        ids.add(reply.headers["x-request-id"])
    assert len(ids) == 6  # one id per request
    assert stack.get(UNKNOWN, ONE).status == 400  # unmapped: to the realm's home, a
    assert stack.delete(q2, TWO).status == 200
    nowhere = call(stack.kansas.public_port, "GET", "/nowhere")
    assert nowhere.status == 404 and nowhere.headers["x-request-id"]

    # The internal listener trusts its callers' ids (Django's) and sends them back.
    fetched = stack.internal("/api/v1/events/internal", ONE, queue_id=q4, last_event_id=-1)
    assert fetched.status == 200
    mine = call(stack.kansas.internal_port, "POST", "/api/v1/events/internal", host=THREE,
                form={"secret": SECRET, "dont_block": "true", "client": "internal",
                      "queue_id": q3, "last_event_id": "-1"},
                headers={"X-Request-Id": "django-42"})  # fmt: skip
    assert mine.status == 200 and mine.headers["x-request-id"] == "django-42"

    # One long-poll held by shard a while /metrics is scraped, then answered.
    held: list[Reply] = []
    waiting = threading.Thread(target=lambda: held.append(stack.get(q1, ONE, last=-1,
                                                                    block=True)))  # fmt: skip
    # (q1 has no events: the earlier GETs took none, so the poll waits.)
    waiting.start()
    deadline = time.monotonic() + 10
    while not stack.held_by("a")[q1]["parked"]:
        assert time.monotonic() < deadline, "the long-poll did not reach shard a"
        time.sleep(0.02)
    during = stack.metrics()
    assert during["kansas_longpolls_held", (("shard", "a"),)] == 1
    assert during["kansas_longpolls_held", (("shard", "b"),)] == 0
    assert stack.notify({"type": "message"}, [1]).status == 200
    waiting.join(10)
    assert held and held[0].status == 200

    got = stack.metrics()
    creations = {"a": 1 + (hashed == "a"), "b": 2 + (hashed == "b")}
    fetch_shard = {hashed: 1.0}
    fetch_shard["b"] = fetch_shard.get("b", 0) + 1  # q3's fetch
    expected = {
        "public a GET events 200": 4,  # q1 x3 and its long-poll
        "public a GET events 400": 1,  # the unknown queue, on its realm's home
        "public b GET events 200": 3,  # q2 x2, q3
        "public b DELETE events 200": 1,
        "public none GET other 404": 1,
        "internal all POST internal 200": 1,  # the notification, to every shard
    }
    for shard in "ab":
        n = creations[shard] + fetch_shard.get(shard, 0)
        if n:
            expected[f"internal {shard} POST internal 200"] = n
    assert requests_total(got) == expected
    rules = {dict(labels)["rule"]: v for (name, labels), v in got.items()
             if name == "kansas_routed_total"
             and dict(labels)["listener"] == "internal"}  # fmt: skip
    assert rules == {"realm-pin": 2, "user-override": 1, "hash": 1, "queue-mapping": 2}
    assert got["kansas_longpoll_duration_seconds_count", (("shard", "a"),)] == 1
    assert got["kansas_shard_up", (("shard", "a"),)] == 1
    assert got["kansas_shard_up", (("shard", "b"),)] == 1
    assert got["kansas_route_cache_misses_total", ()] >= 1  # the unknown queue, at least
    assert got["kansas_postgres_listening", ()] == 1
    assert got["kansas_workers", ()] == 1
    assert got["process_open_fds", (("worker", "main"),)] > 0
    assert ("kansas_redis_duration_seconds_count", (("op", "put"),)) in got  # the creations

    # The JSON access log: one line per request, with the rule that chose the shard.
    lines = [parse_line(line) for line in stack.kansas.log_text().splitlines()]
    logged = [line for line in lines if line is not None]
    assert len(logged) == sum(expected.values())
    by_id = {line["id"]: line for line in logged}
    assert set(ids) <= set(by_id) and "forged-by-a-client" not in by_id
    assert by_id["django-42"]["rule"] == "queue-mapping" and by_id["django-42"]["queue"] == q3
    created = {line["queue"]: line["rule"] for line in logged
               if line["listener"] == "internal"
               and line["rule"] not in (None, "queue-mapping")}  # fmt: skip
    assert created == {q1: "realm-pin", q2: "realm-pin", q3: "user-override", q4: "hash"}
    unknown = next(line for line in logged if line["queue"] == UNKNOWN)
    assert (unknown["shard"], unknown["rule"], unknown["status"]) == ("a", "fallback", 400)
    longpoll = next(line for line in logged if line["longpoll"])
    assert longpoll["queue"] == q1 and longpoll["backend_ms"] >= 0 and longpoll["route_ms"] >= 0
    for line in logged:
        assert line["total_ms"] >= 0 and line["ts"].endswith("Z") and line["bytes"] > 0

    # kansas-ctl reads the running kansas.
    internal = f"http://127.0.0.1:{stack.kansas.internal_port}"
    code, status = stack.ctl_process("status", "--internal", internal)
    assert code == 0, status
    header, *rows = status.splitlines()
    assert header.split()[-3:] == ["HEALTH", "LONG-POLLS", "PARKED"]
    assert rows[0].split()[0] == "a" and rows[0].split()[-3:] == ["up", "0", "0"]
    assert f"kansas at {internal} (1 process(es))" in status
    code, trace = stack.ctl_process("trace", q3, "--internal", internal)
    assert code == 0, trace
    assert f"queue {q3}: on shard b (queue mapping in Redis: realm {THREE}, user 5" in trace
    assert "a new queue of this user would go to b (user-override): the same shard" in trace
    assert "django-42" in trace and "user-override" in trace
    code, trace = stack.ctl_process("trace", UNKNOWN, "--internal", internal)
    assert code == 0 and "no mapping in Redis" in trace
    assert f"(realm {ONE}) is looked for on the realm's shards, first its home: a" in trace
