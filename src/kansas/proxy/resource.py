"""The internal listener: twisted.web resources for the calls Django makes.

These are rare (one queue creation per page load, one notification per event batch),
so they run on twisted.web, with ``ShardProxyResource`` — a ``ReverseProxyResource``
whose forwarding path is replaced: the shard is chosen per request, and requests go
over kansas's persistent HTTP/1.1 connections instead of the stock HTTP/1.0 client.

* ``POST /api/v1/events/internal``: without ``queue_id``, create a queue on the shard
  the router places it on and record the mapping (refused, 400, unless its ``Host`` is
  a realm's host: ``kansas.router.realm_host_problem``); with one, route by the queue.
* ``POST /api/internal/notify_tornado`` and ``…/web_reload_clients``: sent to every
  shard, replies combined.
* ``GET /metrics`` and ``GET /debug/trace?queue=ID``: see ``kansas.observe.web``.

Every call gets a request id (the caller's ``X-Request-Id`` if sane: internal callers
are trusted), sent to the shards and returned, and is counted like a public request.
"""

from __future__ import annotations

import json
from typing import Any, cast
from weakref import WeakSet

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from kansas.errors import bad_queue_body, zulip_error_body
from kansas.http.wire import Header
from kansas.model import QueueRoute, queue_timeout
from kansas.observe.recorder import RequestRecorder
from kansas.observe.request_id import LOWER as REQUEST_ID_LOWER
from kansas.observe.trace import RecentRequests
from kansas.observe.web import (
    METRICS_PATH,
    TRACE_PATH,
    MetricsResource,
    ObservedRequest,
    SnapshotSource,
    TraceResource,
)
from kansas.proxy.backend import BackendPool, CollectedResponse, Exchange
from kansas.proxy.forwarding import (
    QUEUE_ID,
    EventRouter,
    NoShard,
    Target,
    downstream_headers,
    upstream_head,
)
from kansas.proxy.front import RETIRE_IDLE_SECONDS
from kansas.proxy.notify import NotifyDispatcher
from kansas.proxy.sending import has_unread
from kansas.router import place_queue, realm_from_host, realm_host_problem
from kansas.transparent.protocol import NOTIFICATION_HEADER

_NOTIFICATION_LOWER = NOTIFICATION_HEADER.lower().encode()

log = Logger()

#: Internal callers are trusted, but a body this large is still not Zulip talking.
MAX_INTERNAL_BODY = 1024 * 1024
#: Django gives Tornado 0.5 s: do not hold its answer long for the Redis write.
RECORD_WAIT_SECONDS = 0.2


def _json_error(request: Request, status: int, msg: str, code: str = "BAD_REQUEST") -> bytes:
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    return zulip_error_body(msg, code)


def _headers(request: Request) -> list[Header]:
    return [
        (name.lower(), name, value)
        for name, values in request.requestHeaders.getAllRawHeaders()
        for value in values
    ]


def _body(request: Request) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    return cast(bytes, content.read())


def _arg(request: Request, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return None if not values else values[-1].decode("utf-8", "replace")


def _peer(request: Request) -> str:
    return getattr(request.getClientAddress(), "host", "") or "unknown"


def _observed(request: Request) -> ObservedRequest:
    return cast(ObservedRequest, request)


def send_to(
    pool: BackendPool, target: Target, request: Request, retry_safe: bool
) -> tuple[Exchange, CollectedResponse]:
    body = _body(request)
    seen = _observed(request)
    seen.kansas_shard, seen.kansas_rule = target.shard.name, str(target.reason)
    seen.kansas_sent = pool.reactor.seconds()
    head = upstream_head(request.method, request.uri, _headers(request), _peer(request), len(body),
                         request_id=seen.kansas_id)  # fmt: skip
    sink = CollectedResponse()
    exchange = pool.send(target.shard.address, head + body, sink, retry_safe)
    return exchange, sink


class ShardProxyResource(ReverseProxyResource):
    """A ``ReverseProxyResource`` that picks its shard per request (``choose``) and
    forwards over the persistent backend pool; subclasses decide the shard and may
    look at the reply (``replied``) before it is relayed."""

    isLeaf = True

    def __init__(self, pool: BackendPool, router: EventRouter) -> None:
        Resource.__init__(self)
        self.pool = pool
        self.router = router

    def choose(self, request: Request) -> Target | Deferred[Target] | bytes:
        """The target shard, or a complete error body (status already set)."""
        raise NotImplementedError

    def replied(self, request: Request, target: Target, reply: CollectedResponse) -> object:
        """Hook on the shard's reply; may return a Deferred to hold the answer."""
        return None

    def render(self, request: Request) -> bytes | int:
        try:
            chosen = self.choose(request)
        except NoShard as e:
            return _json_error(
                request, 503, f"No shard is available for realm {e}", "SHARD_UNAVAILABLE"
            )
        if isinstance(chosen, bytes):
            return chosen
        d = chosen if isinstance(chosen, Deferred) else succeed(chosen)
        d.addCallback(self._ready, request)
        d.addCallback(self._forward, request)
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    def ready(self, request: Request, target: Target) -> Deferred[None] | None:
        """Hook: a Deferred to wait for before forwarding to ``target`` (or None)."""
        return None

    def _ready(self, target: Target, request: Request) -> Target | Deferred[Target]:
        waiting = self.ready(request, target)
        return target if waiting is None else waiting.addCallback(lambda _: target)

    def _forward(self, target: Target, request: Request) -> Deferred[None]:
        exchange, reply = send_to(self.pool, target, request, retry_safe=False)
        request.notifyFinish().addErrback(lambda _: exchange.cancel())
        reply.done.addCallback(self._relay, request, target)
        return reply.done.addCallback(lambda _: None)

    def _relay(self, reply: CollectedResponse, request: Request, target: Target) -> Deferred[None]:
        if reply.json() is None:
            msg = f"Shard {target.shard.name} sent a reply that is not JSON (status {reply.status})"
            _finish(request, _json_error(request, 502, msg, "BAD_GATEWAY"))
            return succeed(None)
        held = maybeDeferred(self.replied, request, target, reply)
        held.addErrback(lambda f: log.failure("after a shard reply", f))

        def write(_: object) -> None:
            request.setResponseCode(reply.status)
            for _lname, name, value in downstream_headers(reply.headers):
                request.responseHeaders.addRawHeader(name, value)
            _finish(request, reply.body)

        return held.addCallback(write)

    def _failed(self, failure: Failure, request: Request) -> None:
        if isinstance(failure.value, NoShard):
            msg = f"No shard is available for realm {failure.value}"
            _finish(request, _json_error(request, 503, msg, "SHARD_UNAVAILABLE"))
        elif isinstance(failure.value, CatchingUp):
            msg = f"Shard {failure.value} is catching up after a restart"
            retry = [b"1"]
            request.responseHeaders.setRawHeaders(b"retry-after", retry)
            _finish(request, _json_error(request, 503, msg, "SHARD_UNAVAILABLE"))
        elif isinstance(failure.value, ConnectionError):
            log.warn("{e}", e=failure.getErrorMessage())
            _finish(request, _json_error(request, 502, "Shard is unavailable", "BAD_GATEWAY"))
        else:
            log.failure("internal request failed", failure)
            _finish(request, _json_error(request, 500, "Internal error", "INTERNAL"))


def _finish(request: Request, body: bytes) -> None:
    if request.finished or request.channel is None:
        return  # the caller went away
    request.write(body)
    request.finish()


class CatchingUp(Exception):
    """A shard still has held notifications to receive: no new queue on it yet."""


#: How long a queue creation waits for a shard to receive its held notifications (Django
#: gives Tornado 0.5 s, then tries again).
CATCH_UP_WAIT_SECONDS = 0.4


class QueueResource(ShardProxyResource):
    """``POST /api/v1/events/internal``: Django creates a queue, or fetches from one."""

    def __init__(self, pool: BackendPool, router: EventRouter, notify: NotifyDispatcher) -> None:
        super().__init__(pool, router)
        self.notify = notify

    def ready(self, request: Request, target: Target) -> Deferred[None] | None:
        if _arg(request, b"queue_id") is not None:
            return None
        # A new queue must not receive events from before it existed: a shard that is
        # back from a restart first gets the notifications held for it.
        name = target.shard.name
        waiting = self.notify.drained(name)
        if waiting.called:
            return None

        def late(failure: Failure) -> None:
            failure.trap(TimeoutError, defer.TimeoutError)
            raise CatchingUp(name)

        return waiting.addTimeout(CATCH_UP_WAIT_SECONDS, self.pool.reactor).addErrback(late)

    def choose(self, request: Request) -> Target | Deferred[Target] | bytes:
        realm = realm_from_host(request.getHeader(b"host"))
        queue_id = _arg(request, b"queue_id")
        if queue_id is not None:
            _observed(request).kansas_queue = queue_id
            if QUEUE_ID.fullmatch(queue_id) is None:
                request.setResponseCode(400)
                request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
                return bad_queue_body(queue_id)
            return self.router.route(queue_id, realm)
        host = request.getHeader(b"host")
        problem = realm_host_problem(host, getattr(request.getHost(), "port", None))
        if problem is not None:
            shown = "" if host is None else f" {host.decode('latin-1')[:100]!r}"
            msg = (f"Bad Host header{shown} ({problem}): a queue is created for the realm "
                   "named by Host, which must be the realm's host, as Django sends it "
                   "(realm.host)")  # fmt: skip
            return _json_error(request, 400, msg)
        user = _arg(request, b"user_profile_id")
        if user is None or not user.isdigit():
            return _json_error(request, 400, "Missing or bad 'user_profile_id' argument")
        assignment = self.router.directory.current
        decision = place_queue(assignment, realm, int(user))
        if decision is None:
            raise NoShard(realm)
        return Target(assignment.shards[decision.shard], decision.reason, None)

    def replied(self, request: Request, target: Target, reply: CollectedResponse) -> object:
        queue_id = _arg(request, b"queue_id")
        realm = realm_from_host(request.getHeader(b"host"))
        if queue_id is not None:
            self.router.answered(b"GET", queue_id, realm, target, reply.status)
            return None
        data = reply.json()
        new_id = data.get("queue_id") if reply.status == 200 and data else None
        if not isinstance(new_id, str):
            return None
        _observed(request).kansas_queue = new_id
        user = _arg(request, b"user_profile_id")
        timeout = queue_timeout(_arg(request, b"lifespan_secs"))
        route = QueueRoute(new_id, target.shard.name, realm, int(user or 0), timeout)
        d = self.router.table.record(route)
        # Wait briefly for the mapping to be durable, but answer Django in time anyway.
        clock = self.pool.reactor
        return d.addTimeout(RECORD_WAIT_SECONDS, clock).addErrback(lambda _: None)


class BroadcastResource(Resource):
    """``POST /api/internal/*``: the same call to every shard, replies combined.

    A shard that is down gets the call later, in order (``NotifyDispatcher``): Django
    is told it succeeded, as a message broker would have taken it.
    """

    isLeaf = True

    def __init__(self, router: EventRouter, notify: NotifyDispatcher) -> None:
        super().__init__()
        self.router = router
        self.notify = notify

    def render(self, request: Request) -> bytes | int:
        shards = sorted(self.router.directory.current.shards.values(), key=lambda s: s.name)
        if not shards:
            return _json_error(request, 503, "No shard is registered", "SHARD_UNAVAILABLE")
        body = _body(request)
        seen = _observed(request)
        seen.kansas_shard, seen.kansas_sent = "all", self.notify.pool.reactor.seconds()
        headers = [h for h in _headers(request) if h[0] != _NOTIFICATION_LOWER]
        if request.path == b"/api/internal/notify_tornado":
            # The same id to every shard: what transparent moves deduplicate and fence by.
            name = NOTIFICATION_HEADER.encode()
            headers.append((_NOTIFICATION_LOWER, name, self.notify.next_id()))
        head = upstream_head(request.method, request.uri, headers, _peer(request),
                             len(body), request_id=seen.kansas_id)  # fmt: skip
        calls = [self.notify.deliver(shard, head + body) for shard in shards]
        DeferredList(calls, consumeErrors=True).addCallback(
            self._combine, request, [s.name for s in shards]
        )
        return NOT_DONE_YET

    def _combine(self, results: list[tuple[bool, Any]], request: Request, names: list[str]) -> None:
        ok: list[dict[str, Any]] = []
        queued: list[str] = []
        failed: list[str] = []
        first_error: CollectedResponse | None = None
        for name, (_, outcome) in zip(names, results, strict=True):
            if outcome.state == "queued":
                queued.append(name)
                continue
            reply = outcome.reply
            data = reply.json() if reply is not None else None
            if data is not None and reply.status == 200 and data.get("result") == "success":
                ok.append(data)
                continue
            failed.append(name)
            if first_error is None and data is not None:
                first_error = reply
            reason = outcome.reason or f"status {reply.status}"
            log.warn("{path} on shard {s} failed: {r}", path=request.path, s=name, r=reason)
        if not ok and not queued:
            # Nobody took it: pass on what the shards said (e.g. a bad secret), or 502.
            if first_error is not None:
                request.setResponseCode(first_error.status)
                request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
                _finish(request, first_error.body)
            else:
                _finish(request, _json_error(request, 502, "No shard is reachable", "BAD_GATEWAY"))
            return
        combined: dict[str, Any] = {"result": "success", "msg": ""}
        if request.path.endswith(b"/web_reload_clients"):
            combined["sent_events"] = sum(int(d.get("sent_events", 0)) for d in ok)
            everyone = not (failed or queued)
            combined["complete"] = everyone and all(d.get("complete", True) for d in ok)
        if queued:
            combined["queued_shards"] = queued
        if failed:
            combined["failed_shards"] = failed
        request.setResponseCode(200)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        _finish(request, json.dumps(combined, separators=(",", ":")).encode())


class InternalRoot(Resource):
    """Dispatches the internal listener's few paths; JSON 404 for the rest."""

    isLeaf = True

    def __init__(
        self,
        pool: BackendPool,
        router: EventRouter,
        notify: NotifyDispatcher,
        recorder: RequestRecorder | None = None,
        metrics: SnapshotSource | None = None,
        recent: RecentRequests | None = None,
    ) -> None:
        super().__init__()
        self.clock = pool.reactor
        self.queues = QueueResource(pool, router, notify)
        self.broadcast = BroadcastResource(router, notify)
        self.recorder = recorder or RequestRecorder()
        self.metrics = None if metrics is None else MetricsResource(metrics)
        self.trace = TraceResource(recent, router.table.cached)

    def render(self, request: Request) -> bytes | int:
        path = request.path
        if path == METRICS_PATH and self.metrics is not None:
            return self.metrics.render(request)  # type: ignore[no-any-return]
        if path == TRACE_PATH:
            return self.trace.render(request)  # type: ignore[no-any-return]
        self._observe(request)
        if path == b"/api/v1/events/internal":
            handler: Resource = self.queues
        elif path in (b"/api/internal/notify_tornado", b"/api/internal/web_reload_clients"):
            handler = self.broadcast
        else:
            return _json_error(request, 404, "Not Found", "NOT_FOUND")
        if request.method != b"POST":
            request.responseHeaders.setRawHeaders(b"allow", [b"POST"])
            return _json_error(request, 405, "Method Not Allowed")
        if len(_body(request)) > MAX_INTERNAL_BODY:
            return _json_error(request, 413, "Request body too large")
        try:
            return handler.render(request)  # type: ignore[no-any-return]
        except Exception:
            log.failure("internal request failed")
            return _json_error(request, 500, "Internal error", "INTERNAL")

    def _observe(self, request: Request) -> None:
        """Give the call its id (sent back at once) and record it when it is answered."""
        seen = _observed(request)
        incoming = request.requestHeaders.getRawHeaders(REQUEST_ID_LOWER)
        seen.kansas_id = self.recorder.ids.choose(incoming[-1] if incoming else None, True)
        seen.kansas_arrived = self.clock.seconds()
        request.setHeader(b"X-Request-Id", seen.kansas_id)
        request.notifyFinish().addBoth(self._finished, seen)

    def _finished(self, result: object, seen: ObservedRequest) -> None:
        status = 499 if isinstance(result, Failure) else seen.code  # 499: the caller left
        internal = seen.path.startswith((b"/api/internal/", b"/api/v1/events/internal"))
        kind = "internal" if internal else "other"
        self.recorder.finished("internal", seen.method, kind, status, seen.kansas_shard,
                               seen.kansas_rule, seen.kansas_queue,
                               realm_from_host(seen.getHeader(b"host")), seen.kansas_id,
                               seen.kansas_arrived, seen.kansas_sent, self.clock.seconds(),
                               seen.sentLength, False)  # fmt: skip


class _InternalChannel(HTTPChannel):
    """An HTTP connection from Django that stops being kept alive once kansas retires."""

    site: InternalSite
    idle_since = 0.0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.idle_since = self.site.reactor.seconds()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if self.site.retiring:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def requestDone(self, request: Any) -> None:
        self.idle_since = self.site.reactor.seconds()
        super().requestDone(request)


class InternalSite(Site):
    """The internal listener's Site, which knows its connections so it can retire."""

    protocol = _InternalChannel  # type: ignore[assignment]  # a plain HTTP/1.1 channel

    def __init__(self, resource: Resource, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.retiring = False
        self.channels: WeakSet[_InternalChannel] = WeakSet()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.channels.add(channel)
        return channel

    def open_connections(self) -> int:
        """Connections still open (closed ones leave the weak set)."""
        return sum(1 for c in self.channels if c.connected)

    def retire(self) -> None:
        """Answer every request from now on with ``Connection: close``, and close the
        connections idle long enough (``close_idle``, called again while draining)."""
        self.retiring = True
        for channel in list(self.channels):
            for request in channel.requests:
                channel.persistent = False
                if not request.startedWriting:
                    # Said in the answer, so the client sends nothing more on it.
                    request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        self.close_idle()

    def close_idle(self) -> None:
        """Close the connections idle for ``RETIRE_IDLE_SECONDS``, as the public
        listener does (``FrontFactory.close_idle``). Django reuses a connection
        within milliseconds, and although its client sends a POST to Tornado again when
        a connection closes under it, closing only those idle for a while mostly keeps
        clear of that race; the others close after their next answer.
        """
        idle = self.reactor.seconds() - RETIRE_IDLE_SECONDS
        for channel in list(self.channels):
            if (
                channel.connected
                and not channel.requests
                and channel.idle_since <= idle
                and not has_unread(channel.transport)
            ):
                channel.loseConnection()


def internal_site(
    pool: BackendPool,
    router: EventRouter,
    notify: NotifyDispatcher,
    recorder: RequestRecorder | None = None,
    metrics: SnapshotSource | None = None,
    recent: RecentRequests | None = None,
) -> InternalSite:
    root = InternalRoot(pool, router, notify, recorder, metrics, recent)
    site = InternalSite(root, requestFactory=ObservedRequest, reactor=pool.reactor)
    site.displayTracebacks = False
    site.noisy = False
    # No access log line per internal call: at Zulip's rate of queue creation it is noise.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
