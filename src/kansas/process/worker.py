"""A worker: ``python -m kansas.process.worker --control-fd N [kansas options]``.

Started by the master (``kansas.process.master``), never by hand. It reads the
listening sockets from the control socket, assembles a serving kansas
(``kansas.tap.assemble``), and adopts the sockets once Redis answers. Told to retire
(or when its master is gone, or on SIGTERM) it stops accepting, hands its caches to
its successor through the master, drains, and exits.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import FileLogObserver, Logger, formatEvent, globalLogBeginner

from kansas.process.control import ControlFactory, ControlProtocol, Message, receive_listeners
from kansas.process.sockets import accept_evenly

log = Logger()

#: How often readiness (Redis, and PostgreSQL's LISTEN) and the end of draining are
#: checked.
POLL_SECONDS = 0.2
#: A worker that cannot reach Redis serves without it (realm fallback, journalled
#: writes) after this long rather than never; the master does not take that as ready
#: for a reload while another generation serves.
REDIS_WAIT_SECONDS = 10.0
#: After the drain deadline's empty answers, time for them to reach the clients.
FLUSH_SECONDS = 1.0
#: How long the master waits for the workers' metrics snapshots (then shows the rest).
COLLECT_SECONDS = 2.0
#: A retiring worker lives at least this long (its idle connections close after 1 s).
MIN_DRAIN_SECONDS = 1.0


class Worker:
    """Drives one KansasService through ready -> serving -> retiring -> exit."""

    def __init__(
        self,
        reactor: Any,
        service: Any,
        listeners: dict[str, int],
        control_fd: int,
        drain_timeout: float,
    ) -> None:
        self.reactor = reactor
        self.service = service
        self.listeners = listeners
        self.control_fd = control_fd
        self.drain_timeout = drain_timeout
        self.ports: list[Any] = []
        self.control = ControlProtocol(self.received, self.master_gone)
        self.retiring = False
        self.exit_code = 0
        self._started = 0.0
        self._asked = 0
        self._collecting: dict[int, Deferred[list[Any]]] = {}
        self._retired_at = 0.0
        self._redis_ok = False
        self._checking = False
        self._ready_poll = LoopingCall(self._check_ready)
        self._ready_poll.clock = reactor
        self._drain_poll = LoopingCall(self._check_drained)
        self._drain_poll.clock = reactor
        self._deadline: Any = None

    def start(self) -> None:
        self._started = self.reactor.seconds()
        self.service.snapshots = self.collect_snapshots
        self.reactor.adoptStreamConnection(
            self.control_fd, socket.AF_UNIX, ControlFactory(self.control)
        )
        os.close(self.control_fd)  # the reactor holds its own duplicate
        self.service.startService()
        self._ready_poll.start(POLL_SECONDS, now=True)

    # -- becoming ready ------------------------------------------------------------------------
    def _check_ready(self) -> None:
        if not self._checking:  # a Redis call may take up to --redis-timeout
            self._checking = True
            self.service.redis_answers().addCallback(self._redis_checked)

    def _redis_checked(self, answers: bool) -> None:
        self._checking = False
        if self.retiring or self._redis_ok:
            return
        waited = self.reactor.seconds() - self._started
        if answers and not self.service.following() and waited < REDIS_WAIT_SECONDS:
            # Not yet LISTENing on PostgreSQL: a change committed now would reach this
            # worker only with the next periodic reload (and /metrics would say so).
            return
        if answers:
            self._redis_ok = True
            self._ready_poll.stop()
            self._serve()
            self.control.send({"op": "ready", "pid": os.getpid(), "redis": True})
        elif waited >= REDIS_WAIT_SECONDS and not self.ports:
            log.warn("Redis does not answer: serving without it meanwhile")
            self._serve()
            self.control.send({"op": "ready", "pid": os.getpid(), "redis": False})

    def _serve(self) -> None:
        if self.ports:
            return
        factories = {"listen": self.service.front, "internal-listen": self.service.internal}
        for name, fd in self.listeners.items():
            family = socket.socket(fileno=os.dup(fd))
            try:
                port = self.reactor.adoptStreamPort(fd, family.family, factories[name])
                accept_evenly(port)  # the accept queue is shared with the other workers
                self.ports.append(port)
            finally:
                family.close()
            os.close(fd)  # the port holds its own duplicate
        self.listeners = {}

    # -- the master's word ------------------------------------------------------------------
    def received(self, message: Message) -> None:
        op = message["op"]
        if op == "retire":
            self.retire()
        elif op == "state":
            self.service.take_over(message)
        elif op == "snapshot":
            snapshot = self.service.live.snapshot()
            self.control.send({"op": "snapshot", "id": message["id"], "snapshot": snapshot})
        elif op == "collected":
            waiting = self._collecting.pop(message["id"], None)
            if waiting is not None:
                waiting.callback(message["snapshots"])

    # -- /metrics: every worker's snapshot, gathered by the master -------------------------
    def collect_snapshots(self) -> Deferred[list[Any]]:
        """What a scrape of this worker shows: every worker's metrics (kansas.observe
        merges them). Alone, or without its master, a worker shows its own."""
        if self.retiring or not self.control.connected_:
            return succeed([self.service.live.snapshot()])
        self._asked += 1
        asked = self._asked
        d: Deferred[list[Any]] = Deferred()
        self._collecting[asked] = d
        self.control.send({"op": "collect", "id": asked})

        def timed_out() -> None:
            waiting = self._collecting.pop(asked, None)
            if waiting is not None:
                waiting.callback([self.service.live.snapshot()])

        self.reactor.callLater(COLLECT_SECONDS + 1, timed_out)
        return d

    def master_gone(self) -> None:
        if not self.retiring:
            log.warn("the master is gone: draining and exiting")
            self.retire()

    # -- retiring ---------------------------------------------------------------------------
    def retire(self) -> None:
        """Stop accepting (stop reading first, then stop listening: an adopted port does
        not shut the shared socket down), hand over, drain, exit."""
        if self.retiring:
            return
        self.retiring = True
        if self._ready_poll.running:
            self._ready_poll.stop()
        for port in self.ports:
            port.stopReading()
        for port in self.ports:
            port.stopListening()
        for fd in self.listeners.values():
            os.close(fd)  # never adopted (retired before ready)
        self.listeners = {}
        self.control.send({"op": "state", **self.service.handover()})
        self.service.retire()
        self._retired_at = self.reactor.seconds()
        self._deadline = self.reactor.callLater(self.drain_timeout, self._deadline_reached)
        self._drain_poll.start(POLL_SECONDS, now=True)

    def _check_drained(self) -> None:
        self.service.close_idle()
        retired_for = self.reactor.seconds() - self._retired_at
        if retired_for >= MIN_DRAIN_SECONDS and self.service.open_connections() == 0:
            if self._deadline.active():
                self._deadline.cancel()
            self._exit()

    def _deadline_reached(self) -> None:
        left = self.service.open_connections()
        log.warn("drain deadline reached with {n} connections open: answering them", n=left)
        self.service.front.drain()
        self.reactor.callLater(FLUSH_SECONDS, self._exit)

    def _exit(self) -> None:
        if self._drain_poll.running:
            self._drain_poll.stop()
        d = self.service.stopService()
        d.addBoth(lambda _: self.reactor.stop())


def log_line(event: dict[str, Any]) -> str:
    """twistd's format without the timestamp (the master adds its own when it relays
    them), so ``[kansas.access#info] {...}`` lines parse the same under a master."""
    level = event.get("log_level")
    name = level.name if level is not None else "info"
    return f"[{event.get('log_namespace', '-')}#{name}] {formatEvent(event)}\n"


def _log_to_stdout() -> None:
    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(sys.stdout, log_line)], redirectStandardIO=False
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--control-fd":
        print("usage: python -m kansas.process.worker --control-fd N [kansas options]",
              file=sys.stderr)  # fmt: skip
        return 2
    control_fd = int(args[1])
    # The master decides when workers stop; a terminal's Ctrl-C reaches the master only.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    control = socket.socket(fileno=control_fd)
    listeners, rest = receive_listeners(control)
    if rest:
        print("the master wrote past the listening sockets", file=sys.stderr)
        return 1
    control_fd = control.detach()

    from twisted.internet import epollreactor

    epollreactor.install()  # type: ignore[no-untyped-call]
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor

    from kansas.tap import Options, assemble

    _log_to_stdout()
    options = Options()  # type: ignore[no-untyped-call]
    options.listeners_inherited = True
    try:
        options.parseOptions(args[2:])
        service = assemble(options, reactor)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 1
    service.handle_hangup = False
    service.live.worker = str(os.getpid())
    worker = Worker(reactor, service, listeners, control_fd, options["drain-timeout"])
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(worker.retire))
    reactor.callWhenRunning(worker.start)
    reactor.run(installSignalHandlers=False)
    return worker.exit_code


if __name__ == "__main__":
    sys.exit(main())
