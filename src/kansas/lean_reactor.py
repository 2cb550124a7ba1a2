"""A leaner event dispatch for the epoll reactor, on the hot path of every request.

Twisted's epoll reactor wraps every ready socket's ``doRead``/``doWrite`` in
``log.callWithLogger`` (a log-context push and pop for the legacy logging prefix), a
large share of a proxy's per-request CPU. kansas does not use legacy log prefixes, and
``_doReadOrWrite`` already catches and logs whatever a protocol raises, so kansas's
reactor dispatches directly. Only the epoll reactor is changed; any other is left alone.
"""

from __future__ import annotations

import errno
import types
from typing import Any


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
        if selectable is not None:
            dispatch(selectable, fd, event)


def install(reactor: Any) -> bool:
    """Use the lean dispatch on ``reactor`` if it is an epoll reactor; True if so."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not on Linux
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    reactor.doIteration = types.MethodType(_do_poll, reactor)  # type: ignore[method-assign]
    return True
