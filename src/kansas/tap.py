"""``twistd kansas``: command-line options and the wiring of one kansas process.

Everything here is wiring; the behaviour lives in the modules it connects.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from kansas import lean_reactor
from kansas.errors import ConfigError, KansasError
from kansas.follower import AssignmentFollower
from kansas.health import HealthMonitor
from kansas.observe.access_log import AccessLog
from kansas.observe.live import LiveMetrics
from kansas.observe.recorder import RequestRecorder
from kansas.observe.trace import RecentRequests
from kansas.observe.web import SnapshotSource
from kansas.process.sockets import with_backlog
from kansas.proxy.backend import BackendPool
from kansas.proxy.forwarding import EventRouter
from kansas.proxy.front import CLIENT_PATIENCE_SECONDS, FrontFactory
from kansas.proxy.notify import NotifyDispatcher
from kansas.proxy.parking import Parking
from kansas.proxy.resource import InternalSite, internal_site
from kansas.routes import RouteTable
from kansas.stores.postgres import PostgresAuthority, describe_dsn
from kansas.stores.redis import RedisRouteStore, parse_redis_url

log = Logger()


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(f"{value} is not > 0")
    return number


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Routes Zulip's event-queue traffic to the Tornado shard that owns each queue. "
        "PostgreSQL holds the shard assignments (set them with kansas-ctl); Redis holds "
        "the queue -> shard table."
    )
    optParameters = [
        ["listen", None, "tcp:9799:interface=127.0.0.1",
         "Public endpoint (nginx sends /json/events and /api/v1/events here)."],
        ["internal-listen", None, "tcp:9798:interface=127.0.0.1",
         "Internal endpoint (Django's queue creation and notifications)."],
        ["redis", None, os.environ.get("KANSAS_REDIS", "redis://127.0.0.1:6379/0"),
         "Redis URL of the queue -> shard table [env KANSAS_REDIS]."],
        ["postgres", None, os.environ.get("KANSAS_POSTGRES"),
         "PostgreSQL DSN of the shard assignments [env KANSAS_POSTGRES]."],
        ["backend-timeout", None, 150.0,
         "Seconds a shard may take to answer (long-polls end within ~55 s).", _positive],
        ["connect-timeout", None, 5.0, "Seconds to connect to a shard.", _positive],
        ["redis-timeout", None, 1.0, "Seconds any Redis call may take.", _positive],
        ["idle-timeout", None, 75.0, "Seconds an idle client connection is kept.", _positive],
        ["max-head-bytes", None, 16384, "Largest request head (line and headers) accepted; "
         "beyond, 431.", int],
        ["max-body-bytes", None, 65536, "Largest request body on the public listener; "
         "beyond, 413.", int],
        ["max-connections", None, 0, "Client connections one process holds before it stops "
         "accepting (0: what the open-file limit allows, two descriptors each).", int],
        ["trust-real-ip-from", None, "",
         "Comma-separated addresses of fronts (nginx) whose X-Real-Ip is passed on; from "
         "any other peer it is replaced by the peer's address (default: none)."],
        ["header-timeout", None, 10.0,
         "Seconds a client may take to send a request head.", _positive],
        ["reload-interval", None, 60.0,
         "Seconds between safety-net reloads of the assignment.", _positive],
        ["park-timeout", None, 50.0,
         "Seconds a GET waits for its restarting shard before an empty answer "
         "(keep below Zulip's 90 s client timeout).", _positive],
        ["release-rate", None, 200.0,
         "Parked GETs replayed per second to a shard that is back.", _positive],
        ["max-parked", None, 10000, "Parked GETs per shard; beyond, 503.", int],
        ["probe-interval", None, 1.0, "Seconds between probes of a down shard.", _positive],
        ["workers", None, os.cpu_count() or 1,
         "Worker processes sharing the listeners; SIGHUP replaces them all without "
         "dropping a connection. 0: serve in this process (no master).", int],
        ["drain-timeout", None, 60.0,
         "Seconds a replaced or stopping worker may take to finish its requests (long-polls "
         "end within ~55 s); set supervisor's stopwaitsecs above it.", _positive],
        ["ready-timeout", None, 60.0,
         "Seconds a new worker may take to become ready before its generation is "
         "abandoned.", _positive],
        ["x-accel-redirect", None, None,
         "Answer GETs for mapped queues with X-Accel-Redirect to PREFIX + the request "
         "(PREFIX may use {port}, {host}, {shard}; e.g. /internal/tornado/{port}), so "
         "nginx holds the long-poll itself. Off by default."],
        # -- observability (kansas.observe, docs/observability.md) --
        ["access-log", None, "off",
         "One line per request at info level: json, text, or off (default)."],
        ["trace-queues", None, 2000,
         "Queues whose last 5 requests are kept for kansas-ctl trace (0: none).", int],
    ]  # fmt: skip

    #: Set by a worker, whose listening sockets come from its master.
    listeners_inherited = False

    def parseOptions(self, options: list[str] | None = None) -> None:
        # Kept verbatim: a master starts its workers with the same options.
        self.kansas_argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def worker_args(self) -> list[str]:
        return list(self.kansas_argv)

    def postOptions(self) -> None:
        if self["workers"] < 0:
            _fail("--workers must be >= 0")
        if self["park-timeout"] >= CLIENT_PATIENCE_SECONDS:
            _fail(f"--park-timeout must be below {CLIENT_PATIENCE_SECONDS:.0f} s")
        accel = self["x-accel-redirect"]
        if accel is not None:
            try:
                accel.format(port=9800, host="127.0.0.1", shard="a")
            except (KeyError, IndexError, ValueError) as e:
                _fail(f"bad --x-accel-redirect {accel!r}: {e!r}")
            if not accel.startswith("/"):
                _fail(f"bad --x-accel-redirect {accel!r}: must be a path")
        if self["max-head-bytes"] < 1024 or self["max-body-bytes"] < 0:
            _fail("--max-head-bytes must be >= 1024 and --max-body-bytes >= 0")
        if self["max-connections"] < 0:
            _fail("--max-connections must be >= 0")
        if self["max-parked"] < 0:
            _fail("--max-parked must be >= 0")
        if self["access-log"] not in ("off", "json", "text"):
            _fail(f"bad --access-log {self['access-log']!r}: json, text or off")
        if self["trace-queues"] < 0:
            _fail("--trace-queues must be >= 0")
        if not self["postgres"]:
            _fail("--postgres DSN is required (or set KANSAS_POSTGRES)")
        try:
            describe_dsn(self["postgres"])
            parse_redis_url(self["redis"])
        except ConfigError as e:
            _fail(str(e))
        if self.listeners_inherited:
            return  # a worker: its master made the sockets
        from twisted.internet import reactor

        for option in ("listen", "internal-listen"):
            try:
                serverFromString(reactor, self[option])
            except (ValueError, TypeError, KeyError, IndexError) as e:
                _fail(f"bad --{option} endpoint {self[option]!r}: {e}")


def _fail(message: str) -> NoReturn:
    # One line on stderr and exit 1, rather than twistd's whole usage text.
    raise SystemExit(f"twistd kansas: {message}")


class KansasService(MultiService):
    """One serving kansas: its listeners' factories, the follower, and the clean-up of
    shared connections.

    Stopping (SIGTERM) stops listening, then answers the long-polls in flight with an
    empty success (clients simply poll again, reaching the next kansas) instead of
    cutting them. As a worker (``kansas.process.worker``) it can also ``retire``: finish
    what is in flight while a successor takes the new connections.
    """

    def __init__(
        self,
        reactor: Any,
        table: RouteTable,
        pool: BackendPool,
        authority: PostgresAuthority,
        health: HealthMonitor,
        parking: Parking,
        front: FrontFactory,
        internal: InternalSite,
        follower: AssignmentFollower,
    ):
        super().__init__()
        self.reactor = reactor
        self.table = table
        self.pool = pool
        self.authority = authority
        self.health = health
        self.parking = parking
        self.front = front
        self.internal = internal
        self.follower = follower
        #: SIGHUP reloads the assignment; a worker leaves SIGHUP to its master.
        self.handle_hangup = True
        #: What /metrics exposes (kansas.observe): set by ``assemble``, and by a worker.
        self.live: Any = None
        self.snapshots: Callable[[], Any] = list

    def startService(self) -> None:
        MultiService.startService(self)
        self.health.start()
        if self.handle_hangup:
            self.reactor.callWhenRunning(self._handle_hangup)

    def _handle_hangup(self) -> None:
        def hangup(signum: int, frame: object) -> None:
            log.info("SIGHUP: reloading the assignment from PostgreSQL")
            self.reactor.callFromThread(self.follower.reload)

        signal.signal(signal.SIGHUP, hangup)

    def following(self) -> bool:
        """Whether assignment changes reach this process now (PostgreSQL LISTEN is up)."""
        return self.follower.listening

    def redis_answers(self) -> Deferred[bool]:
        """Whether Redis answers a read now (a worker's readiness)."""
        d = self.table.store.get("kansas:readiness")
        return d.addCallbacks(lambda _: True, lambda _: False)

    def retire(self) -> None:
        """A successor accepts the new connections: stop keeping ours alive."""
        self.front.retire()
        self.internal.retire()

    def close_idle(self) -> None:
        self.front.close_idle()
        self.internal.close_idle()

    def open_connections(self) -> int:
        return len(self.front.connections) + self.internal.open_connections()

    def handover(self) -> dict[str, Any]:
        """The in-memory state a successor should start from (see ``take_over``)."""
        state: dict[str, Any] = self.table.handover()
        state["down"] = {name: list(entry) for name, entry in self.health.down.items()}
        return state

    def take_over(self, state: dict[str, Any]) -> None:
        moving = frozenset(self.follower.current.moving_realms)
        routes = self.table.take_over(state, moving)
        self.health.take_over(state.get("down", {}))
        log.info(
            "took over {routes} cached routes, {journal} journalled mappings and {down} "
            "down shards from the previous worker",
            routes=routes, journal=len(state.get("journal", ())), down=len(state.get("down", {})),
        )  # fmt: skip

    def stopService(self) -> Deferred[Any]:
        stopping = MultiService.stopService(self)  # stops listening first
        self.front.drain()
        self.health.stop()
        self.parking.stop()
        self.table.stop()

        def cleanup(result: object) -> Deferred[Any]:
            self.pool.close()
            self.authority.close()
            return self.table.store.close()

        return DeferredList([stopping]).addCallback(cleanup)


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    _raise_open_file_limit()
    if options["workers"] > 0:
        return _master(options, reactor)
    service = assemble(options, reactor)
    for option, factory in (("listen", service.front), ("internal-listen", service.internal)):
        endpoint = serverFromString(reactor, with_backlog(options[option]))
        listener = StreamServerEndpointService(endpoint, factory)
        listener._raiseSynchronously = True  # a port in use stops twistd with a clear error
        listener.setServiceParent(service)
    return service


def _raise_open_file_limit() -> None:
    """Every held long-poll costs two descriptors: take all the hard limit allows (the
    soft limit is often 1,024); workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("open-file limit raised from {soft} to {hard}", soft=soft, hard=hard)


def _master(options: Options, reactor: Any) -> IService:
    """The supervisor-facing process: binds the sockets, runs ``--workers`` workers."""
    from kansas.process.master import Master
    from kansas.process.sockets import bind

    # What would stop every worker is said once, here, as one line (as without workers).
    authority = PostgresAuthority(options["postgres"])
    try:
        authority.require_current_schema()
    except KansasError as e:
        _fail(str(e))
    finally:
        authority.close()
    try:
        listeners = [bind(name, options[name]) for name in ("listen", "internal-listen")]
    except ConfigError as e:
        _fail(str(e))
    log.info(
        "kansas master: public {pub}, internal {internal}, {n} workers",
        pub=options["listen"], internal=options["internal-listen"], n=options["workers"],
    )  # fmt: skip
    return Master(
        reactor, listeners, options.worker_args(), options["workers"],
        drain_timeout=options["drain-timeout"], ready_timeout=options["ready-timeout"],
    )  # fmt: skip


def assemble(options: Options, reactor: Any) -> KansasService:
    """Everything one serving process needs, except its listening ports."""
    lean_reactor.install(reactor)
    dsn = options["postgres"]
    authority = PostgresAuthority(dsn)
    try:
        authority.require_current_schema()
        initial = authority.load()
    except KansasError as e:
        _fail(str(e))
    if not initial.shards:
        log.warn("no shards registered yet: add them with `kansas-ctl shard add`")

    store = RedisRouteStore(parse_redis_url(options["redis"]), reactor, options["redis-timeout"])
    table = RouteTable(store, reactor)
    follower = AssignmentFollower(
        reactor, dsn, authority.load, initial, reload_interval=options["reload-interval"]
    )
    router = EventRouter(table, follower)
    follower.on_change.append(router.assignment_changed)
    pool = BackendPool(
        reactor,
        connect_timeout=options["connect-timeout"],
        response_timeout=options["backend-timeout"],
    )

    health = HealthMonitor(reactor, follower, interval=options["probe-interval"])
    health.on_down.append(lambda shard, why: pool.abandon(shard.address, why))
    parking = Parking(reactor, health, options["max-parked"], options["release-rate"])
    # -- observability: begin --------------------------------------------------------------
    access_log = None if options["access-log"] == "off" else AccessLog(options["access-log"])
    recent = RecentRequests(options["trace-queues"]) if options["trace-queues"] else None
    recorder = RequestRecorder(access_log, recent)
    live = LiveMetrics(recorder, reactor, parking=parking, health=health, directory=follower,
                       table=table, redis=store.stats)  # fmt: skip
    # One process: its own snapshot. A worker replaces ``service.snapshots`` with a
    # source that asks every worker for theirs, through the master (merged to render).
    metrics_source: SnapshotSource = lambda: service.snapshots()  # noqa: E731
    # -- observability: end ----------------------------------------------------------------
    front = FrontFactory(
        router, pool, reactor, health, parking,
        idle_timeout=options["idle-timeout"], park_timeout=options["park-timeout"],
        header_timeout=options["header-timeout"], accel_prefix=options["x-accel-redirect"],
        max_head=options["max-head-bytes"], max_body=options["max-body-bytes"],
        trusted_fronts=frozenset(a for a in options["trust-real-ip-from"].split(",") if a),
        recorder=recorder, max_connections=options["max-connections"],
    )  # fmt: skip

    notify = NotifyDispatcher(pool, health)
    live.front, live.notify = front, notify
    internal = internal_site(pool, router, notify, recorder, metrics_source, recent)
    service = KansasService(
        reactor, table, pool, authority, health, parking, front, internal, follower
    )
    follower.setServiceParent(service)
    service.live = live
    service.snapshots = lambda: [live.snapshot()]
    log.info(
        "kansas: public {pub}, internal {internal}, redis {redis}, postgres {pg}, {n} shards",
        pub=options["listen"], internal=options["internal-listen"],
        redis=store.address, pg=authority.description, n=len(initial.shards),
    )  # fmt: skip
    return service
