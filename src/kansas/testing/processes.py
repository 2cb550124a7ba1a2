"""Real kansas and demo-shard processes for end-to-end tests (and the demo stack).

Each child logs to a file; readiness is a line in that file or an open port, polled
with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from kansas.testing.servers import STARTUP_DEADLINE_SECONDS, ServerError, free_port

#: The checkout holding twisted/plugins/ (so twistd finds kansas without installing it).
CHECKOUT = Path(__file__).resolve().parents[3]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Child:
    """A subprocess with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        #: ``ip netns exec NAME`` to run it in another network namespace
        self.prefix: list[str] = []
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(CHECKOUT), env.get("PYTHONPATH", "")) if p
        )
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*self.prefix, *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for(self, pattern: str, after: int = 0) -> re.Match[str]:
        """Wait for a line matching ``pattern`` in the log (from offset ``after``)."""
        deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
        while True:
            match = re.search(pattern, self.log_text()[after:])
            if match:
                return match
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_text()[-2000:]
                raise ServerError(f"{self.name} exited ({self.proc.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name}: no {pattern!r} after {STARTUP_DEADLINE_SECONDS} s")
            time.sleep(0.02)

    def wait_for_port(self, port: int) -> None:
        deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
        while not port_open(port):
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_text()[-2000:]
                raise ServerError(f"{self.name} exited ({self.proc.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name}: port {port} not open after deadline")
            time.sleep(0.02)

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


class DemoShardProcess(Child):
    def __init__(
        self,
        name: str,
        log_dir: Path,
        secret: str,
        heartbeat: float | None = None,
        port: int | None = None,
        sharding: str | Path | None = None,
        default_port: int | None = None,
        interface: str = "127.0.0.1",
        prefix: list[str] | None = None,
    ) -> None:
        """``sharding``: a sharding.json, to act as an unmodified Zulip Tornado on
        ``port`` (see kansas.demo.shard); ``default_port`` goes with it. ``interface``
        and ``prefix`` (``ip netns exec NAME``): to run on a test host of
        kansas.testing.netns."""
        self.port = port or free_port()
        self.interface = interface
        self.secret = secret
        self.state_file = log_dir / f"{name}.state.json"
        argv = [sys.executable, "-m", "kansas.demo.shard", "--port", str(self.port)]
        argv += ["--name", name, "--secret", secret, "--state-file", str(self.state_file)]
        if heartbeat is not None:
            argv += ["--heartbeat", str(heartbeat)]
        if sharding is not None:
            argv += ["--sharding", str(sharding)]
        if default_port is not None:
            argv += ["--default-port", str(default_port)]
        if interface != "127.0.0.1":
            argv += ["--interface", interface]
        super().__init__(name, argv, log_dir)
        self.prefix = list(prefix or [])

    @property
    def url(self) -> str:
        return f"http://{self.interface}:{self.port}"

    def start(self) -> DemoShardProcess:
        offset = len(self.log_text())
        self.argv[self.argv.index("--state-file") + 1] = str(self.state_file)
        self.spawn()
        self.wait_for(rf"listening on {re.escape(self.interface)}:\d+", after=offset)
        return self


class KansasProcess(Child):
    """``twistd -n kansas`` with private ports: one process (``workers=0``, the
    default here) or a master with that many workers."""

    def __init__(
        self,
        log_dir: Path,
        postgres: str,
        redis: str,
        extra: list[str] | None = None,
        name: str = "kansas",
        public_port: int | None = None,
        internal_port: int | None = None,
        workers: int = 0,
    ) -> None:
        self.workers = workers
        self.public_port = public_port or free_port()
        self.internal_port = internal_port or free_port()
        twistd = str(Path(sys.executable).with_name("twistd"))
        argv = [twistd, "-n", "--pidfile=", "--logfile=-", "kansas"]
        argv += ["--listen", f"tcp:{self.public_port}:interface=127.0.0.1"]
        argv += ["--internal-listen", f"tcp:{self.internal_port}:interface=127.0.0.1"]
        argv += ["--postgres", postgres, "--redis", redis, "--workers", str(workers)]
        super().__init__(name, argv + (extra or []), log_dir)

    def start(self) -> KansasProcess:
        offset = len(self.log_text())
        self.spawn()
        if self.workers:
            self.wait_for(r"generation \d+ ready", after=offset)
        self.wait_for_port(self.public_port)
        self.wait_for_port(self.internal_port)
        return self

    def generations(self) -> list[tuple[int, list[int]]]:
        """Each generation of workers that became ready, with its pids (master mode)."""
        found = re.findall(
            r"generation (\d+) ready: \d+ workers \(pids ([\d, ]+)\)", self.log_text()
        )
        return [(int(g), [int(p) for p in pids.split(", ")]) for g, pids in found]

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()
