"""Memory per held long-poll: kansas's RSS growth while it holds N parked long-polls.

One demo shard, one kansas, and this process as N clients (raw sockets, one GET each,
left waiting: the shard parks them until its heartbeat). RSS is read from /proc after
the shard reports every request parked. Each long-poll costs kansas a client and a
backend connection: two descriptors, so one process tops out near 9,900 under the
20,000 open-file limit.

    .venv/bin/python bench/longpoll_memory.py --counts 1000,5000,9900
"""

from __future__ import annotations

import argparse
import http.client
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path

from common import parked_at, rss_kib  # bench/common.py (this script's folder)

from kansas.ctl import main as ctl
from kansas.testing.client import call
from kansas.testing.processes import DemoShardProcess, KansasProcess
from kansas.testing.servers import PostgresServer, RedisServer

REALM = "bench.example.com"
SECRET = "bench-secret"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,5000", help="comma-separated N to hold")
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.counts.split(","))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    tmp = Path(tempfile.mkdtemp(prefix="kansas-bench-"))
    tmp.chmod(0o755)
    rows = []
    with RedisServer(tmp / "redis") as redis, PostgresServer(tmp / "pg") as postgres:
        redis.start()
        postgres.start()
        shard = DemoShardProcess("a", tmp, SECRET, heartbeat=600).start()
        common = ["--postgres", postgres.dsn, "--redis", redis.url]
        ctl([*common, "migrate"])
        ctl([*common, "shard", "add", "a", shard.url])
        kansas = KansasProcess(tmp, postgres.dsn, redis.url).start()
        assert kansas.proc is not None
        try:
            form = {"secret": SECRET, "dont_block": "true"}
            queues = [
                call(kansas.internal_port, "POST", "/api/v1/events/internal", host=REALM,
                     form={**form, "user_profile_id": i}).json["queue_id"]
                for i in range(counts[-1])
            ]  # fmt: skip
            # Warm kansas (route cache, a backend connection) before the baseline.
            warm = http.client.HTTPConnection("127.0.0.1", kansas.public_port, timeout=10)
            for queue_id in queues:
                warm.request("GET", f"/json/events?queue_id={queue_id}&dont_block=true",
                             headers={"Host": REALM})  # fmt: skip
                warm.getresponse().read()
            warm.close()
            base = rss_kib(kansas.proc.pid)
            clients: list[socket.socket] = []
            for n in counts:
                while len(clients) < n:
                    queue_id = queues[len(clients)]
                    s = socket.create_connection(("127.0.0.1", kansas.public_port))
                    s.sendall(f"GET /json/events?queue_id={queue_id}&last_event_id=-1 "
                              f"HTTP/1.1\r\nHost: {REALM}\r\n\r\n".encode())  # fmt: skip
                    clients.append(s)
                deadline = time.monotonic() + 120
                while (held := parked_at(shard.port)) < n and time.monotonic() < deadline:
                    time.sleep(0.2)
                rss = rss_kib(kansas.proc.pid)
                rows.append((n, held, rss, (rss - base) * 1024 / n))
            for s in clients:
                s.close()
        finally:
            kansas.stop()
            shard.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"kansas RSS before holding any long-poll: {base:,} KiB")
    print("| held long-polls | parked at the shard | kansas RSS (KiB) | bytes per long-poll |")
    print("|---|---|---|---|")
    for n, held, rss, per in rows:
        print(f"| {n:,} | {held:,} | {rss:,} | {per:,.0f} |")


if __name__ == "__main__":
    main()
