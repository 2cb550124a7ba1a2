"""The last few requests of recently seen queues, for ``kansas-ctl trace``.

Bounded twice: at most ``max_queues`` queues (the queue first seen longest ago goes
first) and ``depth`` requests per queue (the oldest goes first). A record is a small
tuple (see ``FIELDS``); with the defaults (10,000 queues, 5 requests) it is a few MB
at most. Each process keeps its own: with several workers, each knows the requests it
served.
"""

from __future__ import annotations

from typing import Any

#: What a record holds, in order (tuples are the cheapest thing to keep per request).
FIELDS = ("ts", "id", "listener", "method", "status", "shard", "rule", "realm",
          "route_ms", "backend_ms", "total_ms")  # fmt: skip
Record = tuple[Any, ...]


class RecentRequests:
    __slots__ = ("_queues", "depth", "max_queues")

    def __init__(self, max_queues: int = 10_000, depth: int = 5) -> None:
        self.max_queues = max_queues
        self.depth = depth
        self._queues: dict[str, list[Record]] = {}

    def add(self, queue_id: str, record: Record) -> None:
        queues = self._queues
        records = queues.get(queue_id)
        if records is None:
            if self.max_queues <= 0:
                return
            if len(queues) >= self.max_queues:
                del queues[next(iter(queues))]  # dicts keep insertion order
            queues[queue_id] = [record]
            return
        records.append(record)
        if len(records) > self.depth:
            del records[0]

    def get(self, queue_id: str) -> list[dict[str, Any]]:
        """A queue's recent requests, oldest first, as dicts."""
        return [dict(zip(FIELDS, r, strict=True)) for r in self._queues.get(queue_id, ())]

    def __len__(self) -> int:
        return len(self._queues)
