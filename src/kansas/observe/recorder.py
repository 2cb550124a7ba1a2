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
from kansas.observe.trace import RecentRequests, timings

#: Methods counted by name; anything else is "other" (labels must stay few).
_METHODS = frozenset({b"GET", b"DELETE", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"PATCH"})
NO_SHARD = "none"
#: The "rule" of a request on a queue a move invalidated: kansas answered it
#: BAD_EVENT_QUEUE_ID itself (``shard`` is the queue's old one).
INVALIDATED = "invalidated"


class RequestRecorder:
    __slots__ = ("access_log", "ids", "invalidated", "kinds", "recent", "redirects", "unusable")

    def __init__(
        self,
        access_log: AccessLog | None = None,
        recent: RecentRequests | None = None,
        ids: RequestIds | None = None,
    ) -> None:
        self.access_log = access_log
        self.recent = recent
        self.ids = ids or RequestIds()
        #: One latency histogram per kind of request, (listener, shard, method, path
        #: kind, status, rule, long-poll?): one dict lookup per request gives both the
        #: count (the histogram's) and the latency. ``counters`` sums them up per metric.
        self.kinds: dict[tuple[str, str, bytes, str, int, str, bool], Histogram] = {}
        #: old shard -> requests answered BAD_EVENT_QUEUE_ID because a move invalidated
        #: their queue
        self.invalidated: dict[str, int] = {}
        #: (shard, shard redirected to) -> GETs a shard redirected with Zulip's
        #: X-Accel-Redirect that kansas followed
        self.redirects: dict[tuple[str, str], int] = {}
        #: (shard, problem) -> shard answers kansas could not use (the client got 502)
        self.unusable: dict[tuple[str, str], int] = {}

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
        sent: float | None,
        now: float,
        size: int,
        longpoll: bool,
    ) -> None:
        """One request answered. ``shard``/``rule`` are empty if kansas answered it
        itself before choosing a shard; ``sent`` is when it went to the shard (None: never)."""
        if method not in _METHODS:
            method = b"other"
        key = (listener, shard, method, kind, status, rule, longpoll)
        hist = self.kinds.get(key)
        if hist is None:
            hist = self.kinds[key] = Histogram(LONGPOLL_BUCKETS if longpoll else SHORT_BUCKETS)
        total = now - arrived
        hist.counts[bisect_left(hist.bounds, total)] += 1  # Histogram.observe, inlined
        hist.sum += total
        if self.recent is not None and queue_id:
            # Raw values: turned into milliseconds and text only when asked for.
            self.recent.add(queue_id, (request_id, listener, method, status, shard, rule, realm,
                                       arrived, sent, now))  # fmt: skip
        if self.access_log is not None:
            self.access_log.emit(
                {
                    "ts": now,
                    "id": request_id.decode("ascii", "replace"),
                    "listener": listener,
                    "method": method.decode(),
                    "kind": kind,
                    "longpoll": longpoll,
                    "queue": queue_id or None,
                    "realm": realm or None,
                    "shard": shard or None,
                    "rule": str(rule) or None,
                    "status": status,
                    **timings(arrived, sent, now),
                    "bytes": size,
                }
            )

    def public(self, conn: Any, now: float) -> None:
        """``finished`` for a request of the public listener, read from its connection
        (a ``FrontProtocol``): the hot path. The same as ``finished``, inlined while no
        access log is written, since a call with fourteen arguments and the trace's own
        call are a good part of what recording costs."""
        pending = conn.pending
        if pending is None:  # kansas answered before choosing a shard
            queue_id = realm = shard = rule = ""
            if conn.note is not None:  # an invalidated queue
                (queue_id, realm, shard, rule), conn.note = conn.note, None
            self.finished("public", conn.method, conn.kind, conn.status, shard, rule, queue_id,
                          realm, conn.rid, conn.arrived, None, now, conn.sent, False)  # fmt: skip
            return
        target = pending.target
        if self.access_log is not None:
            self.finished("public", pending.method, conn.kind, conn.status, target.shard.name,
                          target.reason, pending.queue_id, pending.realm, conn.rid,
                          conn.arrived, conn.sent_at, now, conn.sent, conn.longpoll)  # fmt: skip
            return
        shard, rule, method, arrived = (
            target.shard.name,
            target.reason,
            pending.method,
            conn.arrived,
        )
        key = ("public", shard, method, conn.kind, conn.status, rule, conn.longpoll)
        hist = self.kinds.get(key)
        if hist is None:
            bounds = LONGPOLL_BUCKETS if conn.longpoll else SHORT_BUCKETS
            hist = self.kinds[key] = Histogram(bounds)
        total = now - arrived
        hist.counts[bisect_left(hist.bounds, total)] += 1
        hist.sum += total
        recent = self.recent
        if recent is not None:
            record = (conn.rid, "public", method, conn.status, shard, rule, pending.realm, arrived,
                      conn.sent_at, now)  # fmt: skip
            records = recent.queues.get(pending.queue_id)
            if records is None:
                recent.add(pending.queue_id, record)
            else:  # RecentRequests.add, inlined for a queue it knows
                records.append(record)
                if len(records) > recent.depth:
                    del records[0]

    def invalidated_answer(self, old_shard: str) -> None:
        self.invalidated[old_shard] = self.invalidated.get(old_shard, 0) + 1

    def redirect_followed(self, shard: str, to: str) -> None:
        key = (shard, to)
        self.redirects[key] = self.redirects.get(key, 0) + 1

    def unusable_answer(self, shard: str, problem: str) -> None:
        key = (shard, problem)
        self.unusable[key] = self.unusable.get(key, 0) + 1

    def counters(self) -> dict[str, Any]:
        """The request metrics in snapshot form (see ``kansas.observe.metrics``)."""
        requests: dict[tuple[str, ...], int] = {}
        routed: dict[tuple[str, ...], int] = {}
        short: dict[tuple[str, ...], Histogram] = {}
        longpolls: dict[tuple[str, ...], Histogram] = {}
        for (listener, shard, method, kind, status, rule, longpoll), hist in self.kinds.items():
            n = sum(hist.counts)
            shard = shard or NO_SHARD
            key = (listener, shard, method.decode("ascii", "replace"), kind, str(status))
            requests[key] = requests.get(key, 0) + n
            if rule and rule != INVALIDATED:  # answered by kansas, not sent
                rkey = (listener, str(rule))
                routed[rkey] = routed.get(rkey, 0) + n
            into, hkey = (longpolls, (shard,)) if longpoll else (short, (listener, shard))
            found = into.get(hkey)
            if found is None:
                found = into[hkey] = Histogram(hist.bounds)
            found.counts = [a + b for a, b in zip(found.counts, hist.counts, strict=True)]
            found.sum += hist.sum
        return {
            "kansas_requests_total": [[list(k), n] for k, n in requests.items()],
            "kansas_routed_total": [[list(k), n] for k, n in routed.items()],
            "kansas_request_duration_seconds": [[list(k), h.value()] for k, h in short.items()],
            "kansas_longpoll_duration_seconds": [
                [list(k), h.value()] for k, h in longpolls.items()
            ],
            "kansas_invalidated_answers_total": [
                [[shard], n] for shard, n in self.invalidated.items()
            ],
            "kansas_tornado_redirects_total": [[list(k), n] for k, n in self.redirects.items()],
            "kansas_shard_unusable_answers_total": [[list(k), n] for k, n in self.unusable.items()],
        }
