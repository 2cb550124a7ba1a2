"""The pure parts of the shard-side protocol: notification ids, reception state, cuts.

No I/O and no clock of their own (``now`` is passed in), so the demo shard and the
tests share them. See docs/transparent-moves.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The header kansas stamps on every notification it forwards.
NOTIFICATION_HEADER = "X-Kansas-Notification"
#: kansas keeps a notification for a down shard at most 120 s: a gap older than this
#: can never be filled.
GAP_SECONDS = 130.0
#: Shard endpoints.
PREPARE_PATH = b"/api/internal/kansas/prepare"
FENCE_PATH = b"/api/internal/kansas/fence"
EXPORT_PATH = b"/api/internal/kansas/export"
IMPORT_PATH = b"/api/internal/kansas/import"
FINISH_PATH = b"/api/internal/kansas/finish"
#: The longest a fence call may wait.
MAX_FENCE_TIMEOUT = 30.0
#: Queues per batch, and how long a batch may hold its clients' requests (seconds).
DEFAULT_BATCH = 50
DEFAULT_DEADLINE = 10.0

_ID = re.compile(r"([0-9a-f]{1,32}):([1-9][0-9]{0,17})")


def parse_notification_id(value: str | None) -> tuple[str, int] | None:
    """``"<origin>:<seq>"`` -> (origin, seq); None if absent or malformed."""
    if not value:
        return None
    match = _ID.fullmatch(value.strip())
    if match is None:
        return None
    return match.group(1), int(match.group(2))


@dataclass
class _Origin:
    low: int
    above: dict[int, float] = field(default_factory=dict)  # seq -> when it arrived
    high: int = 0

    def advance(self, now: float) -> None:
        above = self.above
        while above:
            if self.low + 1 in above:
                del above[self.low + 1]
                self.low += 1
                continue
            first = min(above)
            if now - above[first] < GAP_SECONDS:
                return
            # The gap before ``first`` is too old to be filled: skip it.
            self.low = first - 1


class Reception:
    """Which notifications a shard has received, per origin: a watermark and the ones
    received above it."""

    def __init__(self) -> None:
        self._origins: dict[str, _Origin] = {}

    def receive(self, origin: str, seq: int, now: float) -> None:
        state = self._origins.get(origin)
        if state is None:
            # First contact: what was sent before does not concern this shard.
            self._origins[origin] = _Origin(low=seq, high=seq)
            return
        state.high = max(state.high, seq)
        if seq > state.low:
            state.above[seq] = now
            state.advance(now)

    def seen(self) -> dict[str, int]:
        """The highest seq received per origin."""
        return {origin: state.high for origin, state in self._origins.items()}

    def watermarks(self, now: float) -> dict[str, int]:
        for state in self._origins.values():
            state.advance(now)
        return {origin: state.low for origin, state in self._origins.items()}

    def covers(self, wanted: Mapping[str, int], now: float) -> bool:
        """True if every seq up to ``wanted[origin]`` has been received, every origin."""
        marks = self.watermarks(now)
        return all(marks.get(origin, 0) >= seq for origin, seq in wanted.items())

    def cut(self, now: float) -> Cut:
        self.watermarks(now)
        return Cut(
            {origin: (state.low, frozenset(state.above)) for origin, state in self._origins.items()}
        )


@dataclass(frozen=True)
class Cut:
    """The notifications a shard had received at an instant: per origin, a watermark
    and the seqs received above it."""

    origins: Mapping[str, tuple[int, frozenset[int]]]

    def __contains__(self, notification: object) -> bool:
        if not isinstance(notification, tuple):
            return False
        origin, seq = notification
        entry = self.origins.get(origin)
        if entry is None:
            return False
        low, above = entry
        return bool(seq <= low or seq in above)

    def high(self) -> dict[str, int]:
        """Per origin, the highest seq in the cut: what the new shard must have received
        before it imports (else a notification of the cut could still reach it later,
        and be applied a second time)."""
        return {o: max(low, *above) if above else low for o, (low, above) in self.origins.items()}

    def to_json(self) -> dict[str, Any]:
        return {o: {"low": low, "above": sorted(above)} for o, (low, above) in self.origins.items()}

    @classmethod
    def from_json(cls, data: Any) -> Cut:
        if not isinstance(data, dict):
            raise ValueError("a cut is an object")
        origins: dict[str, tuple[int, frozenset[int]]] = {}
        for origin, entry in data.items():
            low, above = entry["low"], entry["above"]
            if not isinstance(low, int) or not all(isinstance(s, int) for s in above):
                raise ValueError(f"bad cut entry for origin {origin!r}")
            origins[str(origin)] = (low, frozenset(above))
        return cls(origins)
