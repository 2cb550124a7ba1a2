"""The control socket between the master and a worker: JSON messages, one per line.

The master writes the listening descriptors (SCM_RIGHTS) into a fresh socket pair
before the worker exists, so the worker can read them synchronously at start-up. After
that both ends speak line-delimited JSON through Twisted (``ControlProtocol``).

Messages (``op``):
  master -> worker  ``sockets``  (with the descriptors) the names of the listeners
  worker -> master  ``ready``    sockets, Redis, PostgreSQL and routing state in hand
  master -> worker  ``retire``   stop accepting, hand over state, drain, exit
  worker -> master  ``state``    what a retiring worker hands its successors
  master -> worker  ``state``    the same, relayed to the new generation
  worker -> master  ``collect``  a scrape of /metrics: gather every worker's metrics
  master -> worker  ``snapshot`` send your metrics snapshot (answered with ``snapshot``)
  master -> worker  ``collected`` every ready worker's snapshot, for the one that asked
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

Message = dict[str, Any]

#: A handed-over route cache is the largest message (~100 bytes per queue).
MAX_MESSAGE_BYTES = 128 * 1024 * 1024


class ControlError(Exception):
    """The other end broke the control protocol."""


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class MessageDecoder:
    """Bytes in, messages out (I/O-free)."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_bytes

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        *lines, rest = self._buffer.split(b"\n")
        if len(rest) > self._max:
            raise ControlError(f"control message over {self._max} bytes")
        self._buffer = bytearray(rest)
        messages = []
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError as e:
                raise ControlError(f"bad control message: {e}") from None
            if not isinstance(message, dict) or not isinstance(message.get("op"), str):
                raise ControlError(f"bad control message: {line[:80]!r}")
            messages.append(message)
        return messages


# -- descriptors, before the reactor runs ---------------------------------------------
def send_listeners(
    sock: socket.socket,
    listeners: dict[str, int],
    send_fds: Callable[..., int] = socket.send_fds,
) -> None:
    """Write the ``sockets`` message carrying every listening descriptor."""
    names = list(listeners)
    send_fds(sock, [encode({"op": "sockets", "names": names})], [listeners[n] for n in names])


def receive_listeners(
    sock: socket.socket,
    timeout: float = 10.0,
    recv_fds: Callable[..., tuple[bytes, list[int], int, Any]] = socket.recv_fds,
) -> tuple[dict[str, int], bytes]:
    """Read the ``sockets`` message: ``({name: fd}, bytes read past it)``."""
    sock.settimeout(timeout)
    data, fds = b"", []
    try:
        while b"\n" not in data:
            chunk, more, _flags, _addr = recv_fds(sock, 65536, 16)
            if not chunk:
                raise ControlError("the master closed the control socket")
            data += chunk
            fds += more
    finally:
        sock.settimeout(None)
    line, _, rest = data.partition(b"\n")
    message = MessageDecoder().feed(line + b"\n")[0]
    names = message.get("names")
    if message["op"] != "sockets" or not isinstance(names, list) or len(names) != len(fds):
        raise ControlError(f"expected the listening sockets, got {line[:80]!r}")
    for fd in fds:
        os.set_inheritable(fd, False)  # received descriptors arrive inheritable
    return dict(zip(names, fds, strict=True)), rest


class ControlProtocol(Protocol):
    """One end of a control socket, once the reactor runs."""

    def __init__(
        self,
        on_message: Callable[[Message], None],
        on_lost: Callable[[], None],
        decoder: MessageDecoder | None = None,
    ) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.decoder = decoder or MessageDecoder()
        self.connected_ = False

    def connectionMade(self) -> None:
        self.connected_ = True

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except ControlError:
            self.transport.abortConnection()  # type: ignore[union-attr]
            raise
        for message in messages:
            self.on_message(message)

    def send(self, message: Message) -> None:
        if self.transport is not None and self.connected_:
            self.transport.write(encode(message))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_ = False
        self.on_lost()


class ControlFactory(Factory):
    """Builds the one ControlProtocol of an adopted control socket."""

    noisy = False

    def __init__(self, protocol: ControlProtocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return self.protocol_instance
