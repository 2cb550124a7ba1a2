"""The master/worker machinery without processes: sockets, the control channel, the
master's generations and a worker's retirement, on MemoryReactorClock and fakes."""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport

from kansas.errors import ConfigError
from kansas.process import control, master, worker
from kansas.process.control import ControlError, MessageDecoder, encode
from kansas.process.master import Master
from kansas.process.sockets import (
    DEFAULT_BACKLOG,
    accept_evenly,
    bind,
    split_endpoint,
    with_backlog,
)
from kansas.proxy import front

from .test_proxy import Harness, get, ok_reply


# -- sockets -----------------------------------------------------------------------------
def test_endpoint_strings_split_like_twisted() -> None:
    assert split_endpoint("tcp:9799:interface=127.0.0.1") == (
        "tcp", ["9799"], {"interface": "127.0.0.1"}
    )  # fmt: skip
    assert split_endpoint(r"unix:/run/k\:s.sock:mode=660") == (
        "unix", ["/run/k:s.sock"], {"mode": "660"}
    )  # fmt: skip


def test_a_single_process_listens_with_kansass_backlog_unless_told_otherwise() -> None:
    # Twisted's own default (50) drops SYNs when thousands of clients connect at once.
    reactor = MemoryReactor()
    for description, backlog in [
        ("tcp:9799:interface=127.0.0.1", DEFAULT_BACKLOG),
        ("tcp:9799:interface=127.0.0.1:backlog=16", 16),
    ]:
        serverFromString(reactor, with_backlog(description)).listen(Factory())
        assert reactor.tcpServers[-1][2] == backlog
    assert with_backlog("systemd:domain=INET:index=0") == "systemd:domain=INET:index=0"
    assert with_backlog(r"unix:/run/k\:s.sock") == rf"unix:/run/k\:s.sock:backlog={DEFAULT_BACKLOG}"


def test_bind_makes_a_listening_nonblocking_socket_children_do_not_inherit() -> None:
    listener = bind("listen", "tcp:0:interface=127.0.0.1:backlog=16")
    try:
        assert listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert listener.sock.getblocking() is False
        assert listener.sock.get_inheritable() is False
        assert listener.family == socket.AF_INET
    finally:
        listener.close()


def test_bind_errors_are_one_line_config_errors() -> None:
    taken = bind("listen", "tcp:0:interface=127.0.0.1")
    try:
        port = taken.sock.getsockname()[1]
        with pytest.raises(ConfigError, match=r"cannot listen on .*--listen"):
            bind("listen", f"tcp:{port}:interface=127.0.0.1")
    finally:
        taken.close()
    with pytest.raises(ConfigError, match="cannot be shared"):
        bind("listen", "ssl:443")
    with pytest.raises(ConfigError, match="bad --listen"):
        bind("listen", "tcp:http")


def test_a_systemd_socket_that_was_not_passed_is_a_config_error() -> None:
    # (Socket activation itself: tests/test_zulip_client.py, with systemd-socket-activate.)
    with pytest.raises(ConfigError, match="bad --listen endpoint 'systemd:"):
        bind("listen", "systemd:domain=INET:index=0")


def _pending_port(clients: list[socket.socket], built: list[Protocol]) -> tcp.Port:
    """An adopted tcp.Port (on a MemoryReactor) with five connections in its queue."""
    listener = bind("listen", "tcp:0:interface=127.0.0.1")
    for _ in range(5):
        clients.append(socket.create_connection(listener.sock.getsockname(), timeout=5))
    factory = Factory.forProtocol(Protocol)
    factory.buildProtocol = lambda addr: built.append(Protocol()) or built[-1]  # type: ignore[method-assign]
    port = tcp.Port._fromListeningDescriptor(  # what reactor.adoptStreamPort does
        MemoryReactorClock(), listener.fileno(), listener.family, factory
    )  # fmt: skip
    port.startListening()
    listener.close()  # the port holds its own duplicate
    return port


@pytest.mark.parametrize("evenly", [True, False])
def test_a_worker_takes_one_connection_from_the_shared_queue_per_wakeup(evenly: bool) -> None:
    clients: list[socket.socket] = []
    built: list[Protocol] = []
    port = _pending_port(clients, built)
    try:
        if evenly:
            accept_evenly(port)
        port.doRead()
        port.doRead()
        # Twisted alone takes the whole burst at once, leaving none for another worker.
        assert len(built) == (2 if evenly else 5)
    finally:
        for protocol in built:
            protocol.transport.socket.close()  # type: ignore[attr-defined]
        port.socket.close()
        for c in clients:
            c.close()


# -- the control channel -------------------------------------------------------------------
def test_messages_are_decoded_across_reads() -> None:
    decoder = MessageDecoder()
    raw = encode({"op": "ready", "pid": 7}) + encode({"op": "retire"})
    assert decoder.feed(raw[:5]) == []
    assert decoder.feed(raw[5:]) == [{"op": "ready", "pid": 7}, {"op": "retire"}]
    with pytest.raises(ControlError):
        decoder.feed(b"[1]\n")
    with pytest.raises(ControlError):
        MessageDecoder(max_bytes=10).feed(b"x" * 11)


def test_listening_descriptors_travel_over_a_socket_pair() -> None:
    listener = bind("listen", "tcp:0:interface=127.0.0.1")
    parent, child = socket.socketpair()
    try:
        control.send_listeners(parent, {"listen": listener.fileno()})
        fds, rest = control.receive_listeners(child, timeout=5)
        assert list(fds) == ["listen"] and rest == b""
        received = socket.socket(fileno=fds["listen"])
        try:
            assert received.getsockname() == listener.sock.getsockname()
            assert received.get_inheritable() is False
        finally:
            received.close()
    finally:
        for s in (parent, child):
            s.close()
        listener.close()


def test_a_message_without_its_descriptors_is_refused() -> None:
    def recv_fds(sock: Any, size: int, maxfds: int) -> tuple[bytes, list[int], int, Any]:
        return encode({"op": "sockets", "names": ["listen"]}), [], 0, None

    parent, child = socket.socketpair()
    try:
        with pytest.raises(ControlError, match="expected the listening sockets"):
            control.receive_listeners(child, recv_fds=recv_fds)
    finally:
        parent.close()
        child.close()


# -- the master -----------------------------------------------------------------------------
class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []

    def signalProcess(self, signum: int) -> None:
        self.signals.append(signum)


class MasterRig:
    """A Master whose workers are fakes: each has a control transport the test reads."""

    def __init__(self, count: int = 2) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.spawned: list[tuple[Any, FakeProcess, list[str]]] = []
        self.fatal: list[str] = []
        self.master = Master(
            self.reactor, [], ["--workers", str(count)], count,
            drain_timeout=30, ready_timeout=20, on_fatal=self.fatal.append,
        )  # fmt: skip
        pair = (_FakeSocket(), _FakeSocket())
        self.master._socketpair = lambda *a: pair  # type: ignore[method-assign]
        self.master._send_listeners = lambda sock, fds: None  # type: ignore[method-assign]
        self.reactor.spawnProcess = self._spawn  # type: ignore[method-assign]
        self.transports: dict[int, StringTransport] = {}

    def _spawn(self, proto: Any, executable: str, argv: list[str], **kw: Any) -> FakeProcess:
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((proto, process, argv))
        return process

    def connect_controls(self) -> None:
        """Connect every adopted control socket to a StringTransport."""
        for _fd, _family, factory in self.reactor.adoptedStreamConnections:
            proto = factory.buildProtocol(None)
            if proto.transport is None:
                transport = StringTransport()
                proto.makeConnection(transport)
        self.reactor.adoptedStreamConnections.clear()

    def worker(self, n: int) -> master.WorkerHandle:
        return self.spawned[n][0].worker  # type: ignore[no-any-return]

    def sent_to(self, n: int) -> list[dict[str, Any]]:
        handle = self.worker(n)
        assert handle.control is not None and handle.control.transport is not None
        return MessageDecoder().feed(handle.control.transport.value())  # type: ignore[attr-defined]

    def say(self, n: int, message: dict[str, Any]) -> None:
        handle = self.worker(n)
        assert handle.control is not None
        handle.control.dataReceived(encode(message))

    def end(self, n: int, status: str = "exit 1") -> None:
        self.master.worker_ended(self.worker(n), status)


class _FakeSocket:
    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


@pytest.fixture
def rig() -> MasterRig:
    r = MasterRig()
    r.master.startService()
    r.connect_controls()
    return r


def test_workers_run_the_worker_module_with_the_same_options(rig: MasterRig) -> None:
    assert len(rig.spawned) == 2
    argv = rig.spawned[0][2]
    assert argv[1:5] == ["-m", "kansas.process.worker", "--control-fd", "3"]
    assert argv[5:] == ["--workers", "2"]


def test_a_reload_retires_the_old_generation_only_once_the_new_one_is_ready(
    rig: MasterRig,
) -> None:
    rig.say(0, {"op": "ready", "redis": True})
    rig.say(1, {"op": "ready", "redis": True})
    assert rig.master.current == 1 and rig.master.pending == 0

    rig.master.reload()
    rig.connect_controls()
    assert len(rig.spawned) == 4 and rig.master.pending == 2
    rig.master.reload()  # a second SIGHUP while starting: ignored
    assert len(rig.spawned) == 4
    rig.say(2, {"op": "ready", "redis": True})
    assert rig.sent_to(0) == [] and rig.sent_to(1) == []  # one new worker is not enough
    rig.say(3, {"op": "ready", "redis": True})
    assert rig.sent_to(0) == [{"op": "retire"}] == rig.sent_to(1)
    assert rig.master.current == 2

    # What the old workers hand over reaches the new ones.
    state = {"op": "state", "routes": [], "journal": [], "down": {"a": [1.0, "refused"]}}
    rig.say(0, state)
    assert rig.sent_to(2) == [state] == rig.sent_to(3)
    rig.end(0, "exit 0")
    rig.end(1, "exit 0")
    assert [w.generation for w in rig.master.workers] == [2, 2]
    assert len(rig.spawned) == 4  # retired workers are not respawned


def test_a_failed_generation_is_abandoned_and_the_old_one_keeps_serving(
    rig: MasterRig,
) -> None:
    for n in (0, 1):
        rig.say(n, {"op": "ready", "redis": True})
    rig.master.reload()
    rig.connect_controls()
    rig.end(2, "exit 1: ImportError")  # the new code does not even start
    assert rig.master.pending == 0 and rig.master.current == 1
    assert rig.spawned[3][1].signals == [signal.SIGKILL]
    assert rig.sent_to(0) == [] and rig.sent_to(1) == []
    rig.end(3, "killed")
    assert len(rig.spawned) == 4 and rig.fatal == []

    # Nor does a generation that never says it is ready.
    rig.master.reload()
    rig.connect_controls()
    rig.reactor.advance(20)
    assert rig.master.pending == 0
    assert rig.spawned[4][1].signals == [signal.SIGKILL] == rig.spawned[5][1].signals


def test_a_worker_without_redis_is_not_ready_to_replace_a_serving_one(rig: MasterRig) -> None:
    for n in (0, 1):
        rig.say(n, {"op": "ready", "redis": True})
    rig.master.reload()
    rig.connect_controls()
    rig.say(2, {"op": "ready", "redis": False})
    rig.say(3, {"op": "ready", "redis": True})
    assert rig.master.current == 1  # waits for worker 2's Redis
    rig.say(2, {"op": "ready", "redis": True})
    assert rig.master.current == 2


def test_the_first_workers_may_start_without_redis(rig: MasterRig) -> None:
    rig.say(0, {"op": "ready", "redis": False})
    rig.say(1, {"op": "ready", "redis": False})
    assert rig.master.current == 1


def test_the_first_generation_failing_is_fatal(rig: MasterRig) -> None:
    rig.end(0, "exit 1: bad --postgres")
    assert rig.fatal and "bad --postgres" in rig.fatal[0]


def test_a_dead_worker_is_respawned_with_a_backoff_when_it_keeps_dying(
    rig: MasterRig,
) -> None:
    for n in (0, 1):
        rig.say(n, {"op": "ready", "redis": True})
    rig.reactor.advance(100)
    rig.end(0, "killed by signal 9")
    rig.reactor.advance(0)
    assert len(rig.spawned) == 3  # at once, the first time
    delays = []
    for _ in range(8):
        rig.connect_controls()
        before = len(rig.spawned)
        rig.end(len(rig.spawned) - 1, "exit 1")  # dies again at once
        waited = 0.0
        while len(rig.spawned) == before:
            rig.reactor.advance(0.25)
            waited += 0.25
        delays.append(waited)
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert delays[-1] == master.BACKOFF_CAP_SECONDS
    assert all(w.slot in (0, 1) for w in rig.master.workers)


def test_stopping_retires_every_worker_and_waits_for_them(rig: MasterRig) -> None:
    for n in (0, 1):
        rig.say(n, {"op": "ready", "redis": True})
    stopped = rig.master.stopService()
    assert rig.sent_to(0) == [{"op": "retire"}] == rig.sent_to(1)
    rig.end(0, "exit 0")
    assert not stopped.called
    rig.reactor.advance(30 + master.KILL_GRACE_SECONDS)
    assert rig.spawned[1][1].signals == [signal.SIGKILL]  # past the deadline
    rig.end(1, "killed")
    assert stopped.called


# -- a worker -------------------------------------------------------------------------------
class FakePort:
    def __init__(self, calls: list[str], name: str) -> None:
        self.calls = calls
        self.name = name

    def stopReading(self) -> None:
        self.calls.append(f"stopReading {self.name}")

    def stopListening(self) -> None:
        self.calls.append(f"stopListening {self.name}")


class FakeService:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.front = object()
        self.internal = object()
        self.redis: Deferred[bool] | None = None  # None: Redis answers, every time
        self.listening = True
        self.open = 0
        self.taken: list[dict[str, Any]] = []

    def startService(self) -> None:
        self.calls.append("start")

    def redis_answers(self) -> Deferred[bool]:
        return succeed(True) if self.redis is None else self.redis

    def following(self) -> bool:
        return self.listening

    def handover(self) -> dict[str, Any]:
        self.calls.append("handover")
        return {"routes": [["q", "{}", 1.0]]}

    def take_over(self, state: dict[str, Any]) -> None:
        self.taken.append(state)

    def retire(self) -> None:
        self.calls.append("retire")

    def close_idle(self) -> None:
        pass

    def open_connections(self) -> int:
        return self.open

    def stopService(self) -> Deferred[None]:
        self.calls.append("stop")
        return succeed(None)


def make_worker(
    calls: list[str], redis: Deferred[bool] | None = None, listening: bool = True
) -> tuple[worker.Worker, MemoryReactorClock, StringTransport]:
    reactor = MemoryReactorClock()
    service = FakeService(calls)
    service.listening = listening
    if redis is not None:
        service.redis = redis
    ports = iter("ab")

    def adopt(fd: int, family: int, factory: Any) -> FakePort:
        calls.append(f"adopt {fd}")
        return FakePort(calls, next(ports))

    transport = StringTransport()

    def adopt_control(fd: int, family: int, factory: Any) -> None:
        factory.buildProtocol(None).makeConnection(transport)

    reactor.adoptStreamPort = adopt  # type: ignore[method-assign]
    reactor.adoptStreamConnection = adopt_control  # type: ignore[method-assign]
    reactor.stop = lambda: calls.append("reactor stop")  # type: ignore[method-assign]
    a, b = socket.socketpair()
    listeners = {"listen": os.dup(a.fileno()), "internal-listen": os.dup(b.fileno())}
    a.close()
    b.close()
    control_fd = os.open(os.devnull, os.O_RDONLY)
    w = worker.Worker(reactor, service, listeners, control_fd, drain_timeout=30)
    w.start()
    return w, reactor, transport


def test_a_worker_listens_and_says_it_is_ready_once_redis_answers() -> None:
    calls: list[str] = []
    _w, _reactor, transport = make_worker(calls)
    assert calls[0] == "start" and calls[1].startswith("adopt") and calls[2].startswith("adopt")
    assert MessageDecoder().feed(transport.value()) == [
        {"op": "ready", "pid": os.getpid(), "redis": True}
    ]


def test_a_worker_is_ready_only_once_it_follows_postgresql_too() -> None:
    calls: list[str] = []
    w, reactor, transport = make_worker(calls, listening=False)
    assert transport.value() == b"" and not any(c.startswith("adopt") for c in calls)
    service: Any = w.service
    service.listening = True
    reactor.advance(worker.POLL_SECONDS)
    assert MessageDecoder().feed(transport.value()) == [
        {"op": "ready", "pid": os.getpid(), "redis": True}
    ]


def test_a_worker_whose_listen_never_comes_up_serves_after_the_wait() -> None:
    calls: list[str] = []
    _w, reactor, transport = make_worker(calls, listening=False)
    reactor.pump([worker.POLL_SECONDS] * int(worker.REDIS_WAIT_SECONDS / worker.POLL_SECONDS + 2))
    assert MessageDecoder().feed(transport.value()) == [
        {"op": "ready", "pid": os.getpid(), "redis": True}
    ]


def test_retiring_stops_accepting_then_hands_over_then_drains_then_exits() -> None:
    calls: list[str] = []
    w, reactor, transport = make_worker(calls)
    transport.clear()
    del calls[:]
    service: Any = w.service
    service.open = 3
    w.received({"op": "retire"})
    assert calls == ["stopReading a", "stopReading b", "stopListening a", "stopListening b",
                     "handover", "retire"]  # fmt: skip
    assert MessageDecoder().feed(transport.value()) == [
        {"op": "state", "routes": [["q", "{}", 1.0]]}
    ]
    reactor.advance(5)
    assert "stop" not in calls  # long-polls are still being answered
    service.open = 0
    reactor.advance(worker.POLL_SECONDS)
    assert calls[-2:] == ["stop", "reactor stop"]


def test_a_worker_past_its_drain_deadline_answers_what_is_left_and_exits() -> None:
    calls: list[str] = []
    w, reactor, _transport = make_worker(calls)
    service: Any = w.service
    drained: list[bool] = []
    service.front = type("F", (), {"drain": lambda self: drained.append(True)})()
    service.open = 1
    w.retire()
    reactor.advance(30)
    assert drained == [True]
    reactor.advance(worker.FLUSH_SECONDS)
    assert calls[-2:] == ["stop", "reactor stop"]


def test_a_worker_retired_before_it_is_ready_exits_cleanly() -> None:
    calls: list[str] = []
    w, reactor, transport = make_worker(calls, redis=Deferred())  # Redis never answers
    reactor.advance(1)
    w.retire()
    reactor.advance(worker.MIN_DRAIN_SECONDS)
    assert not any(c.startswith("adopt") for c in calls)
    assert calls[-2:] == ["stop", "reactor stop"]
    assert transport.value() == encode({"op": "state", "routes": [["q", "{}", 1.0]]})


def test_a_worker_whose_master_is_gone_retires() -> None:
    calls: list[str] = []
    w, _reactor, _transport = make_worker(calls)
    w.master_gone()
    assert w.retiring and "handover" in calls


def test_a_worker_takes_over_the_state_the_master_relays() -> None:
    calls: list[str] = []
    w, _reactor, _transport = make_worker(calls)
    w.received({"op": "state", "routes": []})
    assert w.service.taken == [{"op": "state", "routes": []}]  # type: ignore[attr-defined]


# -- the public listener retiring --------------------------------------------------------------
def test_a_retiring_front_closes_idle_connections_and_answers_the_rest_with_close() -> None:
    h = Harness()
    h.reactor.advance(1)
    h.route()
    idle, idle_t = h.client()
    idle.dataReceived(get())
    conn, _st = h.shard_connection(9800)
    conn.dataReceived(ok_reply())
    assert not idle_t.disconnecting  # kept alive
    fresh, fresh_t = h.client()  # connected, request not sent yet
    busy, busy_t = h.client()
    busy.dataReceived(get())

    h.front.retire()
    # Just used: its client may be sending its next request right now.
    assert not idle_t.disconnecting
    h.reactor.advance(front.RETIRE_IDLE_SECONDS)
    h.front.close_idle()
    assert idle_t.disconnecting and not fresh_t.disconnecting and not busy_t.disconnecting
    conn.dataReceived(ok_reply())
    assert b"Connection: close\r\n" in busy_t.value() and busy_t.disconnecting
    fresh.dataReceived(get())  # served once, then closed
    conn.dataReceived(ok_reply())
    assert b"Connection: close\r\n" in fresh_t.value() and fresh_t.disconnecting


def test_a_scrape_reaching_one_worker_gathers_every_workers_metrics(rig: MasterRig) -> None:
    for n in (0, 1):
        rig.say(n, {"op": "ready", "redis": True})
    rig.say(1, {"op": "collect", "id": 7})
    asked = rig.sent_to(0)[-1]
    assert asked["op"] == "snapshot" and rig.sent_to(1)[-1] == asked
    rig.say(0, {"op": "snapshot", "id": asked["id"], "snapshot": {"worker": "a"}})
    assert rig.sent_to(1)[-1] == asked  # still waiting for worker 1's own
    rig.say(1, {"op": "snapshot", "id": asked["id"], "snapshot": {"worker": "b"}})
    assert rig.sent_to(1)[-1] == {
        "op": "collected", "id": 7, "snapshots": [{"worker": "a"}, {"worker": "b"}]
    }  # fmt: skip

    # A worker that does not answer in time is left out.
    rig.say(0, {"op": "collect", "id": 8})
    asked = rig.sent_to(0)[-1]
    rig.say(0, {"op": "snapshot", "id": asked["id"], "snapshot": {"worker": "a"}})
    rig.reactor.advance(master.COLLECT_SECONDS)
    assert rig.sent_to(0)[-1] == {"op": "collected", "id": 8, "snapshots": [{"worker": "a"}]}


def test_a_workers_access_log_line_still_parses_in_the_masters_log() -> None:
    from twisted.logger import LogLevel

    from kansas.observe.access_log import parse_line

    event = {"log_namespace": "kansas.access", "log_level": LogLevel.info,
             "log_format": "{line}", "line": '{"id":"x-1","status":200}'}  # fmt: skip
    relayed = worker.log_line(event).rstrip("\n")
    assert relayed == '[kansas.access#info] {"id":"x-1","status":200}'
    in_master = "2026-11-25T10:00:00+0000 [kansas.process.master#info] [worker 1.0 (pid 7)] "
    assert parse_line(in_master + relayed) == {"id": "x-1", "status": 200}


def test_sigint_once_stops_gracefully_and_twice_at_once(
    rig: MasterRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    exits: list[int] = []
    monkeypatch.setattr(master.os, "_exit", exits.append)
    stops: list[bool] = []
    rig.reactor.callFromThread = lambda f, *a: stops.append(True)  # type: ignore[method-assign]
    rig.master._interrupted(signal.SIGINT, None)
    assert stops == [True] and exits == []
    assert all(p.signals == [] for _, p, _ in rig.spawned)
    rig.master._interrupted(signal.SIGINT, None)
    assert exits == [1]
    assert all(p.signals == [signal.SIGKILL] for _, p, _ in rig.spawned)


def test_at_max_connections_a_process_stops_accepting_until_some_close() -> None:
    h = Harness()
    h.front.max_connections, h.front.resume_at = 3, 2
    calls: list[str] = []
    port = type("Port", (), {"stopReading": lambda s: calls.append("stop"),
                             "startReading": lambda s: calls.append("start")})()  # fmt: skip
    conns = []
    for _ in range(3):
        proto = h.front.buildProtocol(None)
        transport = StringTransport()
        transport.server = port  # type: ignore[attr-defined]  # as tcp.Server has
        proto.makeConnection(transport)
        conns.append(proto)
    assert calls == ["stop"]  # the third reached the cap: left in the accept queue
    conns[0].connectionLost()
    assert calls == ["stop"]  # 2 open: not below the resume mark yet
    conns[1].connectionLost()
    assert calls == ["stop", "start"]


def test_the_connection_cap_comes_from_the_open_file_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This machine's hard limit: 20,000 descriptors, two per held long-poll.
    monkeypatch.setattr(front.resource, "getrlimit", lambda _: (20000, 20000))
    assert front.connections_allowed() == 9950
    monkeypatch.setattr(front.resource, "getrlimit", lambda _: (64, 64))
    assert front.connections_allowed() == 16
