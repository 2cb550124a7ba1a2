#!/usr/bin/env python3
"""Chaos run (issue 9): kill -9 what kansas depends on, under steady load, and account.

A private stack on 127.0.0.1 (Redis with AOF, PostgreSQL, two demo shards, one kansas)
carries ``kansas-load`` traffic (long-polls, some ``dont_block`` polls, events injected
at a steady rate). Meanwhile faults follow one another at random intervals, each
victim once per round in a random order:

* ``redis``    SIGKILL, down for a while, restarted on the same port and AOF directory;
* ``postgres`` SIGKILL of the whole server (postmaster and backends), restarted;
* ``shard``    one demo shard stopped and restarted: SIGTERM by default, as a Tornado
  restart (it dumps its queues and reloads them); ``--shard-signal kill`` sends
  SIGKILL instead, and the shard loses its queues and the events in them -- as a
  real Tornado would; those re-registrations are counted apart, as the shard's;
* ``kansas``   SIGKILL, restarted (no graceful stop: its cache and held state are gone).

With ``--partitions`` (root only), Redis, PostgreSQL and shard a run on test hosts of
their own (network namespaces, kansas.testing.netns), and each round has three more
victims, whose links to kansas are cut silently (every packet dropped both ways) for
``--min-cut`` to ``--max-cut`` seconds: ``net-redis``, ``net-postgres``, ``net-shard-a``.

Faults do not overlap (one victim is down at a time). Besides the load, a "churn"
thread creates a queue every ``--churn-interval`` seconds the way Django does, and a
"flip" thread moves a realm's pin to the other shard every ``--flip-interval``
seconds with kansas-ctl: after a flip, a queue whose mapping was lost would be looked
for on the wrong shard, so a lost mapping shows as a lost queue.

Checked at the end (exit status 0 only if all hold):

* no queue lost: kansas-load saw no BAD_EVENT_QUEUE_ID (with ``--shard-signal kill``:
  none beyond the queues the killed shards held), every queue the shards hold has its
  mapping in Redis naming that shard, and every churn queue answers through a freshly
  restarted kansas (empty cache: Redis alone routes it);
* no event lost, duplicated, out of order or unexpected (kansas-load's accounting);
* no request waited over 90 s (kansas-load's long-poll timeout is 90 s, as Zulip's
  clients: such a wait is a ``timeout`` error), and no error kinds other than the
  connection errors of kansas being killed;
* kansas's memory after the load is back near its baseline (RSS under load before the
  first fault): at most ``--memory-slack`` (default 25 %) or 10 MiB above it;
* no traceback in kansas's log; every kansas-ctl failure is one line.

    .venv/bin/python scripts/chaos.py                 # ~5 min of faults
    .venv/bin/python scripts/chaos.py --minutes 2 --seed 7 --json-report chaos.json

Every wait has a deadline and the whole run a watchdog, so it always ends.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kansas.ctl import main as ctl_main
from kansas.testing.client import call
from kansas.testing.netns import TestHost, available, cleanup_stale
from kansas.testing.processes import CHECKOUT, DemoShardProcess, KansasProcess
from kansas.testing.servers import PostgresServer, RedisServer, ServerError

SECRET = "chaos-secret"
REALMS = ["r1.example.com", "r2.example.com", "r3.example.com", "r4.example.com"]
SHARDS = ("a", "b")
#: Churn queues use user ids from here on (kansas-load's clients are 1..N).
CHURN_USER_BASE = 1_000_000
#: Error kinds kansas-load may see because kansas itself was SIGKILLed: cut and refused
#: connections. Anything else is reported as a failure.
KILL_ERRORS = {
    "connection", "notify:connection", "register:connection",
    "connect", "notify:connect", "register:connect",
}  # fmt: skip
RESTART_DEADLINE = 60.0
#: What the summary keeps of kansas-load's report.
LOAD_FIELDS = (
    "clients", "clients_registered", "reregistrations", "events_injected", "events_confirmed",
    "events_failed", "deliveries_expected", "delivered", "lost", "abandoned", "uncertain",
    "failed_notify_missing", "duplicated", "out_of_order", "unexpected", "requests",
    "long_polls", "dont_block_polls", "errors", "drained", "phase_seconds", "event_latency",
    "request_latency", "register_latency", "notify_latency",
)  # fmt: skip


def log(t0: float, text: str) -> None:
    print(f"[chaos {time.monotonic() - t0:7.1f}s] {text}", flush=True)


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def redis_get(port: int, key: str, host: str = "127.0.0.1") -> bytes | None:
    import socket

    payload = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key.encode())
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(payload)
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"$-1\r\n"):
                return None
            head, sep, rest = data.partition(b"\r\n")
            if sep and head.startswith(b"$") and len(rest) >= int(head[1:]) + 2:
                return rest[: int(head[1:])]
        raise OSError(f"no complete Redis reply: {data[:80]!r}")


@dataclass
class Fault:
    victim: str
    signal: str
    at: float  # seconds into the run
    down_for: float
    restart_seconds: float = 0.0
    note: str = ""


@dataclass
class Incarnation:
    """One kansas process: its memory while it lived."""

    number: int
    pid: int
    started_at: float
    samples: list[tuple[float, float]] = field(default_factory=list)  # (t, RSS MiB)


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)  # faults (main thread)
        self.churn_rng = random.Random(args.seed + 1)
        self.flip_rng = random.Random(args.seed + 2)
        self.t0 = time.monotonic()
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="kansas-chaos-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(durable=True)
        self.postgres = PostgresServer()
        #: with --partitions: the test hosts of redis, postgres and shard-a
        self.hosts: dict[str, TestHost] = {}
        self.shards: dict[str, DemoShardProcess] = {}
        self.kansas: KansasProcess | None = None
        self.load: subprocess.Popen[str] | None = None
        self.faults: list[Fault] = []
        self.incarnations: list[Incarnation] = []
        self.pins: dict[str, str] = {}
        self.flips = {"ok": 0, "failed": 0}
        self.ctl_failures: list[str] = []
        self.churn: list[dict[str, Any]] = []
        self.churn_failures: dict[str, int] = {}
        self.shard_kill_queues = 0  # load-client queues held by shards we SIGKILLed
        self.down: str | None = None  # the victim currently down
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.failures: list[str] = []

    def say(self, text: str) -> None:
        log(self.t0, text)

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- the stack ---------------------------------------------------------------------
    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "kansas.ctl", "--postgres", self.postgres.dsn,
                "--redis", self.redis.url, *args]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=CHECKOUT)

    def start_stack(self) -> None:
        if self.args.partitions:
            why = available()
            if why is not None:
                raise SystemExit(f"chaos: --partitions: {why}")
            cleanup_stale()
            for role in ("redis", "postgres", "shard-a"):
                self.hosts[role] = TestHost(role).create()
            self.redis.in_namespace(self.hosts["redis"].prefix, self.hosts["redis"].address)
            self.postgres.in_namespace(self.hosts["postgres"].prefix,
                                       self.hosts["postgres"].address)  # fmt: skip
        self.redis.start()
        self.postgres.start()
        base = ["--postgres", self.postgres.dsn, "--redis", self.redis.url]
        with open(os.devnull, "w") as quiet:
            assert ctl_main([*base, "migrate"], out=quiet) == 0
            for name in SHARDS:
                host = self.hosts.get(f"shard-{name}")
                shard = DemoShardProcess(
                    name, self.work, SECRET,
                    interface=host.address if host else "127.0.0.1",
                    prefix=host.prefix if host else None,
                ).start()  # fmt: skip
                self.shards[name] = shard
                assert ctl_main([*base, "shard", "add", name, shard.url], out=quiet) == 0
            for i, realm in enumerate(REALMS):
                self.pins[realm] = SHARDS[i % 2]
                assert ctl_main([*base, "realm", "pin", realm, self.pins[realm]], out=quiet) == 0
        self.kansas = KansasProcess(self.work, self.postgres.dsn, self.redis.url)
        self.start_kansas()
        self.say(f"stack up in {self.work}: redis :{self.redis.port}, postgres "
                 f":{self.postgres.port}, shards " + ", ".join(
                     f"{n} :{s.port}" for n, s in self.shards.items()) +
                 f", kansas :{self.kansas.public_port}/:{self.kansas.internal_port}")  # fmt: skip

    def start_kansas(self) -> None:
        assert self.kansas is not None
        offset = len(self.kansas.log_text())
        self.kansas.start()
        self.kansas.wait_for(r"following assignment changes", after=offset)
        assert self.kansas.proc is not None
        with self.lock:
            self.incarnations.append(
                Incarnation(len(self.incarnations) + 1, self.kansas.proc.pid, self.now())
            )

    def stop_all(self) -> None:
        self.stopping.set()
        if self.load is not None and self.load.poll() is None:
            self.load.kill()
            self.load.wait(10)
        if self.kansas is not None:
            self.kansas.stop()
        for shard in self.shards.values():
            shard.stop()
        self.redis.cleanup()
        self.postgres.cleanup()
        for host in self.hosts.values():
            host.remove()

    # -- load --------------------------------------------------------------------------
    def start_load(self) -> None:
        assert self.kansas is not None
        a = self.args
        argv = [sys.executable, "-m", "kansas.load", "--quiet",
                "--json-report", str(self.work / "load.json"),
                "--public", f"http://127.0.0.1:{self.kansas.public_port}",
                "--internal", f"http://127.0.0.1:{self.kansas.internal_port}",
                "--secret", SECRET, "--realms", ",".join(REALMS),
                "--clients", str(a.clients), "--duration", str(a.minutes * 60),
                "--event-rate", str(a.event_rate), "--dont-block-share", str(a.dont_block_share),
                "--drain", str(a.drain), "--poll-timeout", "90", "--seed", str(a.seed)]  # fmt: skip
        out = open(self.work / "load.out", "w")  # noqa: SIM115 - closed with the process
        self.load = subprocess.Popen(argv, cwd=CHECKOUT, stdout=out, stderr=subprocess.STDOUT,
                                     text=True)  # fmt: skip

    def held(self) -> dict[str, list[dict[str, Any]]]:
        """Queues each shard holds now (shards that are down are skipped)."""
        found = {}
        for name, shard in self.shards.items():
            if shard.alive():
                with contextlib.suppress(OSError, http.client.HTTPException):
                    # (X-Real-Ip: as from the shard's own host, for a test host's shard)
                    local = {"X-Real-Ip": "127.0.0.1"}
                    reply = call(shard.port, "GET", "/demo/queues", timeout=10,
                                 address=shard.interface, headers=local)  # fmt: skip
                    found[name] = reply.json["queues"]
        return found

    def wait_connected(self) -> None:
        deadline = time.monotonic() + 60 + self.args.clients / 100
        while True:
            self.check_load_alive()
            held = self.held()
            users = {q["user_profile_id"] for qs in held.values() for q in qs}
            if all(u in users for u in range(1, self.args.clients + 1)):
                return
            if time.monotonic() > deadline:
                raise SystemExit("chaos: kansas-load's clients never all registered")
            time.sleep(0.2)

    def check_load_alive(self) -> None:
        if self.load is not None and self.load.poll() is not None and not self.stopping.is_set():
            text = (self.work / "load.out").read_text(errors="replace")[-2000:]
            raise SystemExit(f"chaos: kansas-load ended early ({self.load.returncode}):\n{text}")

    # -- background: memory, churn, pin flips --------------------------------------------
    def sample_memory(self) -> None:
        while not self.stopping.wait(1.0):
            k = self.kansas
            proc = k.proc if k is not None else None
            if proc is None:
                continue
            value = rss_mib(proc.pid)
            with self.lock:
                for inc in self.incarnations:
                    if inc.pid == proc.pid and value is not None:
                        inc.samples.append((round(self.now(), 1), round(value, 1)))

    def churn_loop(self) -> None:
        n = 0
        lifespan = int(self.args.minutes * 60 + self.args.drain + 1200)
        while not self.stopping.wait(self.args.churn_interval):
            k = self.kansas
            if k is None:
                continue
            n += 1
            realm = self.churn_rng.choice(REALMS)
            form = {"secret": SECRET, "user_profile_id": CHURN_USER_BASE + n,
                    "dont_block": "true", "lifespan_secs": lifespan}  # fmt: skip
            started, down = self.now(), self.down
            try:
                reply = call(k.internal_port, "POST", "/api/v1/events/internal", host=realm,
                             form=form, timeout=10)  # fmt: skip
            except (OSError, http.client.HTTPException) as e:
                kind = type(e).__name__
            else:
                if reply.status == 200:
                    entry = {"queue_id": reply.json["queue_id"], "realm": realm,
                             "at": round(started, 2), "down": down or self.down}  # fmt: skip
                    with self.lock:
                        self.churn.append(entry)
                    continue
                kind = f"http-{reply.status}"
            with self.lock:
                key = f"{kind} while {down or self.down or 'nothing'} down"
                self.churn_failures[key] = self.churn_failures.get(key, 0) + 1

    def flip_loop(self) -> None:
        while not self.stopping.wait(self.args.flip_interval):
            realm = self.flip_rng.choice(REALMS)
            target = "b" if self.pins[realm] == "a" else "a"
            down = self.down
            try:
                result = self.ctl("realm", "pin", realm, target)
            except subprocess.TimeoutExpired:
                self.failures.append(f"kansas-ctl hung (over 30 s) while {down or 'nothing'} down")
                continue
            if result.returncode == 0:
                self.pins[realm] = target
                self.flips["ok"] += 1
                continue
            self.flips["failed"] += 1
            lines = result.stderr.strip().splitlines()
            if len(lines) != 1 or "Traceback" in result.stderr:
                self.failures.append(
                    f"kansas-ctl failed with {len(lines)} lines: {result.stderr!r}"
                )
            self.ctl_failures.append(f"{down or 'nothing'} down: {lines[-1] if lines else '?'}")

    # -- faults ------------------------------------------------------------------------
    def pause(self, seconds: float) -> None:
        """The scenario's own length (an outage, a quiet gap), not a synchronisation."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.check_load_alive()
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    def retry(self, what: str, start: Any) -> None:
        deadline = time.monotonic() + RESTART_DEADLINE
        while True:
            try:
                start()
                return
            except ServerError as e:
                if time.monotonic() > deadline:
                    raise SystemExit(f"chaos: {what} would not restart: {e}") from None
                self.say(f"{what} not back yet ({str(e).splitlines()[0]}); retrying")
                time.sleep(0.5)

    def inflict(self, victim: str, down_for: float) -> Fault:
        sig = "KILL"
        started = time.monotonic()
        self.down = victim  # before the kill: the churn thread labels its failures by it
        if victim.startswith("net-"):
            sig = "DROP"
            host = self.hosts[victim.removeprefix("net-")]
            host.partition()
            try:
                self.pause(down_for)
            finally:
                host.heal()
            started = time.monotonic()
        elif victim == "redis":
            self.redis.stop(signal.SIGKILL)
            self.pause(down_for)
            started = time.monotonic()
            self.retry("redis", lambda: self.redis.start(self.redis.port))
        elif victim == "postgres":
            assert self.postgres.proc is not None
            os.killpg(self.postgres.proc.pid, signal.SIGKILL)  # postmaster and backends
            self.postgres.stop(signal.SIGKILL)  # reaps it
            self.pause(down_for)
            started = time.monotonic()
            self.retry("postgres", lambda: self.postgres.start(self.postgres.port))
        elif victim.startswith("shard-"):
            shard = self.shards[victim.removeprefix("shard-")]
            if self.args.shard_signal == "kill":
                held = self.held().get(shard.name, [])
                self.shard_kill_queues += sum(
                    1 for q in held if q["user_profile_id"] <= self.args.clients
                )
                shard.stop(signal.SIGKILL)
            else:
                sig = "TERM"
                shard.stop(signal.SIGTERM)
            self.pause(down_for)
            started = time.monotonic()
            self.retry(victim, shard.start)
        elif victim == "kansas":
            assert self.kansas is not None
            self.kansas.stop(signal.SIGKILL)
            self.pause(down_for)
            started = time.monotonic()
            self.retry("kansas", self.start_kansas)
        self.down = None
        return Fault(victim, sig, 0.0, round(down_for, 1), round(time.monotonic() - started, 2))

    def fault_loop(self, until: float) -> None:
        a = self.args
        order: list[str] = []
        while True:
            gap = self.rng.uniform(a.min_gap, a.max_gap)
            if not order:
                order = ["redis", "postgres", "shard", "kansas"]
                if a.partitions:
                    order += ["net-redis", "net-postgres", "net-shard-a"]
                self.rng.shuffle(order)
            victim = order[-1]
            if victim.startswith("net-"):
                down_for = self.rng.uniform(a.min_cut, a.max_cut)
            else:
                down_for = self.rng.uniform(a.min_down, a.max_down)
            if self.now() + gap + down_for + 5 > until:
                return
            self.pause(gap)
            order.pop()
            if victim == "shard":
                victim = "shard-" + self.rng.choice(SHARDS)
            at = self.now()
            self.say(f"fault {len(self.faults) + 1}: {victim} down for {down_for:.1f} s")
            fault = self.inflict(victim, down_for)
            fault.at = round(at, 1)
            self.faults.append(fault)
            self.say(f"  {victim} back (restart took {fault.restart_seconds:.2f} s)")

    # -- checks ------------------------------------------------------------------------
    def settle_kansas(self) -> tuple[float | None, int | None]:
        """kansas after the load: wait (bounded) until its open sockets stop changing."""
        assert self.kansas is not None and self.kansas.proc is not None
        pid = self.kansas.proc.pid
        deadline = time.monotonic() + 20
        previous = None
        while time.monotonic() < deadline:
            fds = open_fds(pid)
            if fds is not None and fds == previous:
                break
            previous = fds
            time.sleep(1.0)
        return rss_mib(pid), open_fds(pid)

    def check_queues(self) -> dict[str, Any]:
        """Every queue a client knows must survive: held by its shard, mapped to it in
        Redis, and reachable through a kansas restarted with an empty cache (Redis alone).

        A client knows a churn queue if its creation was answered, and a load client's
        queue if it is that client's only one. A queue whose creation kansas never
        answered (kansas killed mid-request) is an orphan: nobody has its id; the shard
        drops it after its idle timeout. A load client with several queues has
        re-registered, which the load report counts already."""
        assert self.kansas is not None
        held = {q["queue_id"]: (name, q["user_profile_id"])
                for name, queues in self.held().items() for q in queues}  # fmt: skip
        gone = [e for e in self.churn if e["queue_id"] not in held]
        realms = {e["queue_id"]: e["realm"] for e in self.churn}
        per_user = Counter(user for _, user in held.values())
        known: dict[str, tuple[str, int, str]] = {}  # queue -> (shard, user, realm)
        orphans = []
        for queue_id, (shard, user) in held.items():
            if queue_id in realms:
                known[queue_id] = (shard, user, realms[queue_id])
            elif user >= CHURN_USER_BASE:
                orphans.append(queue_id)
            elif 1 <= user <= self.args.clients and per_user[user] == 1:
                known[queue_id] = (shard, user, REALMS[(user - 1) % len(REALMS)])
        deadline = time.monotonic() + 30  # the journal may still be replaying
        while True:
            unmapped = []
            for queue_id, (shard, user, _realm) in known.items():
                raw = redis_get(self.redis.port, "kansas:queue:" + queue_id, self.redis.host)
                mapped = json.loads(raw).get("shard") if raw is not None else None
                if mapped != shard:
                    unmapped.append(f"{queue_id} (user {user}) on {shard}, mapped to {mapped}")
            if not unmapped or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.kansas.stop(signal.SIGKILL)
        self.start_kansas()
        unreachable = []
        for queue_id, (shard, user, realm) in known.items():
            params = {"queue_id": queue_id, "last_event_id": -1, "dont_block": "true"}
            reply = call(self.kansas.public_port, "GET", "/json/events", host=realm,
                         params=params, timeout=10)  # fmt: skip
            if reply.status != 200:
                unreachable.append(f"{queue_id} (user {user}, {realm}, on {shard}) -> "
                                   f"{reply.status} {reply.body[:100]!r}")  # fmt: skip
        return {"held": len(held), "checked": len(known), "orphans": orphans,
                "churn": len(self.churn), "churn_gone": gone, "unmapped": unmapped,
                "unreachable": unreachable}  # fmt: skip

    def run(self) -> dict[str, Any]:
        a = self.args
        self.start_stack()
        self.start_load()
        self.wait_connected()
        load_started = self.now()  # kansas-load injects from when its clients registered
        self.say(f"{a.clients} clients registered; warming up")
        self.pause(a.warmup)
        assert self.kansas is not None and self.kansas.proc is not None
        baseline = rss_mib(self.kansas.proc.pid)
        self.say(f"kansas RSS under load before any fault: {baseline:.1f} MiB")
        threads = [threading.Thread(target=fn, daemon=True)
                   for fn in (self.sample_memory, self.churn_loop, self.flip_loop)]  # fmt: skip
        for t in threads:
            t.start()
        self.fault_loop(until=load_started + a.minutes * 60 - 10)
        self.stopping.set()
        for t in threads:
            t.join(timeout=40)
        self.say(f"{len(self.faults)} faults done; waiting for kansas-load to drain")
        assert self.load is not None
        try:
            self.load.wait(timeout=a.minutes * 60 + a.drain + 120)
        except subprocess.TimeoutExpired:
            self.load.kill()
            self.failures.append("kansas-load did not finish in time")
        report = json.loads((self.work / "load.json").read_text())
        end_rss, end_fds = self.settle_kansas()
        self.say(f"kansas RSS after the load: {end_rss:.1f} MiB ({end_fds} fds)")
        queues = self.check_queues()
        log_text = self.kansas.log_text() if self.kansas is not None else ""
        return self.verdict(report, baseline, end_rss, end_fds, queues, log_text)

    def verdict(self, report: dict[str, Any], baseline: float | None, end_rss: float | None,
                end_fds: int | None, queues: dict[str, Any],
                log_text: str) -> dict[str, Any]:  # fmt: skip
        a = self.args
        fail = self.failures
        kills = {f.victim for f in self.faults}
        kansas_caused = report["reregistrations"] - self.shard_kill_queues
        if kansas_caused != 0:
            fail.append(f"{report['reregistrations']} re-registrations, "
                        f"{self.shard_kill_queues} of them the killed shards' queues")  # fmt: skip
        for name in ("lost", "duplicated", "out_of_order", "unexpected"):
            if report[name]:
                fail.append(f"{report[name]} events {name.replace('_', ' ')}")
        if report["delivered"] == 0:
            fail.append("kansas-load delivered nothing")
        allowed = KILL_ERRORS if "kansas" in kills else set()
        if a.shard_signal == "kill":
            allowed = allowed | {"bad-queue"}
        other = {k: v for k, v in report["errors"].items() if k not in allowed}
        if other:
            fail.append(f"errors beyond kansas's own restarts: {other}")
        if "timeout" in report["errors"]:
            fail.append("a long-poll waited over 90 s")
        if queues["unmapped"]:
            fail.append(f"{len(queues['unmapped'])} queues without a correct mapping in Redis")
        if queues["unreachable"]:
            fail.append(f"{len(queues['unreachable'])} queues unreachable through a cold kansas")
        if queues["churn_gone"] and a.shard_signal == "term":
            fail.append(f"{len(queues['churn_gone'])} churn queues no shard holds any more")
        tracebacks = log_text.count("Traceback")
        if tracebacks:
            fail.append(f"{tracebacks} tracebacks in kansas's log")
        limit = None
        if baseline is not None:
            limit = max(baseline * (1 + a.memory_slack), baseline + 10)
            if end_rss is None or end_rss > limit:
                fail.append(f"kansas RSS {end_rss} MiB after the run, baseline {baseline:.1f}")
        incarnations = []
        for inc in self.incarnations[:-1]:  # the last one is check_queues's cold start
            values = [v for _, v in inc.samples]
            incarnations.append({
                "number": inc.number, "started_at": inc.started_at,
                "rss_first_mib": values[0] if values else None,
                "rss_peak_mib": max(values) if values else None,
                "rss_last_mib": values[-1] if values else None,
                "samples": len(values),
            })  # fmt: skip
        summary = {
            "ok": not fail,
            "failures": fail,
            "seed": a.seed,
            "minutes": a.minutes,
            "shard_signal": a.shard_signal,
            "faults": [asdict(f) for f in self.faults],
            "fault_counts": {
                v: sum(1 for f in self.faults if f.victim.startswith(v))
                for v in ("redis", "postgres", "shard", "kansas", "net-")
            },
            "load": {k: report[k] for k in LOAD_FIELDS},
            "shard_killed_queues": self.shard_kill_queues,
            "queues_held": queues["held"],
            "queues_checked": queues["checked"],
            "queues_orphaned": len(queues["orphans"]),
            "queues_unmapped": queues["unmapped"][:20],
            "queues_unreachable": queues["unreachable"][:20],
            "churn_queues": queues["churn"],
            "churn_gone_with_a_killed_shard": len(queues["churn_gone"]),
            "churn_create_failures": self.churn_failures,
            "pin_flips": self.flips,
            "kansas_ctl_failures": self.ctl_failures,
            "kansas_rss_baseline_mib": baseline and round(baseline, 1),
            "kansas_rss_end_mib": end_rss and round(end_rss, 1),
            "kansas_rss_limit_mib": limit and round(limit, 1),
            "kansas_fds_end": end_fds,
            "kansas_incarnations": incarnations,
            "kansas_log_tracebacks": tracebacks,
            "workdir": str(self.work),
        }
        return summary


def print_summary(s: dict[str, Any]) -> None:
    load = s["load"]
    ev = load["event_latency"]
    print()
    print(f"chaos: {'OK' if s['ok'] else 'FAILED'}  ({s['minutes']} min, seed {s['seed']}, "
          f"shards stopped with SIG{s['shard_signal'].upper()})")  # fmt: skip
    for failure in s["failures"]:
        print(f"  FAILED: {failure}")
    counts = ", ".join(f"{k} {v}" for k, v in s["fault_counts"].items())
    print(f"  faults            {len(s['faults'])} ({counts})")
    print(f"  clients           {load['clients']}, re-registrations {load['reregistrations']}"
          f" (killed shards held {s['shard_killed_queues']})")  # fmt: skip
    print(
        f"  events            {load['events_injected']} injected, {load['events_confirmed']} "
        f"confirmed, {load['events_failed']} failed (notify calls kansas could not take)"
    )
    print(f"  deliveries        {load['deliveries_expected']} expected, {load['delivered']} "
          f"delivered, {load['lost']} lost, {load['duplicated']} duplicated, "
          f"{load['out_of_order']} out of order, {load['unexpected']} unexpected, "
          f"{load['uncertain']} uncertain")  # fmt: skip
    print(f"  event latency     p50 {ev['p50_ms']:.0f} ms, p99 {ev['p99_ms']:.0f} ms, "
          f"max {ev['max_ms'] / 1000:.1f} s")  # fmt: skip
    print(f"  requests          {load['requests']}; errors {load['errors'] or 'none'}")
    print(
        f"  queues            {s['queues_held']} held by the shards, {s['queues_checked']} "
        f"known to a client: "
        f"{len(s['queues_unmapped'])} without their mapping in Redis, "
        f"{len(s['queues_unreachable'])} unreachable through a cold kansas; "
        f"{s['churn_queues']} churn queues created during the faults "
        f"({s['churn_gone_with_a_killed_shard']} gone with a SIGKILLed shard); "
        f"{s['queues_orphaned']} orphans (created while kansas was killed mid-answer)"
    )
    print(f"  churn failures    {s['churn_create_failures'] or 'none'}")
    print(f"  pin flips         {s['pin_flips']}; kansas-ctl failures: "
          f"{len(s['kansas_ctl_failures'])}")  # fmt: skip
    for line in s["kansas_ctl_failures"][:3]:
        print(f"                      {line}")
    print(
        f"  kansas memory     baseline {s['kansas_rss_baseline_mib']} MiB under load, "
        f"{s['kansas_rss_end_mib']} MiB after (limit {s['kansas_rss_limit_mib']}); "
        f"{len(s['kansas_incarnations'])} processes, peaks "
        + ", ".join(str(i["rss_peak_mib"]) for i in s["kansas_incarnations"])
    )
    print(f"  kansas log        {s['kansas_log_tracebacks']} tracebacks; work dir {s['workdir']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=5.0, help="length of the load (default 5)")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--event-rate", type=float, default=20.0)
    p.add_argument("--dont-block-share", type=float, default=0.05, help="tight pollers")
    p.add_argument("--drain", type=float, default=60.0, help="seconds kansas-load may drain")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--min-gap", type=float, default=3.0, help="seconds between faults, min")
    p.add_argument("--max-gap", type=float, default=12.0)
    p.add_argument("--min-down", type=float, default=1.0, help="seconds a victim stays down")
    p.add_argument("--max-down", type=float, default=8.0)
    p.add_argument("--churn-interval", type=float, default=0.5)
    p.add_argument("--flip-interval", type=float, default=10.0)
    p.add_argument("--shard-signal", choices=("term", "kill"), default="term")
    p.add_argument(
        "--partitions",
        action="store_true",
        help="Redis, PostgreSQL and shard a on test hosts; their links cut too",
    )
    p.add_argument("--min-cut", type=float, default=5.0, help="seconds a link stays cut, min")
    p.add_argument("--max-cut", type=float, default=20.0)
    p.add_argument("--memory-slack", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workdir", help="logs and reports here (default: a new temp dir)")
    p.add_argument("--json-report", help="write the summary as JSON here too")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    if not 0 < args.minutes <= 120:
        p.error("--minutes must be in (0, 120]")
    if args.min_gap > args.max_gap or args.min_down > args.max_down:
        p.error("min above max")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chaos = Chaos(args)
    budget = args.minutes * 60 + args.drain + 600  # start-up, drain, checks: generous

    def watchdog(signum: int, frame: object) -> None:
        raise SystemExit(f"chaos: watchdog: still running after {budget:.0f} s")

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(int(budget))
    try:
        summary = chaos.run()
    finally:
        signal.alarm(0)
        chaos.stop_all()
    print_summary(summary)
    path = Path(args.json_report) if args.json_report else chaos.work / "chaos.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"  summary           {path}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
