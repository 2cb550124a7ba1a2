"""kansas as users meet it: real twistd kansas, two demo shards, Redis and PostgreSQL.

Everything here runs as separate processes on 127.0.0.1 and talks HTTP over sockets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from kansas.ctl import main as ctl
from kansas.testing.client import Reply, call
from kansas.testing.processes import CHECKOUT, DemoShardProcess, KansasProcess
from kansas.testing.servers import PostgresServer, RedisSentinel, RedisServer, free_port
from tests.conftest import redis_command

SECRET = "e2e-secret"
ONE, TWO, THREE = "one.example.com", "two.example.com", "three.example.com"


class Stack:
    def __init__(self, tmp: Path, postgres_dsn: str, redis_url: str) -> None:
        self.tmp = tmp
        self.dsn = postgres_dsn
        self.redis = redis_url
        self.shards = {
            name: DemoShardProcess(name, tmp, SECRET, heartbeat=30).start() for name in ("a", "b")
        }
        self.ctl("migrate")
        for name, shard in self.shards.items():
            self.ctl("shard", "add", name, shard.url)
        self.kansas = KansasProcess(tmp, postgres_dsn, redis_url).start()

    def ctl(self, *args: str) -> None:
        assert ctl(["--postgres", self.dsn, "--redis", self.redis, *args]) == 0

    def stop(self) -> None:
        self.kansas.stop()
        for shard in self.shards.values():
            shard.stop()

    # -- Django's side (internal listener) ------------------------------------------------
    def create_queue(self, realm: str, user: int, **extra: Any) -> str:
        reply = self.internal("/api/v1/events/internal", realm, user_profile_id=user, **extra)
        assert reply.status == 200, reply
        return str(reply.json["queue_id"])

    def internal(self, path: str, realm: str = ONE, **form: Any) -> Reply:
        form = {"secret": SECRET, "dont_block": "true", "client": "internal", **form}
        return call(self.kansas.internal_port, "POST", path, host=realm, form=form)

    def notify(self, event: dict[str, Any], users: list[int]) -> Reply:
        data = json.dumps({"event": event, "users": users})
        return self.internal("/api/internal/notify_tornado", data=data)

    # -- a client's side (public listener) ------------------------------------------------
    def get(
        self, queue_id: str, realm: str, last: int = -1, block: bool = False, **kw: Any
    ) -> Reply:
        params = {"queue_id": queue_id, "last_event_id": last, "dont_block": json.dumps(not block)}
        return call(self.kansas.public_port, "GET", "/json/events", host=realm, params=params, **kw)

    def delete(self, queue_id: str, realm: str) -> Reply:
        return call(self.kansas.public_port, "DELETE", "/api/v1/events", host=realm,
                    params={"queue_id": queue_id})  # fmt: skip

    def held_by(self, shard: str) -> dict[str, dict[str, Any]]:
        reply = call(self.shards[shard].port, "GET", "/demo/queues")
        return {q["queue_id"]: q for q in reply.json["queues"]}


@pytest.fixture
def stack(tmp_path: Path, postgres_dsn: str, redis_url: str) -> Iterator[Stack]:
    s = Stack(tmp_path, postgres_dsn, redis_url)
    try:
        yield s
    finally:
        s.stop()


def test_events_reach_every_client_once_on_the_right_shard(stack: Stack) -> None:
    stack.ctl("realm", "pin", ONE, "a")
    stack.ctl("realm", "pin", TWO, "b")
    stack.ctl("realm", "pin", THREE, "a")
    stack.ctl("user", "move", THREE, "5", "b", "--no-reload")
    stack.kansas.restart()  # start from a known assignment (no wait for NOTIFY here)
    users = {(ONE, 1): "a", (ONE, 2): "a", (TWO, 3): "b", (TWO, 4): "b", (THREE, 5): "b",
             (THREE, 6): "a"}  # fmt: skip
    queues = {key: stack.create_queue(key[0], key[1]) for key in users}
    for (realm, user), shard in users.items():
        assert queues[realm, user] in stack.held_by(shard), (realm, user, shard)

    # Long-poll every queue at once, then deliver one event to everybody.
    with ThreadPoolExecutor(len(queues)) as pool:
        polls = {key: pool.submit(stack.get, q, key[0], -1, True) for key, q in queues.items()}
        deadline = time.monotonic() + 10
        while not all(q["parked"] for s in "ab" for q in stack.held_by(s).values()):
            assert time.monotonic() < deadline, "long-polls did not reach the shards"
            time.sleep(0.02)
        assert stack.notify({"type": "message", "n": 1}, [u for _, u in users]).status == 200
        for key, poll in polls.items():
            reply = poll.result(timeout=10)
            assert reply.status == 200
            assert [e["n"] for e in reply.json["events"]] == [1], key
            assert reply.json["queue_id"] == queues[key]

    # Two more events: each queue gets exactly those after acknowledging the first.
    stack.notify({"type": "message", "n": 2}, [u for _, u in users])
    stack.notify({"type": "message", "n": 3}, [u for _, u in users])
    for (realm, _user), queue_id in queues.items():
        reply = stack.get(queue_id, realm, last=0)
        assert [e["n"] for e in reply.json["events"]] == [2, 3]
        assert [e["id"] for e in reply.json["events"]] == [1, 2]

    # DELETE forgets the queue: the shard and kansas both answer BAD_EVENT_QUEUE_ID now.
    queue_id = queues[ONE, 1]
    assert stack.delete(queue_id, ONE).json == {"result": "success", "msg": ""}
    gone = stack.get(queue_id, ONE)
    assert gone.status == 400
    assert gone.json == {
        "result": "error",
        "msg": f"Bad event queue ID: {queue_id}",
        "code": "BAD_EVENT_QUEUE_ID",
        "queue_id": queue_id,
    }
    assert redis_command_get(stack, queue_id) is None


def stack_redis(stack: Stack) -> RedisServer:
    """The Redis server of the stack, for plain socket commands."""
    server = RedisServer.__new__(RedisServer)
    server.port = int(stack.redis.rsplit(":", 1)[1].split("/")[0])
    return server


def redis_command_get(stack: Stack, queue_id: str) -> bytes | None:
    raw = redis_command(stack_redis(stack), "GET", f"kansas:queue:{queue_id}")
    return None if raw.startswith(b"$-1") else raw


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_routes_survive_a_kansas_restart(stack: Stack, sig: int) -> None:
    # No pins: placement is by hash, so a queue's shard is only known from Redis.
    queues = {(realm, user): stack.create_queue(realm, user) for realm in (ONE, TWO, THREE)
              for user in (1, 2)}  # fmt: skip
    stack.notify({"type": "message"}, [1, 2])
    held: list[Reply | OSError] = []
    quiet = stack.create_queue(ONE, 3)  # no events: its long-poll waits

    def long_poll() -> None:
        try:
            held.append(stack.get(quiet, ONE, block=True))
        except OSError as e:  # SIGKILL: the connection is simply cut
            held.append(e)

    waiting = threading.Thread(target=long_poll)
    waiting.start()
    deadline = time.monotonic() + 10
    while not any(q["parked"] for s in "ab" for q in stack.held_by(s).values()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stack.kansas.restart(sig)
    waiting.join(10)
    if sig == signal.SIGTERM:  # a graceful stop answers held long-polls: "poll again"
        answer = held[0]
        assert isinstance(answer, Reply) and answer.status == 200, held
        assert answer.json == {"result": "success", "msg": "", "events": [], "queue_id": quiet}
    for (realm, _user), queue_id in queues.items():
        reply = stack.get(queue_id, realm)
        assert reply.status == 200, reply
        assert [e["type"] for e in reply.json["events"]] == ["message"]


def test_a_lost_mapping_falls_back_to_the_realm_and_is_recorded_again(stack: Stack) -> None:
    stack.ctl("realm", "pin", TWO, "b")
    stack.kansas.restart()
    queue_id = stack.create_queue(TWO, 9)
    redis_command(stack_redis(stack), "FLUSHALL")
    stack.kansas.restart()  # empty cache and empty Redis
    assert stack.get(queue_id, TWO).status == 200
    deadline = time.monotonic() + 5  # the mapping is written just after the answer
    while (recorded := redis_command_get(stack, queue_id)) is None:
        assert time.monotonic() < deadline, "the mapping was not recorded again"
        time.sleep(0.02)
    assert b'"shard":"b"' in recorded


def test_assignment_changes_apply_live(stack: Stack) -> None:
    stack.ctl("realm", "pin", ONE, "a")
    deadline = time.monotonic() + 10
    while stack.create_queue(ONE, 1) not in stack.held_by("a"):
        assert time.monotonic() < deadline
    started = time.monotonic()
    stack.ctl("realm", "pin", ONE, "b")
    while stack.create_queue(ONE, 1) not in stack.held_by("b"):
        assert time.monotonic() - started < 5, "the pin was not followed"
        time.sleep(0.05)


def test_bad_input_gets_json_errors_and_kansas_keeps_serving(stack: Stack) -> None:
    port = stack.kansas.public_port
    queue_id = stack.create_queue(ONE, 1)

    def error(reply: Reply, status: int, code: str) -> None:
        assert reply.status == status, reply
        assert reply.headers["content-type"] == "application/json"
        assert reply.json["result"] == "error" and reply.json["code"] == code, reply.json
        assert isinstance(reply.json["msg"], str) and reply.json["msg"]

    error(call(port, "GET", "/json/events", host=ONE), 400, "BAD_REQUEST")
    error(call(port, "GET", "/json/events", host=ONE, params={"queue_id": "<script>"}), 400,
          "BAD_EVENT_QUEUE_ID")  # fmt: skip
    error(stack.get(queue_id, ONE, last="x"), 400, "BAD_REQUEST")  # type: ignore[arg-type]
    error(stack.get("4f1b3c2e-0000-4000-8000-00000000dead", ONE), 400, "BAD_EVENT_QUEUE_ID")
    error(call(port, "POST", "/json/events", host=ONE, form={"queue_id": queue_id}), 405,
          "BAD_REQUEST")  # fmt: skip
    error(call(port, "POST", "/api/v1/events/internal", host=ONE, form={"secret": SECRET}), 403,
          "UNAUTHORIZED")  # fmt: skip
    error(call(port, "POST", "/api/internal/notify_tornado", host=ONE), 403, "UNAUTHORIZED")
    error(call(port, "GET", "/nothing/here", host=ONE), 404, "NOT_FOUND")
    error(call(stack.kansas.internal_port, "GET", "/json/events", host=ONE), 404, "NOT_FOUND")
    internal = stack.kansas.internal_port
    error(call(internal, "GET", "/api/v1/events/internal", host=ONE), 405, "BAD_REQUEST")
    error(call(internal, "POST", "/api/v1/events/internal", host=ONE, form={"secret": SECRET}),
          400, "BAD_REQUEST")  # fmt: skip
    huge = {"queue_id": queue_id, "pad": "x" * (1024 * 1024)}
    error(call(port, "DELETE", "/json/events", host=ONE, form=huge), 413, "BAD_REQUEST")

    # Hostile bytes: an answer, a closed connection, and no harm done.
    hostile = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200) + b"\r\n\r\n",  # TLS hello
        b"GET /json/events?queue_id=x HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    ]
    for garbage in hostile:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(garbage)
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 4") or answer.startswith(b"HTTP/1.1 5"), answer
            assert b'"result":"error"' in answer
            assert s.recv(4096) == b""  # closed after a protocol error

    assert stack.get(queue_id, ONE).status == 200  # still serving


def test_queue_creation_needs_the_realms_host(stack: Stack) -> None:
    internal = stack.kansas.internal_port
    form = {"secret": SECRET, "user_profile_id": 1, "dont_block": "true"}
    hosts = ["127.0.0.1", f"127.0.0.1:{internal}", f"[::1]:{internal}", "::1",
             f"localhost:{internal}"]  # fmt: skip
    for host in hosts:  # an IP address, or kansas's own listener: no realm named
        reply = call(internal, "POST", "/api/v1/events/internal", host=host, form=form)
        assert reply.status == 400 and reply.json["code"] == "BAD_REQUEST", (host, reply)
        assert "must be the realm's host, as Django sends it" in reply.json["msg"], reply.json
    body = urlencode(form).encode()
    with socket.create_connection(("127.0.0.1", internal), timeout=5) as s:  # no Host at all
        s.sendall(b"POST /api/v1/events/internal HTTP/1.1\r\nConnection: close\r\n"
                  b"Content-Type: application/x-www-form-urlencoded\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b'"code":"BAD_REQUEST"' in answer and b"(missing)" in answer, answer
    assert stack.held_by("a") == stack.held_by("b") == {}  # nothing reached a shard

    # Zulip's development realm: localhost, with its port in realm.host or not. A
    # sharding.json keyed localhost:9991 routes both to the same shard.
    ports = {name: shard.port for name, shard in stack.shards.items()}
    sharding = stack.tmp / "sharding.json"
    sharding.write_text(json.dumps({"shard_map": {"localhost:9991": ports["b"]}}))
    stack.ctl("import-zulip-sharding", str(sharding), "--default-port", str(ports["a"]))
    stack.kansas.restart()  # start from the imported rules (no wait for NOTIFY here)
    queues = [stack.create_queue(host, user) for host in ("localhost:9991", "localhost")
              for user in (1, 2)]  # fmt: skip
    assert sorted(stack.held_by("b")) == sorted(queues)
    assert stack.create_queue(ONE, 1) in stack.held_by("a")  # Zulip's default port
    for queue_id in queues:
        assert b'"realm":"localhost"' in (redis_command_get(stack, queue_id) or b"")
        assert stack.get(queue_id, "localhost:9991").status == 200


class NotJsonShard(threading.Thread):
    """A 'shard' that answers every request with an HTML error page."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(20)

    def run(self) -> None:
        body = b"<html><title>500: Internal Server Error</title></html>"
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by the test
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/html\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip


def test_shard_trouble_is_a_json_502(stack: Stack) -> None:
    html = NotJsonShard()
    html.start()
    stack.ctl("shard", "add", "html", f"http://127.0.0.1:{html.port}", "--weight", "0")
    stack.ctl("shard", "add", "dead", f"http://127.0.0.1:{free_port()}", "--weight", "0")
    stack.ctl("realm", "pin", TWO, "html")
    stack.ctl("realm", "pin", THREE, "dead")
    stack.kansas.argv += ["--park-timeout", "1"]
    stack.kansas.restart()
    queue_id = "4f1b3c2e-0000-4000-8000-00000000beef"
    # The mapping points at the HTML shard: kansas answers 502 JSON, not the HTML.
    reply = stack.get(queue_id, TWO)
    assert reply.status == 502 and reply.json["code"] == "BAD_GATEWAY", reply
    assert "not JSON" in reply.json["msg"]
    # A GET for a shard that is down waits for it (here 1 s), then polls again.
    reply = stack.get(queue_id, THREE)
    assert reply.status == 200 and reply.json["events"] == [], reply
    assert reply.json["queue_id"] == queue_id
    # A DELETE is not safe to hold and replay.
    reply = stack.delete(queue_id, THREE)
    assert reply.status == 502 and reply.json["code"] == "BAD_GATEWAY", reply
    reply = stack.internal("/api/v1/events/internal", THREE, user_profile_id=1)
    assert reply.status == 502 and reply.json["result"] == "error"
    # The broadcast still reaches the live shards, says which failed, and holds the
    # notification for the shard that is down (delivered when it is back).
    reply = stack.notify({"type": "message"}, [1])
    assert reply.status == 200, reply
    assert reply.json["failed_shards"] == ["html"] and reply.json["queued_shards"] == ["dead"]
    html.sock.close()


def test_a_client_that_leaves_cancels_its_backend_request(stack: Stack) -> None:
    stack.ctl("realm", "pin", ONE, "a")
    stack.kansas.restart()
    queue_id = stack.create_queue(ONE, 1)
    client = socket.create_connection(("127.0.0.1", stack.kansas.public_port), timeout=5)
    client.sendall(b"GET /json/events?queue_id=%s&last_event_id=-1&dont_block=false HTTP/1.1\r\n"
                   b"Host: %s\r\n\r\n" % (queue_id.encode(), ONE.encode()))  # fmt: skip
    deadline = time.monotonic() + 10
    while not stack.held_by("a")[queue_id]["parked"]:
        assert time.monotonic() < deadline, "the long-poll never reached the shard"
        time.sleep(0.02)
    client.close()
    while stack.held_by("a")[queue_id]["parked"]:
        assert time.monotonic() < deadline, "the shard still holds the abandoned long-poll"
        time.sleep(0.02)


def test_web_reload_clients_is_summed_over_shards(stack: Stack) -> None:
    stack.ctl("realm", "pin", ONE, "a")
    stack.ctl("realm", "pin", TWO, "b")
    stack.kansas.restart()
    for realm in (ONE, ONE, TWO):
        stack.create_queue(realm, 1, user_client="website")
    reply = stack.internal("/api/internal/web_reload_clients", immediate="true")
    assert reply.status == 200, reply
    assert reply.json["sent_events"] == 3 and reply.json["complete"] is True


def test_no_postgres_query_on_the_hot_path(stack: Stack, postgres_server: PostgresServer) -> None:
    queue_ids = [stack.create_queue(ONE, user) for user in range(10)]
    marker = f"hot-path-{time.monotonic_ns()}"

    def mark(tag: str) -> None:
        import psycopg2

        conn = psycopg2.connect(stack.dsn)
        with conn.cursor() as cur:
            cur.execute("SELECT %s", (f"{marker}-{tag}",))
        conn.close()

    def wait_logged(tag: str) -> None:
        deadline = time.monotonic() + 10
        while f"{marker}-{tag}" not in postgres_server.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline
            time.sleep(0.02)

    mark("start")
    wait_logged("start")
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", stack.kansas.public_port, timeout=10)
    for i in range(1000):
        assert stack.get(queue_ids[i % 10], ONE, conn=conn).status == 200
    conn.close()
    mark("end")
    wait_logged("end")
    log = postgres_server.log_path.read_text(errors="replace")
    window = log[log.index(f"{marker}-start") : log.index(f"{marker}-end")]
    kansas_lines = [line for line in window.splitlines() if line.startswith("kansas")]
    assert kansas_lines == []


def test_twistd_kansas_refuses_an_old_schema(
    tmp_path: Path, postgres_dsn: str, redis_url: str
) -> None:
    twistd = str(Path(sys.executable).with_name("twistd"))
    argv = [twistd, "-n", "--pidfile=", "kansas", "--postgres", postgres_dsn, "--redis", redis_url]
    argv += ["--listen", f"tcp:{free_port()}:interface=127.0.0.1"]
    argv += ["--internal-listen", f"tcp:{free_port()}:interface=127.0.0.1"]
    env = {**os.environ, "PYTHONPATH": str(CHECKOUT)}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "kansas-ctl --postgres DSN migrate" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_kansas_finds_its_redis_through_sentinel(
    tmp_path: Path,
    postgres_dsn: str,
    redis_url: str,
    redis_server: RedisServer,
    redis_sentinel: RedisSentinel,
) -> None:
    s = Stack(tmp_path, postgres_dsn, redis_sentinel.url)
    try:
        queue_id = s.create_queue(ONE, 1)
        deadline = time.monotonic() + 5
        key = f"kansas:queue:{queue_id}"
        while redis_command(redis_server, "GET", key).startswith(b"$-1"):
            assert time.monotonic() < deadline, "the mapping never reached the master"
            time.sleep(0.02)
        holder = "a" if queue_id in s.held_by("a") else "b"
        s.ctl("realm", "pin", ONE, "b" if holder == "a" else "a")  # the fallback would miss
        s.kansas.restart()  # a cold cache: only the mapping, read via Sentinel, finds it
        assert s.get(queue_id, ONE).status == 200
    finally:
        s.stop()
