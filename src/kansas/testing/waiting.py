"""Polling with a deadline: what tests wait with, instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def until(condition: Callable[[], Any], seconds: float, what: str, step: float = 0.05) -> Any:
    """Poll ``condition`` until it is truthy (returned) or ``seconds`` pass (fail)."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not after {seconds} s"
        time.sleep(step)
