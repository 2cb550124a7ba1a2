"""A realm moved piecewise while its clients long-poll: real Redis, PostgreSQL, two
kansas processes, three demo shards, and ``kansas-ctl realm move`` as operators run it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kansas.ctl import main as ctl
from kansas.testing.client import Reply, call
from kansas.testing.processes import CHECKOUT, DemoShardProcess, KansasProcess
from kansas.testing.servers import PostgresServer

SECRET = "move-secret"
ONE, TWO = "one.example.com", "two.example.com"
MOVED_USERS = range(1, 181)  # ONE's users: moved from a to b
#: ONE's users who get no event during the move: their long-polls stay parked at a
#: (the shards' heartbeat is longer than the test) until kansas answers them.
QUIET_USERS = range(300, 320)
STILL_USERS = range(1000, 1006)  # TWO's users, on c: never touched
RATE = 20.0


@dataclass
class Client:
    realm: str
    user: int
    kansas: list[KansasProcess]
    queues: list[str] = field(default_factory=list)
    bad_queue: int = 0
    #: when it got BAD_EVENT_QUEUE_ID (and re-registered)
    reloaded_at: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    polls: int = 0
    #: queue -> event ids received
    seen: dict[str, list[int]] = field(default_factory=dict)

    def register(self) -> None:
        k = self.kansas[(self.user + len(self.queues)) % len(self.kansas)]
        form = {"secret": SECRET, "dont_block": "true", "client": "internal",
                "user_profile_id": self.user}  # fmt: skip
        reply = call(k.internal_port, "POST", "/api/v1/events/internal", host=self.realm,
                     form=form)  # fmt: skip
        assert reply.status == 200, reply
        self.queues.append(str(reply.json["queue_id"]))
        self.seen[self.queues[-1]] = []

    def poll(self, last: int) -> Reply:
        k = self.kansas[self.polls % len(self.kansas)]  # alternate between the two
        self.polls += 1
        params = {"queue_id": self.queues[-1], "last_event_id": last, "dont_block": "false"}
        return call(k.public_port, "GET", "/json/events", host=self.realm, params=params,
                    timeout=90)  # as Zulip's clients  # fmt: skip

    def run(self, stop: threading.Event) -> None:
        try:
            self.register()
            last = -1
            while not stop.is_set():
                reply = self.poll(last)
                if reply.status == 200:
                    events = reply.json["events"]
                    self.seen[self.queues[-1]] += [e["id"] for e in events]
                    if events:
                        last = events[-1]["id"]
                elif reply.status == 400 and reply.json.get("code") == "BAD_EVENT_QUEUE_ID":
                    assert reply.json == {
                        "result": "error",
                        "msg": f"Bad event queue ID: {self.queues[-1]}",
                        "code": "BAD_EVENT_QUEUE_ID",
                        "queue_id": self.queues[-1],
                    }
                    self.bad_queue += 1
                    self.reloaded_at.append(time.monotonic())
                    self.register()
                    last = -1
                else:
                    self.errors.append(f"{reply.status} {reply.body[:200]!r}")
                    return
        except Exception as e:  # reported by the test, not lost in the thread
            self.errors.append(repr(e))


@pytest.fixture
def stack(
    tmp_path: Path, postgres_dsn: str, redis_url: str
) -> Iterator[tuple[dict[str, DemoShardProcess], list[KansasProcess]]]:
    shards = {n: DemoShardProcess(n, tmp_path, SECRET, heartbeat=120).start() for n in "abc"}
    kansas: list[KansasProcess] = []
    try:
        pg = ["--postgres", postgres_dsn, "--redis", redis_url]
        assert ctl([*pg, "migrate"]) == 0
        for name, shard in shards.items():
            assert ctl([*pg, "shard", "add", name, shard.url]) == 0
        assert ctl([*pg, "realm", "pin", ONE, "a"]) == 0
        assert ctl([*pg, "realm", "pin", TWO, "c"]) == 0
        for i in (1, 2):
            kansas.append(KansasProcess(tmp_path, postgres_dsn, redis_url, name=f"kansas-{i}"))
            kansas[-1].start()
        yield shards, kansas
    finally:
        for k in kansas:
            k.stop()
        for shard in shards.values():
            shard.stop()


def held_by(shard: DemoShardProcess) -> set[str]:
    reply = call(shard.port, "GET", "/demo/queues")
    return {q["queue_id"] for q in reply.json["queues"]}


def wait_until(what: str, check: Any, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_piecewise_move_while_clients_long_poll(
    stack: tuple[dict[str, DemoShardProcess], list[KansasProcess]],
    postgres_dsn: str,
    redis_url: str,
    postgres_server: PostgresServer,
) -> None:
    shards, kansas = stack
    clients = [Client(ONE, u, kansas) for u in [*MOVED_USERS, *QUIET_USERS]]
    clients += [Client(TWO, u, kansas) for u in STILL_USERS]
    stop = threading.Event()
    threads = [threading.Thread(target=c.run, args=(stop,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    wait_until("clients registered", lambda: all(c.queues for c in clients))
    first_queues = {c.user: c.queues[0] for c in clients}
    assert {first_queues[u] for u in [*MOVED_USERS, *QUIET_USERS]} <= held_by(shards["a"])

    # Events flow to everybody all along (through the internal listener, broadcast).
    feeding = threading.Event()

    def send(n: int, users: list[int]) -> None:
        data = json.dumps({"event": {"type": "test", "n": n}, "users": users})
        form = {"secret": SECRET, "data": data}
        call(kansas[0].internal_port, "POST", "/api/internal/notify_tornado", form=form)

    def feed() -> None:
        n = 0
        while not feeding.is_set():
            n += 1
            send(n, [*MOVED_USERS, *STILL_USERS])
            feeding.wait(0.25)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    marker = f"move-{time.monotonic_ns()}"
    _mark(postgres_dsn, postgres_server, f"{marker}-start")
    polls_before = sum(c.polls for c in clients)
    argv = [sys.executable, "-m", "kansas.ctl", "--postgres", postgres_dsn, "--redis", redis_url,
            "realm", "move", ONE, "b", "--reload-rate", str(RATE), "--batch", "70",
            "--interval", "0.5", "--settle", "1.5"]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=100, cwd=CHECKOUT)
    took = time.monotonic() - started
    print(result.stdout, f"took {took:.1f} s")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "batch 1/3: 70 user(s) moved" in out and "batch 3/3: 60 user(s) moved" in out, out
    measured = re.search(
        r"moved one\.example\.com to b: 200 queue\(s\) invalidated at ([\d.]+)/s", out
    )
    assert measured is not None, out
    rate = float(measured.group(1))
    assert abs(rate - RATE) / RATE < 0.10, out
    assert took >= 199 / RATE, took  # 200 invalidations cannot have gone faster than the rate

    # Every moved client gets one BAD_EVENT_QUEUE_ID, re-registers, and lands on b.
    moved = [c for c in clients if c.realm == ONE]
    # Those whose long-poll was parked at a when their queue was invalidated were told
    # then, at the move's pace, not at a's heartbeat (which would be after the test).
    wait_until("every moved client re-registered", lambda: all(len(c.queues) == 2 for c in moved),
               seconds=5)  # fmt: skip
    _mark(postgres_dsn, postgres_server, f"{marker}-end")
    polls_during = sum(c.polls for c in clients) - polls_before
    feeding.set()
    stop.set()
    feeder.join(timeout=15)
    send(0, [*MOVED_USERS, *QUIET_USERS, *STILL_USERS])  # ends every long-poll
    for t in threads:
        t.join(timeout=15)
        assert not t.is_alive()
    assert [c.errors for c in clients if c.errors] == []
    on_b = held_by(shards["b"])
    for c in moved:
        assert c.bad_queue == 1, (c.user, c.queues)
        assert c.queues[1] in on_b
    for c in clients:
        if c.realm == TWO:
            assert c.bad_queue == 0 and len(c.queues) == 1
        for queue_id, ids in c.seen.items():
            assert len(ids) == len(set(ids)), (c.user, queue_id)  # nothing delivered twice
            assert ids == sorted(ids)
        assert c.user in QUIET_USERS or any(c.seen.values()), c.user  # and events did flow
    # The new shard saw the re-registrations come at the reload rate, not at once.
    times = sorted(t for c in moved for t in c.reloaded_at)
    peak1 = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
    peak2 = max(sum(1 for u in times if t <= u < t + 2.0) for t in times) / 2
    print(f"re-registrations on b: peak {peak1} in 1 s, {peak2:g}/s over 2 s (rate {RATE:g}/s)")
    # Clients notice at their next poll, not in lockstep with the mover: a busy test
    # machine bunches them a little, but the load follows the reload rate.
    assert peak2 <= 1.5 * RATE, peak2

    # kansas DELETEd the invalidated queues on their old shard.
    first = {first_queues[u] for u in [*MOVED_USERS, *QUIET_USERS]}
    wait_until("old queues freed on a", lambda: not first & held_by(shards["a"]))

    # PostgreSQL: kansas only reloaded the assignment (a few times, on NOTIFY); none of
    # the hundreds of GETs of the move asked it anything.
    log = postgres_server.log_path.read_text(errors="replace")
    window = log[log.index(f"{marker}-start") : log.index(f"{marker}-end")]
    statements = [line for line in window.splitlines() if line.startswith("kansas|")]
    reloads = [line for line in statements if "FROM kansas_shards" in line]
    assert polls_during > 200
    assert len(reloads) <= 2 * 12, len(reloads)
    allowed = ("kansas_", "SET SESSION", "BEGIN", "COMMIT", "ROLLBACK", "SHOW", "LISTEN")
    stray = [
        line for line in statements if "statement:" in line and not any(a in line for a in allowed)
    ]
    assert stray == []


def _mark(dsn: str, server: PostgresServer, tag: str) -> None:
    import psycopg2

    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("SELECT %s", (tag,))
    conn.close()
    wait_until(f"{tag} logged", lambda: tag in server.log_path.read_text(errors="replace"), 10)
