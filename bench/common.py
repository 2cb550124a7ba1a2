"""What the bench scripts share: reading a process's memory, asking a demo shard, a
one-shard demo stack."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from kansas.ctl import main as ctl
from kansas.testing.client import call
from kansas.testing.processes import DemoShardProcess
from kansas.testing.servers import PostgresServer, RedisServer


def rss_kib(pid: int) -> int:
    """A process's resident memory (VmRSS), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def parked_at(shard_port: int) -> int:
    """How many long-polls a demo shard holds parked right now."""
    queues = call(shard_port, "GET", "/demo/queues", timeout=60).json["queues"]
    return sum(1 for q in queues if q["parked"])


@contextlib.contextmanager
def one_shard_stack(
    tmp: Path, secret: str
) -> Iterator[tuple[RedisServer, PostgresServer, DemoShardProcess]]:
    """Private Redis and PostgreSQL (schema migrated) and demo shard ``a``, registered,
    with a 600 s heartbeat so that a long-poll stays parked; all stopped on the way out."""
    with RedisServer(tmp / "redis") as redis, PostgresServer(tmp / "pg") as postgres:
        redis.start()
        postgres.start()
        shard = DemoShardProcess("a", tmp, secret, heartbeat=600).start()
        try:
            common = ["--postgres", postgres.dsn, "--redis", redis.url]
            ctl([*common, "migrate"])
            ctl([*common, "shard", "add", "a", shard.url])
            yield redis, postgres, shard
        finally:
            shard.stop()
