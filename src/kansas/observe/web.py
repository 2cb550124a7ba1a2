"""The internal listener's windows into kansas: ``GET /metrics`` and ``GET /debug/trace``.

``/metrics`` asks a *snapshot source* for the snapshots to expose: by default this
process's own (``LiveMetrics.snapshot``); a master/worker set-up passes a source that
asks every worker (it may return a Deferred), and the snapshots are merged
(``kansas.observe.metrics.merge``) before rendering.

``/debug/trace?queue=ID``: what this process knows of a queue: its cached route and its
last requests (``RecentRequests``), as JSON, for ``kansas-ctl trace``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from kansas.observe.metrics import Snapshot, render
from kansas.observe.trace import RecentRequests

log = Logger()

SnapshotSource = Callable[[], "list[Snapshot] | Deferred[list[Snapshot]]"]
METRICS_PATH = b"/metrics"
TRACE_PATH = b"/debug/trace"


class ObservedRequest(Request):
    """A twisted.web request that carries what kansas records of it."""

    kansas_id = b""
    kansas_arrived = 0.0
    kansas_sent: float | None = None  # when it went to a shard
    kansas_shard = ""  # "" until chosen; "all" for a broadcast
    kansas_rule = ""
    kansas_queue = ""  # the queue asked for, or the new queue's id once created


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, source: SnapshotSource) -> None:
        Resource.__init__(self)  # type: ignore[no-untyped-call]
        self.source = source

    def render_GET(self, request: Any) -> int:  # twisted.web is only partly typed
        d: Deferred[list[Snapshot]]
        try:
            found = self.source()
            d = found if isinstance(found, Deferred) else succeed(found)
        except Exception:
            d = fail()

        def write(snapshots: list[Snapshot]) -> None:
            body = render(snapshots)
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            _finish(request, body)

        def failed(failure: Failure) -> None:
            log.failure("collecting metrics failed", failure)
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain")
            _finish(request, b"collecting metrics failed\n")

        d.addCallback(write).addErrback(failed)
        return NOT_DONE_YET


class TraceResource(Resource):
    isLeaf = True

    def __init__(self, recent: RecentRequests | None, cached: Callable[[str], Any]) -> None:
        Resource.__init__(self)  # type: ignore[no-untyped-call]
        self.recent = recent
        self.cached = cached

    def render_GET(self, request: Any) -> bytes:
        from kansas.proxy.forwarding import QUEUE_ID  # no cycle at import time

        request.setHeader(b"content-type", b"application/json")
        values = (request.args or {}).get(b"queue")
        queue_id = values[-1].decode("utf-8", "replace") if values else ""
        if QUEUE_ID.fullmatch(queue_id) is None:
            request.setResponseCode(400)
            return b'{"result":"error","msg":"a valid ?queue= is required","code":"BAD_REQUEST"}'
        route = self.cached(queue_id)
        found: dict[str, Any] = {
            "result": "success",
            "queue": queue_id,
            "cached_route": None if route is None else json.loads(route.to_json()),
            "tracing": self.recent is not None,
            "requests": [] if self.recent is None else self.recent.get(queue_id),
        }
        return json.dumps(found, separators=(",", ":")).encode()


def _finish(request: Any, body: bytes) -> None:
    if request.finished or request.channel is None:
        return
    request.write(body)
    request.finish()
