"""A Redis failover under load: Sentinel promotes a real replica, once on request
(``SENTINEL FAILOVER``) and once because the master was killed (SIGKILL).

kansas finds its Redis through Sentinel (``redis+sentinel://``). Clients long-poll
and Django creates queues throughout. The test reports exactly which mappings the
failovers lost (written to a master that died before its replica had them) and shows
that kansas still routes every queue, those included, with an empty cache: the realm
fallback finds them on their realm's shard, so no client reloads.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

from kansas.testing.client import call
from kansas.testing.servers import RedisSentinel, RedisServer
from kansas.testing.waiting import until
from tests.test_partitions import ONE, TWO, Stack, metric, start_pollers, stop_pollers


def command(port: int, *args: str) -> bytes:
    payload = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        return s.recv(65536)


def master_port(sentinel: RedisSentinel) -> int:
    reply = command(sentinel.port, "SENTINEL", "get-master-addr-by-name", sentinel.service)
    return int(reply.split(b"\r\n")[4])


def has(port: int, queue_id: str) -> bool:
    try:
        return not command(port, "EXISTS", f"kansas:queue:{queue_id}").startswith(b":0")
    except OSError:
        return False


def in_sync(replica: RedisServer) -> bool:
    try:
        return b"master_link_status:up" in command(replica.port, "INFO", "replication")
    except OSError:
        return False


def test_kansas_follows_a_promoted_replica_and_routes_what_the_failover_lost(
    tmp_path: Path, postgres_dsn: str
) -> None:
    with (
        RedisServer(tmp_path / "one") as first,
        RedisServer(tmp_path / "two") as second,
    ):
        first.start()
        second.replica_of = first.port
        second.start()
        until(lambda: in_sync(second), 30, "the replica in sync")
        with RedisSentinel(first.port, base_dir=tmp_path / "sentinel") as sentinel:
            sentinel.start()
            until(lambda: b"ip" in command(sentinel.port, "SENTINEL", "replicas", "kansas"),
                  30, "the sentinel knows the replica")  # fmt: skip
            stack = Stack(tmp_path, postgres_dsn, sentinel.url)
            try:
                k = stack.kansas()
                queues = [stack.create_queue(k, ONE, user) for user in range(1, 21)]
                pollers = start_pollers(k, queues, ONE)
                created: list[tuple[str, str, float]] = []
                problems: list[str] = []
                stop = threading.Event()

                def django() -> None:
                    user = 1000
                    while not stop.is_set():
                        user += 1
                        realm = ONE if user % 2 else TWO
                        try:
                            created.append((stack.create_queue(k, realm, user), realm,
                                            time.monotonic()))  # fmt: skip
                        except AssertionError as e:
                            problems.append(str(e))
                        stop.wait(0.1)

                threading.Thread(target=django, daemon=True).start()
                servers = {first.port: first, second.port: second}

                def failover(how: str) -> str:
                    old = master_port(sentinel)
                    new = second.port if old == first.port else first.port
                    until(lambda: in_sync(servers[new]), 30, "the replica in sync")
                    until(lambda: len(created) >= 10, 10, "queues created")
                    started = time.monotonic()
                    if how == "SIGKILL":
                        servers[old].stop(signal.SIGKILL)
                    else:
                        reply = command(sentinel.port, "SENTINEL", "FAILOVER", "kansas")
                        assert reply.startswith(b"+OK"), reply
                    until(lambda: master_port(sentinel) == new, 30, "the replica promoted")
                    promoted = time.monotonic() - started
                    # kansas writes to the new master: a queue created now is there.
                    mark = len(created)
                    until(lambda: any(has(new, q) for q, _, _ in created[mark:]), 30,
                          "kansas writing to the new master")  # fmt: skip
                    following = time.monotonic() - started
                    if how == "SIGKILL":
                        servers[old].start(old)  # back, as a replica of the new master
                        command(old, "REPLICAOF", "127.0.0.1", str(new))
                    return (f"{how}: promoted after {promoted:.1f} s, kansas writing to it"
                            f" {following:.1f} s after the failover began")  # fmt: skip

                figures = [failover("SENTINEL FAILOVER"), failover("SIGKILL")]
                stop.set()
                final = master_port(sentinel)
                # The journal replays what was written while no master was up.
                until(lambda: metric(k, "kansas_route_journal_entries") == 0, 30,
                      "the journal replayed")  # fmt: skip
                lost = [(q, r) for q, r, _ in created if not has(final, q)]
                # Every queue, lost mapping or not, is routed by a kansas with an empty
                # cache (the realm fallback finds the lost ones), with no reload.
                stop_pollers(pollers)
                k.restart()
                for queue_id, realm in [(q, r) for q, r, _ in created]:
                    reply = call(k.public_port, "GET", "/json/events", host=realm,
                                 params={"queue_id": queue_id, "last_event_id": -1,
                                         "dont_block": "true"})  # fmt: skip
                    assert reply.status == 200, (queue_id, reply)
                failed = [r for p in pollers for r in p.requests if r.status != 200]
                # kansas wrote the mappings of the last 30 s again to the new master: none
                # lost (before, the writes taken by the old master until Sentinel demoted
                # it, ~10 s of them, were wiped when it resynced as a replica).
                assert not lost, f"{len(lost)} mappings lost: {lost[:10]}"
                assert not problems, problems[:5]
                assert not failed, failed[:5]
                assert "Traceback" not in k.log_text()
                print(
                    f"redis failover: {'; '.join(figures)}; {len(created)} queues created"
                    f" during the run, {len(lost)} mappings lost ({lost[:10]}), all"
                    f" {len(created)} routed by a cold kansas;"
                    f" {sum(len(p.requests) for p in pollers)} long-polls, none failed"
                )
            finally:
                stack.stop()
