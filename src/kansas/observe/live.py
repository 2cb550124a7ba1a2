"""This process's metrics snapshot, read from the live objects when /metrics is scraped.

Counters are the plain numbers the components keep as they work (``RequestRecorder``,
``RouteTable``, ``CallStats`` of the Redis store and the PostgreSQL follower, ...);
gauges (long-polls held, parked requests, shard health, moves) are computed here, at
scrape time, so serving a request never pays for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kansas.observe.metrics import SNAPSHOT_VERSION, CallStats, Snapshot, process_samples
from kansas.observe.recorder import RequestRecorder


def default_worker_id() -> str:
    return "main"


@dataclass
class LiveMetrics:
    """Whatever of the process is there to look at (tests wire only a part)."""

    recorder: RequestRecorder
    clock: Any
    front: Any = None  # FrontFactory: connections, held long-polls
    parking: Any = None  # Parking
    health: Any = None  # HealthMonitor
    directory: Any = None  # AssignmentFollower (or anything with .current)
    table: Any = None  # RouteTable
    redis: CallStats | None = None
    notify: Any = None  # NotifyDispatcher
    #: names this process's process_* metrics; the worker model sets one per worker
    worker: str = field(default_factory=default_worker_id)
    with_process: bool = True

    def snapshot(self) -> Snapshot:
        metrics: dict[str, Any] = self.recorder.counters()
        metrics["kansas_workers"] = [[[], 1]]
        self._shards(metrics)
        self._routes(metrics)
        self._stores(metrics)
        return {
            "v": SNAPSHOT_VERSION,
            "worker": self.worker,
            "pid": os.getpid(),
            "metrics": metrics,
            "process": {self.worker: process_samples()} if self.with_process else {},
        }

    def _shards(self, metrics: dict[str, Any]) -> None:
        names: list[str] = []
        if self.directory is not None:
            assignment = self.directory.current
            names = sorted(assignment.shards)
            metrics["kansas_shards"] = [[[], len(names)]]
            moving = sorted(assignment.moving_realms)
            metrics["kansas_moves_in_progress"] = [[[], len(moving)]]
            metrics["kansas_realm_moving"] = [[[realm], 1] for realm in moving]
        if self.health is not None:
            metrics["kansas_shard_up"] = [
                [[name], 0 if self.health.is_down(name) else 1] for name in names
            ]
        if self.front is not None:
            held: dict[str, int] = dict.fromkeys(names, 0)
            for conn in self.front.connections:
                pending = conn.pending
                if conn.exchange is not None and pending is not None and pending.method == b"GET":
                    name = pending.target.shard.name
                    held[name] = held.get(name, 0) + 1
            metrics["kansas_longpolls_held"] = [[[n], c] for n, c in sorted(held.items())]
            metrics["kansas_client_connections"] = [[[], len(self.front.connections)]]
        if self.parking is not None:
            parked = dict.fromkeys(names, 0)
            for name, lot in self.parking.lots.items():
                parked[name] = lot.live
            metrics["kansas_parked_requests"] = [[[n], c] for n, c in sorted(parked.items())]
            metrics["kansas_parked_released_total"] = [[[], self.parking.released]]
            metrics["kansas_parked_expired_total"] = [[[], self.parking.expired]]
        if self.notify is not None:
            held_notes = dict.fromkeys(names, 0)
            for name, box in self.notify.boxes.items():
                held_notes[name] = len(box.letters)
            metrics["kansas_notifications_held"] = [[[n], c] for n, c in sorted(held_notes.items())]
            metrics["kansas_notifications_lost_total"] = [[[], self.notify.lost]]

    def _routes(self, metrics: dict[str, Any]) -> None:
        table = self.table
        if table is None:
            return
        metrics["kansas_route_cache_hits_total"] = [[[], table.hits]]
        metrics["kansas_route_cache_misses_total"] = [[[], table.misses]]
        metrics["kansas_route_cache_entries"] = [[[], len(table)]]
        metrics["kansas_route_journal_entries"] = [[[], table.journal_size]]
        metrics["kansas_route_journal_dropped_total"] = [[[], table.journal_dropped]]
        metrics["kansas_uncached_routes_total"] = [[[], table.uncached_by_moves]]

    def _stores(self, metrics: dict[str, Any]) -> None:
        if self.redis is not None:
            metrics["kansas_redis_errors_total"] = [
                [[op], n] for op, n in sorted(self.redis.errors.items())
            ]
            metrics["kansas_redis_duration_seconds"] = [
                [[op], hist.value()] for op, hist in sorted(self.redis.latency.items())
            ]
        directory = self.directory
        stats = getattr(directory, "stats", None)
        if isinstance(stats, CallStats):
            metrics["kansas_postgres_errors_total"] = [
                [[what], n] for what, n in sorted(stats.errors.items())
            ]
            reload = stats.latency.get("reload")
            if reload is not None:
                metrics["kansas_postgres_reload_duration_seconds"] = [[[], reload.value()]]
            metrics["kansas_postgres_listening"] = [[[], 1 if directory.listening else 0]]
            age = self.clock.seconds() - directory.loaded_at
            metrics["kansas_assignment_age_seconds"] = [[[], max(0.0, age)]]
