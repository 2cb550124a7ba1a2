"""The lean epoll dispatch still reads, writes and survives a protocol's exception."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.task import Clock

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
