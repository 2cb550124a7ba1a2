"""kansas with --workers 1 vs --workers 2: proxied GETs per second, in one run.

The same set-up as bench/against_nginx.py (a backend nginx as the two shards, realms
pinned, every queue mapped beforehand), but the proxy is a kansas master with one
worker, then with two, alternating over rounds; wrk uses two threads so the load
generator is not what limits two workers. Every process shares the machine's cores,
so the ratio says how much of the machine's spare CPU a second worker turns into
requests. ``--write`` records the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from against_nginx import (
    REALMS,
    BenchError,
    children_of,
    cpu_model,
    cpu_seconds,
    kansas_revision,
    loadavg,
    seed_routes,
    start_backends,
    stopping,
    write_section,
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


def workers_cpu(master_pid: int) -> float:
    return sum(sum(cpu_seconds(pid)) for pid in children_of(master_pid))


def run(args: argparse.Namespace, tmp: Path) -> str:
    before = loadavg()
    rows: list[tuple[int, int, float, float, int]] = []
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
                    assert kansas.proc is not None
                    seed_routes(kansas, redis.port, queues, shard_of)
                    wrk2(public, script, 2, args.connections)  # warm every worker's cache
                    cpu, started = workers_cpu(kansas.proc.pid), time.monotonic()
                    rate, bad = wrk2(public, script, args.seconds, args.connections)
                    used = workers_cpu(kansas.proc.pid) - cpu
                    wall = time.monotonic() - started
                    rows.append((number, workers, rate, used / wall, bad))
                    print(
                        f"  round {number}, {workers} worker(s): {rate:,.0f} req/s, "
                        f"{used / wall:.0%} of a core, {bad} non-2xx",
                        flush=True,
                    )
    one = sorted(r[2] for r in rows if r[1] == 1)
    two = sorted(r[2] for r in rows if r[1] == 2)
    median = lambda xs: xs[len(xs) // 2]  # noqa: E731
    ratio = median(two) / median(one)

    def per_core(workers: int) -> float:
        mine = [r for r in rows if r[1] == workers]
        return sum(r[2] for r in mine) / sum(r[3] for r in mine)

    lines = [
        SECTION, "",
        f"Command: `.venv/bin/python bench/workers.py --write` (`--seconds {args.seconds:g} "
        f"--rounds {args.rounds} --connections {args.connections}`), on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {os.cpu_count()} cores ({cpu_model()}); kansas at {kansas_revision()}. "
        f"Load average before: {before}, after: {loadavg()}.", "",
        "Same set-up as the side-by-side run above (backend nginx as two shards, 100 queues "
        "mapped beforehand, `dont_block` GETs), a kansas master with 1 or 2 workers, "
        "wrk with 2 threads and "
        f"{args.connections} connections; rounds alternate which goes first. Every process "
        "(wrk, the backend nginx, kansas's workers) shares the machine's cores.", "",
        "| round | workers | req/s | workers' CPU (cores) | non-2xx |", "|---|---|---|---|---|",
        *(f"| {n} | {w} | {rate:,.0f} | {cpu:.2f} | {bad} |" for n, w, rate, cpu, bad in rows),
        "",
        f"- median req/s: 1 worker {median(one):,.0f}, 2 workers {median(two):,.0f}: "
        f"**ratio {ratio:.2f}** (target ≥ 1.8).",
        f"- requests per second per core of kansas CPU: 1 worker {per_core(1):,.0f}, "
        f"2 workers {per_core(2):,.0f}. What a second worker can add is bounded by the CPU "
        "that wrk and the backend nginx leave on this machine's two cores.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--queues", type=int, default=50, help="queues per realm")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is missing (scripts/system-deps.sh wrk)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="kansas-bench-"))
    tmp.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    try:
        text = run(args, tmp)
    except BenchError as e:
        sys.exit(f"bench: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(text)
    if args.write:
        write_section(text, SECTION)
        print("(written to BENCHMARKS.md)")


if __name__ == "__main__":
    main()
