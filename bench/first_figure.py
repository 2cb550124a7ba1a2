"""First benchmark: proxied GETs per second through kansas vs. straight to a demo shard.

Runs, side by side on this machine: a private Redis and PostgreSQL, one demo shard,
one kansas (twistd), and wrk. Each measurement is a fixed-length wrk run of
``GET /json/events?...&dont_block=true`` on one queue (an immediate reply, the shard's
cheapest answer): first straight to the shard, then through kansas. kansas's CPU per
request comes from /proc (user + system time over the run).

    make bench            # or: .venv/bin/python bench/first_figure.py --seconds 10
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kansas.ctl import main as ctl
from kansas.testing.client import call
from kansas.testing.processes import DemoShardProcess, KansasProcess
from kansas.testing.servers import PostgresServer, RedisServer

REALM = "bench.example.com"
SECRET = "bench-secret"


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def wrk(port: int, queue_id: str, seconds: int, connections: int) -> tuple[float, int, str]:
    url = (
        f"http://127.0.0.1:{port}/json/events?queue_id={queue_id}&last_event_id=-1&dont_block=true"
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-H", f"Host: {REALM}", url],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, total, errors.group(1) if errors else "0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is missing (apt-get install wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="kansas-bench-"))
    tmp.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    with RedisServer(tmp / "redis") as redis, PostgresServer(tmp / "pg") as postgres:
        redis.start()
        postgres.start()
        shard = DemoShardProcess("a", tmp, SECRET).start()
        common = ["--postgres", postgres.dsn, "--redis", redis.url]
        ctl([*common, "migrate"])
        ctl([*common, "shard", "add", "a", shard.url])
        kansas = KansasProcess(tmp, postgres.dsn, redis.url).start()
        try:
            form = {"secret": SECRET, "user_profile_id": 1, "dont_block": "true"}
            reply = call(
                kansas.internal_port, "POST", "/api/v1/events/internal", host=REALM, form=form
            )
            queue_id = reply.json["queue_id"]
            wrk(kansas.public_port, queue_id, 2, args.connections)  # warm up both
            direct, _, direct_err = wrk(shard.port, queue_id, args.seconds, args.connections)
            assert kansas.proc is not None
            before = cpu_seconds(kansas.proc.pid)
            proxied, proxied_n, proxied_err = wrk(
                kansas.public_port, queue_id, args.seconds, args.connections
            )
            after = cpu_seconds(kansas.proc.pid)
            user, system = after[0] - before[0], after[1] - before[1]
            used = user + system
        finally:
            kansas.stop()
            shard.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrk -t1 -c{args.connections} -d{args.seconds}s, dont_block GET on one queue, "
          f"{os.cpu_count()} cores shared by wrk, kansas and the demo shard")  # fmt: skip
    print("| path | req/s | non-2xx |")
    print("|---|---|---|")
    print(f"| wrk -> demo shard | {direct:,.0f} | {direct_err} |")
    print(f"| wrk -> kansas -> demo shard | {proxied:,.0f} | {proxied_err} |")
    print(f"ratio kansas/direct: {proxied / direct:.2f}")
    per_request = used / proxied_n * 1e6
    split = f"user {user / proxied_n * 1e6:.0f} µs, system {system / proxied_n * 1e6:.0f} µs"
    print(f"kansas CPU per proxied request: {per_request:.0f} µs ({split}; {used:.1f} s for"
          f" {proxied_n:,})")  # fmt: skip


if __name__ == "__main__":
    main()
