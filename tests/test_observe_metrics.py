"""Metric snapshots: plain numbers in, merged across workers, Prometheus text out."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kansas.observe.metrics import (
    LONGPOLL_BUCKETS,
    SHORT_BUCKETS,
    SNAPSHOT_VERSION,
    STORE_BUCKETS,
    CallStats,
    Histogram,
    merge,
    render,
)
from kansas.observe.recorder import RequestRecorder
from kansas.observe.trace import RecentRequests


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            found[s.name, tuple(sorted(s.labels.items()))] = s.value
    return found


def snap(metrics: dict[str, Any], worker: str = "w1", process: Any = None) -> dict[str, Any]:
    return {
        "v": SNAPSHOT_VERSION,
        "worker": worker,
        "metrics": metrics,
        "process": {worker: process or [["process_open_fds", "gauge", "fds", 7.0]]},
    }


def test_histogram_buckets_are_le_and_the_last_is_inf() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(value)
    assert h.counts == [2, 2, 1]  # <= 0.1, <= 1.0, +Inf
    assert h.sum == 4.65


def test_recorder_counts_render_exactly() -> None:
    rec = RequestRecorder()
    for _ in range(3):
        rec.finished("public", b"GET", "events", 200, "a", "queue-mapping", "q1", "r", b"i",
                     10.0, 10.001, 10.002, 100, False)  # fmt: skip
    rec.finished("public", b"GET", "events", 200, "b", "fallback", "q2", "r", b"i", 10.0, 10.1,
                 30.0, 100, True)  # fmt: skip
    rec.finished("public", b"BREW", "other", 404, "", "", "", "", b"i", 10.0, None, 10.0, 50,
                 False)  # fmt: skip
    rec.invalidated_answer("a")
    got = samples(render([snap(rec.counters())]))
    req = "kansas_requests_total"
    assert got[req, (("kind", "events"), ("listener", "public"), ("method", "GET"),
                     ("shard", "a"), ("status", "200"))] == 3  # fmt: skip
    assert got[req, (("kind", "events"), ("listener", "public"), ("method", "GET"),
                     ("shard", "b"), ("status", "200"))] == 1  # fmt: skip
    # An unknown method is "other", a request kansas answered itself has shard "none".
    assert got[req, (("kind", "other"), ("listener", "public"), ("method", "other"),
                     ("shard", "none"), ("status", "404"))] == 1  # fmt: skip
    assert got["kansas_routed_total", (("listener", "public"), ("rule", "queue-mapping"))] == 3
    assert got["kansas_routed_total", (("listener", "public"), ("rule", "fallback"))] == 1
    # The long-poll went into its own histogram, with buckets up to 60 s.
    lp = "kansas_longpoll_duration_seconds_bucket"
    assert got[lp, (("le", "10.0"), ("shard", "b"))] == 0
    assert got[lp, (("le", "20.0"), ("shard", "b"))] == 1
    assert got[lp, (("le", "60.0"), ("shard", "b"))] == 1
    assert got["kansas_longpoll_duration_seconds_count", (("shard", "b"),)] == 1
    short = "kansas_request_duration_seconds"
    assert got[short + "_count", (("listener", "public"), ("shard", "a"))] == 3
    assert got[short + "_bucket", (("le", "0.0025"), ("listener", "public"), ("shard", "a"))] == 3
    assert got[short + "_bucket", (("le", "0.001"), ("listener", "public"), ("shard", "a"))] == 0
    assert got["kansas_invalidated_answers_total", (("shard", "a"),)] == 1
    assert got["process_open_fds", (("worker", "w1"),)] == 7


def test_snapshots_are_json_and_merge_sensibly() -> None:
    one = RequestRecorder()
    two = RequestRecorder()
    one.finished("public", b"GET", "events", 200, "a", "queue-mapping", "", "", b"", 0.0, 0.0,
                 0.002, 0, False)  # fmt: skip
    for _ in range(2):
        two.finished("public", b"GET", "events", 200, "a", "queue-mapping", "", "", b"", 0.0,
                     0.0, 0.2, 0, False)  # fmt: skip

    def gauges(up: int, parked: int, age: float) -> dict[str, Any]:
        return {
            "kansas_shard_up": [[["a"], up]],
            "kansas_parked_requests": [[["a"], parked]],
            "kansas_assignment_age_seconds": [[[], age]],
            "kansas_workers": [[[], 1]],
        }

    a = snap({**one.counters(), **gauges(1, 3, 5.0)}, "w1")
    b = snap({**two.counters(), **gauges(0, 4, 9.0)}, "w2", [["process_open_fds", "gauge", "", 9]])
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))  # as over a pipe
    merged = merge([a, b])
    got = samples(render([a, b]))
    assert samples(render([merged])) == got
    key = (("kind", "events"), ("listener", "public"), ("method", "GET"), ("shard", "a"),
           ("status", "200"))  # fmt: skip
    assert got["kansas_requests_total", key] == 3  # counters: summed
    assert (
        got["kansas_request_duration_seconds_count", (("listener", "public"), ("shard", "a"))] == 3
    )
    bucket = (("le", "0.0025"), ("listener", "public"), ("shard", "a"))
    assert got["kansas_request_duration_seconds_bucket", bucket] == 1  # buckets: summed
    assert got["kansas_shard_up", (("shard", "a"),)] == 0  # down if any worker sees it down
    assert got["kansas_parked_requests", (("shard", "a"),)] == 7  # per-worker gauges: summed
    assert got["kansas_assignment_age_seconds", ()] == 9  # the stalest worker
    assert got["kansas_workers", ()] == 2
    # process_* stay per worker.
    assert got["process_open_fds", (("worker", "w1"),)] == 7
    assert got["process_open_fds", (("worker", "w2"),)] == 9


def test_a_snapshot_of_another_version_is_left_out() -> None:
    good = snap({"kansas_workers": [[[], 1]]})
    odd = {**snap({"kansas_workers": [[[], 1]]}, "w2"), "v": SNAPSHOT_VERSION + 1}
    assert samples(render([good, odd]))["kansas_workers", ()] == 1


def test_bucket_layouts_are_the_documented_ones() -> None:
    assert LONGPOLL_BUCKETS[-1] == 60.0 and SHORT_BUCKETS[0] < 0.001


def test_call_stats_time_and_count_failures() -> None:
    stats = CallStats()
    stats.timer("get")(True)
    stats.timer("get")(False)
    stats.observe("put", 0.3, False)
    assert stats.errors == {"get": 1, "put": 1}
    assert sum(stats.latency["get"].counts) == 2
    assert stats.latency["put"].counts[STORE_BUCKETS.index(0.5)] == 1  # (0.25, 0.5]


def test_recent_requests_are_bounded() -> None:
    recent = RecentRequests(max_queues=3, depth=2)
    for i in range(5):
        for n in range(4):
            recent.add(f"q{i}", (b"id-%d" % n, "public", b"GET", 200, "a", "hash", "r", 1.0,
                                 1.5, 2.0))  # fmt: skip
    assert len(recent) == 3
    assert recent.get("q0") == [] and recent.get("q1") == []
    got = recent.get("q4")
    assert [r["id"] for r in got] == ["id-2", "id-3"]  # the newest two
    assert got[0] == {"ts": 2.0, "id": "id-2", "listener": "public", "method": "GET",
                      "status": 200, "shard": "a", "rule": "hash", "realm": "r",
                      "route_ms": 500.0, "backend_ms": 500.0, "total_ms": 1000.0}  # fmt: skip
    assert RecentRequests(max_queues=0).get("q") == []
