"""Listening sockets the master creates once and every worker generation shares.

Only the master binds. A port opened with ``listenTCP`` would ``shutdown()`` the shared
socket when a worker stops listening, cutting off its successor; an adopted port does
not. The endpoint strings are those of ``--listen``/``--internal-listen`` (the subset a
master can bind itself: ``tcp``, ``tcp6``, ``unix``, and ``systemd`` socket activation).
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass

from twisted.internet import tcp
from twisted.internet.endpoints import serverFromString

from kansas.errors import ConfigError

#: Large enough that a burst of connections waits in the kernel while a worker restarts
#: (the kernel caps it at net.core.somaxconn).
DEFAULT_BACKLOG = 4096
#: Connections a worker accepts from the shared queue each time it is told the queue is
#: ready. Twisted accepts up to 100 (and more after each full batch), so one worker
#: awake first would take a whole burst of keep-alive connections, nginx's upstream
#: pool or a load test, and keep them for hours while the others idle. One at a time,
#: as nginx does (``multi_accept off``): every worker woken for the queue gets some, and
#: a busy worker, back in epoll later, gets fewer.
ACCEPTS_PER_WAKEUP = 1


@dataclass(frozen=True)
class Listener:
    """One bound, listening, non-blocking socket, named after its option."""

    name: str
    description: str
    sock: socket.socket

    @property
    def family(self) -> int:
        return int(self.sock.family)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def split_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """``"tcp:9799:interface=127.0.0.1"`` -> ``("tcp", ["9799"], {"interface": ...})``;
    a backslash escapes the next character, as in Twisted's endpoint strings."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    kind, args, kwargs = parts[0], [], {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq:
            kwargs[key] = value
        else:
            args.append(part)
    return kind, args, kwargs


def with_backlog(description: str) -> str:
    """``description`` with ``backlog=DEFAULT_BACKLOG`` if it is a ``tcp``, ``tcp6`` or
    ``unix`` endpoint that names none: Twisted's default (50) overflows when thousands
    of clients connect at once (after an nginx reload, say), and every dropped SYN
    costs its client a second or more."""
    kind, _args, kwargs = split_endpoint(description)
    if kind in ("tcp", "tcp6", "unix") and "backlog" not in kwargs:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


def _backlog(kwargs: dict[str, str]) -> int:
    return int(kwargs.get("backlog", DEFAULT_BACKLOG))


def bind(name: str, description: str) -> Listener:
    """Create the listening socket ``description`` names, or raise ConfigError."""
    try:
        kind, args, kwargs = split_endpoint(description)
        if kind in ("tcp", "tcp6"):
            family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
            port = int(args[0] if args else kwargs["port"])
            interface = kwargs.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _listen(sock, (interface, port), _backlog(kwargs))
        elif kind == "unix":
            path = args[0] if args else kwargs["address"]
            _remove_stale_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            _listen(sock, path, _backlog(kwargs))
            os.chmod(path, int(kwargs.get("mode", "666"), 8))
        elif kind == "systemd":
            sock = _inherited(description)
        else:
            raise ConfigError(f"endpoint type {kind!r} cannot be shared with workers")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"bad --{name} endpoint {description!r}: {e!r}") from None
    except OSError as e:
        raise ConfigError(f"cannot listen on {description!r} (--{name}): {e.strerror}") from None
    sock.setblocking(False)
    sock.set_inheritable(False)
    return Listener(name, description, sock)


def _listen(sock: socket.socket, address: str | tuple[str, int], backlog: int) -> None:
    try:
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise


def _remove_stale_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # left behind by a previous master
    except FileNotFoundError:
        pass


def _inherited(description: str) -> socket.socket:
    """A socket systemd passed (socket activation): ``systemd:domain=INET:index=0``.

    Twisted reads (and removes) systemd's LISTEN_FDS when its endpoints module is
    imported, so its systemd endpoint parser is the one record of what was passed."""
    endpoint = serverFromString(None, description)  # type: ignore[no-untyped-call]
    fd = os.dup(endpoint.fileno)
    return socket.socket(endpoint.addressFamily, socket.SOCK_STREAM, fileno=fd)


def accept_evenly(port: object, per_wakeup: int = ACCEPTS_PER_WAKEUP) -> None:
    """Hold an adopted TCP port to ``per_wakeup`` accepts per readiness event (see
    ACCEPTS_PER_WAKEUP). A port of another kind is left as it is."""
    if not isinstance(port, tcp.Port):
        return
    accept = port.doRead

    def doRead() -> None:  # the name the reactor calls
        port.numberAccepts = per_wakeup  # Twisted grows it after every full batch
        accept()  # type: ignore[no-untyped-call]

    port.doRead = doRead  # type: ignore[method-assign]
