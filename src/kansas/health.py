"""Which shards are down, learnt passively (failed connections) and actively (probes).

A shard is marked down the moment kansas cannot connect to it, and up again the moment
a probe connects or any request gets an answer. Marking it down also gives up on the
requests waiting at it that have not had an answer byte (``on_down``): a shard whose
link died silently answers them never, and they are parked and replayed like those cut
by a restart, instead of waiting for TCP to retransmit or for ``--backend-timeout``.
Probes are plain TCP connects: cheap for Tornado, and a restarting Tornado only listens
once it has reloaded its queues. Down shards are probed every ``interval``; healthy
ones ten times less often. Each change of state is logged once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kansas.model import Shard
from kansas.proxy.forwarding import Directory

log = Logger()

#: Healthy shards are probed once every this many intervals.
UP_PROBE_EVERY = 10


class _Probe(Protocol):
    def __init__(self, factory: _ProbeFactory) -> None:
        self.probe = factory

    def connectionMade(self) -> None:
        self.probe.done(None)
        assert self.transport is not None
        self.transport.loseConnection()


class _ProbeFactory(ClientFactory):
    noisy = False

    def __init__(self, monitor: HealthMonitor, shard: Shard) -> None:
        self.monitor = monitor
        self.shard = shard
        self.started = monitor.reactor.seconds()

    def buildProtocol(self, addr: Any) -> _Probe:
        return _Probe(self)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.done(reason.getErrorMessage())

    def done(self, error: str | None) -> None:
        monitor = self.monitor
        monitor._probing.discard(self.shard.name)
        if error is None:
            monitor.succeeded(self.shard.name)
        elif monitor.last_answer.get(self.shard.name, -1.0) < self.started:
            monitor.failed(self.shard.name, error)
        # else: the shard has answered since this probe began (a link that healed
        # while its SYN was lost): a stale failure, which must not mark it down again


class HealthMonitor:
    def __init__(
        self,
        reactor: Any,
        directory: Directory,
        interval: float = 1.0,
        probe_timeout: float = 2.0,
    ) -> None:
        self.reactor = reactor
        self.directory = directory
        self.interval = interval
        self.probe_timeout = probe_timeout
        #: name -> (since, why) for every shard believed down
        self.down: dict[str, tuple[float, str]] = {}
        #: called whenever a shard is seen to answer (probe or request), down before or not
        self.on_healthy: list[Callable[[str], object]] = []
        #: called with the shard and why, when a shard is marked down
        self.on_down: list[Callable[[Shard, str], object]] = []
        #: name -> when the shard last answered (probe or request)
        self.last_answer: dict[str, float] = {}
        self._probing: set[str] = set()
        self._rounds = 0
        self._loop = LoopingCall(self._probe_round)
        self._loop.clock = reactor

    def start(self) -> None:
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def is_down(self, name: str) -> bool:
        return name in self.down

    def failed(self, name: str, why: str) -> None:
        if name in self.down or name not in self.directory.current.shards:
            return
        self.down[name] = (self.reactor.seconds(), why)
        log.warn("shard {name} is down: {why}", name=name, why=why)
        shard = self.directory.current.shards[name]
        for callback in self.on_down:
            callback(shard, why)

    def succeeded(self, name: str) -> None:
        self.last_answer[name] = self.reactor.seconds()
        entry = self.down.pop(name, None)
        if entry is not None:
            took = self.reactor.seconds() - entry[0]
            log.info("shard {name} is up again after {took:.1f} s", name=name, took=took)
        for callback in self.on_healthy:
            callback(name)

    def take_over(self, down: dict[str, list[Any]]) -> None:
        """A predecessor's view of which shards are down (``{name: [since, why]}``):
        park for them at once instead of learning it from a failed request."""
        for name, (since, why) in down.items():
            if name in self.directory.current.shards and name not in self.down:
                self.down[name] = (float(since), str(why))

    def probe(self, name: str) -> None:
        """Find out now whether a shard answers (a long-poll was cut: is it going away?)."""
        shard = self.directory.current.shards.get(name)
        if shard is None or name in self._probing:
            return
        self._probing.add(name)
        host, port = shard.address
        self.reactor.connectTCP(host, port, _ProbeFactory(self, shard), timeout=self.probe_timeout)

    def _probe_round(self) -> None:
        self._rounds += 1
        # Shards that left the assignment are not down any more, just gone.
        for name in [n for n in self.down if n not in self.directory.current.shards]:
            del self.down[name]
        everyone = self._rounds % UP_PROBE_EVERY == 0
        for name in self.directory.current.shards:
            if everyone or name in self.down:
                self.probe(name)
