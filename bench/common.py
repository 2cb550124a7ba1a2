"""What the bench scripts share: reading a process's memory, asking a demo shard, a
one-shard demo stack, making queues and holding long-polls on them."""

from __future__ import annotations

import contextlib
import resource
import socket
from collections.abc import Iterator
from pathlib import Path

from kansas.ctl import main as ctl
from kansas.testing.client import call
from kansas.testing.processes import DemoShardProcess
from kansas.testing.servers import PostgresServer, RedisServer


def raise_open_file_limit() -> None:
    """Soft open-file limit up to the hard one; the processes a bench starts inherit it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def create_queues(
    internal_port: int, secret: str, realm: str, users: range, timeout: float = 10
) -> list[str]:
    """One event queue per user of ``realm``, made as Django does: through kansas's
    internal listener."""
    form = {"secret": secret, "dont_block": "true"}
    return [
        call(internal_port, "POST", "/api/v1/events/internal", host=realm,
             form={**form, "user_profile_id": user}, timeout=timeout).json["queue_id"]
        for user in users
    ]  # fmt: skip


def long_poll(port: int, realm: str, queue_id: str, timeout: float | None = None) -> socket.socket:
    """A raw-socket client that has sent one blocking ``GET /json/events`` and waits."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(f"GET /json/events?queue_id={queue_id}&last_event_id=-1 HTTP/1.1\r\n"
              f"Host: {realm}\r\n\r\n".encode())  # fmt: skip
    return s


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
