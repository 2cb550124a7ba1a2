"""A leaner event dispatch for the epoll reactor, on the hot path of every request.

Twisted's epoll reactor wraps every ready socket's ``doRead``/``doWrite`` in
``log.callWithLogger`` (a log-context push and pop for the legacy logging prefix), a
large share of a proxy's per-request CPU. kansas does not use legacy log prefixes, and
``_doReadOrWrite`` already catches and logs whatever a protocol raises, so kansas's
reactor dispatches directly. The commonest event, a TCP connection with bytes to read
and nothing else, is handled inline: ``_doReadOrWrite``, ``Connection.doRead`` and
``_dataReceived`` in one place, with the same outcomes. Only the epoll reactor is
changed; any other is left alone.
"""

from __future__ import annotations

import errno
import select
import sys
import types
from typing import Any

from twisted.internet import main, tcp
from twisted.logger import Logger

#: Transports whose read is ``tcp.Connection.doRead`` (checked in ``install``).
_PLAIN_TCP: frozenset[Any] = frozenset({tcp.Server, tcp.Client})
log = Logger()
_EPOLLIN = select.EPOLLIN if hasattr(select, "EPOLLIN") else 1


def _do_poll(self: Any, timeout: float | None) -> None:
    # The body of EPollReactor.doPoll (Twisted 26.10) without the per-event wrapper.
    try:
        events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    dispatch = self._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        if event != _EPOLLIN or selectable.__class__ not in _PLAIN_TCP:
            dispatch(selectable, fd, event)
            continue
        # _doReadOrWrite -> Connection.doRead -> _dataReceived, inlined.
        try:
            data = selectable.socket.recv(selectable.bufferSize)
        except BlockingIOError:
            continue
        except OSError:
            self._disconnectSelectable(selectable, main.CONNECTION_LOST, True)
            continue
        if not data:
            self._disconnectSelectable(selectable, main.CONNECTION_DONE, True)
            continue
        try:
            selectable.protocol.dataReceived(data)
        except BaseException:
            log.failure("Unhandled error in {protocol}.dataReceived",
                        protocol=selectable.protocol.__class__.__name__)  # fmt: skip
            self._disconnectSelectable(selectable, sys.exc_info()[1], True)


def install(reactor: Any) -> bool:
    """Use the lean dispatch on ``reactor`` if it is an epoll reactor; True if so."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not on Linux
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    plain = all(
        cls.doRead is tcp.Connection.doRead and cls._dataReceived is tcp.Connection._dataReceived
        for cls in _PLAIN_TCP
    )
    reactor.doIteration = types.MethodType(  # type: ignore[method-assign]
        _do_poll if plain else _dispatch_only, reactor
    )
    return True


def _dispatch_only(self: Any, timeout: float | None) -> None:
    # As _do_poll, without the inlined read (a Twisted whose TCP read differs).
    try:
        events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    dispatch = self._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is not None:
            dispatch(selectable, fd, event)
