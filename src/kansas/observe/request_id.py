"""Request ids: one per request, sent to the shard and back to the client (``X-Request-Id``).

An id is this process's random prefix and a counter (``3f9a1c02b7d4-1a2b``): unique
across processes and restarts in practice, and far cheaper than ``os.urandom`` per
request. An incoming ``X-Request-Id`` is kept only from a caller kansas trusts (the
internal listener, or a front named by ``--trust-real-ip-from``) and only if it is
short and plain; anyone else's is replaced, so a client cannot forge what the logs
and the shard see.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable

HEADER = b"X-Request-Id"
LOWER = b"x-request-id"
#: What an accepted incoming id may look like: short, no spaces, no quotes, no controls.
_SANE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:+=/@-]{0,127}")


class RequestIds:
    __slots__ = ("new",)

    def __init__(self, prefix: bytes | None = None) -> None:
        if prefix is None:
            prefix = os.urandom(6).hex().encode()
        if b"%" in prefix:
            raise ValueError("a request id prefix cannot contain '%'")
        #: A new id: ``next`` on a ``map`` of ``bytes.__mod__`` over a counter, so making
        #: one runs no Python code at all (it is made for every request).
        self.new: Callable[[], bytes] = map((prefix + b"-%x").__mod__, itertools.count(1)).__next__

    def choose(self, incoming: bytes | None, trusted: bool) -> bytes:
        """The caller's id if it may give one and it is sane, else a new one."""
        if incoming is not None and trusted and _SANE.fullmatch(incoming) is not None:
            return incoming
        return self.new()


def sane(value: bytes) -> bool:
    return _SANE.fullmatch(value) is not None
