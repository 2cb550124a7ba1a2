"""Follows the PostgreSQL authority live: LISTEN/NOTIFY, no query on the request path.

kansas loads the whole assignment at start, then keeps one autocommit connection that
LISTENs on ``kansas_assignment``; its socket sits in the reactor (an ``os.dup`` of it,
since psycopg2 closes its own when the server goes away). A notification triggers a
reload in a thread. Notifications sent while disconnected are lost, so every
(re)connect LISTENs first and then reloads everything; a periodic reload is the safety
net for anything else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kansas.errors import KansasError
from kansas.model import Assignment
from kansas.observe.metrics import CallStats
from kansas.stores.postgres import NOTIFY_CHANNEL, connect

log = Logger()


@implementer(IReadDescriptor)
class _NotifyReader:
    """Registers a LISTEN connection's socket with the reactor."""

    def __init__(
        self, conn: Any, on_notify: Callable[[], object], on_lost: Callable[[], None]
    ) -> None:
        self.conn = conn
        self._fd = os.dup(conn.fileno())
        self._on_notify = on_notify
        self._on_lost = on_lost

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        try:
            self.conn.poll()
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            self._on_lost()
            return
        if self.conn.notifies:
            self.conn.notifies.clear()  # one reload covers any number of them
            self._on_notify()

    def connectionLost(self, reason: Failure) -> None:
        self._on_lost()

    def logPrefix(self) -> str:
        return "kansas-listen"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self.conn.closed:
            self.conn.close()


class AssignmentFollower(Service):
    """Holds ``current``, the latest assignment snapshot, and keeps it fresh."""

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        load: Callable[[], Assignment],
        initial: Assignment,
        reload_interval: float = 60.0,
        retry_max: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.dsn = dsn
        self._load = load
        self.current = initial
        self.reload_interval = reload_interval
        self.retry_max = retry_max
        self.reloads = 0
        self.loaded_at = reactor.seconds()
        self._reader: _NotifyReader | None = None
        self._periodic = LoopingCall(self.reload)
        self._periodic.clock = reactor
        self._retry_delay = 0.5
        self._retry_call: Any = None
        self._reloading: Deferred[None] | None = None
        self._again = False
        self.on_change: list[Callable[[Assignment], None]] = []
        #: reload latencies and failures (reload, listen), for /metrics
        self.stats = CallStats()

    @property
    def listening(self) -> bool:
        return self._reader is not None

    def startService(self) -> None:
        Service.startService(self)  # type: ignore[no-untyped-call]
        self._periodic.start(self.reload_interval, now=False)
        self._listen()

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._periodic.running:
            self._periodic.stop()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._drop_reader()
        return self._reloading

    # -- LISTEN --------------------------------------------------------------------------
    @inlineCallbacks
    def _listen(self):  # type: ignore[no-untyped-def]
        self._retry_call = None
        try:
            conn = yield deferToThread(self._connect_listening)
        except KansasError as e:
            self._count_error("listen")
            self._schedule_retry(str(e))
            return
        if not self.running:
            conn.close()
            return
        self._reader = _NotifyReader(conn, self.reload, self._lost)
        self.reactor.addReader(self._reader)
        self._retry_delay = 0.5
        log.info("following assignment changes on PostgreSQL channel {c}", c=NOTIFY_CHANNEL)
        yield self.reload()  # whatever changed while we were not listening

    def _connect_listening(self) -> Any:
        conn = connect(self.dsn, "kansas-listen")
        conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return conn

    def _lost(self) -> None:
        if self._reader is None:
            return
        self._count_error("listen")
        self._drop_reader()
        self._schedule_retry("LISTEN connection to PostgreSQL lost")

    def _drop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            self.reactor.removeReader(reader)
            reader.close()

    def _schedule_retry(self, why: str) -> None:
        if not self.running:
            return
        log.warn(
            "{why}; keeping the last assignment, retrying in {d:.1f} s",
            why=why,
            d=self._retry_delay,
        )
        self._retry_call = self.reactor.callLater(self._retry_delay, self._listen)
        self._retry_delay = min(self._retry_delay * 2, self.retry_max)

    # -- reloading -----------------------------------------------------------------------
    def reload(self) -> Deferred[None]:
        """Load a fresh snapshot in a thread; overlapping calls coalesce into one more."""
        if self._reloading is not None:
            self._again = True
            return self._reloading
        done = self.stats.timer("reload")
        d = deferToThread(self._load).addCallbacks(
            self._loaded, self._failed, callbackArgs=(done,), errbackArgs=(done,)
        )
        self._reloading = d
        d.addBoth(self._reload_done)
        return d

    def _count_error(self, what: str) -> None:
        self.stats.errors[what] = self.stats.errors.get(what, 0) + 1

    def _loaded(self, assignment: Assignment, done: Callable[[bool], None]) -> None:
        done(True)
        self.reloads += 1
        self.loaded_at = self.reactor.seconds()
        if assignment != self.current:
            self.current = assignment
            log.info(
                "assignment reloaded: {n} shards, {p} realm pins, {sp} realm splits,"
                " {rx} regex rules, {u} user overrides",
                n=len(assignment.shards),
                p=len(assignment.realm_pins),
                sp=len(assignment.realm_splits),
                rx=len(assignment.regex_rules),
                u=len(assignment.user_overrides),
            )
            for callback in self.on_change:
                callback(assignment)

    def _failed(self, failure: Failure, done: Callable[[bool], None]) -> None:
        done(False)
        log.warn(
            "reloading the assignment failed, keeping the last one: {e}",
            e=failure.getErrorMessage(),
        )

    def _reload_done(self, _: object) -> None:
        self._reloading = None
        if self._again:
            self._again = False
            self.reload()
