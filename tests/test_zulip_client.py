"""The real thing, end to end: nginx (with contrib/nginx/) in front of kansas and demo
shards, Zulip's own Python client (``zulip`` from PyPI), and Django's side played by a
small register endpoint in this file.

* ``POST /api/v1/register`` (via nginx) -> the endpoint creates the queue through kansas's
  internal listener as Django does (``Host`` = the realm, form with ``secret``,
  ``user_profile_id``, ...), fetches the events that raced with it, answers in Zulip's
  register shape;
* events are routed as the Zulip integration does it: ``kansas.placement`` names the
  shard(s), the event goes straight to them (``/api/internal/notify_tornado``, where
  Zulip would publish to the shard's RabbitMQ queue);
* ``GET``/``DELETE /api/v1/events`` go from the client through nginx to kansas to the
  shard.

Needs nginx (Debian package ``nginx``); skipped, saying so, if it is not installed.
Also here: the systemd units of contrib/ (socket activation), with
``systemd-socket-activate`` (Debian package ``systemd``).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import zulip

from kansas.ctl import main as ctl_main
from kansas.placement import Placement
from kansas.testing.client import call
from kansas.testing.processes import CHECKOUT, Child, DemoShardProcess, KansasProcess, port_open
from kansas.testing.servers import free_port

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian package: nginx)"
)
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")

SECRET = "zulip-client-secret"
ONE, SPLIT = "one.example.com", "split.example.com"
ZULIP_VERSION, FEATURE_LEVEL = "10.0-kansas-test", 300


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# -- Django's side: /api/v1/server_settings and /api/v1/register --------------------------
class Users:
    def __init__(self) -> None:
        #: email -> (api key, realm, user id)
        self.accounts: dict[str, tuple[str, str, int]] = {}

    def add(self, realm: str, user_id: int) -> tuple[str, str]:
        email, key = f"user{user_id}@{realm}", f"key-{user_id}"
        self.accounts[email] = (key, realm, user_id)
        return email, key


class FakeDjango(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, internal_port: int, users: Users) -> None:
        super().__init__(("127.0.0.1", 0), DjangoHandler)
        self.internal_port = internal_port
        self.users = users
        self.registered: list[tuple[str, int, str]] = []  # realm, user, queue id

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class DjangoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeDjango

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/api/v1/server_settings":
            self._reply(200, {"result": "success", "msg": "", "zulip_version": ZULIP_VERSION,
                              "zulip_feature_level": FEATURE_LEVEL})  # fmt: skip
        else:
            self._reply(404, {"result": "error", "msg": "Not found", "code": "NOT_FOUND"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
        if urlsplit(self.path).path != "/api/v1/register":
            self._reply(404, {"result": "error", "msg": "Not found", "code": "NOT_FOUND"})
            return
        account = self._authenticate()
        if account is None:
            self._reply(401, {"result": "error", "msg": "Unauthorized", "code": "UNAUTHORIZED"})
            return
        _key, realm, user_id = account
        # As Django's request_event_queue: to kansas's internal listener, Host = realm.
        create = {
            "dont_block": "true", "client": "internal", "secret": SECRET,
            "user_profile_id": str(user_id), "user_client": self.headers.get("User-Agent", "")[:30],
            "lifespan_secs": "0", "narrow": form.get("narrow", "[]"),
            "apply_markdown": "false", "client_gravatar": "false", "slim_presence": "false",
            "all_public_streams": "false",
        }  # fmt: skip
        if "event_types" in form and form["event_types"] != "null":
            create["event_types"] = form["event_types"]
        port = self.server.internal_port
        reply = call(port, "POST", "/api/v1/events/internal", host=realm, form=create)
        if reply.status != 200:
            self._reply(reply.status, reply.json)
            return
        queue_id = reply.json["queue_id"]
        # ... then the immediate fetch of events that raced with the registration.
        fetch = {"queue_id": queue_id, "last_event_id": "-1", "dont_block": "true",
                 "user_profile_id": str(user_id), "secret": SECRET,
                 "client": "internal"}  # fmt: skip
        raced = call(port, "POST", "/api/v1/events/internal", host=realm, form=fetch)
        events = raced.json.get("events", []) if raced.status == 200 else []
        self.server.registered.append((realm, user_id, queue_id))
        self._reply(200, {"result": "success", "msg": "", "queue_id": queue_id,
                          "last_event_id": max((e["id"] for e in events), default=-1),
                          "zulip_version": ZULIP_VERSION,
                          "zulip_feature_level": FEATURE_LEVEL})  # fmt: skip

    def _authenticate(self) -> tuple[str, str, int] | None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None
        email, _, key = base64.b64decode(header[6:]).decode().partition(":")
        account = self.server.users.accounts.get(email)
        host = (self.headers.get("Host") or "").split(":")[0]
        if account is None or account[0] != key or account[1] != host:
            return None  # a realm's users authenticate on their realm's host only
        return account


def send_event(placement: Placement, realm: str, event: dict[str, Any], users: list[int]) -> None:
    """Django's send_event under kansas: the module names the shards, each gets its users
    (here by HTTP; Zulip publishes to notify_tornado_port_<port> in RabbitMQ)."""
    for shard, shard_users in placement.users_by_shard(realm, users).items():
        data = json.dumps({"event": event, "users": shard_users})
        reply = call(shard.port, "POST", "/api/internal/notify_tornado",
                     form={"secret": SECRET, "data": data})  # fmt: skip
        assert reply.status == 200, reply


# -- nginx with contrib/nginx/ --------------------------------------------------------------
def nginx_config(
    tmp: Path, port: int, kansas_port: int, django_port: int, accel: bool = False
) -> Path:
    contrib = CHECKOUT / "contrib" / "nginx"
    upstream = (contrib / "kansas-upstream.conf").read_text()
    assert upstream.count("127.0.0.1:9799") == 1
    upstream = upstream.replace("127.0.0.1:9799", f"127.0.0.1:{kansas_port}")
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / name).mkdir(exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    config = tmp / "nginx.conf"
    accel_include = f"include {contrib / 'kansas-x-accel.conf'};" if accel else ""
    config.write_text(f"""
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format upstream '$request $status upstream=$upstream_addr';
    access_log {tmp}/nginx-access.log upstream;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{upstream}
    upstream django {{ server 127.0.0.1:{django_port}; }}
    server {{
        listen 127.0.0.1:{port};
        server_name _;
        location /api/ {{
            proxy_pass http://django;
            proxy_set_header Host $host;
        }}
        include {contrib / "kansas.conf"};
        {accel_include}
    }}
}}
""")
    return config


class Nginx(Child):
    def __init__(self, tmp: Path, kansas_port: int, django_port: int, accel: bool) -> None:
        assert NGINX is not None
        self.port = free_port()
        config = nginx_config(tmp, self.port, kansas_port, django_port, accel)
        argv = [NGINX, "-p", str(tmp), "-c", str(config), "-e", str(tmp / "nginx-error.log")]
        super().__init__("nginx", argv, tmp)

    def start(self) -> Nginx:
        self.spawn()
        self.wait_for_port(self.port)
        return self


# -- the stack ------------------------------------------------------------------------------
class Stack:
    def __init__(
        self, tmp: Path, dsn: str, redis_url: str, accel: bool = False, workers: int = 0
    ) -> None:
        self.tmp, self.dsn = tmp, dsn
        self.children: list[Any] = []
        self.shards = [self._child(DemoShardProcess(n, tmp, SECRET, heartbeat=30).start())
                       for n in "xy"]  # fmt: skip
        x, y = (s.port for s in self.shards)
        self.names = {s.port: f"tornado-{s.port}" for s in self.shards}
        sharding = {"shard_map": {ONE: x, SPLIT: [x, y]}, "shard_regexes": []}
        (tmp / "sharding.json").write_text(json.dumps(sharding))
        self.ctl("migrate")
        # Zulip's default port is 9800; here x stands for it.
        self.ctl("import-zulip-sharding", str(tmp / "sharding.json"), "--default-port", str(x))
        extra = ["--x-accel-redirect", "/internal/tornado/{port}"] if accel else []
        kansas = KansasProcess(tmp, dsn, redis_url, extra, workers=workers)
        self.kansas = self._child(kansas.start())
        self.users = Users()
        self.django = FakeDjango(self.kansas.internal_port, self.users)
        threading.Thread(target=self.django.serve_forever, daemon=True).start()
        self.nginx = self._child(
            Nginx(tmp, self.kansas.public_port, self.django.port, accel).start()
        )
        # The event path: kansas's placement, followed live (and Redis for older queues).
        self.placement = Placement(dsn, redis_url=redis_url, redis_interval=3600).start()

    def _child(self, child: Any) -> Any:
        self.children.append(child)
        return child

    def ctl(self, *argv: str) -> None:
        assert ctl_main(["--postgres", self.dsn, *argv]) == 0, argv

    def client(self, realm: str, user_id: int) -> zulip.Client:
        email, key = self.users.add(realm, user_id)
        return RealmClient(realm, email=email, api_key=key,
                           site=f"http://127.0.0.1:{self.nginx.port}")  # fmt: skip

    def queues(self, shard: DemoShardProcess) -> list[dict[str, Any]]:
        return list(call(shard.port, "GET", "/demo/queues").json["queues"])

    def parked(self, shard: DemoShardProcess, user_id: int) -> bool:
        return any(q["parked"] for q in self.queues(shard) if q["user_profile_id"] == user_id)

    def stop(self) -> None:
        self.placement.close()
        self.django.shutdown()
        self.django.server_close()
        for child in reversed(self.children):
            child.stop()


class RealmClient(zulip.Client):  # type: ignore[misc]
    """zulip.Client talking to nginx on 127.0.0.1 with the realm as its Host, as a
    browser or app on https://<realm>/ would."""

    def __init__(self, realm: str, **kwargs: Any) -> None:
        self.realm = realm
        super().__init__(**kwargs)

    def ensure_session(self) -> None:
        super().ensure_session()
        self.session.headers["Host"] = self.realm


@pytest.fixture
def stack(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_dsn: str, redis_url: str
) -> Iterator[Stack]:
    accel, workers = getattr(request, "param", (False, 0))
    s = Stack(tmp_path, postgres_dsn, redis_url, accel=accel, workers=workers)
    try:
        yield s
    finally:
        s.stop()


@needs_nginx
@pytest.mark.parametrize(
    "stack", [(False, 0), (True, 0), (False, 2)],
    ids=["proxied", "x-accel", "proxied-master-2-workers"], indirect=True,
)  # fmt: skip
def test_register_get_events_deregister(stack: Stack) -> None:
    client = stack.client(ONE, 11)
    assert client.zulip_version == ZULIP_VERSION
    registered = client.register(event_types=["message"])
    assert registered["result"] == "success", registered
    queue_id, last = registered["queue_id"], registered["last_event_id"]
    x = stack.shards[0]
    assert queue_id in {q["queue_id"] for q in stack.queues(x)}  # ONE lives on x

    send_event(stack.placement, ONE, {"type": "message", "n": 1}, [11])
    got = client.get_events(queue_id=queue_id, last_event_id=last)
    assert got["result"] == "success" and [e["n"] for e in got["events"]] == [1], got
    last = got["events"][-1]["id"]

    # A long-poll, answered when the event comes.
    answer: list[dict[str, Any]] = []
    poll = threading.Thread(
        target=lambda: answer.append(client.get_events(queue_id=queue_id, last_event_id=last)),
        daemon=True,
    )
    poll.start()
    until(lambda: stack.parked(x, 11), 10, "the long-poll to reach the shard")
    send_event(stack.placement, ONE, {"type": "message", "n": 2}, [11])
    poll.join(timeout=10)
    assert [e["n"] for e in answer[0]["events"]] == [2], answer

    assert client.deregister(queue_id) == {"result": "success", "msg": ""}
    gone = client.get_events(queue_id=queue_id, last_event_id=last)
    assert gone["result"] == "error" and gone["code"] == "BAD_EVENT_QUEUE_ID", gone
    log = (stack.tmp / "nginx-access.log").read_text()
    assert "GET /api/v1/events?" in log and "DELETE /api/v1/events" in log  # through nginx
    gets = [line for line in log.splitlines() if line.startswith("GET /api/v1/events?")]
    if "--x-accel-redirect" in stack.kansas.argv:
        # nginx held the long-polls on the shard itself, after kansas's redirect.
        assert any(f"127.0.0.1:{x.port}" in line for line in gets), gets
    else:
        assert not any(f"127.0.0.1:{x.port}" in line for line in gets), gets


class Stop(Exception):
    pass


class Listener:
    """``call_on_each_event`` in a thread, recording every event's ``n``."""

    def __init__(self, client: zulip.Client) -> None:
        self.seen: list[int] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(client,), daemon=True)
        self.thread.start()

    def _run(self, client: zulip.Client) -> None:
        def callback(event: dict[str, Any]) -> None:
            if event["n"] < 0:
                raise Stop
            self.seen.append(event["n"])

        try:
            client.call_on_each_event(callback, event_types=["message"])
        except Stop:
            pass
        except BaseException as e:  # pragma: no cover - reported by the test
            self.error = e


@needs_nginx
def test_events_arrive_exactly_once_and_a_moved_user_re_registers(stack: Stack) -> None:
    x, y = stack.shards
    # SPLIT is split [x, y] by user id, as Zulip had it: user 3 on y, user 4 on x.
    listeners = {3: Listener(stack.client(SPLIT, 3)), 4: Listener(stack.client(SPLIT, 4))}
    until(lambda: stack.parked(y, 3) and stack.parked(x, 4), 15, "both clients long-polling")

    def send(numbers: range) -> None:
        for n in numbers:
            send_event(stack.placement, SPLIT, {"type": "message", "n": n}, [3, 4])

    def received(upto: int) -> None:
        until(lambda: all(len(lis.seen) >= upto for lis in listeners.values()), 20,
              f"events up to {upto}")  # fmt: skip
        for user, listener in listeners.items():
            assert listener.seen == list(range(1, upto + 1)), (user, listener.seen)

    send(range(1, 21))
    received(20)

    # Move user 3 to x. kansas never moves a queue: the old one on y keeps working, and
    # the placement module still sends user 3's events there (Redis-backed).
    stack.ctl("user", "move", SPLIT, "3", stack.names[x.port], "--no-reload")
    until(lambda: stack.placement.shard_for_new_queue(SPLIT, 3).port == x.port, 5,
          "the module to follow the move")  # fmt: skip
    assert [s.port for s in stack.placement.shards_for_user(SPLIT, 3)] == [x.port, y.port]
    send(range(21, 26))
    received(25)

    # The old queue goes away (as when it expires): the client gets BAD_EVENT_QUEUE_ID,
    # registers again by itself -- now on x -- and keeps receiving.
    (old,) = [q["queue_id"] for q in stack.queues(y) if q["user_profile_id"] == 3]
    assert call(y.port, "DELETE", "/api/v1/events", params={"queue_id": old}).status == 200
    until(lambda: stack.parked(x, 3), 15, "user 3's client to re-register on x")
    assert [r for r in stack.django.registered if r[1] == 3][-1][0] == SPLIT
    send(range(26, 31))
    received(30)

    send_event(stack.placement, SPLIT, {"type": "message", "n": -1}, [3, 4])
    for listener in listeners.values():
        listener.thread.join(timeout=20)
        assert not listener.thread.is_alive() and listener.error is None, listener.error
    assert listeners[3].seen == listeners[4].seen == list(range(1, 31))  # exactly once


# -- contrib/systemd: the socket-activated service adopts its sockets ----------------------
def unit_values(path: Path, key: str) -> list[str]:
    """The values of ``key=`` in a unit file, continuation lines joined."""
    text = path.read_text().replace("\\\n", " ")
    return [line.split("=", 1)[1].strip() for line in text.splitlines()
            if line.startswith(f"{key}=")]  # fmt: skip


@pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate is not installed (Debian package: systemd)",
)
def test_socket_activation_as_contrib_systemd_sets_it_up(
    tmp_path: Path, postgres_dsn: str, redis_url: str
) -> None:
    assert SOCKET_ACTIVATE is not None
    systemd = CHECKOUT / "contrib" / "systemd"
    listen = unit_values(systemd / "kansas.socket", "ListenStream")
    assert listen == ["127.0.0.1:9799", "127.0.0.1:9798"]  # public, then internal
    exec_start = [v for v in unit_values(systemd / "kansas.service.d" / "socket-activation.conf",
                                         "ExecStart") if v]  # fmt: skip
    (command,) = exec_start
    argv = shlex.split(command)
    argv = [str(Path(sys.executable).with_name("twistd")), *argv[1:]]
    assert "systemd:domain=INET:index=0" in argv and "systemd:domain=INET:index=1" in argv

    shard = DemoShardProcess("z", tmp_path, SECRET).start()
    assert ctl_main(["--postgres", postgres_dsn, "migrate"]) == 0
    assert ctl_main(["--postgres", postgres_dsn, "shard", "add", "z", shard.url]) == 0
    public, internal = free_port(), free_port()
    # As systemd passes them: in ListenStream order, every descriptor named after the unit.
    wrapper = [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{public}", "-l", f"127.0.0.1:{internal}",
               "--fdname=kansas:kansas", "-E", f"PYTHONPATH={CHECKOUT}",
               "-E", f"KANSAS_POSTGRES={postgres_dsn}",
               "-E", f"KANSAS_REDIS={redis_url}"]  # fmt: skip
    log = (tmp_path / "activated.log").open("wb")
    proc = subprocess.Popen([*wrapper, *argv], stdout=log, stderr=subprocess.STDOUT)
    try:
        until(lambda: port_open(internal), 10, "systemd-socket-activate to listen")
        # A connection starts kansas; it waits in the socket's queue meanwhile.
        form = {"secret": SECRET, "user_profile_id": "1", "dont_block": "true"}
        reply = call(internal, "POST", "/api/v1/events/internal", host=ONE, form=form, timeout=30)
        assert reply.status == 200, (reply, (tmp_path / "activated.log").read_text())
        queue_id = reply.json["queue_id"]
        params = {"queue_id": queue_id, "last_event_id": -1, "dont_block": "true"}
        got = call(public, "GET", "/json/events", host=ONE, params=params, timeout=30)
        assert got.status == 200 and got.json["result"] == "success", got
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        shard.stop()
