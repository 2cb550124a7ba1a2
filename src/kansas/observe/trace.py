"""The last few requests of recently seen queues, for ``kansas-ctl trace``.

Bounded twice: at most ``max_queues`` queues (the queue first seen longest ago goes
first) and ``depth`` requests per queue (the oldest goes first). A record is a small
tuple of ten values: about 1.4 KB per queue with 5 records (measured), so 2.9 MB with
the defaults (2,000 queues). Each process keeps its own: with several workers, each
knows the requests it served.
"""

from __future__ import annotations

from typing import Any

#: A record: (request id, listener, method, status, shard, rule, realm, arrived, sent,
#: answered), raw (bytes, floats), since a tuple of what is at hand is the cheapest
#: thing to keep per request; ``get`` makes them readable.
Record = tuple[Any, ...]


def timings(arrived: float, sent: float | None, now: float) -> dict[str, float | None]:
    """Routing (arrival until sent to the shard, parking included), backend (sent until
    answered) and total time, in milliseconds; no routing/backend time if never sent."""
    return {
        "route_ms": None if sent is None else round((sent - arrived) * 1000, 3),
        "backend_ms": None if sent is None else round((now - sent) * 1000, 3),
        "total_ms": round((now - arrived) * 1000, 3),
    }


class RecentRequests:
    __slots__ = ("depth", "max_queues", "queues")

    def __init__(self, max_queues: int = 2_000, depth: int = 5) -> None:
        self.max_queues = max_queues
        self.depth = depth
        #: queue id -> its records, oldest first (the recorder appends to them directly)
        self.queues: dict[str, list[Record]] = {}

    def add(self, queue_id: str, record: Record) -> None:
        queues = self.queues
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
        found = []
        for (
            rid,
            listener,
            method,
            status,
            shard,
            rule,
            realm,
            arrived,
            sent,
            now,
        ) in self.queues.get(queue_id, ()):
            found.append({
                "ts": now,
                "id": rid.decode("ascii", "replace"),
                "listener": listener,
                "method": method.decode("ascii", "replace"),
                "status": status,
                "shard": shard or None,
                "rule": str(rule) or None,
                "realm": realm or None,
                **timings(arrived, sent, now),
            })  # fmt: skip
        return found

    def __len__(self) -> int:
        return len(self.queues)
