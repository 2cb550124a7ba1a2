"""What each answered request leaves behind: counts, latencies, a trace record, a log line.

``RequestRecorder.finished`` is called once per request by both listeners; on the
public listener that is the hot path, so it only updates plain dicts and bucket lists
(about a microsecond); the access log line and the trace record are extra work only
when they are turned on. ``kansas.observe.live`` turns these numbers into a metrics
snapshot when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from kansas.observe.access_log import AccessLog
from kansas.observe.metrics import LONGPOLL_BUCKETS, SHORT_BUCKETS, Histogram
from kansas.observe.request_id import RequestIds
from kansas.observe.trace import RecentRequests

#: Methods counted by name; anything else is "other" (labels must stay few).
_METHODS = frozenset({b"GET", b"DELETE", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"PATCH"})
NO_SHARD = "none"


class RequestRecorder:
    __slots__ = (
        "access_log",
        "ids",
        "invalidated",
        "longpoll",
        "recent",
        "requests",
        "routed",
        "short",
    )

    def __init__(
        self,
        access_log: AccessLog | None = None,
        recent: RecentRequests | None = None,
        ids: RequestIds | None = None,
    ) -> None:
        self.access_log = access_log
        self.recent = recent
        self.ids = ids or RequestIds()
        #: (listener, shard, method, kind, status) -> count
        self.requests: dict[tuple[str, str, bytes, str, int], int] = {}
        #: (listener, rule) -> count
        self.routed: dict[tuple[str, str], int] = {}
        self.short: dict[tuple[str, str], Histogram] = {}
        self.longpoll: dict[str, Histogram] = {}
        #: old shard -> requests answered BAD_EVENT_QUEUE_ID because a move invalidated
        #: their queue
        self.invalidated: dict[str, int] = {}

    def finished(
        self,
        listener: str,
        method: bytes,
        kind: str,
        status: int,
        shard: str,
        rule: str,
        queue_id: str,
        realm: str,
        request_id: bytes,
        arrived: float,
        sent: float,
        now: float,
        size: int,
        longpoll: bool,
    ) -> None:
        """One request answered. ``shard``/``rule`` are empty if kansas answered it
        itself before choosing a shard; ``sent`` is when it went to the shard (0: never)."""
        if method not in _METHODS:
            method = b"other"
        key = (listener, shard or NO_SHARD, method, kind, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        total = now - arrived
        if longpoll:
            hist = self.longpoll.get(shard)
            if hist is None:
                hist = self.longpoll[shard] = Histogram(LONGPOLL_BUCKETS)
        else:
            hkey = (listener, shard or NO_SHARD)
            hist = self.short.get(hkey)
            if hist is None:
                hist = self.short[hkey] = Histogram(SHORT_BUCKETS)
        hist.counts[bisect_left(hist.bounds, total)] += 1  # Histogram.observe, inlined
        hist.sum += total
        if rule:
            rkey = (listener, rule)
            self.routed[rkey] = self.routed.get(rkey, 0) + 1
        if self.recent is None and self.access_log is None:
            return
        route_ms = round((sent - arrived) * 1000, 3) if sent else None
        backend_ms = round((now - sent) * 1000, 3) if sent else None
        total_ms = round(total * 1000, 3)
        rid = request_id.decode("ascii", "replace")
        if self.recent is not None and queue_id:
            self.recent.add(queue_id, (now, rid, listener, method.decode(), status, shard, rule,
                                       realm, route_ms, backend_ms, total_ms))  # fmt: skip
        if self.access_log is not None:
            self.access_log.emit(
                {
                    "ts": now,
                    "id": rid,
                    "listener": listener,
                    "method": method.decode(),
                    "kind": kind,
                    "longpoll": longpoll,
                    "queue": queue_id or None,
                    "realm": realm or None,
                    "shard": shard or None,
                    "rule": rule or None,
                    "status": status,
                    "route_ms": route_ms,
                    "backend_ms": backend_ms,
                    "total_ms": total_ms,
                    "bytes": size,
                }
            )

    def invalidated_answer(self, old_shard: str) -> None:
        self.invalidated[old_shard] = self.invalidated.get(old_shard, 0) + 1

    def counters(self) -> dict[str, Any]:
        """The request metrics in snapshot form (see ``kansas.observe.metrics``)."""
        return {
            "kansas_requests_total": [
                [[listener, shard, method.decode("ascii", "replace"), kind, str(status)], n]
                for (listener, shard, method, kind, status), n in self.requests.items()
            ],
            "kansas_routed_total": [[list(key), n] for key, n in self.routed.items()],
            "kansas_request_duration_seconds": [
                [list(key), hist.value()] for key, hist in self.short.items()
            ],
            "kansas_longpoll_duration_seconds": [
                [[shard], hist.value()] for shard, hist in self.longpoll.items()
            ],
            "kansas_invalidated_answers_total": [
                [[shard], n] for shard, n in self.invalidated.items()
            ],
        }
