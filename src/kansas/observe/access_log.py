"""The access log: one line per request, off unless asked (``--access-log json|text``).

Lines go through ``twisted.logger`` (namespace ``kansas.access``, level info), so they
land wherever twistd logs (``--logfile``, rotated by twistd by size and on SIGUSR1).
twistd's file observer puts its own prefix before each message::

    2026-11-25T10:40:07+0000 [kansas.access#info] {"ts":"2026-11-25T10:40:07.120Z",...}

so a JSON line is the text from the first ``{`` on (``parse_line`` does that). A busy
kansas serves tens of thousands of requests a second, and formatting a line costs far
more than serving the request: that is why it is opt-in.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from twisted.logger import Logger

NAMESPACE = "kansas.access"
FORMATS = ("off", "json", "text")

log = Logger(namespace=NAMESPACE)


class AccessLog:
    __slots__ = ("json",)

    def __init__(self, fmt: str = "json") -> None:
        if fmt not in ("json", "text"):
            raise ValueError(f"access log format must be json or text, not {fmt!r}")
        self.json = fmt == "json"

    def emit(self, fields: dict[str, Any]) -> None:
        """Log one request. ``fields``: see docs/observability.md."""
        fields["ts"] = (
            datetime.fromtimestamp(fields["ts"], UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        )
        # The line is passed as a field, never as the format: it contains braces.
        log.info("{line}", line=self.format(fields))

    def format(self, fields: dict[str, Any]) -> str:
        if self.json:
            return json.dumps(fields, separators=(",", ":"))
        return (
            "{id} {listener} {method} {kind} queue={queue} realm={realm} shard={shard} "
            "rule={rule} status={status} route={route_ms}ms backend={backend_ms}ms "
            "total={total_ms}ms bytes={bytes}".format(**{k: _text(v) for k, v in fields.items()})
        )


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def parse_line(line: str) -> dict[str, Any] | None:
    """The JSON object of an access-log line as twistd wrote it (None for other lines)."""
    if f"[{NAMESPACE}#" not in line:
        return None
    start = line.find("{", line.index(f"[{NAMESPACE}#"))
    if start < 0:
        return None
    found = json.loads(line[start:])
    return found if isinstance(found, dict) else None
