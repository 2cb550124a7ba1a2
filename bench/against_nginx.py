"""kansas vs nginx, side by side: the same load through each proxy, in one run.

Starts, on this machine and over loopback only:

- a backend: nginx answering every ``GET /json/events?...`` with a ~100-byte JSON body
  (``return 200``), on two ports acting as two Tornado shards;
- a proxy nginx routing as Zulip does today: ``map $host $tornado_server`` picks the
  shard's upstream by ``Host``, HTTP/1.1 with upstream keep-alive, ``Connection ""``,
  ``proxy_buffering off``, ``X-Real-Ip``/``X-Forwarded-For``, one worker process;
- one kansas (private Redis and PostgreSQL) with the two ports as shards, a realm pinned
  to each, and every benchmarked queue mapped (a GET that falls back to the realm's
  shard records the mapping), so that each request is a warm route-cache hit.

Then it measures:

1. throughput and CPU: wrk (1 thread, 50 connections, ``--seconds`` per round) through
   each proxy, ``--rounds`` rounds alternating which goes first; each proxy's CPU time
   (user + system, from /proc; nginx's worker process) per request;
2. added latency: an open-loop client in this process sends at a fixed rate (2,000
   req/s over 20 keep-alive connections, paced by a timerfd) straight to the backend and
   through each proxy, and reports latency percentiles (from the moment a request is
   written); a round disturbed by other work on the machine (processes the bench did not
   start, over ``--max-other`` of its CPU) is run again, a bounded number of times;
3. where kansas spends its CPU: py-spy samples kansas during one more wrk run, and the
   top functions by self time are listed.

It prints a Markdown section; ``--write`` puts it into BENCHMARKS.md (replacing the
section of the same name). Everything started is stopped at the end, even on failure.

    .venv/bin/python bench/against_nginx.py [--seconds 10] [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kansas.ctl import main as ctl
from kansas.testing.client import call
from kansas.testing.processes import Child, KansasProcess
from kansas.testing.servers import PostgresServer, RedisServer, free_port

CHECKOUT = Path(__file__).resolve().parents[1]
SECTION = "## kansas vs nginx, side by side"
#: Two realms, each pinned to its own shard (and mapped to its port by nginx's map).
REALMS = ("one.bench.example.com", "two.bench.example.com")
#: The backend's reply: what a Tornado shard sends for a dont_block poll, padded to ~100 B.
BODY = (
    '{"result":"success","msg":"","events":[],'
    '"queue_id":"00000000-0000-4000-8000-000000000000","pad":""}'
)
KANSAS_TARGET_US = 33.0
RATIO_TARGET = 0.27
ADDED_P99_TARGET_MS = 1.0


class BenchError(RuntimeError):
    """Something in the bench went wrong, or a proxy misbehaved under load."""


# -- /proc ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def machine_busy() -> int:
    """Jiffies the whole machine has been busy so far (all but idle and I/O wait).
    Sampled at the scheduler tick: right for a saturated machine, blind to short bursts
    (the fixed-rate client's work between two ticks goes unseen)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values[:8]) - values[3] - values[4]  # guest time is already in user


def processes() -> dict[int, tuple[int, str, float]]:
    """Every process: pid -> (parent, start time, CPU seconds so far, all its threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        cpu = (int(fields[11]) + int(fields[12])) / tick
        found[int(entry.name)] = (int(fields[1]), fields[19], cpu)
    return found


def other_cpu(table: dict[int, tuple[int, str, float]]) -> dict[tuple[int, str], float]:
    """CPU seconds of every process that is not this one or started by it (at any depth):
    other engineers' work on the machine, kernel threads included."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _start, _cpu) in table.items():
        children.setdefault(parent, []).append(pid)
    ours, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        ours.add(pid)
        todo += children.get(pid, [])
    return {(pid, start): cpu for pid, (_p, start, cpu) in table.items() if pid not in ours}


@dataclass(frozen=True)
class Snapshot:
    busy: float  # CPU seconds the whole machine has been busy (tick-sampled)
    other: dict[tuple[int, str], float]  # CPU seconds of other processes, so far
    at: float


def snapshot() -> Snapshot:
    busy = machine_busy() / os.sysconf("SC_CLK_TCK")
    return Snapshot(busy, other_cpu(processes()), time.monotonic())


def shares(before: Snapshot, after: Snapshot) -> tuple[float, float]:
    """(machine busy, other work) between two snapshots, as shares of the machine's whole
    CPU; other work is the CPU time of processes the bench did not start (a process that
    ended in between is missed)."""
    capacity = max(1e-9, (after.at - before.at) * (os.cpu_count() or 1))
    other = sum(cpu - before.other.get(key, 0.0) for key, cpu in after.other.items())
    return (after.busy - before.busy) / capacity, max(0.0, other) / capacity


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if path.exists():
        return [int(p) for p in path.read_text().split()]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid:
                    found.append(int(entry.name))
    return found


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# -- nginx ---------------------------------------------------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise BenchError(
            "nginx is missing (scripts/system-deps.sh nginx, or apt-get install nginx)"
        )
    return found


def nginx_main(workdir: Path, http: str, connections: int = 4096) -> str:
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    # Descriptors: as many as connections, but no more than this process may give it.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    files = connections if hard == resource.RLIM_INFINITY else min(connections, hard)
    return f"""
{user}
worker_processes 1;
worker_rlimit_nofile {files};
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections {connections}; }}
http {{
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    # Client keep-alive as long as wrk's run: nginx's default closes a connection after
    # 1,000 requests, which kansas never does.
    keepalive_requests 10000000;
    keepalive_timeout 75s;
{http}
}}
"""


def backend_config(workdir: Path, ports: Sequence[int]) -> str:
    listen = "".join(f"        listen 127.0.0.1:{port};\n" for port in ports)
    return nginx_main(
        workdir,
        f"""
    access_log off;
    server {{
{listen}
        location / {{
            default_type application/json;
            return 200 '{BODY}';
        }}
    }}
""",
    )


_PROXY_LOCATION = """
    location %s {
        if ($request_method !~ ^(GET|DELETE)$) {
            return 405;
        }
        proxy_pass $tornado_server;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Real-Ip $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_buffering off;
        proxy_read_timeout 1200;
        proxy_next_upstream off;
        proxy_redirect off;
    }
"""


def proxy_config(
    workdir: Path, port: int, shards: dict[str, int], access_log: bool, connections: int = 4096
) -> str:
    """Zulip's routing today: the realm's Tornado upstream chosen by ``$host``."""
    ports = list(shards.values())
    upstreams = "".join(
        f"    upstream tornado{p} {{\n        server 127.0.0.1:{p};\n"
        f"        keepalive 10000;\n        keepalive_requests 10000000;\n    }}\n"
        for p in ports
    )
    mapping = "".join(f'        "{realm}" http://tornado{p};\n' for realm, p in shards.items())
    log = f"access_log {workdir}/access.log;" if access_log else "access_log off;"
    locations = "".join(_PROXY_LOCATION % path for path in ("/json/events", "/api/v1/events"))
    return nginx_main(
        workdir,
        f"""
    {log}
{upstreams}
    map $host $tornado_server {{
        default http://tornado{ports[0]};
{mapping}    }}
    server {{
        listen 127.0.0.1:{port};
        server_name _;
{locations}
    }}
""",
        connections,
    )


class Nginx(Child):
    """An nginx master (``daemon off``) with one worker, its config in ``workdir``."""

    def __init__(self, name: str, workdir: Path, config: str, port: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        path = workdir / "nginx.conf"
        path.write_text(config)
        binary = nginx_binary()
        argv = [binary, "-p", str(workdir), "-c", str(path), "-e", str(workdir / "error.log")]
        super().__init__(name, argv, workdir)
        self.workdir = workdir

    def start(self) -> Nginx:
        self.spawn()
        self.wait_for_port(self.port)
        return self

    @property
    def worker_pid(self) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + 10
        while not (workers := children_of(self.proc.pid)):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no worker process")
            time.sleep(0.05)
        if len(workers) != 1:
            raise BenchError(f"{self.name}: {len(workers)} worker processes, expected 1")
        return workers[0]

    def errors(self) -> list[str]:
        path = self.workdir / "error.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return [line for line in text.splitlines() if "[error]" in line or "[crit]" in line]


# -- wrk -----------------------------------------------------------------------------------


@dataclass
class WrkResult:
    rate: float
    requests: int
    non_2xx: int
    socket_errors: int


def wrk_script(path: Path, requests: Sequence[tuple[str, str]]) -> Path:
    """A wrk script cycling through (host, target) requests, prepared once per thread."""
    items = ",\n".join(f'  {{"{host}", "{target}"}}' for host, target in requests)
    path.write_text(f"""local items = {{
{items}
}}
local reqs = {{}}
local i = 0
function init(args)
  for k, item in ipairs(items) do
    reqs[k] = wrk.format("GET", item[2], {{["Host"] = item[1]}})
  end
end
function request()
  i = i % #reqs + 1
  return reqs[i]
end
""")
    return path


def wrk(port: int, script: Path, seconds: float, connections: int) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rate is None or total is None:
        raise BenchError(f"unexpected wrk output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        float(rate.group(1)),
        int(total.group(1)),
        int(non_2xx.group(1)) if non_2xx else 0,
        sum(int(n) for n in failed.groups()) if failed else 0,
    )


@dataclass
class Round:
    number: int
    proxy: str
    result: WrkResult
    user: float
    system: float
    wall: float
    busy: float  # share of the machine's CPU in use during the round
    other: float  # share of the machine's CPU used by other work than the bench's

    @property
    def us_per_request(self) -> float:
        return (self.user + self.system) / self.result.requests * 1e6

    @property
    def core_share(self) -> float:
        return (self.user + self.system) / self.wall


def measured_wrk(
    number: int,
    proxy: str,
    pid: int,
    port: int,
    script: Path,
    seconds: float,
    conns: int,
) -> Round:
    """One wrk run through ``proxy`` (its process: ``pid``), with its CPU time."""
    before, start = cpu_seconds(pid), snapshot()
    result = wrk(port, script, seconds, conns)
    after, end = cpu_seconds(pid), snapshot()
    busy, other = shares(start, end)
    return Round(
        number, proxy, result, after[0] - before[0], after[1] - before[1], end.at - start.at,
        busy, other,
    )  # fmt: skip


# -- a fixed-rate (open-loop) client ---------------------------------------------------------


@dataclass
class RateResult:
    latencies: array[float] = field(default_factory=lambda: array("d"))
    statuses: Counter[int] = field(default_factory=Counter)
    sent: int = 0
    late: int = 0  # written more than 1 ms after their scheduled time
    other: float = 0.0  # share of the machine used by processes the bench did not start
    attempts: int = 1

    def pct(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[max(0, int(p * len(ordered) + 0.999999) - 1)] * 1000.0

    @property
    def non_200(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200)


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.IGNORECASE)


def complete_response(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(status, length) of the first response in ``buf`` once it is all there."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end])
    status = int(head[9:12])
    length = _CONTENT_LENGTH.search(head)
    if length is not None:
        total = end + 4 + int(length.group(1))
        return (status, total) if len(buf) >= total else None
    if _CHUNKED.search(head):
        last = buf.find(b"\r\n0\r\n\r\n", end)
        return None if last < 0 else (status, last + 7)
    raise BenchError(f"a response without a length: {head[:200]!r}")


class _Ticker:
    """A periodic Linux timerfd (through ctypes: Python 3.11 has no os.timerfd_*): the
    fixed-rate client wakes on it at each send time with microsecond precision, where an
    epoll timeout is rounded up to the next millisecond."""

    def __init__(self, start: float, interval: float) -> None:
        """Ticks at ``start`` (``time.monotonic()`` seconds), then every ``interval``."""
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        every, at = max(1000, round(interval * 1e9)), round(start * 1e9)
        spec = (ctypes.c_long * 4)(every // 10**9, every % 10**9, at // 10**9, at % 10**9)
        if libc.timerfd_settime(self.fd, 1, ctypes.byref(spec), None) != 0:  # absolute
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)

    def close(self) -> None:
        os.close(self.fd)


class _Conn:
    __slots__ = ("buf", "sent_at", "sock", "warm")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.sent_at = 0.0
        self.warm = False


def fixed_rate(
    ports: Sequence[int],
    requests: Sequence[bytes],
    rate: float,
    seconds: float,
    connections: int,
    warmup: float = 0.5,
) -> RateResult:
    """Send ``requests`` (cycled) at ``rate`` per second for ``warmup + seconds``, each on
    a free keep-alive connection (connection k goes to ``ports[k % len(ports)]``), and
    record the latency of each one scheduled after the warm-up: from writing the request
    to reading its whole answer. Requests are sent on schedule whatever the answers do
    (open loop) as long as a connection is free; ``late`` counts those that were not."""
    selector = selectors.DefaultSelector()
    conns: list[_Conn] = []
    result = RateResult()
    ticker: _Ticker | None = None
    gc.disable()  # no collector pause inside the measurement
    try:
        for k in range(connections):
            sock = socket.create_connection(("127.0.0.1", ports[k % len(ports)]), timeout=5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            conn = _Conn(sock)
            conns.append(conn)
            selector.register(sock, selectors.EVENT_READ, conn)
        free = deque(conns)
        total = int(rate * (warmup + seconds))
        interval = 1.0 / rate
        # time.monotonic() is CLOCK_MONOTONIC, the timerfd's clock.
        start = time.monotonic() + 0.05
        with contextlib.suppress(OSError, AttributeError):  # else: epoll timeouts (ms)
            ticker = _Ticker(start, interval)
            selector.register(ticker.fd, selectors.EVENT_READ, ticker)
        measured_from = start + warmup
        deadline = start + warmup + seconds + 10.0
        done = 0
        while done < total:
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"fixed-rate client: {total - done} answers missing at the end")
            while result.sent < total and free:
                due = start + result.sent * interval
                if due > now:
                    break
                conn = free.popleft()
                request = requests[result.sent % len(requests)]
                conn.sent_at = time.monotonic()
                if conn.sock.send(request) != len(request):
                    raise BenchError("fixed-rate client: a request did not fit the socket")
                conn.warm = due < measured_from
                result.late += conn.sent_at - due > 0.001
                result.sent += 1
                now = conn.sent_at
            if result.sent < total and free and ticker is None:
                timeout = max(0.0, start + result.sent * interval - time.monotonic())
            else:
                timeout = 0.1
            for key, _events in selector.select(timeout):
                if isinstance(key.data, _Ticker):
                    key.data.drain()
                    continue
                conn = key.data
                data = conn.sock.recv(65536)
                got = time.monotonic()
                if not data:
                    raise BenchError("fixed-rate client: the server closed a connection")
                conn.buf += data
                while (found := complete_response(conn.buf)) is not None:
                    status, length = found
                    del conn.buf[:length]
                    if not conn.warm:
                        result.latencies.append(got - conn.sent_at)
                        result.statuses[status] += 1
                    done += 1
                    free.append(conn)
    finally:
        for conn in conns:
            conn.sock.close()
        if ticker is not None:
            ticker.close()
        selector.close()
        gc.enable()
    return result


# -- py-spy --------------------------------------------------------------------------------


def short_path(path: str) -> str:
    """A source path without this machine's directories."""
    for marker in ("site-packages/", "/src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    match = re.search(r"python3\.\d+/(.*)$", path)
    if match:
        return match.group(1)
    return Path(path).name


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame(text: str) -> tuple[str, str]:
    match = _FRAME.match(text)
    return (match.group("func"), short_path(match.group("file"))) if match else (text, "")


@dataclass
class Profile:
    samples: int = 0
    #: Samples with each (function, file) on top of the stack (self time).
    by_function: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_file: Counter[str] = field(default_factory=Counter)
    #: For each function on top, the functions that called it.
    callers: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)


def self_time(raw: str) -> Profile:
    """Self time by function (line numbers merged) from py-spy's raw (collapsed) output:
    one ``frame;frame;...;top count`` line per distinct stack."""
    profile = Profile()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        top = _frame(frames[-1])
        n = int(count)
        profile.samples += n
        profile.by_function[top] += n
        profile.by_file[top[1]] += n
        caller = _frame(frames[-2])[0] if len(frames) > 1 else "-"
        profile.callers.setdefault(top, Counter())[caller] += n
    return profile


def profile(pid: int, port: int, script: Path, seconds: float, conns: int, out: Path) -> WrkResult:
    pyspy = Path(sys.executable).with_name("py-spy")
    if not pyspy.exists():
        found = shutil.which("py-spy")
        if found is None:
            raise BenchError("py-spy is missing (pip install py-spy)")
        pyspy = Path(found)
    duration = max(1, int(seconds) - 2)
    argv = [str(pyspy), "record", "--format", "raw", "--rate", "250", "--nonblocking"]
    argv += ["--full-filenames", "--function"]
    argv += ["-p", str(pid), "-d", str(duration), "-o", str(out)]
    spy = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        result = wrk(port, script, seconds, conns)
        _, err = spy.communicate(timeout=duration + 30)
        if spy.returncode != 0 or not out.exists():
            raise BenchError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')}")
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    return result


# -- kansas set-up -------------------------------------------------------------------------


def redis_call(port: int, *words: str) -> bytes | None:
    """One Redis command with a bulk-string answer, over RESP, without a client library."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        parts.append(f"${len(word.encode())}\r\n{word}\r\n".encode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"".join(parts))
        data = b""
        while True:
            head, sep, rest = data.partition(b"\r\n")
            if sep and not head.startswith(b"$"):
                raise BenchError(f"redis: {data[:200]!r}")
            if sep and head == b"$-1":
                return None
            if sep and len(rest) >= int(head[1:]) + 2:
                return rest[: int(head[1:])]
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError("redis closed the connection")
            data += chunk


def redis_calls(port: int) -> Counter[str]:
    """Commands Redis has served so far, by name (INFO commandstats; commands run by a
    script count too)."""
    info = redis_call(port, "INFO", "commandstats") or b""
    calls = Counter(
        {name.decode(): int(n) for name, n in re.findall(rb"cmdstat_(\S+?):calls=(\d+)", info)}
    )
    return calls


def seed_routes(
    kansas: KansasProcess, redis_port: int, queues: dict[str, str], shard_of: dict[str, str]
) -> None:
    """Map every queue through kansas's own fallback: a GET for an unmapped queue goes to
    its realm's shard, which answers 200, so kansas records queue -> shard (in its cache
    and in Redis). Checks that Redis has each mapping, on the right shard."""
    for queue_id, realm in queues.items():
        reply = call(kansas.public_port, "GET", "/json/events", host=realm,
                     params={"queue_id": queue_id, "dont_block": "true"})  # fmt: skip
        if reply.status != 200:
            raise BenchError(f"kansas answered {reply.status} for {queue_id}: {reply.body[:200]!r}")
    deadline = time.monotonic() + 20
    for queue_id, realm in queues.items():
        while (raw := redis_call(redis_port, "GET", f"kansas:queue:{queue_id}")) is None:
            if time.monotonic() > deadline:
                raise BenchError(f"kansas did not record a mapping for {queue_id}")
            time.sleep(0.05)
        if f'"{shard_of[realm]}"'.encode() not in raw:
            raise BenchError(f"queue {queue_id} mapped wrongly: {raw!r}")


# -- report ----------------------------------------------------------------------------------


def spread(values: Sequence[float], fmt: str = ",.0f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    med = statistics.median(values)
    return f"{med:{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"


def redis_summary(calls: Counter[str]) -> str:
    used = {name: n for name, n in calls.items() if n > 0}
    if not used:
        return "none"
    return ", ".join(f"{n:,} `{name.upper()}`" for name, n in sorted(used.items()))


def verdict(oks: Sequence[bool]) -> str:
    if all(oks):
        return "met" + (" in every round" if len(oks) > 1 else "")
    if any(oks):
        return f"met in {sum(oks)} of {len(oks)} rounds"
    return "not met"


def kansas_revision() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(CHECKOUT), "status", "--porcelain", "--", "src", "twisted"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return f"`{sha}`" + (" plus uncommitted changes in src/" if dirty else "")


def nginx_version() -> str:
    out = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, timeout=10)
    return out.stderr.strip().split("/", 1)[-1] or "?"


@dataclass
class Measurements:
    args: argparse.Namespace
    load_before: str
    revision: str  # of the kansas that was started
    load_after: str
    direct: WrkResult
    rounds: list[Round]
    latency: dict[str, list[RateResult]]
    redis_calls: Counter[str]  # by kansas, during its wrk rounds
    profile_run: WrkResult
    profile_raw: str
    kansas_log_problems: list[str]
    nginx_errors: list[str]


def report(m: Measurements) -> tuple[str, bool]:
    """The Markdown section, and whether every proxied request succeeded."""
    args = m.args
    nginx_rounds = [r for r in m.rounds if r.proxy == "nginx"]
    kansas_rounds = [r for r in m.rounds if r.proxy == "kansas"]
    ratios = [
        n.us_per_request / k.us_per_request
        for n, k in zip(nginx_rounds, kansas_rounds, strict=True)
    ]
    kansas_us = [r.us_per_request for r in kansas_rounds]
    ratio = statistics.median(ratios)
    errors = sum(r.result.non_2xx + r.result.socket_errors for r in m.rounds)
    errors += m.direct.non_2xx + m.direct.socket_errors
    errors += sum(res.non_200 for results in m.latency.values() for res in results)
    errors += m.profile_run.non_2xx + m.profile_run.socket_errors
    clean = errors == 0 and not m.kansas_log_problems and not m.nginx_errors
    argv = " ".join(["bench/against_nginx.py", *sys.argv[1:]])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"Command: `make bench` (runs `.venv/bin/python bench/against_nginx.py --write` after "
        f"`bench/first_figure.py`); this run: `.venv/bin/python {argv}`, on {date}.",
        f"Machine: {os.cpu_count()} cores ({cpu_model()}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, nginx {nginx_version()}; kansas at "
        f"{m.revision}. Load average before the run: {m.load_before}, after: "
        f'{m.load_after}. Other engineers\' work shares this machine: the "other work" '
        "columns give the share of the machine's CPU (both cores) used during each "
        "measurement by processes the bench did not start.",
        "",
        "Set-up, all on 127.0.0.1, every process sharing the two cores: a backend nginx "
        f"answering `{len(BODY)}`-byte JSON (`return 200`) on two ports, the two shards; a "
        "proxy nginx routing as Zulip does today (`map $host $tornado_server`, HTTP/1.1 "
        'upstreams with `keepalive 10000`, `Connection ""`, `proxy_buffering off`, '
        "`X-Real-Ip`/`X-Forwarded-For`, one worker, access log "
        f"{'on' if args.nginx_access_log else 'off'}, keep-alive not capped at 1,000 "
        "requests); one kansas process (Redis and PostgreSQL behind it) with a realm "
        f"pinned to each shard. Requests: `GET /json/events?queue_id=…&last_event_id=-1"
        f"&dont_block=true` cycling over {len(REALMS) * args.queues} queues of the two "
        "realms (the `Host` picks the realm), every one mapped beforehand, so kansas "
        "routes each by a warm route-cache hit.",
        "",
        f"### Throughput and CPU per request (wrk -t1 -c{args.connections} "
        f"-d{args.seconds:g}s, {args.rounds} rounds alternating)",
        "",
        "| round | proxy | req/s | proxy CPU per request | user / system | proxy CPU "
        "(share of a core) | machine busy / other work | non-2xx / socket errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in m.rounds:
        n = r.result.requests
        lines.append(
            f"| {r.number} | {r.proxy} | {r.result.rate:,.0f} | {r.us_per_request:.1f} µs | "
            f"{r.user / n * 1e6:.1f} / {r.system / n * 1e6:.1f} µs | {r.core_share:.0%} | "
            f"{r.busy:.0%} / {r.other:.0%} | {r.result.non_2xx} / {r.result.socket_errors} |"
        )
    lines += [
        "",
        "| | nginx | kansas |",
        "|---|---|---|",
        f"| req/s, median (min to max) | {spread([r.result.rate for r in nginx_rounds])} | "
        f"{spread([r.result.rate for r in kansas_rounds])} |",
        f"| CPU µs per request | {spread([r.us_per_request for r in nginx_rounds], '.1f')} | "
        f"{spread(kansas_us, '.1f')} |",
        "",
        f"- wrk straight to the backend (no proxy, one {args.seconds:g} s run): "
        f"{m.direct.rate:,.0f} req/s.",
        f"- Redis commands from kansas during its wrk rounds, for "
        f"{sum(r.result.requests for r in kansas_rounds):,} requests on {len(REALMS) * args.queues}"
        f" queues: {redis_summary(m.redis_calls)} (routing comes from the route cache; a "
        "queue's expiry is pushed back at most once a minute, by a script).",
        f"- **nginx CPU per request ÷ kansas CPU per request: {ratio:.2f}** (per round: "
        f"{', '.join(f'{x:.2f}' for x in ratios)}); target ≥ {RATIO_TARGET}: "
        f"**{verdict([x >= RATIO_TARGET for x in ratios])}**.",
        f"- kansas CPU per request: {spread(kansas_us, '.1f')} µs; target ≤ "
        f"{KANSAS_TARGET_US:g} µs: **{verdict([x <= KANSAS_TARGET_US for x in kansas_us])}**.",
        "",
    ]
    # Latency.
    paths = ("direct", "nginx", "kansas")
    lines += [
        f"### Added latency at {args.rate:,.0f} req/s (open loop, {args.latency_connections} "
        f"keep-alive connections, {args.rounds} rounds of {args.latency_seconds:g} s)",
        "",
        "A client in the bench process writes each request at its scheduled time on a free "
        "connection and times it until the whole answer is read; the same client, on the "
        "same cores, for every path, so what differs between rows is the proxy. A round "
        f"during which other work took more than {args.max_other:.0%} of the machine is run "
        f"again (up to {args.latency_retries} times; the least disturbed attempt is kept). "
        "Median over rounds (min to max), milliseconds.",
        "",
        "| path | answered | p50 | p90 | p99 | max | sent > 1 ms late | other work | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    label = {"direct": "client -> backend", "nginx": "client -> nginx -> backend",
             "kansas": "client -> kansas -> backend"}  # fmt: skip
    for path in paths:
        results = m.latency[path]
        cells = [spread([r.pct(p) for r in results], ".3f") for p in (0.5, 0.9, 0.99)]
        cells.append(spread([max(r.latencies) * 1000 for r in results], ".2f"))
        late = sum(r.late for r in results) / max(1, sum(r.sent for r in results))
        count = sum(len(r.latencies) for r in results)
        other = spread([r.other * 100 for r in results], ".0f")
        runs = sum(r.attempts for r in results)
        lines.append(
            f"| {label[path]} | {count:,} | {' | '.join(cells)} | {late:.1%} | {other} % | {runs} |"
        )
    added = {
        p: [
            r.pct(0.99) - d.pct(0.99)
            for r, d in zip(m.latency[p], m.latency["direct"], strict=True)
        ]
        for p in ("nginx", "kansas")
    }
    added50 = {
        p: [r.pct(0.5) - d.pct(0.5) for r, d in zip(m.latency[p], m.latency["direct"], strict=True)]
        for p in ("nginx", "kansas")
    }
    lines += [
        "",
        f"- **p99 added by kansas: {spread(added['kansas'], '+.3f')} ms** (p50: "
        f"{spread(added50['kansas'], '+.3f')} ms); target ≤ {ADDED_P99_TARGET_MS:g} ms: "
        f"**{verdict([x <= ADDED_P99_TARGET_MS for x in added['kansas']])}**.",
        f"- p99 added by nginx: {spread(added['nginx'], '+.3f')} ms (p50: "
        f"{spread(added50['nginx'], '+.3f')} ms).",
        "",
    ]
    # Profile.
    prof = self_time(m.profile_raw)
    total = max(1, prof.samples)
    lines += [
        f"### Where kansas spends its CPU (py-spy, {prof.samples:,} samples)",
        "",
        f"`py-spy record --format raw --rate 250 --nonblocking` on kansas during one more "
        f"wrk run through it ({m.profile_run.rate:,.0f} req/s while sampled). Samples of "
        "kansas's Python stack when it was not idle in epoll, by the function on top (self "
        "time; a function that makes a system call, such as `untilConcludes` around "
        "`socket.send`, is charged with the call). The share is of those samples.",
        "",
        "| self | function | file | mostly called from |",
        "|---|---|---|---|",
    ]
    for key, n in prof.by_function.most_common(args.profile_top):
        func, file = key
        caller = prof.callers[key].most_common(1)[0][0]
        lines.append(f"| {n / total:.1%} | `{func}` | {file} | `{caller}` |")
    top_files = prof.by_file.most_common(8)
    lines += [
        "",
        "By file (self time): "
        + ", ".join(f"{file or '?'} {n / total:.0%}" for file, n in top_files)
        + ".",
        "",
    ]
    if not clean:
        lines += ["**Errors during the run** (the figures above are not to be trusted):", ""]
        lines += [f"- {e}" for e in m.kansas_log_problems[:10] + m.nginx_errors[:10]]
        if errors:
            lines.append(f"- {errors} non-2xx answers or socket errors in all (see the tables)")
        lines.append("")
    return "\n".join(lines), clean


def write_section(text: str, section: str = SECTION) -> None:
    """Replace (or append) ``section`` in BENCHMARKS.md; the other sections stay."""
    path = CHECKOUT / "BENCHMARKS.md"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    body = text.rstrip("\n") + "\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(current):
        updated = pattern.sub(lambda _m: body + "\n", current, count=1).rstrip("\n") + "\n"
    else:
        updated = current.rstrip("\n") + "\n\n" + body
    path.write_text(updated)


def run_and_write(run: Callable[[Path], str], write: bool, section: str) -> None:
    """Run a bench in a temporary folder of its own, print its section and, if asked,
    record it in BENCHMARKS.md; a BenchError ends the script with one line. SIGTERM
    unwinds like Ctrl-C, so everything the bench started is stopped."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="kansas-bench-"))
    tmp.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    try:
        text = run(tmp)
    except BenchError as e:
        sys.exit(f"bench: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(text)
    if write:
        write_section(text, section)
        print("(written to BENCHMARKS.md)")


# -- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def stopping(child: Child) -> Iterator[None]:
    try:
        yield
    finally:
        child.stop()


def log_problems(kansas: KansasProcess) -> list[str]:
    lines = kansas.log_text().splitlines()
    bad = ("Traceback", "Unhandled", "CRITICAL", "ERROR", "failed")
    return [line.strip()[:200] for line in lines if any(word in line for word in bad)]


@dataclass
class Backends:
    """What every bench run starts first: Redis, PostgreSQL, and a backend nginx as two
    shards, each with a realm pinned to it in kansas's assignment."""

    redis: RedisServer
    postgres: PostgresServer
    backend: Nginx
    shard_ports: tuple[int, int]
    shard_of: dict[str, str]  # realm -> shard name


def start_backends(stack: contextlib.ExitStack, tmp: Path) -> Backends:
    redis = RedisServer(tmp / "redis")
    stack.callback(redis.cleanup)
    postgres = PostgresServer(tmp / "pg")
    stack.callback(postgres.cleanup)
    redis.start()
    postgres.start()
    shard_ports = (free_port(), free_port())
    backend = Nginx("backend", tmp / "backend", backend_config(tmp / "backend", shard_ports),
                    shard_ports[0])  # fmt: skip
    stack.enter_context(stopping(backend))
    backend.start()
    backend.wait_for_port(shard_ports[1])
    shard_of = {realm: f"tornado-{port}" for realm, port in zip(REALMS, shard_ports, strict=True)}
    steps = [["migrate"]]
    for realm, port in zip(REALMS, shard_ports, strict=True):
        steps.append(["shard", "add", shard_of[realm], f"http://127.0.0.1:{port}"])
        steps.append(["realm", "pin", realm, shard_of[realm]])
    for step in steps:
        with contextlib.redirect_stdout(None):
            if ctl(["--postgres", postgres.dsn, "--redis", redis.url, *step]) != 0:
                raise BenchError(f"kansas-ctl {' '.join(step)} failed")
    return Backends(redis, postgres, backend, shard_ports, shard_of)


def run(args: argparse.Namespace, tmp: Path) -> Measurements:
    load_before = loadavg()
    stack = contextlib.ExitStack()
    with stack:
        backends = start_backends(stack, tmp)
        redis, postgres = backends.redis, backends.postgres
        shard_ports, shard_of = backends.shard_ports, backends.shard_of
        ports_of = dict(zip(REALMS, shard_ports, strict=True))
        proxy_port = free_port()
        config = proxy_config(tmp / "proxy", proxy_port, ports_of, args.nginx_access_log)
        proxy = Nginx("nginx", tmp / "proxy", config, proxy_port)
        stack.enter_context(stopping(proxy))
        proxy.start()
        kansas = KansasProcess(tmp, postgres.dsn, redis.url)
        stack.enter_context(stopping(kansas))
        revision = kansas_revision()
        kansas.start()
        assert kansas.proc is not None
        queues = {str(uuid.uuid4()): realm for realm in REALMS for _ in range(args.queues)}
        seed_routes(kansas, redis.port, queues, shard_of)
        targets = [
            (realm, f"/json/events?queue_id={q}&last_event_id=-1&dont_block=true")
            for q, realm in queues.items()
        ]
        # Interleave the realms, so consecutive requests go to both shards.
        targets = [t for pair in zip(targets[: args.queues], targets[args.queues :], strict=True)
                   for t in pair]  # fmt: skip
        script = wrk_script(tmp / "requests.lua", targets)
        raw_requests = [
            f"GET {target} HTTP/1.1\r\nHost: {realm}\r\nUser-Agent: bench\r\n\r\n".encode()
            for realm, target in targets
        ]
        pids = {"nginx": proxy.worker_pid, "kansas": kansas.proc.pid}
        ports = {"nginx": proxy.port, "kansas": kansas.public_port}
        conns = args.connections
        say = print if not args.quiet else (lambda *_a, **_k: None)

        say("warming up (wrk, 2 s through each proxy) ...", flush=True)
        for name in ("nginx", "kansas"):
            wrk(ports[name], script, 2, conns)
        direct = wrk(shard_ports[0], script, args.seconds, conns)
        say(f"  direct to the backend: {direct.rate:,.0f} req/s", flush=True)
        rounds = []
        redis_used: Counter[str] = Counter()
        for number in range(1, args.rounds + 1):
            order = ("nginx", "kansas") if number % 2 else ("kansas", "nginx")
            for name in order:
                calls = redis_calls(redis.port)
                r = measured_wrk(number, name, pids[name], ports[name], script, args.seconds, conns)
                if name == "kansas":
                    used = redis_calls(redis.port) - calls
                    used["info"] -= 1  # the bench's own, from one call to the next
                    redis_used.update(used)
                rounds.append(r)
                say(f"  round {number} {name}: {r.result.rate:,.0f} req/s, "
                    f"{r.us_per_request:.1f} µs CPU per request, "
                    f"{r.result.non_2xx} non-2xx, {r.result.socket_errors} socket errors",
                    flush=True)  # fmt: skip

        say(f"latency at {args.rate:,.0f} req/s ...", flush=True)
        latency: dict[str, list[RateResult]] = {"direct": [], "nginx": [], "kansas": []}
        lat_ports = {"direct": list(shard_ports), "nginx": [proxy.port],
                     "kansas": [kansas.public_port]}  # fmt: skip
        for number in range(1, args.rounds + 1):
            names = ["direct", "nginx", "kansas"]
            first = (number - 1) % len(names)
            names = names[first:] + names[:first]  # rotate who goes first
            for name in names:
                attempts: list[RateResult] = []
                while True:  # a round disturbed by other work is run again (bounded)
                    start = snapshot()
                    res = fixed_rate(lat_ports[name], raw_requests, args.rate,
                                     args.latency_seconds, args.latency_connections)  # fmt: skip
                    _busy, res.other = shares(start, snapshot())
                    attempts.append(res)
                    if res.other <= args.max_other or len(attempts) > args.latency_retries:
                        break
                    say(f"  round {number} {name}: other work took {res.other:.0%} of the "
                        "machine, running it again", flush=True)  # fmt: skip
                res = min(attempts, key=lambda r: r.other)
                res.attempts = len(attempts)
                latency[name].append(res)
                say(f"  round {number} {name}: p50 {res.pct(0.5):.3f} ms, p99 "
                    f"{res.pct(0.99):.3f} ms, max {max(res.latencies) * 1000:.2f} ms, "
                    f"{res.non_200} non-200, {res.late} sent late, other work "
                    f"{res.other:.0%}", flush=True)  # fmt: skip

        say(f"profiling kansas with py-spy ({args.profile_seconds:g} s of wrk) ...", flush=True)
        raw_path = tmp / "kansas.pyspy.txt"
        profile_run = profile(kansas.proc.pid, kansas.public_port, script,
                              args.profile_seconds, conns, raw_path)  # fmt: skip
        problems = log_problems(kansas)
        if not kansas.alive():
            problems.append(f"kansas exited ({kansas.proc.returncode})")
        return Measurements(
            args=args,
            load_before=load_before,
            revision=revision,
            load_after=loadavg(),
            direct=direct,
            rounds=rounds,
            latency=latency,
            redis_calls=redis_used,
            profile_run=profile_run,
            profile_raw=raw_path.read_text(),
            kansas_log_problems=problems,
            nginx_errors=backends.backend.errors() + proxy.errors(),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="each wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per proxy (default 3)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--queues", type=int, default=50, help="queues per realm")
    parser.add_argument("--rate", type=float, default=2000, help="fixed rate for latency")
    parser.add_argument("--latency-seconds", type=float, default=5)
    parser.add_argument("--latency-connections", type=int, default=20)
    parser.add_argument("--max-other", type=float, default=0.03,
                        help="a latency round during which processes the bench did not "
                             "start used more than this share of the machine is run again "
                             "(default 0.03)")  # fmt: skip
    parser.add_argument("--latency-retries", type=int, default=2,
                        help="at most this many times (default 2); the least disturbed "
                             "attempt is kept")  # fmt: skip
    parser.add_argument("--profile-seconds", type=float, default=None,
                        help="wrk run profiled with py-spy (default: --seconds)")  # fmt: skip
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--nginx-access-log", action="store_true",
                        help="the proxy nginx logs each request (kansas does not)")  # fmt: skip
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--quiet", action="store_true", help="only the Markdown section")
    args = parser.parse_args()
    if args.profile_seconds is None:
        args.profile_seconds = args.seconds
    if args.seconds < 3 or args.rounds < 1 or args.profile_seconds < 3:
        parser.error("--seconds and --profile-seconds must be >= 3, --rounds >= 1")
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk is missing (scripts/system-deps.sh wrk, or apt-get install wrk)")
    # SIGTERM (and SIGINT, even if started in the background) unwinds like Ctrl-C, so
    # everything started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tmp = Path(tempfile.mkdtemp(prefix="kansas-bench-"))
    tmp.chmod(0o755)  # PostgreSQL runs as its own user when we are root
    try:
        measurements = run(args, tmp)
    except BenchError as e:
        sys.exit(f"bench: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text, clean = report(measurements)
    print()
    print(text)
    if not clean:
        sys.exit("bench: errors during the run; BENCHMARKS.md left as it was")
    if args.write:
        write_section(text)
        print("(written to BENCHMARKS.md)")


if __name__ == "__main__":
    main()
