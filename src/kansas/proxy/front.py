"""The public listener: a lean raw-socket HTTP/1.1 front for the event-queue paths.

Every long-poll of every Zulip client comes through here, so this path avoids
twisted.web's generic machinery: one small ``Protocol`` per client connection parses
heads (``kansas.http.wire``), routes by queue (``EventRouter``) and relays the shard's
response as it arrives. Only GET and DELETE on ``/json/events`` and ``/api/v1/events``
are forwarded; the internal paths are refused (403) and everything else is 404/405.
"""

from __future__ import annotations

import json
import resource
from typing import Any, NamedTuple
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kansas.health import HealthMonitor
from kansas.http.responses import bad_queue_response, error_response, json_response, status_line
from kansas.http.wire import (
    MAX_HEAD_BYTES,
    Header,
    HttpError,
    Request,
    RequestParser,
    is_json,
)
from kansas.model import QueueRoute, Shard
from kansas.observe.recorder import INVALIDATED, RequestRecorder
from kansas.observe.request_id import HEADER as REQUEST_ID_HEADER
from kansas.observe.request_id import LOWER as REQUEST_ID_LOWER
from kansas.observe.throttled import ThrottledWarnings
from kansas.proxy.backend import BackendPool, Exchange, Failed
from kansas.proxy.forwarding import (
    EVENT_PATHS,
    INTERNAL_PREFIX,
    INTERNAL_QUEUE_PATH,
    QUEUE_ID,
    EventRouter,
    NoShard,
    QueueInvalidated,
    QueueMoving,
    Target,
    downstream_headers,
    tornado_redirect,
    upstream_head,
)
from kansas.proxy.invalidation import InvalidationWatch
from kansas.proxy.parking import Parked, Parking
from kansas.proxy.quick import QuickResponse, quick_arguments, quick_request, quick_upstream_head
from kansas.proxy.sending import has_unread, send_now
from kansas.router import realm_from_host, valid_realm
from kansas.transparent.holding import Held, MoveHolding

log = Logger()

#: A DELETE's form body is tiny; anything near this size is not Zulip talking.
MAX_BODY_BYTES = 64 * 1024
#: Bytes a client may send ahead (pipelining) while its request is in flight.
MAX_AHEAD_BYTES = 64 * 1024
#: After a final answer, how long (and how much) the client may go on sending before
#: the socket is closed. Closing with unread input makes the kernel send a reset that
#: can destroy the answer before the client reads it (say, a 413 for a large body).
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024
#: A retiring worker closes a keep-alive connection once it has been idle this long
#: (a client sends its next request on a kept-alive connection within milliseconds).
RETIRE_IDLE_SECONDS = 1.0
#: However long a GET has been parked, it is answered this long after it arrived:
#: Zulip's clients give up on a request after 90 s.
CLIENT_PATIENCE_SECONDS = 85.0

_LENGTH, _CHUNKED, _UNTIL_CLOSE, _DISCARD = range(4)
#: Host headers whose realm is remembered (beyond it, the memory starts over).
MAX_REALMS_REMEMBERED = 10_000
#: Descriptors kept for what is not a client connection (Redis, PostgreSQL, Django's
#: connections, the reactor, logs) when ``max_connections`` comes from the limit.
FD_RESERVE = 100


def connections_allowed() -> int:
    """Client connections the open-file limit can hold: each costs two descriptors
    (itself and its shard connection)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft - FD_RESERVE) // 2)


def _params(data: bytes) -> dict[bytes, bytes]:
    """A query string or form body as a dict; later values win, as Django's QueryDict
    does for a single-valued argument. Decodes only what is encoded (the hot path)."""
    params = {}
    for part in data.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        if b"%" in value or b"+" in value:
            value = unquote_to_bytes(value.replace(b"+", b" "))
        if b"%" in name or b"+" in name:
            name = unquote_to_bytes(name.replace(b"+", b" "))
        params[name] = value
    return params


class InFlight(NamedTuple):
    """The request being served: what the answer and a replay need."""

    method: bytes
    http11: bool
    payload: bytes  # the request exactly as sent to the shard
    queue_id: str
    realm: str
    target: Target


class FrontProtocol(Protocol):
    """One client connection: requests one at a time, each relayed to its shard."""

    __slots__ = (
        "arrived",
        "busy",
        "detour",
        "exchange",
        "framing",
        "gone",
        "head_out",
        "head_since",
        "held",
        "idle_since",
        "in_loop",
        "keep_alive",
        "kind",
        "linger",
        "longpoll",
        "method",
        "note",
        "parked",
        "parser",
        "patience",
        "peer",
        "pending",
        "proxy",
        "rid",
        "sent",
        "sent_at",
        "status",
        "trusted",
    )

    def __init__(self, proxy: FrontFactory) -> None:
        self.proxy = proxy
        self.parser = RequestParser(proxy.max_body, proxy.max_head)
        self.busy = False
        self.gone = False
        self.in_loop = False
        self.exchange: Exchange | None = None
        self.pending: InFlight | None = None
        self.keep_alive = True
        self.framing = _LENGTH
        self.head_out = b""
        self.peer = ""
        self.trusted = False  # the peer is a trusted front: its X-Real-Ip is kept
        self.idle_since = 0.0
        self.head_since = 0.0
        self.linger: Any = None  # (timer, bytes still allowed) while closing gracefully
        self.parked: Parked | None = None  # waiting for a shard to come back
        #: (queue, realm, shard, rule) of an answer kansas made itself about a queue
        #: (rare: set there, used and cleared when the request is recorded)
        self.note: tuple[str, str, str, str] | None = None
        self.held: Held | None = None  # waiting for a transparent move's switch
        #: The shard to ask next once this answer is read (and discarded): the realm's
        #: next candidate, or where the shard's X-Accel-Redirect points.
        self.detour: Target | None = None
        self.arrived = 0.0
        #: when a GET replayed after parking must be answered (0: not replayed)
        self.patience = 0.0
        # -- what the access log and the metrics need (kansas.observe) --
        self.method = b""
        self.kind = "other"  # "events", "internal" or "other"
        self.longpoll = False  # a blocking GET
        self.rid = b""  # the request id; b"": no request, or it is recorded already
        self.status = 0
        self.sent = 0  # bytes to the client
        self.sent_at: float | None = None  # when the request went to its shard

    # -- connection ----------------------------------------------------------------------
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = getattr(self.transport.getPeer(), "host", "") or "unknown"
        self.trusted = self.peer in self.proxy.trusted_fronts
        self.idle_since = self.proxy.clock.seconds()
        proxy = self.proxy
        proxy.connections.add(self)
        if len(proxy.connections) >= proxy.max_connections:
            proxy.pause_accepting(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        if self.busy and self.rid:
            self.status = 499  # the client left before its answer was complete (as nginx logs)
            self._record(self.proxy.clock.seconds())
        if self.linger is not None and self.linger[0].active():
            self.linger[0].cancel()
        proxy = self.proxy
        proxy.connections.discard(self)
        if proxy.accept_paused is not None and len(proxy.connections) < proxy.resume_at:
            proxy.resume_accepting()
        if self.parked is not None:
            self.proxy.parking.unpark(self.parked)  # at once: a parked client costs memory
            self.parked = None
        if self.held is not None:
            self.proxy.holding.release(self.held)
            self.held = None
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.cancel()  # the shard drops the parked request with the connection

    def dataReceived(self, data: bytes) -> None:
        if self.linger is not None:
            self.linger[1] -= len(data)  # read and dropped, so the close stays orderly
            if self.linger[1] < 0:
                self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if not self.parser.buffered and not self.busy:
            if (
                data[-4:] == b"\r\n\r\n"
                and len(data) <= self.proxy.max_head + 4
                and self.proxy.quick
                and self._quick(data)
            ):
                return
            self.head_since = self.proxy.clock.seconds()  # a new request head starts
        self.parser.feed(data)
        if self.busy:
            if self.parser.buffered > MAX_AHEAD_BYTES:
                self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._serve()

    def _serve(self) -> None:
        """Handle every complete request buffered, one at a time."""
        if self.in_loop:
            return
        self.in_loop = True
        try:
            while not self.busy and not self.gone:
                try:
                    request = self.parser.next_request()
                except HttpError as e:
                    self._start(b"")
                    self.kind = "other"
                    self._reply(error_response(e.status, e.message, keep_alive=False), False)
                    return
                if request is None:
                    if self.parser.wants_continue():
                        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
                    return
                self.busy = True
                self.keep_alive = request.keep_alive and not self.proxy.retiring
                self._dispatch(request)
        finally:
            self.in_loop = False

    def _quick(self, data: bytes) -> bool:
        """The common request, an ordinary poll on a queue whose route is cached, in one
        go (``kansas.proxy.quick``). False: nothing was done, and the general path takes
        the bytes (every error, and every rarer case, is answered there)."""
        request = quick_request(data)
        if request is None:
            return False
        args = quick_arguments(request.query)
        if args is None:
            return False
        raw_queue_id = args.get(b"queue_id")
        if raw_queue_id is None:
            return False
        queue_id = raw_queue_id.decode("ascii")  # visible ASCII (quick_request)
        if QUEUE_ID.fullmatch(queue_id) is None:
            return False
        last_event_id = args.get(b"last_event_id")
        if last_event_id is not None and not last_event_id.lstrip(b"-").isdigit():
            return False
        proxy = self.proxy
        realm = proxy.realms.get(request.host)
        if realm is None:
            realm = realm_from_host(request.host)
            if not valid_realm(realm):
                return False
            if len(proxy.realms) >= MAX_REALMS_REMEMBERED:  # Host is the client's to choose
                proxy.realms.clear()
            proxy.realms[request.host] = realm
        target = proxy.router.cached_target(queue_id)
        if target is None:
            return False
        health = proxy.health
        if health.down and health.is_down(target.shard.name):
            return False
        method = request.method
        if proxy.accel_prefix is not None and method == b"GET":
            return False
        # From here on, what _serve, _dispatch, _start, _events, route and _send do.
        proxy.router.table.hits += 1
        self.busy = True
        self.keep_alive = request.keep_alive and not proxy.retiring
        self.arrived = self.sent_at = proxy.clock.seconds()
        self.patience = 0.0
        self.method = method
        incoming = request.request_id
        self.rid = proxy.ids.new() if incoming is None else proxy.ids.choose(incoming, self.trusted)
        self.sent = 0
        self.kind = "events"
        self.longpoll = method == b"GET" and b"dont_block=true" not in request.query
        head = quick_upstream_head(request, self.peer, self.trusted, self.rid)
        self.pending = InFlight(method, True, head, queue_id, realm, target)
        self.exchange = proxy.pool.send(target.shard.address, head, self, True)
        return True

    def _reply(self, response: bytes, keep_alive: bool) -> None:
        """Send an answer kansas made itself (with the request id after its status line)."""
        cut = response.index(b"\r\n") + 2
        response = b"%s%s: %s\r\n%s" % (response[:cut], REQUEST_ID_HEADER, self.rid,
                                          response[cut:])  # fmt: skip
        self.status = int(response[9:12])
        self.sent += len(response)
        send_now(self.transport, response)
        self._done(keep_alive)

    def _done(self, keep_alive: bool) -> None:
        now = self.proxy.clock.seconds()
        if self.rid:  # not recorded yet (``_record``, inlined: this is every request)
            self.proxy.recorder.public(self, now)
            self.rid = b""
        self.busy = False
        self.exchange = None
        self.pending = None
        self.detour = None
        self.head_out = b""
        self.idle_since = self.head_since = now
        if not keep_alive:
            self._close_gracefully()
        elif self.parser.buffered:
            self._serve()

    def _close_gracefully(self) -> None:
        """Send what is buffered, half-close, and drain the client for a little while."""
        self.gone = True
        transport: Any = self.transport
        timer = self.proxy.clock.callLater(LINGER_SECONDS, transport.abortConnection)
        self.linger = [timer, LINGER_BYTES]
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is None:
            transport.loseConnection()
        else:
            half_close()

    # -- requests ------------------------------------------------------------------------
    def _start(self, method: bytes, incoming_id: bytes | None = None) -> None:
        """A request begins: its id, and a clean slate for what is recorded of it
        (``kind`` is set by ``_dispatch``, ``status`` before any answer, ``longpoll``
        before a shard is chosen)."""
        self.arrived = self.proxy.clock.seconds()
        self.patience = 0.0
        self.method = method
        ids = self.proxy.ids
        self.rid = ids.new() if incoming_id is None else ids.choose(incoming_id, self.trusted)
        self.sent = 0
        self.sent_at = None

    def _record(self, now: float) -> None:
        self.proxy.recorder.public(self, now)
        self.rid = b""

    def _dispatch(self, request: Request) -> None:
        # Only a trusted front may name the request: nobody else's id is even looked at.
        self._start(request.method, request.header(REQUEST_ID_LOWER) if self.trusted else None)
        path, _, query = request.target.partition(b"?")
        ka = self.keep_alive
        if path in EVENT_PATHS:
            self.kind = "events"
            if request.method == b"GET" or request.method == b"DELETE":
                self._events(request, query)
            else:
                allow = ((b"Allow", b"GET, DELETE"),)
                self._reply(
                    error_response(405, "Method Not Allowed", keep_alive=ka, extra=allow), ka
                )
        elif path == INTERNAL_QUEUE_PATH or path.startswith(INTERNAL_PREFIX):
            self.kind = "internal"
            self._reply(error_response(403, "Access denied", "UNAUTHORIZED", ka), ka)
        else:
            self.kind = "other"
            self._reply(error_response(404, "Not Found", "NOT_FOUND", ka), ka)

    def _events(self, request: Request, query: bytes) -> None:
        ka = self.keep_alive
        params = _params(query)
        if b"queue_id" not in params and request.body and request.method == b"DELETE":
            params = {**_params(request.body), **params}
        raw_queue_id = params.get(b"queue_id")
        if raw_queue_id is None:
            self._reply(error_response(400, "Missing 'queue_id' argument", keep_alive=ka), ka)
            return
        queue_id = raw_queue_id.decode("utf-8", "replace")
        if QUEUE_ID.fullmatch(queue_id) is None:
            self._reply(bad_queue_response(queue_id, ka), ka)
            return
        last_event_id = params.get(b"last_event_id")
        if last_event_id is not None and not last_event_id.lstrip(b"-").isdigit():
            msg = f"Bad value for 'last_event_id': {last_event_id.decode('utf-8', 'replace')}"
            self._reply(error_response(400, msg, keep_alive=ka), ka)
            return
        realm = realm_from_host(request.header(b"host"))
        if not valid_realm(realm):
            self._reply(error_response(400, "Missing or invalid Host header", keep_alive=ka), ka)
            return
        self.longpoll = request.method == b"GET" and b"dont_block=true" not in query
        try:
            target = self.proxy.router.route(queue_id, realm)
        except NoShard:
            self._no_shard(realm)
            return
        except QueueInvalidated as e:
            self._invalidated(e, request)
            return
        except QueueMoving as e:
            self._hold(e, request)
            return
        if isinstance(target, Deferred):
            target.addCallbacks(
                self._forward,
                self._route_failed,
                callbackArgs=(request, queue_id, realm),
                errbackArgs=(realm, request),
            )
        else:
            self._forward(target, request, queue_id, realm)

    def _no_shard(self, realm: str) -> None:
        msg = f"No shard is available for realm {realm!r}"
        self._reply(error_response(503, msg, "SHARD_UNAVAILABLE", self.keep_alive), self.keep_alive)

    def _invalidated(self, e: QueueInvalidated, request: Request) -> None:
        """A move invalidated this queue: Zulip's BAD_EVENT_QUEUE_ID (the client
        re-registers, on its new shard), and a DELETE of the queue on its old shard,
        with the client's own credentials (Tornado authenticates queue deletion)."""
        target = request.target
        if request.method == b"DELETE" and request.body and b"?" not in target:
            target += b"?queue_id=" + e.route.queue_id.encode()  # from the form body
        delete = upstream_head(b"DELETE", target, request.headers, self.peer, 0, self.trusted,
                               self.rid)  # fmt: skip
        self._answer_invalidated(e.route, e.shard, delete)

    def _answer_invalidated(self, route: QueueRoute, shard: Shard | None, delete: bytes) -> None:
        self.proxy.recorder.invalidated_answer(route.shard)
        self.pending = None  # recorded as kansas's own answer, under the note
        self.note = (route.queue_id, route.realm, route.shard, INVALIDATED)
        self._reply(bad_queue_response(route.queue_id, self.keep_alive), self.keep_alive)
        if shard is not None:
            self.proxy.pool.send(shard.address, delete, _DISCARD_SINK, True)

    def invalidated_in_flight(self, route: QueueRoute) -> None:
        """A move invalidated the queue of this waiting long-poll
        (``kansas.proxy.invalidation``): answer it now, at the move's pace, rather than
        at the old shard's heartbeat, and cancel it there."""
        flight = self._waiting_get()
        if self.gone or flight is None or flight.queue_id != route.queue_id:
            return  # answered, or being answered, meanwhile
        self._withdraw_get()  # the old shard drops the long-poll with the connection
        self.proxy.router.table.uncache(route.queue_id)
        shard = self.proxy.router.directory.current.shards.get(route.shard)
        # The GET's own head, as the shard got it, turned into a DELETE of its queue.
        self._answer_invalidated(route, shard, b"DELETE" + flight.payload[3:])

    def _hold(self, e: QueueMoving, request: Request) -> None:
        """A transparent move is switching the queue: wait for its commit or rollback,
        then route the request again; a GET still waiting at the batch's deadline gets
        the empty success (the client polls again)."""
        holding = self.proxy.holding
        now = self.proxy.clock.seconds()
        deadline = min(holding.deadline(e.route), now + self.proxy.park_timeout,
                       self.arrived + CLIENT_PATIENCE_SECONDS)  # fmt: skip
        queue_id, method = e.route.queue_id, request.method
        query = request.target.partition(b"?")[2]

        def resume(route: QueueRoute | None) -> None:
            self.held = None
            if self.gone:
                return
            fresh = self.proxy.router.fresh
            if route is not None:
                fresh[queue_id] = route  # just read: no second Redis read
            self._events(request, query)
            fresh.pop(queue_id, None)

        def expire() -> None:
            self.held = None
            if method == b"GET":
                self._empty_success(queue_id)
                return
            msg = "The queue is being moved; try again"
            retry = ((b"Retry-After", b"1"),)
            self._reply(error_response(503, msg, "SHARD_UNAVAILABLE", self.keep_alive, retry),
                        self.keep_alive)  # fmt: skip

        self.held = holding.hold(queue_id, deadline, resume, expire)

    def _route_failed(self, failure: Failure, realm: str, request: Request) -> None:
        if self.gone:
            return
        if isinstance(failure.value, NoShard):
            self._no_shard(realm)
            return
        if isinstance(failure.value, QueueInvalidated):
            self._invalidated(failure.value, request)
            return
        if isinstance(failure.value, QueueMoving):
            self._hold(failure.value, request)
            return
        log.failure("routing failed", failure)
        ka = self.keep_alive
        self._reply(error_response(500, "Internal error while routing", "INTERNAL", ka), ka)

    def _forward(self, target: Target, request: Request, queue_id: str, realm: str) -> None:
        if self.gone:
            return
        head = upstream_head(
            request.method,
            request.target,
            request.headers,
            self.peer,
            len(request.body),
            self.trusted,
            self.rid,
        )
        # Only the bytes for the shard are kept, not the parsed request: a held long-poll
        # should cost little memory.
        flight = InFlight(request.method, request.version == b"HTTP/1.1", head + request.body,
                          queue_id, realm, target)  # fmt: skip
        self._send(flight)

    def _send(self, flight: InFlight) -> None:
        self.pending = flight
        target = flight.target
        if self.proxy.health.down and self.proxy.health.is_down(target.shard.name):
            if flight.method == b"GET":
                self._park(flight)
            else:
                self._unavailable(target)  # a DELETE is not safe to hold and replay
            return
        if self.proxy.accel_prefix is not None and flight.method == b"GET" and target.route:
            self._accel_redirect(flight)
            return
        self.sent_at = self.proxy.clock.seconds()
        self.exchange = self.proxy.pool.send(target.shard.address, flight.payload, self, True)

    def _accel_redirect(self, flight: InFlight) -> None:
        """X-Accel-Redirect mode: nginx holds the long-poll itself, on its internal
        location for the shard; kansas only decides where (and refreshes the mapping)."""
        route, template = flight.target.route, self.proxy.accel_prefix
        assert route is not None and template is not None
        self.proxy.router.table.seen(route)
        payload = flight.payload
        uri = payload[4 : payload.index(b" HTTP/1.1\r\n")]  # "GET <uri> HTTP/1.1"
        host, port = flight.target.shard.address
        prefix = template.format(port=port, host=host, shard=flight.target.shard.name).encode()
        extra = ((b"X-Accel-Redirect", prefix + uri),)
        self._reply(json_response(200, b"", self.keep_alive, extra), self.keep_alive)

    def _park(self, flight: InFlight) -> None:
        """Hold a GET until its shard is back (then replay it) or its deadline passes."""
        proxy = self.proxy
        now = proxy.clock.seconds()
        deadline = min(now + proxy.park_timeout, self.arrived + CLIENT_PATIENCE_SECONDS)
        if deadline <= now:
            self._empty_success(flight.queue_id)
            return
        name = flight.target.shard.name
        self.parked = proxy.parking.park(name, deadline, self._resume, self._expire)
        if self.parked is None:
            msg = f"Shard {name} is restarting and too many requests wait for it"
            retry = ((b"Retry-After", b"10"),)
            self._reply(error_response(503, msg, "SHARD_UNAVAILABLE", self.keep_alive, retry),
                        self.keep_alive)  # fmt: skip

    def stop_gracefully(self) -> None:
        if not self.busy:
            self.keep_alive = False
            self._close_gracefully()
            return
        if self.held is not None:
            held, self.held = self.held, None
            self.proxy.holding.release(held)
            self.keep_alive = False
            held.expire()
            return
        flight = self._waiting_get()
        if flight is None:
            return  # still routing, already answering, or not a GET: let it finish
        self._withdraw_get()
        self.keep_alive = False
        self._empty_success(flight.queue_id)

    def _waiting_get(self) -> InFlight | None:
        """The GET in flight, if it is still waiting (parked, or at its shard with no
        answer byte yet): one kansas may answer itself instead."""
        flight = self.pending
        if flight is None or flight.method != b"GET" or self.head_out:
            return None
        if self.exchange is not None and self.exchange.started:
            return None
        return flight

    def _withdraw_get(self) -> None:
        """Take the waiting GET back: out of its lot, or its shard connection dropped
        (the shard frees the long-poll with it)."""
        if self.parked is not None:
            self.proxy.parking.unpark(self.parked)
            self.parked = None
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.cancel()

    def _resume(self) -> None:
        self.parked = None
        if self.pending is not None and not self.gone:
            self._send(self.pending)
            exchange = self.exchange
            if exchange is not None:
                # The client has been waiting since it arrived, and the shard starts
                # its long-poll afresh (up to its heartbeat, ~55 s): answered by the
                # client's patience all the same, with the empty success.
                self.patience = self.arrived + CLIENT_PATIENCE_SECONDS
                exchange.deadline = min(exchange.deadline, self.patience)

    def _expire(self) -> None:
        self.parked = None
        if self.pending is not None:
            self._empty_success(self.pending.queue_id)

    def _empty_success(self, queue_id: str) -> None:
        """What a parked GET gets when its shard stays away: clients simply poll again."""
        body = (
            b'{"result":"success","msg":"","events":[],"queue_id":%s}'
            % json.dumps(queue_id).encode()
        )
        self._reply(json_response(200, body, self.keep_alive), self.keep_alive)

    def _unavailable(self, target: Target) -> None:
        msg = f"Shard {target.shard.name} is unavailable"
        self._reply(error_response(502, msg, "BAD_GATEWAY", self.keep_alive), self.keep_alive)

    # -- ResponseSink: the shard's answer --------------------------------------------------
    def response_head(self, status: int, headers: list[Header]) -> None:
        pending = self.pending
        assert pending is not None
        method, http11, _, queue_id, realm, target = pending
        health = self.proxy.health
        if health.down and target.shard.name in health.down:
            health.succeeded(target.shard.name)
        location = tornado_redirect(headers)
        if location is not None:
            # Zulip's Tornado: "this user lives on another port" (a user-split realm).
            detour = self.proxy.router.redirected(target, location)
            if detour.target is None:
                self._unusable(target, detour.problem, detour.why)
                return
            self.proxy.recorder.redirect_followed(target.shard.name, detour.target.shard.name)
            self.detour = detour.target
            self.framing = _DISCARD
            return
        if status == 400 and target.others:
            # A queue without a mapping, unknown to this shard of its realm: ask the next
            # one once this answer is read (user-split realms, users moved elsewhere).
            self.detour = target.next_candidate()
            self.framing = _DISCARD
            return
        if not is_json(headers):
            why = f"Shard {target.shard.name} sent a reply that is not JSON (status {status})"
            self._unusable(target, "not-json", why)
            return
        self.proxy.router.answered(method, queue_id, realm, target, status)
        self.status = status
        out = [status_line(status), REQUEST_ID_HEADER, b": ", self.rid, b"\r\n"]
        framing = _UNTIL_CLOSE
        for lname, name, value in downstream_headers(headers):
            if lname == b"content-length":
                framing = _LENGTH
            out += (name, b": ", value, b"\r\n")
        if framing != _LENGTH:
            if http11:
                framing = _CHUNKED
                out.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False
        if not self.keep_alive:
            out.append(b"Connection: close\r\n")
        elif not http11:
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        self.framing = framing
        # Held until the body arrives (almost always in the same read), so the whole
        # answer usually leaves in one send.
        self.head_out = b"".join(out)

    def _unusable(self, target: Target, problem: str, why: str) -> None:
        """The shard answered something kansas cannot pass on: 502, logged (a line a
        minute per shard and problem) and counted, so an operator sees it."""
        if self.exchange is not None:
            self.exchange.cancel()
        name = target.shard.name
        self.proxy.recorder.unusable_answer(name, problem)
        self.proxy.warnings.warn((name, problem), f"{why}: answered 502")
        self._reply(error_response(502, why, "BAD_GATEWAY", self.keep_alive), self.keep_alive)

    def response_whole(self, answer: QuickResponse) -> bool:
        """The shard's whole answer at once (``kansas.proxy.quick``): what
        ``response_head``, ``response_body`` and ``response_end`` would do, in one send.
        False: nothing was done, the answer goes through those instead."""
        pending = self.pending
        assert pending is not None
        method, http11, _, queue_id, realm, target = pending
        status = answer.status
        if status == 400 and target.others:
            return False  # the next shard is asked (response_head)
        health = self.proxy.health
        if health.down and target.shard.name in health.down:
            health.succeeded(target.shard.name)
        self.proxy.router.answered(method, queue_id, realm, target, status)
        self.status = status
        if not self.keep_alive:
            end = b"Connection: close\r\n\r\n"
        elif not http11:
            end = b"Connection: keep-alive\r\n\r\n"
        else:
            end = b"\r\n"
        data = b"%s%s: %s\r\n%s%s%s" % (status_line(status), REQUEST_ID_HEADER, self.rid,
                                         answer.headers, end, answer.body)  # fmt: skip
        self.sent += len(data)
        send_now(self.transport, data)
        self._done(self.keep_alive)
        return True

    def response_body(self, data: bytes) -> None:
        if self.framing == _DISCARD:
            return
        if self.framing == _CHUNKED:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self.head_out:
            data = self.head_out + data
            self.head_out = b""
        self.sent += len(data)
        send_now(self.transport, data)

    def response_end(self) -> None:
        if self.framing == _DISCARD:
            self.framing = _LENGTH
            flight, detour, self.detour = self.pending, self.detour, None
            if flight is not None and detour is not None:
                self.exchange = None
                self._send(flight._replace(target=detour))
            return
        tail = self.head_out + b"0\r\n\r\n" if self.framing == _CHUNKED else self.head_out
        if tail:
            self.head_out = b""
            self.sent += len(tail)
            send_now(self.transport, tail)
        self._done(self.keep_alive)

    def response_failed(self, reason: str, started: bool, kind: Failed) -> None:
        self.exchange = None
        pending = self.pending
        assert pending is not None
        target = pending.target
        health = self.proxy.health
        if kind is Failed.UNREACHABLE:
            health.failed(target.shard.name, reason)
        elif kind is Failed.CLOSED:
            health.probe(target.shard.name)  # a Tornado restart cuts its long-polls first
        if self.gone:
            return
        if started:
            # Part of the answer is out: only a cut connection tells the client.
            log.warn("{reason}", reason=reason)
            self.status = 502
            self._record(self.proxy.clock.seconds())
            self.gone = True
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        if pending.method == b"GET" and kind in (Failed.UNREACHABLE, Failed.CLOSED):
            self._park(pending)
            return
        if kind is Failed.TIMEOUT and self.patience and pending.method == b"GET":
            self.patience = 0.0
            self._empty_success(pending.queue_id)  # "poll again", before the client quits
            return
        log.warn("{reason}", reason=reason)
        self._unavailable(target)


class _Discard:
    """The sink of kansas's own DELETEs: the answer does not matter (a queue already
    gone is as good as deleted; a shard that is down drops it with its queues)."""

    def response_head(self, status: int, headers: list[Header]) -> None:
        pass

    def response_body(self, data: bytes) -> None:
        pass

    def response_end(self) -> None:
        pass

    def response_failed(self, reason: str, started: bool, kind: Failed) -> None:
        pass


_DISCARD_SINK = _Discard()


class FrontFactory(Factory):
    """Shared state of one public listener, and the reaper of idle connections."""

    noisy = False

    def __init__(
        self,
        router: EventRouter,
        pool: BackendPool,
        clock: Any,
        health: HealthMonitor,
        parking: Parking,
        idle_timeout: float = 75.0,
        park_timeout: float = 50.0,
        header_timeout: float = 10.0,
        accel_prefix: str | None = None,
        max_head: int = MAX_HEAD_BYTES,
        max_body: int = MAX_BODY_BYTES,
        trusted_fronts: frozenset[str] = frozenset(),
        reap_interval: float = 5.0,
        recorder: RequestRecorder | None = None,
        holding: MoveHolding | None = None,
        max_connections: int = 0,
        quick: bool = True,
    ) -> None:
        self.router = router
        self.pool = pool
        self.clock = clock
        self.health = health
        self.parking = parking
        #: requests for queues a transparent move is switching
        self.holding = holding or MoveHolding(router.table.store, clock, router.wall)
        self.park_timeout = park_timeout
        self.header_timeout = header_timeout
        #: e.g. "/internal/tornado/{port}": answer mapped GETs with X-Accel-Redirect
        self.accel_prefix = accel_prefix
        self.max_head = max_head
        self.max_body = max_body
        #: peers (nginx) whose X-Real-Ip is the client's; any other peer's is replaced
        self.trusted_fronts = trusted_fronts
        self.idle_timeout = idle_timeout
        #: take the common exchange through kansas.proxy.quick (off: the general path
        #: only, which tests compare it with)
        self.quick = quick
        #: Host header -> its realm, for the Host headers seen (validated once)
        self.realms: dict[bytes, str] = {}
        #: counts, latencies, access log and trace records of every request
        self.recorder = recorder or RequestRecorder()
        self.ids = self.recorder.ids
        #: shard answers kansas cannot use, logged at most once a minute per kind
        self.warnings = ThrottledWarnings(clock)
        self.connections: set[FrontProtocol] = set()
        self.retiring = False  # set when a successor takes over (see retire)
        #: Beyond this many client connections, stop accepting (see pause_accepting).
        self.max_connections = max_connections or connections_allowed()
        self.resume_at = self.max_connections * 95 // 100
        self.accept_paused: Any = None  # the listening port, while paused
        self._reaper = LoopingCall(self.reap)
        self._reaper.clock = clock
        self._reap_interval = reap_interval
        #: answers the long-polls of queues a move invalidates, as it does
        self.invalidations = InvalidationWatch(
            router.table.store, clock, lambda: router.directory.current.moving_realms,
            self.long_polls_in,
        )  # fmt: skip

    def buildProtocol(self, addr: Any) -> FrontProtocol:
        return FrontProtocol(self)

    def startFactory(self) -> None:
        self._reaper.start(self._reap_interval, now=False)
        self.invalidations.start()

    def stopFactory(self) -> None:
        if self._reaper.running:
            self._reaper.stop()
        self.invalidations.stop()
        self.holding.stop()

    def long_polls_in(self, realms: frozenset[str]) -> dict[str, FrontProtocol]:
        """Queue id -> the connection of each GET waiting for a shard of these realms."""
        return {
            c.pending.queue_id: c
            for c in self.connections
            if c.pending is not None and c.pending.method == b"GET"
            and c.pending.realm in realms and not c.head_out
        }  # fmt: skip

    def drain(self) -> None:
        """kansas is stopping: answer what can be answered, close the rest.

        A GET still waiting for its shard (or parked) gets the empty success every Zulip
        client takes as "poll again"; an answer already being relayed, or a DELETE, is
        left to finish; idle connections are closed.
        """
        for conn in list(self.connections):
            conn.stop_gracefully()

    def pause_accepting(self, transport: Any) -> None:
        """At ``max_connections``: leave new connections in the kernel's accept queue,
        for another worker sharing it or for later, rather than accept what the
        open-file limit cannot hold (Twisted would then accept and drop them)."""
        port = getattr(transport, "server", None)  # a tcp.Server knows its Port
        if self.accept_paused is not None or port is None or self.retiring:
            return
        port.stopReading()
        self.accept_paused = port
        log.warn("{n} client connections: not accepting more until {m}",
                 n=len(self.connections), m=self.resume_at)  # fmt: skip

    def resume_accepting(self) -> None:
        port, self.accept_paused = self.accept_paused, None
        if port is not None and not self.retiring:
            port.startReading()
            log.info("accepting connections again ({n} open)", n=len(self.connections))

    def retire(self) -> None:
        """This worker is being replaced: stop keeping connections alive.

        A request in flight is answered with ``Connection: close`` (long-polls finish
        normally, within the shard's heartbeat); a keep-alive connection idle for
        ``RETIRE_IDLE_SECONDS`` is closed (``close_idle``, called again while draining).
        One idle for less is likely about to carry its client's next request: closing
        it now would race with that request, so it gets ``Connection: close`` on that
        answer instead. A connection that has not sent its first request yet is served
        once: its client has committed to sending one.
        """
        self.retiring = True
        for conn in self.connections:
            conn.keep_alive = False
        self.close_idle()

    def close_idle(self) -> None:
        """While retiring: close the keep-alive connections idle long enough."""
        idle = self.clock.seconds() - RETIRE_IDLE_SECONDS
        for conn in [
            c
            for c in self.connections
            if not c.gone and not c.busy and not c.parser.buffered
            and c.head_since and c.idle_since <= idle and not has_unread(c.transport)
        ]:  # fmt: skip
            conn._close_gracefully()

    def reap(self) -> None:
        """Close connections idle past ``idle_timeout``, and those still sending a
        request head after ``header_timeout`` (slowloris). Requests in flight, long-polls
        included, are never touched.

        One sweep every few seconds costs less than a timer per connection reset on
        every request.
        """
        now = self.clock.seconds()
        idle, slow = now - self.idle_timeout, now - self.header_timeout
        for conn in [
            c
            for c in self.connections
            if not c.busy and (c.idle_since < idle or (c.parser.buffered and c.head_since < slow))
        ]:
            conn.gone = True
            if conn.transport is not None:
                conn.transport.loseConnection()
