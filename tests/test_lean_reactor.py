"""The lean epoll dispatch still reads, writes and survives a protocol's exception."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientCreator, Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from kansas import lean_reactor

epollreactor = pytest.importorskip("twisted.internet.epollreactor")


class Reader:
    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.got: list[bytes] = []
        self.lost: list[object] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.got.append(self.sock.recv(100))
        if self.fail:
            raise RuntimeError("protocol bug")

    def connectionLost(self, reason: object) -> None:
        self.lost.append(reason)

    def logPrefix(self) -> str:
        return "test"


def test_dispatches_reads_and_contains_errors() -> None:
    reactor = epollreactor.EPollReactor()
    try:
        assert lean_reactor.install(reactor)
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        good, bad = Reader(a), Reader(c, fail=True)
        reactor.addReader(good)
        reactor.addReader(bad)
        b.sendall(b"hello")
        d.sendall(b"boom")
        reactor.doIteration(0)
        assert good.got == [b"hello"] and not good.lost
        # The failing protocol is disconnected, as Twisted would do, and nothing escapes.
        assert bad.got == [b"boom"] and len(bad.lost) == 1
        for s in (a, b, c, d):
            s.close()
    finally:
        reactor._poller.close()


def test_other_reactors_are_left_alone() -> None:
    assert lean_reactor.install(Clock()) is False


class Peer(Protocol):
    """Records what a TCP connection delivers, and raises once if told to."""

    def __init__(self, fail_on: bytes = b"") -> None:
        self.got = b""
        self.lost: list[type[BaseException]] = []
        self.fail_on = fail_on

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if self.fail_on and self.fail_on in self.got:
            raise RuntimeError("protocol bug")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason.type)  # type: ignore[arg-type]


def iterate_until(reactor: Any, done: Callable[[], bool]) -> None:
    for _ in range(200):  # bounded: each iteration waits at most 50 ms
        if done():
            return
        reactor.runUntilCurrent()  # connecting and closing use delayed calls
        reactor.doIteration(0.05)
    raise AssertionError("the reactor never got there")


def tcp_pair(reactor: Any, server: Peer) -> tuple[Peer, Any]:
    """A TCP connection through ``reactor``: its client side, and the server's port."""
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
    client = Peer()
    endpoint = ClientCreator(reactor, lambda: client)
    endpoint.connectTCP("127.0.0.1", port.getHost().port)
    iterate_until(reactor, lambda: client.transport is not None and server.transport is not None)
    return client, port


def test_tcp_reads_are_inlined_with_twisteds_outcomes() -> None:
    """Bytes, an orderly close, and a protocol that raises: as Twisted's own doRead."""
    reactor = epollreactor.EPollReactor()
    try:
        assert lean_reactor.install(reactor)
        assert reactor.doIteration.__func__ is lean_reactor._do_poll
        errors: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(errors.append)
        try:
            server = Peer(fail_on=b"boom")
            client, port = tcp_pair(reactor, server)
            client.transport.write(b"hello")
            iterate_until(reactor, lambda: server.got == b"hello")
            server.transport.write(b"back")
            iterate_until(reactor, lambda: client.got == b"back")
            client.transport.write(b"boom")
            iterate_until(reactor, lambda: bool(server.lost and client.lost))
            assert server.lost == [RuntimeError] and client.lost == [ConnectionDone]
            assert any("dataReceived" in str(e.get("log_format")) for e in errors)
            # An orderly close by the peer: connectionLost with ConnectionDone.
            quiet = Peer()
            other, port2 = tcp_pair(reactor, quiet)
            other.transport.loseConnection()
            iterate_until(reactor, lambda: bool(quiet.lost))
            assert quiet.lost == [ConnectionDone]
        finally:
            globalLogPublisher.removeObserver(errors.append)
        port.stopListening()
        port2.stopListening()
    finally:
        reactor._poller.close()
