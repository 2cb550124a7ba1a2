"""kansas under faults (issue 9), end to end: real Redis, PostgreSQL, demo shards, twistd.

Each test breaks one thing kansas depends on -- Redis, PostgreSQL, a shard that hangs
or restarts -- or runs two kansas side by side, and checks what a client sees and that
nothing is lost. docs/reliability.md lists these tests with what each fault costs (and,
under "Known defects", the ones that fail until kansas is fixed); the long random run is
scripts/chaos.py.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList

from kansas.ctl import main as ctl
from kansas.model import QueueRoute
from kansas.stores.redis import RedisRouteStore, parse_redis_url
from kansas.testing.client import Reply, call
from kansas.testing.processes import CHECKOUT, DemoShardProcess, KansasProcess
from kansas.testing.servers import PostgresServer, RedisServer, free_port
from kansas.testing.waiting import until
from tests.conftest import redis_command

SECRET = "faults-secret"
ONE, TWO, THREE = "one.example.com", "two.example.com", "three.example.com"
#: Longest any answer may take while Redis is away: kansas's Redis calls time out
#: after --redis-timeout (1 s by default), then it routes without Redis.
REDIS_DOWN_CEILING = 1.6
#: txredisapi reconnects with a back-off capped at 10 s: the longest kansas may need to
#: use a Redis that is back.
REDIS_RECONNECT_DEADLINE = 20.0


def timed(fn: Callable[[], Reply]) -> tuple[float, Reply]:
    started = time.monotonic()
    reply = fn()
    return time.monotonic() - started, reply


def redis_get(server: RedisServer, key: str) -> bytes | None:
    """The value of ``key`` (None if missing) over a plain socket."""
    raw = redis_command(server, "GET", key)
    if raw.startswith(b"$-1"):
        return None
    assert raw.startswith(b"$"), raw
    return raw.split(b"\r\n", 2)[1]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Rig:
    """Two demo shards (a, b) registered in PostgreSQL, and the kansas processes."""

    def __init__(self, tmp: Path, dsn: str, redis: str) -> None:
        self.tmp = tmp
        self.dsn = dsn
        self.redis = redis
        self.shards = {n: DemoShardProcess(n, tmp, SECRET).start() for n in ("a", "b")}
        self.kansases: list[KansasProcess] = []
        self.ctl("migrate")
        for name, shard in self.shards.items():
            self.ctl("shard", "add", name, shard.url)

    def ctl(self, *args: str) -> None:
        assert ctl(["--postgres", self.dsn, "--redis", self.redis, *args]) == 0, args

    def kansas(self, extra: list[str] | None = None, name: str = "kansas") -> KansasProcess:
        k = KansasProcess(self.tmp, self.dsn, self.redis, extra=extra, name=name).start()
        self.kansases.append(k)
        return k

    def stop(self) -> None:
        for k in self.kansases:
            k.stop()
        for shard in self.shards.values():
            shard.stop()

    # -- Django's side and a client's side -----------------------------------------------
    def create_queue(self, k: KansasProcess, realm: str, user: int) -> str:
        form = {"secret": SECRET, "user_profile_id": user, "dont_block": "true"}
        reply = call(k.internal_port, "POST", "/api/v1/events/internal", host=realm, form=form)
        assert reply.status == 200, reply
        return str(reply.json["queue_id"])

    def create_on_shard(self, shard: str, realm: str, user: int) -> str:
        """A queue kansas never saw (as if created before kansas, or its mapping lost)."""
        form = {"secret": SECRET, "user_profile_id": user, "dont_block": "true"}
        port = self.shards[shard].port
        reply = call(port, "POST", "/api/v1/events/internal", host=realm, form=form)
        assert reply.status == 200, reply
        return str(reply.json["queue_id"])

    def get(self, k: KansasProcess, queue_id: str, realm: str, timeout: float = 10) -> Reply:
        params = {"queue_id": queue_id, "last_event_id": -1, "dont_block": "true"}
        return call(k.public_port, "GET", "/json/events", host=realm, params=params,
                    timeout=timeout)  # fmt: skip

    def held_by(self, shard: str) -> set[str]:
        queues = call(self.shards[shard].port, "GET", "/demo/queues").json["queues"]
        return {q["queue_id"] for q in queues}


@pytest.fixture
def rig(tmp_path: Path, postgres_dsn: str, redis_url: str) -> Iterator[Rig]:
    r = Rig(tmp_path, postgres_dsn, redis_url)
    try:
        yield r
    finally:
        r.stop()


def kill_redis(server: RedisServer) -> None:
    server.stop(signal.SIGKILL)
    assert not server.ping()


def restart_redis(server: RedisServer) -> None:
    server.start(server.port)  # same port, same directory: it reloads its AOF


def wait_writing(rig: Rig, k: KansasProcess, server: RedisServer, realm: str) -> str:
    """Create queues until kansas writes their mappings to Redis again; the last one."""
    deadline = time.monotonic() + REDIS_RECONNECT_DEADLINE
    while True:
        queue_id = rig.create_queue(k, realm, 1000)
        end = time.monotonic() + 0.5  # once connected, the write follows the answer closely
        while time.monotonic() < end:
            if redis_get(server, f"kansas:queue:{queue_id}") is not None:
                return queue_id
            time.sleep(0.02)
        assert time.monotonic() < deadline, "kansas never wrote to Redis again"


# -- Redis --------------------------------------------------------------------------------


def test_redis_down_routes_from_cache_and_realm_and_still_creates_queues(
    rig: Rig, redis_server: RedisServer
) -> None:
    rig.ctl("realm", "pin", ONE, "a")
    rig.ctl("realm", "pin", TWO, "b")
    k = rig.kansas()
    cached = rig.create_queue(k, ONE, 1)  # kansas knows this one (cache and Redis)
    unknown = rig.create_on_shard("b", TWO, 2)  # kansas has never seen this one
    kill_redis(redis_server)
    try:
        took, reply = timed(lambda: rig.get(k, cached, ONE))
        assert reply.status == 200 and reply.json["result"] == "success", reply
        assert took < 0.5, f"a cached route waited {took:.2f} s for Redis"

        took, reply = timed(lambda: rig.get(k, unknown, TWO))  # Redis cannot say: realm's shard
        assert reply.status == 200 and reply.json["result"] == "success", reply
        assert took < REDIS_DOWN_CEILING, f"an uncached route took {took:.2f} s"

        started = time.monotonic()
        created = rig.create_queue(k, ONE, 3)
        assert time.monotonic() - started < REDIS_DOWN_CEILING
        assert created in rig.held_by("a")
        took, reply = timed(lambda: rig.get(k, created, ONE))
        assert reply.status == 200 and took < 0.5, (took, reply)

        # A DELETE is answered by the shard; the mapping's removal is what cannot wait.
        doomed = rig.create_queue(k, ONE, 4)
        took, reply = timed(lambda: call(k.public_port, "DELETE", "/json/events", host=ONE,
                                         params={"queue_id": doomed}))  # fmt: skip
        assert reply.status == 200 and reply.json["result"] == "success", reply
        assert took < REDIS_DOWN_CEILING, f"a DELETE took {took:.2f} s"

        # Many at once: none waits on another's Redis timeout.
        with ThreadPoolExecutor(20) as pool:
            jobs = [pool.submit(timed, lambda: rig.get(k, unknown, TWO)) for _ in range(20)]
            answers = [job.result(timeout=10) for job in jobs]
        assert all(reply.status == 200 for _, reply in answers), answers
        assert max(took for took, _ in answers) < REDIS_DOWN_CEILING, answers
    finally:
        restart_redis(redis_server)
    # Redis is back: new mappings are written again (once txredisapi has reconnected).
    started = time.monotonic()
    fresh = wait_writing(rig, k, redis_server, ONE)
    print(f"mappings written again {time.monotonic() - started:.1f} s after Redis restarted")
    assert b'"shard":"a"' in (redis_get(redis_server, f"kansas:queue:{fresh}") or b"")
    # The journal replays what the outage kept from Redis -- but not a deleted queue.
    until(lambda: redis_get(redis_server, f"kansas:queue:{created}"), 5, "journal replayed")
    assert redis_get(redis_server, f"kansas:queue:{doomed}") is None
    assert b"Traceback" not in k.log_path.read_bytes()


def test_a_queue_created_while_redis_is_down_gets_its_mapping_once_redis_is_back(
    rig: Rig, redis_server: RedisServer
) -> None:
    rig.ctl("realm", "pin", ONE, "a")
    k = rig.kansas()
    kill_redis(redis_server)
    try:
        during = rig.create_queue(k, ONE, 7)
    finally:
        restart_redis(redis_server)
    wait_writing(rig, k, redis_server, ONE)  # kansas uses Redis again
    key = f"kansas:queue:{during}"
    recorded = until(lambda: redis_get(redis_server, key), 5, "the journal was not replayed")
    assert b'"shard":"a"' in recorded


def live_deferreds() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Deferred))


@pytest_twisted.ensureDeferred
async def test_redis_calls_that_time_out_during_an_outage_leave_nothing_behind(
    tmp_path: Path,
) -> None:
    """While Redis is down, kansas keeps calling it: cache misses, expiry pushes, and
    the journal's replay (up to 500 writes a second). Each call times out after
    --redis-timeout; none may leave anything behind, or kansas's memory grows for as
    long as the outage lasts (and every leftover is run when Redis comes back)."""
    from twisted.internet import reactor

    server = RedisServer(tmp_path / "redis").start()
    try:
        store = RedisRouteStore(parse_redis_url(server.url), reactor, call_timeout=0.2)
        try:
            await store.put(QueueRoute("warm", "a", ONE, 1, 600))  # connected once
            server.stop(signal.SIGKILL)

            async def outage_second() -> None:  # what one replay round sends
                puts = [store.put(QueueRoute(f"q{i}", "a", ONE, i, 600)) for i in range(500)]
                results = await DeferredList(puts, consumeErrors=True)
                assert not any(ok for ok, _ in results)

            await outage_second()
            before = live_deferreds()
            for _ in range(4):
                await outage_second()
            left = live_deferreds() - before
            assert left < 100, f"2000 timed-out Redis calls left {left} Deferreds behind"
        finally:
            await store.close()
    finally:
        server.cleanup()


def aof_contains(server: RedisServer, needles: list[str]) -> bool:
    data = b"".join(p.read_bytes() for p in server.dir.rglob("*.aof") if p.is_file())
    return all(n.encode() in data for n in needles)


def test_a_redis_restart_keeps_every_mapping_older_than_a_second(
    rig: Rig, redis_server: RedisServer
) -> None:
    rig.ctl("realm", "pin", ONE, "a")
    k = rig.kansas()
    queues = [rig.create_queue(k, ONE, user) for user in range(20)]
    keys = [f"kansas:queue:{q}" for q in queues]
    until(lambda: all(redis_get(redis_server, key) for key in keys), 5, "mappings written")
    before = {key: redis_get(redis_server, key) for key in keys}
    until(lambda: aof_contains(redis_server, keys), 5, "mappings in the AOF file")
    # appendfsync everysec: a write is on disk at most 1 s later. The scenario is
    # "written more than 1 s before the crash" -- its length, not a synchronisation.
    time.sleep(1.1)
    redis_server.stop(signal.SIGKILL)
    restart_redis(redis_server)
    after = {key: redis_get(redis_server, key) for key in keys}
    assert after == before

    # Routed by those mappings, not by the realm: ONE now lives on b, the queues on a.
    rig.ctl("realm", "pin", ONE, "b")
    k.restart(signal.SIGKILL)  # and an empty cache
    for queue_id in queues:
        reply = rig.get(k, queue_id, ONE)
        assert reply.status == 200 and reply.json["result"] == "success", reply


# -- PostgreSQL ---------------------------------------------------------------------------


def kansas_ctl(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kansas.ctl", "--postgres", dsn, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=CHECKOUT)


def test_postgres_down_keeps_routing_and_listen_resumes(
    rig: Rig, postgres_server: PostgresServer
) -> None:
    rig.ctl("realm", "pin", ONE, "a")
    rig.ctl("realm", "pin", TWO, "b")
    # No safety-net reload during the test: only LISTEN and its reconnect can follow.
    k = rig.kansas(extra=["--reload-interval", "3600"])
    k.wait_for(r"following assignment changes")
    existing = rig.create_queue(k, ONE, 1)
    offset = len(k.log_text())
    port = postgres_server.port
    postgres_server.stop()
    try:
        k.wait_for(r"keeping the last assignment", after=offset)  # it noticed
        took, reply = timed(lambda: rig.get(k, existing, ONE))
        assert reply.status == 200 and took < 0.5, (took, reply)
        # New queues are placed by the last-known assignment.
        assert rig.create_queue(k, ONE, 2) in rig.held_by("a")
        assert rig.create_queue(k, TWO, 3) in rig.held_by("b")
        # kansas-ctl cannot write: one line saying why, and a non-zero exit.
        result = kansas_ctl(rig.dsn, "realm", "pin", ONE, "b")
        assert result.returncode == 1, result
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("kansas-ctl: error: cannot reach "
                                                       "PostgreSQL"), result.stderr  # fmt: skip
    finally:
        offset = len(k.log_text())
        postgres_server.start(port)
    # LISTEN resumes (the follower retries with a back-off), then a change made now is
    # followed at once, by NOTIFY.
    k.wait_for(r"following assignment changes", after=offset)
    result = kansas_ctl(rig.dsn, "realm", "pin", ONE, "b")
    assert result.returncode == 0, result
    started = time.monotonic()
    until(lambda: rig.create_queue(k, ONE, 4) in rig.held_by("b"), 3, "pin followed")
    print(f"pin followed {time.monotonic() - started:.2f} s after PostgreSQL came back")
    assert rig.get(k, existing, ONE).status == 200  # the old queue stays on a
    assert "Traceback" not in k.log_text()


def test_a_change_made_before_kansas_listens_again_is_not_missed(
    rig: Rig, postgres_server: PostgresServer
) -> None:
    """NOTIFYs sent while kansas is not listening are lost: the reload that follows
    every reconnect is what catches the changes made in between."""
    rig.ctl("realm", "pin", TWO, "b")
    k = rig.kansas(extra=["--reload-interval", "3600"])  # no safety net in this test
    k.wait_for(r"following assignment changes")
    offset = len(k.log_text())
    port = postgres_server.port
    postgres_server.stop()
    try:
        k.wait_for(r"retrying in 4\.0 s", after=offset)  # its next try is 4 s away
    finally:
        postgres_server.start(port)
    assert kansas_ctl(rig.dsn, "realm", "pin", TWO, "a").returncode == 0
    assert "following assignment changes" not in k.log_text()[offset:], "too late to test"
    k.wait_for(r"following assignment changes", after=offset)
    until(lambda: rig.create_queue(k, TWO, 5) in rig.held_by("a"), 3,
          "the change made before kansas listened again was missed")  # fmt: skip


def test_kansas_refuses_to_start_while_postgres_is_down(tmp_path: Path, redis_url: str) -> None:
    """The one thing a PostgreSQL outage stops: a kansas (re)starting meanwhile."""
    k = KansasProcess(tmp_path, f"host=127.0.0.1 port={free_port()} dbname=kansas user=x",
                      redis_url)  # fmt: skip
    k.spawn()
    assert k.proc is not None
    code = k.proc.wait(timeout=60)
    k.stop()
    output = k.log_text()
    assert code != 0
    assert "cannot reach PostgreSQL" in output and "Traceback" not in output, output


# -- a shard that restarts ------------------------------------------------------------


def test_a_held_notification_is_not_delivered_to_a_queue_created_after_it(rig: Rig) -> None:
    """kansas holds notify_tornado calls for a shard that is down and tells Django they
    were taken. Once the shard is back they must reach the queues that existed when
    they were sent -- not a queue registered afterwards, whose initial state (from
    Django) already includes the event: that client would apply it twice. The chaos run
    with --shard-signal kill shows it as kansas-load's "unexpected" deliveries."""
    rig.ctl("realm", "pin", ONE, "a")
    # Down shards are probed every 3 s: time for Django to register a queue on the shard
    # that is back before kansas notices it and delivers what it holds.
    k = rig.kansas(extra=["--probe-interval", "3"])
    old = rig.create_queue(k, ONE, 1)
    rig.shards["a"].stop()  # SIGTERM: it keeps `old` (dumped, reloaded)
    data = '{"event": {"type": "message", "n": 1}, "users": [1]}'
    form = {"secret": SECRET, "data": data}
    reply = call(k.internal_port, "POST", "/api/internal/notify_tornado", host=ONE, form=form)
    assert reply.status == 200 and reply.json["queued_shards"] == ["a"], reply
    rig.shards["a"].start()
    new = rig.create_queue(k, ONE, 1)  # the user registers again (a new tab, a reload)

    def pending() -> dict[str, int]:
        queues = call(rig.shards["a"].port, "GET", "/demo/queues").json["queues"]
        return {q["queue_id"]: q["pending"] for q in queues}

    until(lambda: pending()[old] == 1, 10, "the held notification was never delivered")
    assert pending()[new] == 0, "an event sent before the queue existed was delivered to it"


# -- a shard that hangs -------------------------------------------------------------------


class HungShard(threading.Thread):
    """Accepts connections and never reads nor answers (a wedged Tornado)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by the test
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_hung_shard_costs_a_502_after_the_backend_timeout_and_nothing_more(rig: Rig) -> None:
    hung = HungShard()
    hung.start()
    try:
        rig.ctl("shard", "add", "hung", f"http://127.0.0.1:{hung.port}", "--weight", "0")
        rig.ctl("realm", "pin", ONE, "a")
        rig.ctl("realm", "pin", THREE, "hung")
        k = rig.kansas(extra=["--backend-timeout", "3"])
        assert k.proc is not None
        healthy = rig.create_queue(k, ONE, 1)
        assert rig.get(k, healthy, ONE).status == 200  # a kept-alive backend connection
        baseline = open_fds(k.proc.pid)

        n = 10
        stuck = [f"4f1b3c2e-0000-4000-8000-{i:012d}" for i in range(n)]
        with ThreadPoolExecutor(n + 1) as pool:
            jobs = [pool.submit(timed, lambda q=q: rig.get(k, q, THREE)) for q in stuck]
            until(lambda: len(hung.held) >= n, 2.5, "GETs reaching the hung shard")
            # kansas serves everybody else meanwhile.
            for _ in range(5):
                took, reply = timed(lambda: rig.get(k, healthy, ONE))
                assert reply.status == 200 and took < 0.5, (took, reply)
            creation = pool.submit(timed, lambda: call(
                k.internal_port, "POST", "/api/v1/events/internal", host=THREE,
                form={"secret": SECRET, "user_profile_id": 5, "dont_block": "true"}))  # fmt: skip
            answers = [job.result(timeout=15) for job in jobs]
            created = creation.result(timeout=15)
        # --backend-timeout 3 (deadlines swept once a second): a clean JSON 502 each.
        for took, reply in [*answers, created]:
            assert reply.status == 502, reply
            assert reply.json["result"] == "error" and reply.json["code"] == "BAD_GATEWAY", reply
            assert 2.5 <= took <= 5.5, took
        # The backend connections are gone (aborted), the client ones kept alive or closed.
        until(lambda: open_fds(k.proc.pid) <= baseline, 5, "kansas's sockets released")  # type: ignore[union-attr]
        assert rig.get(k, healthy, ONE).status == 200
        assert "Traceback" not in k.log_text()
    finally:
        hung.close()


# -- two kansas on one Redis and one PostgreSQL -------------------------------------------


def test_two_kansas_agree_on_routes_and_follow_a_pin_within_a_second(rig: Rig) -> None:
    rig.ctl("realm", "pin", ONE, "a")
    k1, k2 = rig.kansas(name="kansas-1"), rig.kansas(name="kansas-2")
    for k in (k1, k2):
        k.wait_for(r"following assignment changes")
    # Queues created through one are routed by the other (from Redis: not in its cache),
    # also by hash (TWO, THREE: no pin, so only the mapping knows).
    created = {}
    for i, (realm, via) in enumerate([(r, k) for r in (ONE, TWO, THREE) for k in (k1, k2)]):
        created[rig.create_queue(via, realm, i)] = (realm, k2 if via is k1 else k1)
    for queue_id, (realm, other) in created.items():
        reply = rig.get(other, queue_id, realm)
        assert reply.status == 200 and reply.json["result"] == "success", reply

    # A pin changed with kansas-ctl: both place new queues by it within 1 s.
    started = time.monotonic()
    rig.ctl("realm", "pin", ONE, "b")
    for k in (k1, k2):
        until(lambda k=k: rig.create_queue(k, ONE, 99) in rig.held_by("b"), 1.0,
              f"{k.name} following the pin", step=0.02)  # fmt: skip
    print(f"both kansas followed the pin within {time.monotonic() - started:.2f} s")
    # The queues already on a stay reachable through both (their mappings win).
    for queue_id, (realm, other) in created.items():
        for k in (k1, k2):
            assert rig.get(k, queue_id, realm).status == 200, (queue_id, k.name, other.name)
