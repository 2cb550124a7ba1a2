"""Send at once when nothing is queued: half the syscalls of ``transport.write``.

``transport.write`` only buffers: the bytes go out on the reactor's next turn, after
registering the socket for writability and unregistering it again (two ``epoll_ctl``
calls and an extra wake-up per response). A proxy writes one small answer at a time,
so when the transport's buffer is empty kansas sends directly, and hands Twisted only
what the kernel did not take (or the error, which Twisted then reports as usual).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor

#: Transports sent on with ``socket.send`` itself (``writeSomeData`` without its
#: memoryview and EINTR loop: Python retries EINTR already).
_TCP: frozenset[Any] = frozenset({tcp.Server, tcp.Client})


def _nothing_queued(transport: FileDescriptor) -> bool:
    return bool(
        transport.connected
        and not transport.disconnecting
        and not transport._tempDataLen
        and len(transport.dataBuffer) == transport.offset
    )


def send_now(transport: Any, data: bytes) -> None:
    if transport.__class__ in _TCP:
        if not transport.TLS and _nothing_queued(transport):
            try:
                sent = transport.socket.send(data)
            except OSError:  # EAGAIN, or an error Twisted meets again on its own write
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
    elif isinstance(transport, FileDescriptor) and _nothing_queued(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
        # Partial send or an error: Twisted buffers the rest, or finds the error again
        # on its own write and closes the connection the usual way.
    transport.write(data)


def has_unread(transport: Any) -> bool:
    """Whether the client has sent bytes the reactor has not read yet (a request that
    crossed our decision to close an idle connection: closing now would lose it)."""
    handle = getattr(transport, "getHandle", lambda: None)()
    if not isinstance(handle, socket.socket):
        return False
    try:
        return bool(handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing to read (EAGAIN), or the connection is gone already
        return False
