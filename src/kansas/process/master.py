"""The master: owns the listening sockets, keeps ``--workers`` workers running, and
replaces them generation by generation on SIGHUP without dropping a connection.

A reload starts a whole new generation from the code on disk. Only when every new
worker is ready (sockets adopted, Redis and PostgreSQL connected, assignment loaded)
are the old ones told to retire: they stop accepting, hand their state over (relayed
here to the new generation), drain and exit. A new generation that fails (a worker
exits or is not ready within ``ready_timeout``) is abandoned and the old one keeps
serving. A worker that dies is respawned, with a backoff if it keeps dying.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from kansas.process.control import ControlFactory, ControlProtocol, Message, send_listeners
from kansas.process.sockets import Listener

log = Logger()

#: Crash-loop backoff: the n-th quick death in a row waits min(CAP, BASE * 2**(n-1)).
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
#: A worker that lived this long before dying was not crash-looping.
STABLE_SECONDS = 10.0
#: How long a scrape waits for the workers' metrics before showing those it has.
COLLECT_SECONDS = 2.0
#: Beyond the drain deadline a retiring worker is given this long before SIGKILL.
KILL_GRACE_SECONDS = 5.0


class WorkerHandle:
    """What the master knows of one worker process."""

    def __init__(self, number: int, generation: int, slot: int, started: float) -> None:
        self.number = number
        self.generation = generation
        self.slot = slot
        self.started = started
        self.pid: int | None = None
        self.state = "starting"  # -> ready -> retiring -> gone
        self.process: Any = None
        self.control: ControlProtocol | None = None

    def __repr__(self) -> str:
        return f"worker {self.generation}.{self.slot} (pid {self.pid})"

    def send(self, message: Message) -> None:
        if self.control is not None:
            self.control.send(message)

    def signal(self, signum: int) -> None:
        if self.state != "gone" and self.process is not None:
            with contextlib.suppress(OSError, ProcessExitedAlready):  # it is gone anyway
                self.process.signalProcess(signum)


class _Gather:
    """One scrape's snapshots being gathered from the serving workers."""

    def __init__(self, asker: WorkerHandle, asked: int, waiting: set[int]) -> None:
        self.asker = asker
        self.asked = asked
        self.waiting = waiting
        self.snapshots: list[Any] = []
        self.timer: Any = None


class _WorkerOutput(ProcessProtocol):
    """Relays a worker's output lines to the master's log, and reports its end."""

    def __init__(self, master: Master, worker: WorkerHandle) -> None:
        self.master = master
        self.worker = worker
        self._partial: dict[int, bytes] = {}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *lines, rest = (self._partial.pop(childFD, b"") + data).split(b"\n")
        if rest:
            self._partial[childFD] = rest[-65536:]
        for line in lines:
            if line:
                text = line.decode("utf-8", "replace")
                log.info("[{worker}] {line}", worker=self.worker, line=text)

    def processEnded(self, reason: Failure) -> None:
        self.master.worker_ended(self.worker, reason.value)


class Master(Service):
    """Keeps ``count`` workers serving ``listeners``; SIGHUP replaces them all."""

    # Stubbable for tests: how a worker process and its control socket are made.
    _socketpair = staticmethod(socket.socketpair)
    _send_listeners = staticmethod(send_listeners)

    def __init__(
        self,
        reactor: Any,
        listeners: list[Listener],
        worker_args: list[str],
        count: int,
        drain_timeout: float = 60.0,
        ready_timeout: float = 60.0,
        executable: str = sys.executable,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.listeners = listeners
        self.worker_args = worker_args
        self.count = count
        self.drain_timeout = drain_timeout
        self.ready_timeout = ready_timeout
        self.executable = executable
        self.on_fatal = on_fatal or self._fatal
        self.workers: list[WorkerHandle] = []
        self.current = 0  # the generation serving (0: none yet)
        self.pending = 0  # the generation starting (0: none)
        self._generations = 0
        self._numbers = 0
        self._ready_timer: Any = None
        self._failures: dict[int, int] = {}  # slot -> quick deaths in a row
        self._respawns: dict[int, Any] = {}  # slot -> timer
        self._stopping: Deferred[None] | None = None
        self._kill_timer: Any = None
        self._interrupts = 0
        self._gathers = 0
        self._gathering: dict[int, _Gather] = {}

    # -- life cycle ------------------------------------------------------------------------
    def startService(self) -> None:
        Service.startService(self)  # type: ignore[no-untyped-call]
        self._start_generation()
        self.reactor.callWhenRunning(self._install_signals)

    def _install_signals(self) -> None:
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        signal.signal(signal.SIGINT, self._interrupted)

    def _interrupted(self, signum: int, frame: object) -> None:
        self._interrupts += 1
        if self._interrupts == 1:
            log.info("SIGINT: stopping gracefully (again to stop at once)")
            self.reactor.callFromThread(self.reactor.stop)
        else:
            for worker in self.workers:
                worker.signal(signal.SIGKILL)
            os._exit(1)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._stopping is not None:
            return self._stopping
        self._stopping = Deferred()
        for timer in [self._ready_timer, *self._respawns.values()]:
            if timer is not None and timer.active():
                timer.cancel()
        self._respawns.clear()
        live = [w for w in self.workers if w.state != "gone"]
        log.info("stopping: draining {n} workers", n=len(live))
        for worker in live:
            self._retire(worker)
        self._kill_timer = self.reactor.callLater(
            self.drain_timeout + KILL_GRACE_SECONDS, self._kill_stragglers
        )
        stopping = self._stopping
        self._check_stopped()
        return stopping

    def _check_stopped(self) -> None:
        if self._stopping is None or any(w.state != "gone" for w in self.workers):
            return
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        for listener in self.listeners:
            listener.close()
        if not self._stopping.called:
            self._stopping.callback(None)

    def _kill_stragglers(self) -> None:
        for worker in self.workers:
            if worker.state != "gone":
                log.warn("{worker} still draining past the deadline: killed", worker=worker)
                worker.signal(signal.SIGKILL)

    def _fatal(self, why: str) -> None:
        log.critical("kansas cannot start: {why}", why=why)
        sys.stderr.write(f"twistd kansas: cannot start: {why}\n")
        # twistd would exit 0 after reactor.stop(): leave with a failure instead, once
        # the shutdown (pid file, logs) is done.
        self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()

    # -- generations -----------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP: start a new generation; the current one serves until it is ready."""
        if self._stopping is not None:
            return
        if self.pending:
            log.warn("SIGHUP ignored: generation {g} is still starting", g=self.pending)
            return
        log.info("SIGHUP: starting a new generation of {n} workers", n=self.count)
        self._start_generation()

    def _start_generation(self) -> None:
        self._generations += 1
        self.pending = generation = self._generations
        for slot in range(self.count):
            self._spawn(generation, slot)
        self._ready_timer = self.reactor.callLater(
            self.ready_timeout, self._abandon, generation, f"not ready in {self.ready_timeout:g} s"
        )

    def _promote(self, generation: int) -> None:
        if self._ready_timer is not None and self._ready_timer.active():
            self._ready_timer.cancel()
        old = [w for w in self.workers if w.generation < generation and w.state != "gone"]
        self.current, self.pending = generation, 0
        pids = ", ".join(str(w.pid) for w in self._generation(generation))
        log.info(
            "kansas: generation {g} ready: {n} workers (pids {pids}); retiring {old}",
            g=generation, n=self.count, pids=pids, old=len(old),
        )  # fmt: skip
        for worker in old:
            self._retire(worker)

    def _abandon(self, generation: int, why: str) -> None:
        """A new generation failed: stop what it started; the current one keeps serving."""
        if generation != self.pending:
            return
        if self._ready_timer is not None and self._ready_timer.active():
            self._ready_timer.cancel()
        self.pending = 0
        for worker in self._generation(generation):
            worker.state = "abandoned"
            worker.signal(signal.SIGKILL)
        if not self.current:
            self.on_fatal(f"the first workers failed: {why}")
        else:
            log.error(
                "new generation {g} failed ({why}); generation {c} keeps serving",
                g=generation, why=why, c=self.current,
            )  # fmt: skip

    def _generation(self, generation: int) -> list[WorkerHandle]:
        return [w for w in self.workers if w.generation == generation and w.state != "gone"]

    def _retire(self, worker: WorkerHandle) -> None:
        if worker.state in ("retiring", "gone"):
            return
        worker.state = "retiring"
        worker.send({"op": "retire"})

    # -- one worker --------------------------------------------------------------------------
    def _spawn(self, generation: int, slot: int) -> WorkerHandle:
        self._numbers += 1
        worker = WorkerHandle(self._numbers, generation, slot, self.reactor.seconds())
        parent, child = self._socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._send_listeners(parent, {lst.name: lst.fileno() for lst in self.listeners})
            env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID")}
            argv = [self.executable, "-m", "kansas.process.worker", "--control-fd", "3"]
            worker.process = self.reactor.spawnProcess(
                _WorkerOutput(self, worker), self.executable, [*argv, *self.worker_args],
                env=env, childFDs={0: "w", 1: "r", 2: "r", 3: child.fileno()},
            )  # fmt: skip
            worker.pid = worker.process.pid
            control = ControlProtocol(lambda message: self._received(worker, message), lambda: None)
            worker.control = control
            self.reactor.adoptStreamConnection(
                parent.fileno(), socket.AF_UNIX, ControlFactory(control)
            )
        finally:
            child.close()
            parent.close()  # the reactor holds its own duplicate
        self.workers.append(worker)
        return worker

    def _received(self, worker: WorkerHandle, message: Message) -> None:
        op = message["op"]
        if op == "ready" and worker.state == "starting":
            if (
                not message.get("redis", True)
                and self.current
                and worker.generation == self.pending
            ):
                # Serving without Redis is better than not serving at all, but not
                # better than the generation serving now: wait for Redis.
                log.warn("{worker} has no Redis yet: generation {g} waits", worker=worker,
                         g=worker.generation)  # fmt: skip
                return
            worker.state = "ready"
            if worker.generation == self.pending:
                if all(w.state == "ready" for w in self._generation(self.pending)):
                    self._promote(worker.generation)
            else:
                log.info("{worker} is back", worker=worker)
        elif op == "collect":
            self._collect(worker, message["id"])
        elif op == "snapshot":
            self._snapshot_received(worker, message)
        elif op == "state":
            # A retiring worker's caches, for whoever serves now.
            for successor in self._generation(self.current):
                if successor.state == "ready":
                    successor.send(message)
        else:
            log.warn("{worker} sent an unexpected {op!r}", worker=worker, op=op)

    # -- metrics: a scrape reaches one worker, which shows every worker's -----------------
    def _collect(self, asker: WorkerHandle, asked: int) -> None:
        self._gathers += 1
        gather = _Gather(asker, asked, {w.number for w in self.workers if w.state == "ready"})
        self._gathering[self._gathers] = gather
        for worker in self.workers:
            if worker.number in gather.waiting:
                worker.send({"op": "snapshot", "id": self._gathers})
        gather.timer = self.reactor.callLater(COLLECT_SECONDS, self._gathered, self._gathers)
        if not gather.waiting:
            self._gathered(self._gathers)

    def _snapshot_received(self, worker: WorkerHandle, message: Message) -> None:
        gather = self._gathering.get(message["id"])
        if gather is None or worker.number not in gather.waiting:
            return
        gather.waiting.discard(worker.number)
        gather.snapshots.append(message["snapshot"])
        if not gather.waiting:
            self._gathered(message["id"])

    def _gathered(self, number: int) -> None:
        gather = self._gathering.pop(number, None)
        if gather is None:
            return
        if gather.timer is not None and gather.timer.active():
            gather.timer.cancel()
        gather.asker.send({"op": "collected", "id": gather.asked, "snapshots": gather.snapshots})

    def worker_ended(self, worker: WorkerHandle, status: object) -> None:
        state, worker.state = worker.state, "gone"
        self.workers.remove(worker)
        lived = self.reactor.seconds() - worker.started
        if state == "retiring" or self._stopping is not None:
            log.info("{worker} has drained and exited", worker=worker)
        elif state == "abandoned":
            pass
        elif worker.generation == self.pending:
            self._abandon(worker.generation, f"{worker} exited: {status}")
        elif worker.generation == self.current:
            quick = self._failures.get(worker.slot, 0) + 1 if lived < STABLE_SECONDS else 1
            self._failures[worker.slot] = quick
            delay = 0.0 if quick == 1 else min(
                BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (quick - 2)
            )  # fmt: skip
            log.warn(
                "{worker} died ({status}) after {lived:.1f} s; respawning in {delay:g} s",
                worker=worker, status=status, lived=lived, delay=delay,
            )  # fmt: skip
            self._respawns[worker.slot] = self.reactor.callLater(
                delay, self._respawn, worker.generation, worker.slot
            )
        self._check_stopped()

    def _respawn(self, generation: int, slot: int) -> None:
        self._respawns.pop(slot, None)
        if self._stopping is None and generation == self.current:
            self._spawn(generation, slot)
