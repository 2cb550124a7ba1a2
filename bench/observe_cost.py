"""What recording a request costs: the public hot path before and after, without sockets.

On a shared 2-core machine, wrk runs vary by ±20 %, far more than the microsecond or two
this is about. So this drives ``FrontProtocol`` and ``BackendPool`` in-process (the
harness of tests/test_proxy.py: StringTransports, a memory clock, a warm route cache)
and measures two ways, for kansas at a base revision and for the working tree:

- Python bytecodes executed per proxied request (``sys.settrace`` opcode events):
  deterministic, whatever else the machine does;
- CPU time per request (``time.process_time``), the variants taking turns in small
  batches; the minimum and 10th percentile over batches are the least disturbed.

    .venv/bin/python bench/observe_cost.py --base main [--rounds 300]
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[1]
Q = "5b0c6c58-1f8c-4c57-9a4a-000000000001"
REALM = "chat.example.com"
BODY = b'{"result":"success","msg":"","events":[],"queue_id":"%s"}' % Q.encode()
REPLY = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 25 Nov 2026 10:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
    % (len(BODY), BODY)
)
REQUEST = (
    b"GET /json/events?queue_id=%s&last_event_id=-1&dont_block=true HTTP/1.1\r\n"
    b"Host: %s\r\nUser-Agent: bench\r\n\r\n" % (Q.encode(), REALM.encode())
)


def harness(trace: bool) -> Any:
    """One client connection and one shard connection, a request already served."""
    from types import SimpleNamespace

    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from kansas.health import HealthMonitor
    from kansas.model import Assignment, QueueRoute, Shard
    from kansas.proxy.backend import BackendPool
    from kansas.proxy.forwarding import EventRouter
    from kansas.proxy.front import FrontFactory
    from kansas.proxy.parking import Parking
    from kansas.routes import RouteTable
    from kansas.stores.memory import MemoryRouteStore

    reactor = MemoryReactorClock()
    store = MemoryRouteStore(reactor)
    table = RouteTable(store, reactor)
    shards = {"a": Shard("a", "http://127.0.0.1:9800")}
    directory = SimpleNamespace(current=Assignment(shards, {REALM: "a"}))
    router = EventRouter(table, directory)  # type: ignore[arg-type]
    health = HealthMonitor(reactor, directory)  # type: ignore[arg-type]
    extra: dict[str, Any] = {}
    # (Not an import probe: an editable install finds kansas.observe in the checkout.)
    if "recorder" in inspect.signature(FrontFactory).parameters:
        from kansas.observe.recorder import RequestRecorder
        from kansas.observe.trace import RecentRequests

        # as makeService wires it
        extra["recorder"] = RequestRecorder(None, RecentRequests() if trace else None)
    front = FrontFactory(router, BackendPool(reactor), reactor, health, Parking(reactor, health),
                         **extra)  # fmt: skip
    store.put(QueueRoute(Q, "a", REALM, 1, 600))
    table.fetch(Q)
    client = front.buildProtocol(None)
    client_t = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    client.makeConnection(client_t)
    client.dataReceived(REQUEST)
    factory = reactor.tcpClients[0][2]
    shard = factory.buildProtocol(None)
    shard_t = StringTransport()
    shard.makeConnection(shard_t)
    shard.dataReceived(REPLY)
    assert client_t.value().startswith(b"HTTP/1.1 200 OK\r\n"), client_t.value()

    def serve(n: int) -> None:
        for _ in range(n):
            client_t.clear()
            shard_t.clear()
            client.dataReceived(REQUEST)
            shard.dataReceived(REPLY)

    return serve


def child(trace: bool) -> None:
    """Serve batches on request: a count per line on stdin, µs per request on stdout."""
    serve = harness(trace)
    serve(1000)  # warm
    count = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return tracer

    sys.settrace(tracer)
    serve(200)
    sys.settrace(None)
    print(count / 200, flush=True)
    for line in sys.stdin:
        n = int(line)
        start = time.process_time()
        serve(n)
        print((time.process_time() - start) / n * 1e6, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=300, help="batches per variant")
    parser.add_argument("--batch", type=int, default=500, help="requests per batch")
    parser.add_argument("--child", choices=["trace", "notrace"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child == "trace")
        return
    tmp = Path(tempfile.mkdtemp(prefix="kansas-observe-cost-"))
    try:
        archive = subprocess.run(["git", "-C", str(CHECKOUT), "archive", args.base, "src"],
                                 capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        variants = {
            f"{args.base}": (tmp / "src", "notrace"),
            "this tree": (CHECKOUT / "src", "trace"),
            "this tree, --trace-queues 0": (CHECKOUT / "src", "notrace"),
        }
        procs = {}
        opcodes = {}
        for name, (src, mode) in variants.items():
            env = dict(os.environ, PYTHONPATH=str(src))
            procs[name] = proc = subprocess.Popen(
                [sys.executable, __file__, "--child", mode],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            assert proc.stdout is not None
            opcodes[name] = float(proc.stdout.readline())
        times: dict[str, list[float]] = {name: [] for name in procs}
        for _ in range(args.rounds):
            for name, proc in procs.items():
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(f"{args.batch}\n")
                proc.stdin.flush()
                times[name].append(float(proc.stdout.readline()))
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = next(iter(procs))
    print(f"{args.rounds} batches of {args.batch} requests per variant, taking turns")
    print("| variant | bytecodes per request | CPU µs per request, min | 10th percentile |")
    print("|---|---|---|---|")
    for name in procs:
        ts = sorted(times[name])
        p10 = ts[len(ts) // 10]
        delta = "" if name == base else (
            f" ({opcodes[name] - opcodes[base]:+.0f})", f" ({ts[0] - min(times[base]):+.2f})",
            f" ({p10 - sorted(times[base])[len(ts) // 10]:+.2f})")  # fmt: skip
        d = delta or ("", "", "")
        print(f"| {name} | {opcodes[name]:.0f}{d[0]} | {ts[0]:.2f}{d[1]} | {p10:.2f}{d[2]} |")


if __name__ == "__main__":
    main()
