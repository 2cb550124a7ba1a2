"""N workers hold N times what one process can: held long-polls through a kansas master.

A held long-poll costs a kansas process two descriptors (client and shard connection),
and the open-file limit here is 20,000 per process, so one process tops out near
9,900. This holds ``--per-worker`` long-polls per worker through ``--workers`` workers,
with the load spread so that no other process hits the same limit: one demo shard and
one realm pinned to it per worker, one client process per worker (each holding its
share of sockets). Reports how many the shards hold, how the workers share them, and
every worker's descriptors and RSS.

    .venv/bin/python bench/longpoll_workers.py --workers 2 --per-worker 9900
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from common import (  # bench/common.py (this script's folder)
    create_queues,
    long_poll,
    parked_at,
    raise_open_file_limit,
    rss_kib,
)

from kansas.ctl import main as ctl
from kansas.testing.processes import DemoShardProcess, KansasProcess
from kansas.testing.servers import PostgresServer, RedisServer, free_port

SECRET = "bench-secret"


def realm(n: int) -> str:
    return f"r{n}.bench.example.com"


def hold(port: int, host: str, queues: list[str], done: Connection) -> None:
    """A client process: one long-poll per queue, held until told to stop."""
    raise_open_file_limit()
    sockets, errors = [], 0
    for queue_id in queues:
        try:
            sockets.append(long_poll(port, host, queue_id, timeout=30))
        except OSError:
            errors += 1
    done.send(errors)
    done.recv()  # stop
    for s in sockets:
        s.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-worker", type=int, default=9900)
    args = parser.parse_args()
    n = args.workers
    tmp = Path(tempfile.mkdtemp(prefix="kansas-bench-"))
    tmp.chmod(0o755)
    try:
        with RedisServer(tmp / "redis") as redis, PostgresServer(tmp / "pg") as postgres:
            redis.start()
            postgres.start()
            common = ["--postgres", postgres.dsn, "--redis", redis.url]
            ctl([*common, "migrate"])
            shards = []
            for i in range(n):
                shard = DemoShardProcess(f"s{i}", tmp, SECRET, heartbeat=600).start()
                shards.append(shard)
                ctl([*common, "shard", "add", f"s{i}", shard.url])
                ctl([*common, "realm", "pin", realm(i), f"s{i}"])
            kansas = KansasProcess(tmp, postgres.dsn, redis.url, workers=n,
                                   public_port=free_port(), internal_port=free_port())  # fmt: skip
            kansas.start()
            assert kansas.proc is not None
            try:
                started = time.monotonic()
                queues = {
                    i: create_queues(kansas.internal_port, SECRET, realm(i),
                                     range(args.per_worker), timeout=30)
                    for i in range(n)
                }  # fmt: skip
                print(f"{n * args.per_worker:,} queues created in "
                      f"{time.monotonic() - started:.0f} s", flush=True)  # fmt: skip
                pipes, children = [], []
                for i in range(n):
                    ours, theirs = multiprocessing.Pipe()
                    child = multiprocessing.Process(
                        target=hold, args=(kansas.public_port, realm(i), queues[i], theirs)
                    )
                    child.start()
                    pipes.append(ours)
                    children.append(child)
                errors = sum(p.recv() for p in pipes)
                want = n * args.per_worker
                deadline = time.monotonic() + 300
                while (held := sum(parked_at(s.port) for s in shards)) < want:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                workers = [pid for _, pids in kansas.generations() for pid in pids]
                print(f"held at the shards: {held:,} of {want:,}; "
                      f"client connect errors: {errors}")  # fmt: skip
                print("| worker pid | open descriptors | RSS (KiB) |")
                print("|---|---|---|")
                for pid in workers:
                    print(f"| {pid} | {open_fds(pid):,} | {rss_kib(pid):,} |")
                bad = ("Traceback", "EMFILE", "died")
                problems = [line for line in kansas.log_text().splitlines()
                            if any(word in line for word in bad)]  # fmt: skip
                print(f"kansas log problems: {len(problems)}")
                for line in problems[:5]:
                    print("  " + line[:200])
                for p in pipes:
                    p.send("stop")
                for c in children:
                    c.join(timeout=60)
            finally:
                kansas.stop(timeout=90)
                for shard in shards:
                    shard.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
