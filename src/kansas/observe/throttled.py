"""Warnings that could come once per request, logged at most once a minute per kind.

A shard answering something kansas cannot use is worth a warning the operator sees,
but not ten thousand of them a second: the first of each kind is logged at once, the
rest are counted and summed up in the next line of that kind.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="kansas.proxy")

#: Seconds between two lines of the same kind.
INTERVAL = 60.0
#: Kinds remembered (keys are shard x problem: few; the bound is a safety net).
MAX_KINDS = 1000


class ThrottledWarnings:
    def __init__(self, clock: IReactorTime, interval: float = INTERVAL) -> None:
        self.clock = clock
        self.interval = interval
        #: kind -> (when its last line was logged, how many were not logged since)
        self._kinds: dict[tuple[str, ...], tuple[float, int]] = {}

    def warn(self, kind: tuple[str, ...], message: str) -> bool:
        """Log ``message`` unless a line of this ``kind`` was logged within the
        interval; True if it was logged."""
        now = self.clock.seconds()
        last, quiet = self._kinds.get(kind, (None, 0))
        if last is not None and now - last < self.interval:
            self._kinds[kind] = (last, quiet + 1)
            return False
        if len(self._kinds) >= MAX_KINDS:
            self._kinds.clear()
        self._kinds[kind] = (now, 0)
        if quiet:
            message += f" (and {quiet} more like it in the last {now - last:.0f} s)"  # type: ignore[operator]
        log.warn("{message}", message=message)
        return True
