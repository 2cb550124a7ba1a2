"""Memory per held long-poll: kansas's and nginx's RSS growth while each holds N.

One demo shard, and this process as N clients (raw sockets, one GET each, left
waiting: the shard parks them until its heartbeat), first through one kansas, then
through an nginx routing as Zulip does (bench/against_nginx.py's proxy config, one
worker), in the same run. RSS is read from /proc after the shard reports every request
parked, against the proxy's RSS after a warm-up with none held. Each long-poll costs a
proxy a client and a backend connection: two descriptors, so one process tops out near
9,900 under the 20,000 open-file limit. ``--write`` records the table in BENCHMARKS.md.

    .venv/bin/python bench/longpoll_memory.py --counts 1000,5000,9900 --write
"""

from __future__ import annotations

import argparse
import http.client
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from against_nginx import (
    BenchError,
    Nginx,
    cpu_model,
    kansas_revision,
    nginx_version,
    proxy_config,
    run_and_write,
)
from common import (  # bench/common.py (this script's folder)
    create_queues,
    long_poll,
    one_shard_stack,
    parked_at,
    raise_open_file_limit,
    rss_kib,
)

from kansas.testing.processes import KansasProcess
from kansas.testing.servers import free_port

REALM = "bench.example.com"
SECRET = "bench-secret"
SECTION = "## Memory per held long-poll"
#: nginx's worker_connections. Once fewer than 1/16 of them are free, nginx closes idle
#: client connections to make room ("worker_connections are not enough, reusing
#: connections"), which at 20,000 drops long-polls past ~9,400; with 24,000 the 20,000
#: open-file limit binds first, as it does for kansas.
NGINX_CONNECTIONS = 24_000
#: Long-polls one process can hold: two descriptors each under the 20,000 hard limit.
CEILING = 9_900


@dataclass(frozen=True)
class Row:
    held: int  # long-polls sent
    parked: int  # of them, parked at the shard
    rss_kib: int
    per_poll: float  # bytes of RSS growth per long-poll


@dataclass(frozen=True)
class Holding:
    base_kib: int
    rows: list[Row]


def warm(port: int, queues: list[str]) -> None:
    """One request per queue through the proxy (route caches, a backend connection)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for queue_id in queues:
        conn.request("GET", f"/json/events?queue_id={queue_id}&dont_block=true",
                     headers={"Host": REALM})  # fmt: skip
        answer = conn.getresponse()
        answer.read()
        if answer.status != 200:
            raise BenchError(f"warm-up through port {port}: HTTP {answer.status}")
    conn.close()


def wait_parked(shard_port: int, done: Callable[[int], bool]) -> int:
    deadline = time.monotonic() + 120
    while not done(parked := parked_at(shard_port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return parked


def hold(port: int, pid: int, queues: list[str], counts: list[int], shard_port: int) -> Holding:
    """Hold counts[0], then counts[1], … long-polls through the proxy on ``port``; the
    proxy's RSS at each; then let them all go, and wait until the shard has none."""
    warm(port, queues)
    base = rss_kib(pid)
    rows, clients = [], []
    try:
        for n in counts:
            clients += [long_poll(port, REALM, q) for q in queues[len(clients) : n]]
            parked = wait_parked(shard_port, lambda held, n=n: held >= n)
            rss = rss_kib(pid)
            rows.append(Row(n, parked, rss, (rss - base) * 1024 / n))
            print(f"  {n:,} held: {parked:,} parked, RSS {rss:,} KiB", flush=True)
    finally:
        for s in clients:
            s.close()
    if wait_parked(shard_port, lambda held: held == 0):
        raise BenchError("the shard still holds long-polls of closed clients")
    return Holding(base, rows)


def verdict(rows: list[Row]) -> str:
    """Where the ≤ 4 KiB target is met: "**met** at every count", or which counts."""
    missed = [r for r in rows if r.per_poll > 4096]
    if not missed:
        return "**met** at every count"
    met = ", ".join(f"{r.held:,}" for r in rows if r.per_poll <= 4096) or "none"
    over = ", ".join(f"{r.held:,} ({r.per_poll / 1024:.2f} KiB)" for r in missed)
    return f"met at {met}; **not met** at {over}"


def report(args: argparse.Namespace, kansas: Holding, nginx: Holding, took: float) -> str:
    lines = [
        SECTION, "",
        f"Command: `.venv/bin/python bench/longpoll_memory.py --counts {args.counts} --write` "
        f"(part of `make bench`), on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{took / 60:.0f} min. Machine: {os.cpu_count()} cores ({cpu_model()}), "
        f"nginx {nginx_version()}; kansas at {kansas_revision()}.", "",
        "One demo shard (heartbeat 600 s, so nothing is answered); the bench process as N "
        "raw-socket clients each holding one `GET /json/events` long-poll on its own queue, "
        "first through one kansas process, then through nginx configured as in the "
        "side-by-side run (one worker, HTTP/1.1 upstream, `proxy_buffering off`; "
        f"`worker_connections {NGINX_CONNECTIONS:,}`). A proxy's RSS (`VmRSS`, for nginx "
        "its worker's) once the shard reports all N parked, against its RSS after a warm-up "
        f"with none held: kansas {kansas.base_kib:,} KiB, nginx {nginx.base_kib:,} KiB.", "",
        "| held long-polls | kansas: parked at the shard | RSS (KiB) | bytes per long-poll "
        "| nginx: parked at the shard | RSS (KiB) | bytes per long-poll | kansas ÷ nginx |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for k, n in zip(kansas.rows, nginx.rows, strict=True):
        lines.append(
            f"| {k.held:,} | {k.parked:,} | {k.rss_kib:,} | {k.per_poll:,.0f} "
            f"| {n.parked:,} | {n.rss_kib:,} | {n.per_poll:,.0f} | {k.per_poll / n.per_poll:.2f} |"
        )
    worst = max(r.per_poll for r in kansas.rows)
    ceiling = max(kansas.rows, key=lambda r: r.held)
    lines += [
        "",
        f"- kansas: at most **{worst / 1024:.2f} KiB per held long-poll**, client and backend "
        f"connection included; target ≤ 4 KiB: {verdict(kansas.rows)}.",
        f"- {ceiling.held:,} held through one kansas process, {ceiling.parked:,} of them "
        "parked at the shard, every connection accepted (a refused one stops the bench)"
        + (
            ": one process's ceiling, two descriptors per long-poll under the 20,000 "
            "open-file limit."
            if ceiling.held >= CEILING
            else f" (the ceiling is {CEILING:,})."
        ),
        "- At the ceiling kansas sits at the 4 KiB target, not under it: on 2026-12-07 the "
        "9,900 figure was 3,963 and 3,967 bytes while kansas listened with Twisted's backlog "
        "of 50 (dropped SYNs spread the connections over minutes) and 4,073 to 4,125 in "
        "three runs since (all 9,900 arrive within seconds); the cause of those ~150 bytes "
        "was not looked into.",
        "- nginx allocates its `worker_connections` slots when it starts, so they are in its "
        "baseline and not in its bytes per long-poll; kansas allocates a connection's "
        "objects when it is accepted.",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, tmp: Path) -> str:
    counts = sorted(int(n) for n in args.counts.split(","))
    started = time.monotonic()
    with one_shard_stack(tmp, SECRET) as (redis, postgres, shard):
        kansas = KansasProcess(tmp, postgres.dsn, redis.url).start()
        assert kansas.proc is not None
        try:
            queues = create_queues(kansas.internal_port, SECRET, REALM, range(counts[-1]))
            print("through kansas ...", flush=True)
            through_kansas = hold(kansas.public_port, kansas.proc.pid, queues, counts,
                                  shard.port)  # fmt: skip
        finally:
            kansas.stop()
        port = free_port()
        config = proxy_config(tmp / "nginx", port, {REALM: shard.port}, False,
                              NGINX_CONNECTIONS)  # fmt: skip
        nginx = Nginx("nginx", tmp / "nginx", config, port).start()
        try:
            print("through nginx ...", flush=True)
            through_nginx = hold(port, nginx.worker_pid, queues, counts, shard.port)
        finally:
            nginx.stop()
    return report(args, through_kansas, through_nginx, time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,5000,9900", help="comma-separated N to hold")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    raise_open_file_limit()
    run_and_write(lambda tmp: run(args, tmp), args.write, SECTION)


if __name__ == "__main__":
    main()
