"""Private redis-server and PostgreSQL processes: a temp dir, a free port, stopped after;
and ``not_found_server``, an HTTP server that knows no path.

Used by kansas's own test fixtures and by ``make run``. Never touches the machine's
shared servers on 6379/5432. PostgreSQL refuses to run as root, so when we are root it
runs as the ``postgres`` user, owning its data directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

STARTUP_DEADLINE_SECONDS = 30.0


class ServerError(RuntimeError):
    """A private server would not start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _NotFound(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    #: What Tornado answers for a path it does not serve.
    BODY = b"<html><title>404: Not Found</title><body>404: Not Found</body></html>"

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(404)
        self.send_header("Content-Type", "text/html; charset=UTF-8")
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        self.wfile.write(self.BODY)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def not_found_server() -> Iterator[int]:
    """The port of an HTTP server answering every request 404, as a Tornado does for a
    path it does not serve (an unmodified Zulip's, for the transparent-move protocol)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def wait_until(ready: Callable[[], bool], what: str, proc: subprocess.Popen[Any]) -> None:
    """Poll ``ready`` until it holds, the process dies, or the deadline passes."""
    deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
    while not ready():
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with status {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise ServerError(f"{what} not ready after {STARTUP_DEADLINE_SECONDS:.0f} s")
        time.sleep(0.05)


class _Process:
    name = "server"

    def __init__(self, base_dir: Path | None) -> None:
        #: The address it listens on; with ``prefix`` (``ip netns exec NAME``, see
        #: kansas.testing.netns), another network namespace's.
        self.host = "127.0.0.1"
        self.prefix: list[str] = []
        self._own_dir = base_dir is None
        self.dir = (
            Path(tempfile.mkdtemp(prefix=f"kansas-{self.name}-")) if base_dir is None else base_dir
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.name}.log"

    def in_namespace(self, prefix: Sequence[str], host: str) -> None:
        """Run (from the next start) inside another network namespace, listening on
        ``host`` there: ``prefix`` is ``ip netns exec NAME``."""
        self.prefix = list(prefix)
        self.host = host

    def _spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        if self.prefix and "user" in kwargs:
            # ip netns exec needs root: change user after it, not before.
            uid, gid = kwargs.pop("user"), kwargs.pop("group")
            kwargs.pop("extra_groups", None)
            argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]
        self.proc = subprocess.Popen(
            [*self.prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal is for us, not for it
            **kwargs,
        )
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> _Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class RedisServer(_Process):
    name = "redis"

    def __init__(
        self, base_dir: Path | None = None, *, durable: bool = False, replica_of: int = 0
    ) -> None:
        """``replica_of``: the port of a master on 127.0.0.1 to replicate."""
        super().__init__(base_dir)
        self.durable = durable
        self.replica_of = replica_of

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, port: int | None = None) -> RedisServer:
        self.port = port or free_port()
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        # AOF with fsync every second when durability matters (make run, restart tests).
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.durable
            else ["--appendonly", "no"]
        )
        argv = [binary, "--port", str(self.port), "--bind", self.host, "--save", ""]
        argv += [*persistence, "--dir", str(self.dir), "--daemonize", "no"]
        if self.replica_of:
            argv += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        if not self.host.startswith("127."):
            # A test host's private address: clients come from the other end of its
            # link, which protected mode would refuse.
            argv += ["--protected-mode", "no"]
        proc = self._spawn(argv)
        wait_until(self.ping, "redis-server", proc)
        return self


def postgres_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), reverse=True)
    if not found:
        on_path = shutil.which("postgres")
        if on_path is None:
            raise ServerError("no PostgreSQL server binaries found (apt-get install postgresql)")
        return Path(on_path).parent
    return Path(found[0]).parent


class PostgresServer(_Process):
    name = "postgres"

    def __init__(
        self, base_dir: Path | None = None, *, settings: dict[str, str] | None = None
    ) -> None:
        super().__init__(base_dir)
        self.data = self.dir / "data"
        self.settings = settings or {}
        self.database = "kansas"

    @property
    def dsn(self) -> str:
        return f"host={self.host} port={self.port} dbname={self.database} user=postgres"

    def _as_postgres(self) -> dict[str, Any]:
        """Run as the postgres user when we are root (initdb and postgres refuse root)."""
        if os.geteuid() != 0:
            return {}
        entry = pwd.getpwnam("postgres")
        for path in (self.dir, self.data):
            if path.exists():
                os.chown(path, entry.pw_uid, entry.pw_gid)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _can_connect(self, dbname: str) -> bool:
        import psycopg2

        try:
            psycopg2.connect(
                host=self.host, port=self.port, dbname=dbname, user="postgres", connect_timeout=2
            ).close()
            return True
        except psycopg2.OperationalError:
            return False

    def start(self, port: int | None = None) -> PostgresServer:
        self.port = port or free_port()
        bindir = postgres_bindir()
        if not (self.data / "PG_VERSION").exists():
            self.data.mkdir(parents=True, exist_ok=True)
            creds = self._as_postgres()
            initdb = subprocess.run(
                [str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                **creds,
            )
            if initdb.returncode != 0:
                # Usually: as root, the postgres user cannot reach a directory above data/.
                last = (initdb.stderr.strip().splitlines() or ["?"])[-1]
                raise ServerError(f"initdb in {self.data} failed: {last}")
        hba = self.data / "pg_hba.conf"
        if not self.host.startswith("127.") and "# kansas test host" not in hba.read_text():
            # On a test host (kansas.testing.netns): clients come from the other end of
            # its private link.
            with hba.open("a") as f:
                f.write("# kansas test host\nhost all all samenet trust\n")
        creds = self._as_postgres()
        if self.log_path.exists() and creds:
            os.chown(self.log_path, creds["user"], creds["group"])
        settings = {
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.dir),
            "fsync": "off",
            "full_page_writes": "off",
            "synchronous_commit": "off",
            **self.settings,
        }
        argv = [str(bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        proc = self._spawn(argv, **creds)
        wait_until(lambda: self._can_connect("postgres"), "postgres", proc)
        self._ensure_database()
        return self

    def _ensure_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, dbname="postgres", user="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{self.database}"')
        conn.close()

    def stop(self, sig: int = signal.SIGINT) -> None:  # SIGINT: PostgreSQL's fast shutdown
        super().stop(sig)


class RedisSentinel(_Process):
    """A private Redis Sentinel watching one master (``redis-server --sentinel``)."""

    name = "sentinel"

    def __init__(self, master_port: int, service: str = "kansas", base_dir: Path | None = None):
        super().__init__(base_dir)
        self.master_port = master_port
        self.service = service

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def ping(self) -> bool:
        return RedisServer.ping(self)  # type: ignore[arg-type]

    def start(self, port: int | None = None) -> RedisSentinel:
        self.port = port or free_port()
        config = self.dir / "sentinel.conf"  # Sentinel rewrites it: it must be writable
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 1000\n"
            f"sentinel failover-timeout {self.service} 5000\n"
        )
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        proc = self._spawn([binary, str(config), "--sentinel"])
        wait_until(self.ping, "redis sentinel", proc)
        return self
