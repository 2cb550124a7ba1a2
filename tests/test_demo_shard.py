"""Tests for the demo shard (kansas.demo.shard): core on a fake clock, HTTP, CLI."""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

from kansas.demo.shard import (
    DEFAULT_SECRET,
    DEMO_ZULIP_FEATURE_LEVEL,
    DEMO_ZULIP_VERSION,
    MAX_LIFESPAN_SECS,
    DemoShard,
    NotifyPublisher,
    ShardError,
    ShardResource,
    listen,
    parse_args,
)
from kansas.testing.processes import DemoShardProcess
from kansas.testing.servers import free_port
from kansas.zulip_sharding import parse_sharding

JSONDict = dict[str, Any]
SRC = Path(__file__).resolve().parent.parent / "src"
WAIT = 5.0  # bound on any single asynchronous wait


# -- core, on a fake clock -----------------------------------------------------


def make_shard(**kwargs: Any) -> tuple[DemoShard, Clock]:
    clock = Clock()
    clock.advance(1000)
    kwargs.setdefault("rng", random.Random(1))
    return DemoShard(clock, **kwargs), clock


def result(d: Deferred[JSONDict]) -> JSONDict:
    """The result of a Deferred that must already have fired successfully."""
    out: list[JSONDict] = []
    failures: list[Failure] = []
    d.addCallbacks(out.append, failures.append)
    assert not failures, failures[0].getTraceback()
    assert out, "deferred has not fired"
    return out[0]


def msg(content: str) -> JSONDict:
    return {"type": "message", "message": {"content": content}}


def test_event_ids_are_per_queue_and_start_at_zero() -> None:
    shard, _ = make_shard()
    a = shard.create_queue(7)
    b = shard.create_queue(7)
    other = shard.create_queue(8)
    shard.notify(msg("1"), [7])
    shard.notify(msg("2"), [7, 8])
    shard.create_queue(7)  # a late queue does not see old events
    assert [e["id"] for e in a.events] == [0, 1]
    assert [e["id"] for e in b.events] == [0, 1]
    assert [e["message"]["content"] for e in other.events] == ["2"]
    assert other.events[0]["id"] == 0
    # Every queue got its own copy.
    a.events[0]["message"]["content"] = "changed"
    assert b.events[0]["message"]["content"] == "1"


def test_immediate_reply_prunes_acked_events_and_has_no_queue_id() -> None:
    shard, _ = make_shard()
    q = shard.create_queue(1)
    for i in range(3):
        shard.notify(msg(str(i)), [1])
    reply = result(shard.get_events(q.queue_id, last_event_id=-1))
    assert reply == {"result": "success", "msg": "", "events": q.events}
    assert [e["id"] for e in reply["events"]] == [0, 1, 2]
    # A retried GET with the same last_event_id replays what is not acked.
    assert [e["id"] for e in result(shard.get_events(q.queue_id, 0))["events"]] == [1, 2]
    assert [e["id"] for e in result(shard.get_events(q.queue_id, 0))["events"]] == [1, 2]
    assert result(shard.get_events(q.queue_id, 2, dont_block=True))["events"] == []
    assert q.events == []


def test_long_poll_parks_until_an_event_arrives() -> None:
    shard, clock = make_shard()
    q = shard.create_queue(1)
    d = shard.get_events(q.queue_id, last_event_id=-1)
    assert not d.called
    assert shard.describe()["queues"][0]["parked"] is True
    shard.notify(msg("hi"), [2])  # someone else's event
    assert not d.called
    shard.notify(msg("hi"), [1])
    reply = result(d)
    assert reply["queue_id"] == q.queue_id
    assert [(e["id"], e["type"]) for e in reply["events"]] == [(0, "message")]
    assert q.parked is None
    assert clock.getDelayedCalls() == []  # its heartbeat was cancelled


def test_newer_get_completes_the_older_one_with_no_events() -> None:
    shard, _ = make_shard()
    q = shard.create_queue(1)
    old = shard.get_events(q.queue_id)
    new = shard.get_events(q.queue_id)
    assert result(old) == {"result": "success", "msg": "", "events": [], "queue_id": q.queue_id}
    assert not new.called
    shard.notify(msg("x"), [1])
    assert [e["id"] for e in result(new)["events"]] == [0]


def test_heartbeat_fixed_delay() -> None:
    shard, clock = make_shard(heartbeat=10)
    q = shard.create_queue(1)
    shard.notify(msg("acked"), [1])
    d = shard.get_events(q.queue_id, last_event_id=0)
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.2)
    reply = result(d)
    assert reply["events"] == [{"type": "heartbeat", "id": 1}]
    assert reply["queue_id"] == q.queue_id


def test_heartbeat_default_is_between_45_and_55_seconds() -> None:
    for seed in range(20):
        shard, clock = make_shard(rng=random.Random(seed))
        q = shard.create_queue(1)
        d = shard.get_events(q.queue_id)
        clock.advance(44.99)
        assert not d.called
        clock.advance(10.02)
        assert result(d)["events"] == [{"type": "heartbeat", "id": 0}]


def test_cancel_unparks_and_stops_the_heartbeat() -> None:
    shard, clock = make_shard(heartbeat=10)
    q = shard.create_queue(1)
    d = shard.get_events(q.queue_id)
    errors: list[Failure] = []
    d.addErrback(errors.append)
    clock.advance(3)
    d.cancel()
    assert errors and errors[0].check(CancelledError)
    assert q.parked is None
    assert q.last_connection == clock.seconds()
    assert clock.getDelayedCalls() == []
    assert q.events == []


def test_unknown_or_foreign_queue() -> None:
    shard, _ = make_shard()
    q = shard.create_queue(1)
    for call in (
        lambda: shard.get_events("nope"),
        lambda: shard.get_events(q.queue_id, user_profile_id=2),
        lambda: shard.delete_queue("nope"),
    ):
        with pytest.raises(ShardError) as info:
            call()
        assert info.value.status == 400
        assert info.value.body()["code"] == "BAD_EVENT_QUEUE_ID"
    assert result(shard.get_events(q.queue_id, dont_block=True, user_profile_id=1))


def test_delete_answers_a_parked_request() -> None:
    shard, _ = make_shard()
    q = shard.create_queue(1)
    d = shard.get_events(q.queue_id)
    errors: list[Failure] = []
    d.addErrback(errors.append)
    shard.delete_queue(q.queue_id)
    assert shard.queues == {}
    assert isinstance(errors[0].value, ShardError)
    assert errors[0].value.body()["queue_id"] == q.queue_id


def test_event_types_filter() -> None:
    shard, _ = make_shard()
    only_msgs = shard.create_queue(1, event_types=["message"])
    everything = shard.create_queue(1)
    assert shard.notify({"type": "presence"}, [1]) == 1
    assert shard.notify(msg("m"), [{"id": 1, "flags": ["read"]}]) == 2
    assert [e["type"] for e in only_msgs.events] == ["message"]
    assert only_msgs.events[0]["id"] == 0
    assert only_msgs.events[0]["flags"] == ["read"]
    assert [e["type"] for e in everything.events] == ["presence", "message"]


def test_gc_idle_timeout_lifespan_and_parked_queues() -> None:
    # No heartbeat during the test: the parked request stays parked.
    shard, clock = make_shard(idle_timeout=600, gc_interval=60, heartbeat=10**7)
    shard.start()
    default = shard.create_queue(1)
    short = shard.create_queue(1, lifespan_secs=100)
    long = shard.create_queue(1, lifespan_secs=10**9)
    parked = shard.create_queue(1)
    assert long.timeout == MAX_LIFESPAN_SECS
    poll = shard.get_events(parked.queue_id)
    dropped: list[Failure] = []
    poll.addErrback(dropped.append)
    clock.advance(60)
    assert set(shard.queues) == {q.queue_id for q in (default, short, long, parked)}
    clock.advance(60)  # 120 s idle > 100 s lifespan
    assert short.queue_id not in shard.queues
    clock.pump([60] * 8)  # 600 s: not older than the timeout yet
    assert default.queue_id in shard.queues
    clock.advance(60)
    assert default.queue_id not in shard.queues
    # The parked queue lives on, and a connection resets the idle time.
    assert parked.queue_id in shard.queues
    result(shard.get_events(long.queue_id, dont_block=True))
    clock.advance(MAX_LIFESPAN_SECS - 30)
    assert long.queue_id in shard.queues
    clock.advance(60)
    assert long.queue_id not in shard.queues
    shard.stop()
    assert shard.queues[parked.queue_id].parked is None
    assert dropped and dropped[0].check(CancelledError)
    assert clock.getDelayedCalls() == []


def test_web_reload_clients_counts() -> None:
    shard, _ = make_shard()
    web = [shard.create_queue(i, user_client="website") for i in range(3)]
    api = shard.create_queue(9, user_client="ZulipMobile")
    parked = shard.get_events(web[0].queue_id)
    assert shard.web_reload_clients(2, immediate=True) == (2, False)
    reply = result(parked)
    assert reply["events"] == [{"type": "web_reload_client", "immediate": True, "id": 0}]
    assert shard.web_reload_clients(2, immediate=False) == (1, True)
    assert web[2].events == [{"type": "web_reload_client", "immediate": False, "id": 0}]
    assert api.events == []
    assert shard.web_reload_clients(None, immediate=False) == (0, True)
    # Once a client acked its reload event it is asked again (all at once here).
    result(shard.get_events(web[1].queue_id, last_event_id=0, dont_block=True))
    assert shard.web_reload_clients(None, immediate=False) == (1, True)


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    shard, clock = make_shard(heartbeat=5)
    a = shard.create_queue(
        3, user_client="website", narrow=[["stream", "x"]], event_types=["message"]
    )
    b = shard.create_queue(4, lifespan_secs=30)
    shard.notify(msg("one"), [3, 4])
    shard.notify(msg("two"), [3])
    result(shard.get_events(a.queue_id, last_event_id=0))
    poll = shard.get_events(b.queue_id, last_event_id=0)  # parked: not in the dump
    dropped: list[Failure] = []
    poll.addErrback(dropped.append)
    path = tmp_path / "state.json"
    shard.stop()
    shard.save_state_file(str(path))
    assert dropped and dropped[0].check(CancelledError)
    assert os.listdir(tmp_path) == ["state.json"]  # no temp file left behind

    clock.advance(10)
    restored = DemoShard(clock)
    assert restored.load_state_file(str(path))
    assert list(restored.queues) == [a.queue_id, b.queue_id]
    ra, rb = restored.queues[a.queue_id], restored.queues[b.queue_id]
    for old, new in ((a, ra), (b, rb)):
        assert new.to_state() == old.to_state()
        assert new.parked is None
    assert [e["id"] for e in ra.events] == [1]
    assert rb.timeout == 30
    restored.notify(msg("three"), [3])
    assert [e["id"] for e in ra.events] == [1, 2]
    assert not DemoShard(clock).load_state_file(str(tmp_path / "missing.json"))
    path.write_text('{"version": 99}')
    with pytest.raises(ValueError):
        DemoShard(clock).load_state_file(str(path))


def test_secret_check() -> None:
    shard, _ = make_shard(secret="s3cret")
    assert shard.check_secret("s3cret")
    assert not shard.check_secret("s3cre")
    assert not shard.check_secret(None)
    assert not shard.check_secret("")


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--port", "x"], ["--port", "70000"], [], ["--port", "0", "--heartbeat", "0"]):
        with pytest.raises(SystemExit) as info:
            parse_args(argv)
        assert info.value.code != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ": error: " in err, err
    args = parse_args(["--port", "0", "--heartbeat", "1.5", "--state-file", "s.json"])
    assert (args.port, args.heartbeat, args.state_file) == (0, 1.5, "s.json")


# -- HTTP, in process ------------------------------------------------------------


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class Server:
    """A DemoShard listening on 127.0.0.1, plus an Agent without keep-alive."""

    def __init__(self, **kwargs: Any) -> None:
        self.reactor = get_reactor()
        self.shard = DemoShard(self.reactor, name="t", **kwargs)
        self.shard.start()
        self.port = listen(self.shard, self.reactor)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(self.reactor, persistent=False)
        self.agent = Agent(self.reactor, pool=self.pool)
        self.clients: list[RawClient] = []

    @inlineCallbacks
    def request(
        self,
        method: str,
        path: str,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Generator[Deferred[Any], Any, tuple[int, JSONDict]]:
        hdrs = Headers({k: [v] for k, v in (headers or {}).items()})
        body = None
        if form is not None:
            hdrs.setRawHeaders("Content-Type", ["application/x-www-form-urlencoded"])
            body = FileBodyProducer(BytesIO(urlencode(form).encode()))
        d = self.agent.request(method.encode(), (self.base + path).encode(), hdrs, body)
        response = yield d.addTimeout(WAIT, self.reactor)
        assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
        body_reader = BodyReader()
        response.deliverBody(body_reader)
        data = yield body_reader.done.addTimeout(WAIT, self.reactor)
        return response.code, json.loads(data)

    def internal(
        self, path: str, form: dict[str, str], **kwargs: Any
    ) -> Deferred[tuple[int, JSONDict]]:
        return self.request("POST", path, {"secret": DEFAULT_SECRET, **form}, **kwargs)

    @inlineCallbacks
    def raw(self) -> Generator[Deferred[Any], Any, RawClient]:
        client = RawClient()
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port.getHost().port)
        yield connectProtocol(endpoint, client).addTimeout(WAIT, self.reactor)
        self.clients.append(client)
        return client

    def close(self) -> None:
        self.shard.stop()
        for client in self.clients:
            if client.transport is not None:
                client.transport.abortConnection()
        pytest_twisted.blockon(self.port.stopListening())
        pytest_twisted.blockon(self.pool.closeCachedConnections())


class BodyReader(Protocol):
    """Collects a response body (twisted's readBody warns on closed connections)."""

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone):
            self.done.callback(self.data)
        else:
            self.done.errback(reason)


class RawClient(Protocol):
    """A bare HTTP/1.1 client: keep-alive and disconnects under the test's control."""

    def __init__(self) -> None:
        self.buffer = b""
        self.closed: Deferred[None] = Deferred()
        self._waiting: list[tuple[int, Deferred[list[tuple[int, JSONDict]]]]] = []

    def send(self, method: str, path: str) -> None:
        self.transport.write(f"{method} {path} HTTP/1.1\r\nHost: shard\r\n\r\n".encode())

    def responses(self) -> list[tuple[int, JSONDict]]:
        out, rest = [], self.buffer
        while b"\r\n\r\n" in rest:
            head, rest = rest.split(b"\r\n\r\n", 1)
            lines = head.decode().split("\r\n")
            fields = dict(line.lower().split(": ", 1) for line in lines[1:])
            length = int(fields["content-length"])
            if len(rest) < length:
                break
            out.append((int(lines[0].split()[1]), json.loads(rest[:length])))
            rest = rest[length:]
        return out

    def wait_responses(self, n: int) -> Deferred[list[tuple[int, JSONDict]]]:
        d: Deferred[list[tuple[int, JSONDict]]] = Deferred()
        self._waiting.append((n, d))
        self.dataReceived(b"")
        return d.addTimeout(WAIT, get_reactor())

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        got = self.responses()
        for n, d in list(self._waiting):
            if len(got) >= n:
                self._waiting.remove((n, d))
                d.callback(got)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(heartbeat=0.3)
    yield srv
    srv.close()


@inlineCallbacks
def wait_until(check: Callable[[], bool]) -> Generator[Deferred[Any], Any, None]:
    """Poll in-process server state (bounded) until ``check()`` holds."""
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        yield deferLater(get_reactor(), 0.005, lambda: None)


@pytest_twisted.inlineCallbacks
def test_http_register_fetch_long_poll_and_delete(
    server: Server,
) -> Generator[Deferred[Any], Any, None]:
    status, created = yield server.internal(
        "/api/v1/events/internal",
        {
            "dont_block": "true",
            "client": "internal",
            "user_profile_id": "11",
            "user_client": "website",
            "lifespan_secs": "0",
            "narrow": "[]",
            "event_types": '["message"]',
            "apply_markdown": "true",
        },
    )
    assert status == 200
    queue_id = created.pop("queue_id")
    assert created == {"result": "success", "msg": "", "events": []}
    assert server.shard.queues[queue_id].event_types == ["message"]

    # Django's follow-up fetch: immediate, and no queue_id in it.
    status, reply = yield server.internal(
        "/api/v1/events/internal",
        {"queue_id": queue_id, "last_event_id": "-1", "dont_block": "true"},
    )
    assert (status, reply) == (200, {"result": "success", "msg": "", "events": []})

    poll = server.request("GET", f"/json/events?queue_id={queue_id}&last_event_id=-1")
    yield wait_until(lambda: server.shard.queues[queue_id].parked is not None)
    event = {"type": "message", "message": {"id": 5, "content": "hi"}}
    status, reply = yield server.internal(
        "/api/internal/notify_tornado", {"data": json.dumps({"event": event, "users": [11, 12]})}
    )
    assert (status, reply) == (200, {"result": "success", "msg": ""})
    status, reply = yield poll
    assert status == 200
    assert reply == {
        "result": "success",
        "msg": "",
        "events": [{**event, "id": 0}],
        "queue_id": queue_id,
    }

    status, listing = yield server.request("GET", "/demo/queues")
    assert listing["shard"] == "t"
    assert listing["queues"] == [
        {"queue_id": queue_id, "user_profile_id": 11, "pending": 1, "parked": False}
    ]

    status, reply = yield server.request(
        "GET", f"/api/v1/events?queue_id={queue_id}&last_event_id=0&dont_block=true"
    )
    assert (status, reply) == (200, {"result": "success", "msg": "", "events": []})

    status, reply = yield server.internal("/api/internal/web_reload_clients", {"immediate": "true"})
    assert (status, reply) == (
        200,
        {"result": "success", "msg": "", "sent_events": 1, "complete": True},
    )

    status, reply = yield server.request("DELETE", "/json/events", {"queue_id": queue_id})
    assert (status, reply) == (200, {"result": "success", "msg": ""})
    status, reply = yield server.request("DELETE", f"/api/v1/events?queue_id={queue_id}")
    assert status == 400
    assert reply == {
        "result": "error",
        "msg": f"Bad event queue ID: {queue_id}",
        "code": "BAD_EVENT_QUEUE_ID",
        "queue_id": queue_id,
    }


@pytest_twisted.inlineCallbacks
def test_http_errors(server: Server) -> Generator[Deferred[Any], Any, None]:
    queue_id = server.shard.create_queue(1).queue_id
    create = {"user_profile_id": "1"}
    cases: list[tuple[Deferred[tuple[int, JSONDict]], int, str, str | None]] = [
        (
            server.request("GET", f"/json/events?queue_id={queue_id}&last_event_id=abc"),
            400,
            "BAD_REQUEST",
            "Bad value for 'last_event_id': abc",
        ),
        (server.request("GET", "/json/events?last_event_id=1"), 400, "BAD_REQUEST", None),
        (
            server.request("GET", f"/json/events?queue_id={queue_id}&dont_block=yes"),
            400,
            "BAD_REQUEST",
            None,
        ),
        (server.request("GET", "/json/events?queue_id=x"), 400, "BAD_EVENT_QUEUE_ID", None),
        (server.request("POST", "/json/events", {"queue_id": queue_id}), 405, "", None),
        (server.request("PUT", "/api/v1/events"), 405, "", None),
        (server.request("GET", "/api/v1/events/internal"), 405, "", None),
        (server.request("GET", "/nowhere"), 404, "NOT_FOUND", None),
        (server.request("POST", "/api/v1/events/internal", create), 403, "ACCESS_DENIED", None),
        (
            server.request("POST", "/api/v1/events/internal", {**create, "secret": "wrong"}),
            403,
            "ACCESS_DENIED",
            None,
        ),
        (
            server.internal(
                "/api/internal/notify_tornado",
                {"data": '{"event": {}, "users": [1]}'},
                headers={"X-Real-Ip": "203.0.113.9"},
            ),
            403,
            "ACCESS_DENIED",
            None,
        ),
        (
            server.request("GET", "/demo/queues", headers={"X-Forwarded-For": "203.0.113.9"}),
            403,
            "ACCESS_DENIED",
            None,
        ),
        (server.internal("/api/v1/events/internal", {}), 400, "BAD_REQUEST", None),
        (
            server.internal("/api/v1/events/internal", {**create, "event_types": "nope"}),
            400,
            "BAD_REQUEST",
            None,
        ),
        (server.internal("/api/internal/notify_tornado", {}), 400, "BAD_REQUEST", None),
    ]
    for d, status, code, message in cases:
        got_status, body = yield d
        assert (got_status, body["result"]) == (status, "error"), body
        if code:
            assert body["code"] == code
        if message is not None:
            assert body["msg"] == message
    assert list(server.shard.queues) == [queue_id]
    # The trusted header also works the other way: a local X-Real-Ip is local.
    status, _ = yield server.request("GET", "/demo/queues", headers={"X-Real-Ip": "127.0.0.1"})
    assert status == 200


@pytest_twisted.inlineCallbacks
def test_http_heartbeat_keep_alive_and_disconnect(
    server: Server,
) -> Generator[Deferred[Any], Any, None]:
    queue = server.shard.create_queue(1)
    client = yield server.raw()
    client.send("GET", f"/api/v1/events?queue_id={queue.queue_id}")
    [(status, reply)] = yield client.wait_responses(1)
    assert (status, reply["events"], reply["queue_id"]) == (
        200,
        [{"type": "heartbeat", "id": 0}],
        queue.queue_id,
    )
    # Same connection again (keep-alive): a newer GET replaces an older one.
    client.send("GET", f"/api/v1/events?queue_id={queue.queue_id}&last_event_id=0")
    yield wait_until(lambda: queue.parked is not None)
    other = yield server.raw()
    other.send("GET", f"/api/v1/events?queue_id={queue.queue_id}&last_event_id=0")
    got = yield client.wait_responses(2)
    assert got[1] == (
        200,
        {"result": "success", "msg": "", "events": [], "queue_id": queue.queue_id},
    )
    yield wait_until(lambda: queue.parked is not None)
    # The parked client goes away: the queue no longer has a parked request.
    other.transport.loseConnection()
    yield other.closed.addTimeout(WAIT, server.reactor)
    yield wait_until(lambda: queue.parked is None)
    assert queue.events == []
    assert client.closed.called is False


@pytest_twisted.inlineCallbacks
def test_http_stop_drops_parked_connections(
    server: Server,
) -> Generator[Deferred[Any], Any, None]:
    queue = server.shard.create_queue(1)
    client = yield server.raw()
    client.send("GET", f"/json/events?queue_id={queue.queue_id}")
    yield wait_until(lambda: queue.parked is not None)
    server.shard.stop()
    yield client.closed.addTimeout(WAIT, server.reactor)
    assert client.buffer == b""
    assert queue.parked is None


# -- the CLI, as a subprocess ------------------------------------------------------


class ShardProcess:
    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kansas.demo.shard", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        line = self.readline()
        assert line.startswith("demo shard "), line
        self.name = line.split()[2]
        self.port = int(line.rsplit(":", 1)[1])

    def readline(self) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            assert sel.select(WAIT * 2), "no output from the shard"
        return self.proc.stdout.readline().decode()

    def request(
        self, method: str, path: str, form: dict[str, str] | None = None
    ) -> tuple[int, JSONDict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)
        try:
            body = urlencode(form) if form is not None else None
            headers = {"Content-Type": "application/x-www-form-urlencoded"} if form else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=WAIT * 2)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., ShardProcess]]:
    started: list[ShardProcess] = []

    def start(*args: str) -> ShardProcess:
        started.append(ShardProcess(*args))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()


def test_subprocess_queues_survive_a_restart(
    tmp_path: Path, spawn: Callable[..., ShardProcess]
) -> None:
    state = tmp_path / "state.json"
    shard = spawn("--state-file", str(state), "--secret", "s", "--name", "alpha")
    assert shard.name == "alpha"
    status, created = shard.request(
        "POST",
        "/api/v1/events/internal",
        {"secret": "s", "user_profile_id": "5", "user_client": "website"},
    )
    assert status == 200
    queue_id = created["queue_id"]
    event = {"type": "stream", "op": "create"}
    for _ in range(2):
        status, _ = shard.request(
            "POST",
            "/api/internal/notify_tornado",
            {"secret": "s", "data": json.dumps({"event": event, "users": [5]})},
        )
        assert status == 200
    # Ack the first event.
    status, reply = shard.request(
        "GET", f"/json/events?queue_id={queue_id}&last_event_id=0&dont_block=true"
    )
    assert reply["events"] == [{**event, "id": 1}]
    # A long-poll parked on another queue is dropped by the restart, without a reply.
    _, other = shard.request(
        "POST", "/api/v1/events/internal", {"secret": "s", "user_profile_id": "6"}
    )
    with socket.create_connection(("127.0.0.1", shard.port), timeout=WAIT) as poll:
        poll.sendall(
            f"GET /json/events?queue_id={other['queue_id']} HTTP/1.1\r\n"
            "Host: shard\r\n\r\n".encode()
        )
        deadline = time.monotonic() + WAIT
        while not any(q["parked"] for q in shard.request("GET", "/demo/queues")[1]["queues"]):
            assert time.monotonic() < deadline, "long-poll never parked"
        assert shard.terminate() == 0
        assert poll.recv(1024) == b""
    assert json.loads(state.read_text())["queues"][0]["queue_id"] == queue_id

    again = spawn("--state-file", str(state), "--secret", "s")
    assert again.name == f"shard-{again.port}"
    assert not state.exists() and (tmp_path / "state.json.last").exists()
    status, listing = again.request("GET", "/demo/queues")
    assert listing["queues"] == [
        {"queue_id": queue_id, "user_profile_id": 5, "pending": 1, "parked": False},
        {"queue_id": other["queue_id"], "user_profile_id": 6, "pending": 0, "parked": False},
    ]
    status, reply = again.request(
        "GET", f"/api/v1/events?queue_id={queue_id}&last_event_id=0&dont_block=true"
    )
    assert (status, reply["events"]) == (200, [{**event, "id": 1}])
    again.request(
        "POST",
        "/api/internal/notify_tornado",
        {"secret": "s", "data": json.dumps({"event": event, "users": [5]})},
    )
    status, reply = again.request("GET", f"/api/v1/events?queue_id={queue_id}&last_event_id=1")
    assert [e["id"] for e in reply["events"]] == [2]
    assert again.terminate() == 0


def run_demo_shard(*args: str) -> subprocess.CompletedProcess[str]:
    """The demo shard's CLI, to completion (for the ways it refuses to start)."""
    return subprocess.run(
        [sys.executable, "-m", "kansas.demo.shard", *args],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )


def test_subprocess_rejects_a_bad_state_file(
    tmp_path: Path, spawn: Callable[..., ShardProcess]
) -> None:
    state = tmp_path / "state.json"
    state.write_text("{not json")
    proc = run_demo_shard("--port", "0", "--state-file", str(state))
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.strip().startswith("demo shard: cannot load state file")


# -- as an unmodified Zulip Tornado: --sharding ------------------------------------------

# Realm "split" is shared by user id (even users on 9800, odd on 9801), "solo" is on
# 9801, realms matching ^eu\. too; any other realm goes to the default (9800, the lowest).
SHARDING = {
    "shard_map": {"split.example.com": [9800, 9801], "solo.example.com": 9801},
    "shard_regexes": [[r"eu\.", 9801]],
}
SPLIT = "split.example.com"


def basic(user_id: int | str, api_key: str = "key") -> dict[str, str]:
    """HTTP Basic headers for the tests' users: user<ID>@<anything>."""
    name = f"user{user_id}@example.com" if isinstance(user_id, int) else user_id
    token = base64.b64encode(f"{name}:{api_key}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class FakeRequest:
    """What ShardResource uses of twisted.web's Request, without a socket."""

    def __init__(
        self,
        method: str,
        uri: str,
        *,
        headers: dict[str, str] | None = None,
        form: dict[str, str] | None = None,
        client: str = "127.0.0.1",
    ) -> None:
        self.method = method.encode()
        self.uri = uri.encode()
        self.path = self.uri.partition(b"?")[0]
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        body = b""
        if form is not None:
            self.headers["content-type"] = "application/x-www-form-urlencoded"
            body = urlencode(form).encode()
        self.content = BytesIO(body)
        self.client = IPv4Address("TCP", client, 40000)
        self.code = 200
        self.response_headers: dict[bytes, bytes] = {}
        self.body = b""
        self.finished = False
        self.finishing: Deferred[None] = Deferred()

    def getHeader(self, key: str) -> str | None:
        return self.headers.get(key.lower())

    def getClientAddress(self) -> IPv4Address:
        return self.client

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.response_headers[name.lower()] = value

    def write(self, data: bytes) -> None:
        self.body += data

    def finish(self) -> None:
        self.finished = True

    def loseConnection(self) -> None:
        self.finished = True

    def notifyFinish(self) -> Deferred[None]:
        return self.finishing

    def json(self) -> JSONDict:
        assert self.response_headers[b"content-type"] == b"application/json"
        body: JSONDict = json.loads(self.body)
        return body


class Sharded:
    """A DemoShard on a fake clock with SHARDING, on ``port``, driven through its
    resource; what it publishes to other ports is kept in ``published``."""

    def __init__(self, port: int = 9800, **kwargs: Any) -> None:
        self.published: list[tuple[int, JSONDict]] = []
        self.shard, self.clock = make_shard(
            sharding=parse_sharding(SHARDING),
            port=port,
            publish=lambda port, notice: self.published.append((port, notice)),
            **kwargs,
        )
        self.resource = ShardResource(self.shard)

    def send(self, request: FakeRequest) -> FakeRequest:
        rendered = self.resource.render_request(request)
        if isinstance(rendered, bytes):  # else NOT_DONE_YET: it finishes later
            request.write(rendered)
            request.finish()
        return request

    def get(self, uri: str, user: int | None, host: str = SPLIT) -> FakeRequest:
        headers = {"Host": host, **(basic(user) if user is not None else {})}
        return self.send(FakeRequest("GET", uri, headers=headers))

    def delete(self, queue_id: str, user: int | None, host: str = SPLIT) -> FakeRequest:
        headers = {"Host": host, **(basic(user) if user is not None else {})}
        return self.send(
            FakeRequest("DELETE", f"/api/v1/events?queue_id={queue_id}", headers=headers)
        )

    def internal(self, form: dict[str, str], host: str | None = SPLIT) -> FakeRequest:
        headers = {"Host": host} if host is not None else {}
        form = {"secret": DEFAULT_SECRET, **form}
        return self.send(FakeRequest("POST", "/api/v1/events/internal", headers=headers, form=form))


def test_default_port_is_the_lowest_in_the_file_unless_given() -> None:
    here = Sharded(port=9801)
    assert here.shard.default_port == 9800
    assert here.shard.user_port("other.example.org", 5) == 9800
    assert here.shard.other_port("other.example.org", 5) == 9800
    assert here.shard.other_port("eu.example.org", 5) is None
    assert [here.shard.other_port(SPLIT, u) for u in range(4)] == [9800, None, 9800, None]
    assert Sharded(port=9801, default_port=9801).shard.other_port("other.example.org", 5) is None
    assert DemoShard(Clock()).other_port(SPLIT, 2) is None  # no map: serves everyone


def test_sharded_get_of_another_ports_user_is_an_accel_redirect() -> None:
    here = Sharded(port=9800)
    queue = here.shard.create_queue(3)  # user 3's queue, here by mistake: no matter
    for uri in (
        "/api/v1/events?queue_id=no-such-queue&last_event_id=-1&dont_block=true",
        f"/json/events?queue_id={queue.queue_id}&last_event_id=abc",  # not parsed here
        "/json/events?narrow=%5B%5D&queue_id=a+b",  # the query as received
        "/json/events",
    ):
        reply = here.get(uri, user=3, host="Split.Example.com:443")
        assert reply.finished and reply.code == 200 and reply.body == b""
        assert reply.response_headers == {
            b"content-type": b"text/html; charset=utf-8",
            b"content-length": b"0",
            b"x-accel-redirect": b"/internal/tornado/9801" + uri.encode(),
        }
    assert queue.parked is None and here.published == []
    # A realm the file does not name lives on the default port.
    there = Sharded(port=9801)
    reply = there.get("/api/v1/events?queue_id=q", user=4, host="chat.example.org")
    assert (
        reply.response_headers[b"x-accel-redirect"]
        == b"/internal/tornado/9800/api/v1/events?queue_id=q"
    )


def test_sharded_get_of_this_ports_user_checks_the_queues_owner() -> None:
    here = Sharded(port=9801, heartbeat=10)
    mine = here.shard.create_queue(3)
    theirs = here.shard.create_queue(5)
    here.shard.notify(msg("hi"), [3, 5])
    reply = here.get(f"/api/v1/events?queue_id={mine.queue_id}&last_event_id=-1", user=3)
    assert (reply.code, [e["id"] for e in reply.json()["events"]]) == (200, [0])
    reply = here.get(f"/json/events?queue_id={theirs.queue_id}&dont_block=true", user=3)
    assert reply.code == 400
    assert reply.json() == {
        "result": "error",
        "msg": f"Bad event queue ID: {theirs.queue_id}",
        "code": "BAD_EVENT_QUEUE_ID",
        "queue_id": theirs.queue_id,
    }
    # A long-poll of this port's user parks, as without a map.
    poll = here.get(f"/api/v1/events?queue_id={mine.queue_id}&last_event_id=0", user=3)
    assert not poll.finished and mine.parked is not None
    here.clock.advance(10)
    assert poll.finished and poll.json()["events"] == [{"type": "heartbeat", "id": 1}]


def test_sharded_client_requests_need_basic_credentials() -> None:
    here = Sharded(port=9800)
    queue = here.shard.create_queue(2)
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic !!not-base64!!"},
        basic("alice@example.com"),  # not user<ID>@...
        basic("user@example.com"),
        {"Authorization": "Basic " + base64.b64encode(b"user2@example.com").decode()},  # no key
    ]
    for headers in bad_headers:
        for method in ("GET", "DELETE"):
            uri = f"/json/events?queue_id={queue.queue_id}&dont_block=true"
            reply = here.send(FakeRequest(method, uri, headers={"Host": SPLIT, **headers}))
            assert reply.code == 401, (method, headers)
            assert reply.response_headers[b"www-authenticate"] == b'Basic realm="zulip"'
            body = reply.json()
            assert (body["result"], body["code"]) == ("error", "UNAUTHORIZED")
            assert isinstance(body["msg"], str) and body["msg"]
    assert list(here.shard.queues) == [queue.queue_id] and queue.parked is None
    # Without a map, as before: nothing is asked.
    plain, _ = make_shard()
    plain_queue = plain.create_queue(2)
    request = FakeRequest("DELETE", f"/json/events?queue_id={plain_queue.queue_id}")
    assert ShardResource(plain).render_request(request) and request.code == 200


def test_sharded_queue_creation_for_another_ports_user_is_a_500() -> None:
    here = Sharded(port=9800)
    reply = here.internal({"user_profile_id": "3"})
    assert reply.code == 500
    assert reply.json() == {"result": "error", "msg": "Internal error", "code": "INTERNAL_ERROR"}
    assert here.shard.queues == {}
    created = here.internal({"user_profile_id": "2"}).json()
    assert created["result"] == "success"
    # Django's immediate fetch is checked too (Zulip asserts before either).
    fetch = {"queue_id": created["queue_id"], "last_event_id": "-1", "dont_block": "true"}
    assert here.internal({**fetch, "user_profile_id": "3"}).code == 500
    assert here.internal({**fetch, "user_profile_id": "2"}).code == 200
    # Unmodified Django posts to 127.0.0.1:<port>: no realm to check by.
    for host in ("127.0.0.1:9800", "[::1]:9800", None):
        assert here.internal({"user_profile_id": "3"}, host=host).code == 200, host
    assert len(here.shard.queues) == 4


def test_sharded_delete_of_another_ports_user_is_published_to_its_port() -> None:
    here, owner = Sharded(port=9800), Sharded(port=9801)
    queue = owner.shard.create_queue(3)
    other = owner.shard.create_queue(5)
    poll = owner.get(f"/api/v1/events?queue_id={queue.queue_id}", user=3)
    assert not poll.finished

    reply = here.delete(queue.queue_id, user=3)
    assert (reply.code, reply.json()) == (200, {"result": "success", "msg": ""})
    notice = {"users": [3], "event": {"type": "cleanup_queue", "queue_id": queue.queue_id}}
    assert here.published == [(9801, notice)]
    assert queue.queue_id in owner.shard.queues  # nothing yet: the notice is in flight

    # The owner is told through notify_tornado (RabbitMQ's stand-in), with the secret.
    form = {"secret": DEFAULT_SECRET, "data": json.dumps(notice)}
    told = owner.send(FakeRequest("POST", "/api/internal/notify_tornado", form=form))
    assert (told.code, told.json()) == (200, {"result": "success", "msg": ""})
    assert list(owner.shard.queues) == [other.queue_id]
    assert poll.finished and poll.code == 400
    assert poll.json()["code"] == "BAD_EVENT_QUEUE_ID"
    assert other.events == []  # a cleanup is never an event

    # A cleanup naming someone else's queue, or a gone one, changes nothing.
    assert owner.shard.notify(notice["event"] | {"queue_id": other.queue_id}, [3]) == 0
    assert owner.shard.notify(notice["event"], [3]) == 0
    assert list(owner.shard.queues) == [other.queue_id]
    # The owner's own DELETE: another user's queue is BAD_EVENT_QUEUE_ID there.
    assert owner.delete(other.queue_id, user=3).code == 400
    assert owner.delete(other.queue_id, user=5).code == 200
    assert owner.shard.queues == {} and owner.published == []


def test_restart_events_go_to_reloaded_queues_that_take_them() -> None:
    shard, clock = make_shard()
    every = shard.create_queue(1)
    restarts = shard.create_queue(1, event_types=["message", "restart"])
    messages = shard.create_queue(1, event_types=["message"])
    shard.notify(msg("before"), [1])
    reloaded = DemoShard(clock)
    reloaded.load_state(shard.dump_state())
    assert reloaded.send_restart_events(1234) == 2
    event = {
        "type": "restart",
        "zulip_version": DEMO_ZULIP_VERSION,
        "zulip_feature_level": DEMO_ZULIP_FEATURE_LEVEL,
        "server_generation": 1234,
        "immediate": False,
        "id": 1,
    }
    assert reloaded.queues[every.queue_id].events[1:] == [event]
    assert reloaded.queues[restarts.queue_id].events[1:] == [event]
    assert [e["type"] for e in reloaded.queues[messages.queue_id].events] == ["message"]
    assert isinstance(DEMO_ZULIP_FEATURE_LEVEL, int) and DEMO_ZULIP_VERSION.startswith("9.")


def test_heartbeat_is_45_plus_a_whole_number_of_seconds_up_to_10() -> None:
    shard, _ = make_shard(rng=random.Random(7))
    delays = [shard.heartbeat_delay() for _ in range(400)]
    assert all(isinstance(d, int) for d in delays)
    assert set(delays) == set(range(45, 56))
    # A long-poll's heartbeat comes exactly then (same seed, same draw).
    shard, clock = make_shard(rng=random.Random(8))
    expected = 45 + random.Random(8).randint(0, 10)
    queue = shard.create_queue(1)
    poll = shard.get_events(queue.queue_id)
    clock.advance(expected - 0.001)
    assert not poll.called
    clock.advance(0.001)
    assert result(poll)["events"] == [{"type": "heartbeat", "id": 0}]
    # --heartbeat still fixes it.
    fixed, clock = make_shard(heartbeat=2.5)
    poll = fixed.get_events(fixed.create_queue(1).queue_id)
    clock.advance(2.5)
    assert poll.called


def test_cli_sharding_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--port", "9801", "--sharding", "s.json", "--default-port", "9802"])
    assert (args.sharding, args.default_port) == ("s.json", 9802)
    assert parse_args(["--port", "1"]).sharding is None
    for argv in (
        ["--port", "1", "--default-port", "9800"],
        ["--port", "1", "--sharding", "s", "--default-port", "x"],
    ):
        with pytest.raises(SystemExit) as info:
            parse_args(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ": error: " in err, err


@pytest_twisted.inlineCallbacks
def test_notify_publisher_delivers_and_only_logs_failures(
    server: Server,
) -> Generator[Deferred[Any], Any, None]:
    owner = server
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        port, closed = owner.port.getHost().port, free_port()
        queue = owner.shard.create_queue(3)
        notice = {"users": [3], "event": {"type": "cleanup_queue", "queue_id": queue.queue_id}}
        publish = NotifyPublisher(owner.reactor, DEFAULT_SECRET)
        yield publish(port, notice)  # fires once the owner has answered
        assert owner.shard.queues == {}
        assert not [e for e in logged if e.get("log_namespace", "").startswith("kansas")]
        # Refused (wrong secret) or nobody listening: a warning, no exception.
        yield NotifyPublisher(owner.reactor, "wrong-secret")(port, notice)
        yield publish(closed, notice)
        warnings = [e for e in logged if "not delivered" in e.get("log_format", "")]
        assert [w["port"] for w in warnings] == [port, closed]
        assert "status 403" in warnings[0]["why"]
    finally:
        globalLogPublisher.removeObserver(logged.append)


def http_exchange(
    port: int, method: str, path: str, headers: dict[str, str], form: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One blocking request to a shard process: status, headers (lower-cased), body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        body = urlencode(form) if form is not None else None
        if form is not None:
            headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_subprocess_shards_as_unmodified_tornado(
    tmp_path: Path, spawn: Callable[..., ShardProcess]
) -> None:
    ports = [free_port(), free_port()]
    sharding = tmp_path / "sharding.json"
    sharding.write_text(json.dumps({"shard_map": {SPLIT: ports}}))
    state = tmp_path / "a.json"
    a = spawn("--port", str(ports[0]), "--sharding", str(sharding), "--state-file", str(state))
    b = spawn("--port", str(ports[1]), "--sharding", str(sharding))
    b_user, a_user = 1, 2  # user U lives on ports[U % 2]
    create = {"secret": DEFAULT_SECRET, "user_profile_id": "1", "user_client": "website"}
    status, _, body = http_exchange(
        b.port, "POST", "/api/v1/events/internal", {"Host": "127.0.0.1"}, create
    )
    assert status == 200
    queue_id = json.loads(body)["queue_id"]

    # A GET of b's user at a: the redirect, on the wire.
    path = f"/api/v1/events?queue_id={queue_id}&last_event_id=-1&dont_block=true"
    status, headers, body = http_exchange(a.port, "GET", path, {"Host": SPLIT, **basic(b_user)})
    assert (status, body) == (200, b"")
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-length"] == "0"
    assert headers["x-accel-redirect"] == f"/internal/tornado/{b.port}{path}"
    status, headers, _ = http_exchange(a.port, "GET", path, {"Host": SPLIT})
    assert status == 401 and headers["www-authenticate"] == 'Basic realm="zulip"'

    # A DELETE of b's user at a reaches b as a cleanup_queue over notify_tornado.
    status, _, body = http_exchange(a.port, "DELETE", path, {"Host": SPLIT, **basic(b_user)})
    assert (status, json.loads(body)) == (200, {"result": "success", "msg": ""})
    deadline = time.monotonic() + WAIT
    while b.request("GET", "/demo/queues")[1]["queues"]:
        assert time.monotonic() < deadline, "the cleanup never reached the owner"
        time.sleep(0.01)

    # a's own user, through a restart: the reloaded queue gets a restart event.
    create["user_profile_id"] = str(a_user)
    status, _, body = http_exchange(
        a.port, "POST", "/api/v1/events/internal", {"Host": SPLIT}, create
    )
    queue_id = json.loads(body)["queue_id"]
    assert a.terminate() == 0
    started = int(time.time())
    again = spawn("--port", str(ports[0]), "--sharding", str(sharding), "--state-file", str(state))
    path = f"/json/events?queue_id={queue_id}&last_event_id=-1&dont_block=true"
    status, _, body = http_exchange(again.port, "GET", path, {"Host": SPLIT, **basic(a_user)})
    [event] = json.loads(body)["events"]
    assert event["type"] == "restart" and event["immediate"] is False
    assert started - 1 <= event["server_generation"] <= time.time()


def test_subprocess_rejects_a_bad_sharding_file(tmp_path: Path) -> None:
    sharding = tmp_path / "sharding.json"
    sharding.write_text('{"shard_map": {"a.example.com": "x"}}')
    proc = run_demo_shard("--port", "0", "--sharding", str(sharding))
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.startswith("demo shard: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_demo_shard_process_passes_the_sharding_options(tmp_path: Path) -> None:
    sharding = tmp_path / "sharding.json"
    proc = DemoShardProcess("a", tmp_path, "s", port=9801, sharding=sharding, default_port=9800)
    args = parse_args(proc.argv[proc.argv.index("--port") :])
    assert (args.port, args.sharding, args.default_port) == (9801, str(sharding), 9800)
    plain = DemoShardProcess("b", tmp_path, "s", port=9802)
    assert parse_args(plain.argv[plain.argv.index("--port") :]).sharding is None
