"""What the bench scripts share: reading a process's memory, asking a demo shard."""

from __future__ import annotations

from pathlib import Path

from kansas.testing.client import call


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
