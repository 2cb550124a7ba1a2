"""What ``kansas-ctl`` reads from a running kansas's internal listener (``--internal URL``):
its /metrics (parsed with prometheus_client's own parser) and /debug/trace."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from kansas.errors import KansasError

TIMEOUT_SECONDS = 5.0

#: name -> [(labels, value)] of every sample
Samples = dict[str, list[tuple[dict[str, str], float]]]


def _get(base: str, path: str) -> bytes:
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise KansasError(f"bad --internal URL {base!r}: expected http://HOST:PORT")
    url = base.rstrip("/") + path
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as reply:
            return reply.read()  # type: ignore[no-any-return]
    except urllib.error.HTTPError as e:
        raise KansasError(f"kansas at {base} answered {e.code} for {path}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        raise KansasError(f"cannot reach kansas at {base}: {why}") from None


def metrics(base: str) -> Samples:
    """Every sample kansas exposes at ``base``/metrics."""
    text = _get(base, "/metrics").decode("utf-8", "replace")
    found: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    except ValueError as e:
        raise KansasError(f"kansas at {base} sent metrics that do not parse: {e}") from None
    return found


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """One metric's values keyed by one label (summed over the other labels)."""
    out: dict[str, float] = {}
    for labels, value in samples.get(name, []):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def total(samples: Samples, name: str) -> float:
    return sum(value for _labels, value in samples.get(name, []))


def trace(base: str, queue_id: str) -> dict[str, Any]:
    """What kansas at ``base`` knows of a queue: its cached route, its recent requests."""
    query = urllib.parse.urlencode({"queue": queue_id})
    raw = _get(base, f"/debug/trace?{query}")
    try:
        found = json.loads(raw)
    except ValueError:
        raise KansasError(f"kansas at {base} sent a trace that is not JSON") from None
    if not isinstance(found, dict):
        raise KansasError(f"kansas at {base} sent a trace that is not an object")
    return found
