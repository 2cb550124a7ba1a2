"""Prometheus metrics from plain numbers: cheap to keep, merged across processes.

The hot path never touches ``prometheus_client`` (its counters take a lock and cost
microseconds each): kansas keeps plain ints, dicts and ``Histogram`` bucket lists, and
turns them into a *snapshot* (a JSON-serialisable dict of plain numbers) when scraped.
Snapshots of several processes (workers) merge with ``merge``; ``render`` exposes one
(or the merge of many) through a ``prometheus_client`` collector, in the standard text
format.

A snapshot::

    {"v": 1, "worker": "main",
     "metrics": {"kansas_requests_total": [[["public", "a", "GET", "events", "200"], 12], ...],
                 "kansas_request_duration_seconds": [[["public", "a"], [[3, 0, ...], 0.01]]]},
     "process": {"main": [["process_open_fds", "gauge", "Number of ...", 12.0], ...]}}

Histogram values are ``[per-bucket counts (not cumulative, +Inf last), sum]``.
``SPECS`` says, per metric, its type, labels and how gauges merge (sum, min or max).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

SNAPSHOT_VERSION = 1

#: Requests answered at once (dont_block GETs, DELETEs, queue creation, errors).
SHORT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0)  # fmt: skip
#: Blocking GETs: a Zulip long-poll ends with an event or a heartbeat within ~55 s.
LONGPOLL_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 40.0, 45.0, 50.0,
                    55.0, 60.0)  # fmt: skip
#: Calls to Redis and PostgreSQL.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Bucket counts and a sum: what a Prometheus histogram needs, without a lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le, "<=").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def value(self) -> list[Any]:
        return [list(self.counts), self.sum]


class CallStats:
    """Errors and latencies of one store's calls, by operation (Redis, PostgreSQL)."""

    __slots__ = ("errors", "latency")

    def __init__(self) -> None:
        self.errors: dict[str, int] = {}
        self.latency: dict[str, Histogram] = {}

    def observe(self, op: str, seconds: float, ok: bool) -> None:
        hist = self.latency.get(op)
        if hist is None:
            hist = self.latency[op] = Histogram(STORE_BUCKETS)
        hist.observe(seconds)
        if not ok:
            self.errors[op] = self.errors.get(op, 0) + 1

    def timer(self, op: str) -> Callable[[bool], None]:
        """Start timing a call now; call the result with whether it succeeded."""
        start = time.monotonic()
        return lambda ok: self.observe(op, time.monotonic() - start, ok)


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    #: how a gauge merges across workers: "sum", "min" or "max" (counters: sum)
    merge: str = "sum"
    buckets: tuple[float, ...] = ()


_REQ = ("listener", "shard", "method", "kind", "status")
SPECS: tuple[Spec, ...] = (
    Spec("kansas_requests_total", "counter",
         "Requests answered, by listener, shard (none: answered by kansas before choosing "
         "one), method, path kind and status.", _REQ),
    Spec("kansas_request_duration_seconds", "histogram",
         "Time to answer requests that are not long-polls (dont_block GETs, DELETEs, "
         "internal calls, errors).", ("listener", "shard"), buckets=SHORT_BUCKETS),
    Spec("kansas_longpoll_duration_seconds", "histogram",
         "Time to answer blocking GETs (long-polls), parking included.", ("shard",),
         buckets=LONGPOLL_BUCKETS),
    Spec("kansas_routed_total", "counter",
         "Requests sent to a shard, by the rule that chose it.", ("listener", "rule")),
    Spec("kansas_longpolls_held", "gauge",
         "GETs waiting for their shard's answer right now.", ("shard",)),
    Spec("kansas_parked_requests", "gauge",
         "GETs parked for a shard that is down.", ("shard",)),
    Spec("kansas_parked_released_total", "counter",
         "Parked GETs replayed to a shard that came back."),
    Spec("kansas_parked_expired_total", "counter",
         "Parked GETs answered with an empty success at their deadline."),
    Spec("kansas_shard_up", "gauge",
         "1 if the shard answers (0 if any worker sees it down).", ("shard",), merge="min"),
    Spec("kansas_shards", "gauge", "Shards in the assignment.", merge="max"),
    Spec("kansas_client_connections", "gauge", "Open client connections (public listener)."),
    Spec("kansas_route_cache_hits_total", "counter",
         "Requests routed from the in-process route cache."),
    Spec("kansas_route_cache_misses_total", "counter",
         "Requests whose queue was not in the route cache (Redis asked)."),
    Spec("kansas_route_cache_entries", "gauge", "Routes in the in-process cache."),
    Spec("kansas_route_journal_entries", "gauge",
         "Queue mappings waiting to be written to Redis (write-behind journal)."),
    Spec("kansas_route_journal_dropped_total", "counter",
         "Mappings dropped from a full write-behind journal."),
    Spec("kansas_redis_errors_total", "counter",
         "Redis calls that failed (error, timeout, not connected), by operation.", ("op",)),
    Spec("kansas_redis_duration_seconds", "histogram",
         "Duration of Redis calls, by operation.", ("op",), buckets=STORE_BUCKETS),
    Spec("kansas_postgres_errors_total", "counter",
         "PostgreSQL failures (reload: loading the assignment; listen: the LISTEN "
         "connection could not be made or was lost).", ("what",)),
    Spec("kansas_postgres_reload_duration_seconds", "histogram",
         "Duration of assignment reloads from PostgreSQL.", buckets=STORE_BUCKETS),
    Spec("kansas_postgres_listening", "gauge",
         "1 while the LISTEN connection to PostgreSQL is up.", merge="min"),
    Spec("kansas_assignment_age_seconds", "gauge",
         "Seconds since the assignment was last loaded from PostgreSQL.", merge="max"),
    Spec("kansas_moves_in_progress", "gauge",
         "Realms being moved (kansas-ctl realm/user move, shard drain).", merge="max"),
    Spec("kansas_realm_moving", "gauge", "1 for each realm being moved.", ("realm",),
         merge="max"),
    Spec("kansas_invalidated_answers_total", "counter",
         "Requests on a queue a move invalidated, answered BAD_EVENT_QUEUE_ID, by the "
         "queue's old shard.", ("shard",)),
    Spec("kansas_tornado_redirects_total", "counter",
         "GETs a shard redirected (Zulip's X-Accel-Redirect: the user lives on another "
         "Tornado port), followed to the shard of that port.", ("shard", "to")),
    Spec("kansas_shard_unusable_answers_total", "counter",
         "Shard answers kansas could not pass on (the client got 502), by problem: "
         "not-json, or a redirect it cannot follow (redirect-loop, redirect-port, "
         "redirect-target).", ("shard", "problem")),
    Spec("kansas_uncached_routes_total", "counter",
         "Cached routes dropped when a realm's move ended."),
    Spec("kansas_notifications_held", "gauge",
         "Notifications held for a shard that is down.", ("shard",)),
    Spec("kansas_notifications_lost_total", "counter",
         "Held notifications dropped (too many, or too old)."),
    Spec("kansas_workers", "gauge", "kansas processes whose metrics are in this scrape."),
)  # fmt: skip
SPECS_BY_NAME = {spec.name: spec for spec in SPECS}

Samples = list[list[Any]]  # [[label values], value]
Snapshot = dict[str, Any]


def counter_samples(counts: dict[Any, int | float]) -> Samples:
    """A dict keyed by label tuples (or one label value) as snapshot samples."""
    return [
        [[str(v) for v in key] if isinstance(key, tuple) else [str(key)], value]
        for key, value in counts.items()
    ]


def histogram_samples(hists: dict[Any, Histogram]) -> Samples:
    return [
        [[str(v) for v in key] if isinstance(key, tuple) else [str(key)], hist.value()]
        for key, hist in hists.items()
    ]


def process_samples() -> list[list[Any]]:
    """This process's own ``process_*`` metrics (CPU, memory, descriptors), as
    prometheus_client measures them (Linux /proc), in snapshot form."""
    found: list[list[Any]] = []
    for family in ProcessCollector(registry=None).collect():
        for sample in family.samples:
            if not sample.labels:
                found.append([family.name, family.type, family.documentation, sample.value])
    return found


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """One snapshot for several processes: counters and histograms summed, gauges merged
    as their spec says, process metrics kept per worker."""
    merged: dict[str, dict[tuple[str, ...], Any]] = {}
    process: dict[str, Any] = {}
    for snap in snapshots:
        if snap.get("v") != SNAPSHOT_VERSION:
            continue  # another version of kansas during an upgrade: skip, do not guess
        process.update(snap.get("process", {}))
        for name, samples in snap.get("metrics", {}).items():
            spec = SPECS_BY_NAME.get(name)
            acc = merged.setdefault(name, {})
            for labels, value in samples:
                key = tuple(labels)
                old = acc.get(key)
                if old is None:
                    acc[key] = [list(value[0]), value[1]] if isinstance(value, list) else value
                elif isinstance(value, list):
                    if len(old[0]) == len(value[0]):  # same buckets
                        old[0] = [a + b for a, b in zip(old[0], value[0], strict=True)]
                        old[1] += value[1]
                else:
                    rule = spec.merge if spec is not None and spec.kind == "gauge" else "sum"
                    acc[key] = min(old, value) if rule == "min" else (
                        max(old, value) if rule == "max" else old + value)  # fmt: skip
    return {
        "v": SNAPSHOT_VERSION,
        "worker": "*",
        "metrics": {
            name: [[list(key), value] for key, value in sorted(acc.items())]
            for name, acc in merged.items()
        },
        "process": process,
    }


class SnapshotCollector:
    """A ``prometheus_client`` collector that renders one snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        metrics = self.snapshot.get("metrics", {})
        for spec in SPECS:
            samples = metrics.get(spec.name)
            if samples is None:
                continue
            family: Metric
            if spec.kind == "counter":
                family = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
                for labels, value in samples:
                    family.add_metric(labels, value)
            elif spec.kind == "gauge":
                family = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
                for labels, value in samples:
                    family.add_metric(labels, value)
            else:
                family = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
                for labels, (counts, total) in samples:
                    family.add_metric(labels, _cumulative(spec.buckets, counts), total)
            yield family
        yield from _process_families(self.snapshot.get("process", {}))


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    running = 0
    buckets = []
    for bound, count in zip((*bounds, float("inf")), counts, strict=False):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
    return buckets


def _process_families(process: dict[str, list[list[Any]]]) -> Iterator[Metric]:
    """``process_*`` per worker, with a ``worker`` label: a process's CPU or memory
    summed over workers would hide the one that misbehaves."""
    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for worker, samples in sorted(process.items()):
        for name, kind, doc, value in samples:
            family = families.get(name)
            if family is None:
                if kind == "counter":
                    family = CounterMetricFamily(name, doc, labels=["worker"])
                else:
                    family = GaugeMetricFamily(name, doc, labels=["worker"])
                families[name] = family
            family.add_metric([worker], value)
    yield from families.values()


def render(snapshots: list[Snapshot]) -> bytes:
    """The Prometheus text exposition of these snapshots (merged if several)."""
    registry = CollectorRegistry(auto_describe=False)
    snapshot = snapshots[0] if len(snapshots) == 1 else merge(snapshots)
    registry.register(SnapshotCollector(snapshot))  # type: ignore[arg-type]
    return generate_latest(registry)
