"""kansas-load as a subprocess against a running kansas, for end-to-end scenarios.

A scenario starts the load, waits until the clients all long-poll (their requests
parked at the demo shards), does its harm (restart a shard, reload kansas, …), and
reads the load's JSON report at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kansas.testing.client import call
from kansas.testing.processes import CHECKOUT, DemoShardProcess, KansasProcess


class LoadRun:
    def __init__(
        self,
        kansas: KansasProcess,
        report: Path,
        secret: str,
        realms: str,
        clients: int,
        duration: float,
        extra: Sequence[str] = (),
    ) -> None:
        self.report = report
        argv = [sys.executable, "-m", "kansas.load", "--quiet", "--json-report", str(report),
                "--public", f"http://127.0.0.1:{kansas.public_port}",
                "--internal", f"http://127.0.0.1:{kansas.internal_port}",
                "--secret", secret, "--realms", realms, "--clients", str(clients),
                "--duration", str(duration), "--event-rate", "20", "--drain", "40",
                *extra]  # fmt: skip
        self.proc = subprocess.Popen(argv, cwd=CHECKOUT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def running(self) -> None:
        """Fail the scenario if the load has already ended."""
        assert self.proc.poll() is None, self.proc.communicate()

    def wait_parked(self, shards: Sequence[DemoShardProcess], n: int, seconds: float = 90) -> None:
        """Until ``n`` long-polls wait at the shards (every client is polling)."""
        deadline = time.monotonic() + seconds
        while parked(shards) < n:
            self.running()
            assert time.monotonic() < deadline, "the clients never all long-polled"
            time.sleep(0.1)

    def hold(self, seconds: float) -> None:
        """Let the scenario last this long (its length, not a synchronisation)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.running()
            time.sleep(0.1)

    def finish(self) -> tuple[int, dict[str, Any]]:
        """Wait for the load to end: its exit status and its report."""
        output, _ = self.proc.communicate(timeout=180)
        print(output)
        return self.proc.returncode, json.loads(self.report.read_text())


def parked(shards: Sequence[DemoShardProcess]) -> int:
    """Long-polls waiting at these demo shards right now."""
    held = 0
    for shard in shards:
        queues = call(shard.port, "GET", "/demo/queues", timeout=30).json["queues"]
        held += sum(1 for q in queues if q["parked"])
    return held
