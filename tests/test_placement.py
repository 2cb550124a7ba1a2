"""kansas.placement: Django's view of kansas's rules -- the same answers, kept fresh.

Real PostgreSQL and Redis (conftest.py), real kansas and demo shards where the answer
must match what kansas actually did.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from kansas.ctl import main as ctl_main
from kansas.model import QueueRoute
from kansas.placement import Placement, PlacementError, RedisURL, RespClient
from kansas.router import place_queue
from kansas.stores.postgres import PostgresAuthority
from kansas.testing.client import call
from kansas.testing.processes import CHECKOUT, DemoShardProcess, KansasProcess
from kansas.testing.servers import free_port
from tests.conftest import terminate_sessions

SECRET = "placement-secret"


def ctl(dsn: str, *argv: str) -> None:
    assert ctl_main(["--postgres", dsn, *argv]) == 0, argv


def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` (no fixed sleeps); how long it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - start


@pytest.fixture
def dsn(postgres_dsn: str) -> str:
    ctl(postgres_dsn, "migrate")
    for name, port in (("a", 9800), ("b", 9801), ("c", 9802)):
        ctl(postgres_dsn, "shard", "add", name, f"http://127.0.0.1:{port}")
    return postgres_dsn


@pytest.fixture
def placement(dsn: str) -> Iterator[Placement]:
    with Placement(dsn, reload_interval=3600) as p:
        yield p


def test_importable_without_twisted_or_zope() -> None:
    code = (
        "import sys\n"
        "for name in ('twisted', 'zope', 'zope.interface', 'txredisapi'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        "import kansas.placement\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=CHECKOUT)  # fmt: skip
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


def test_answers_as_the_router_does(dsn: str, placement: Placement) -> None:
    ctl(dsn, "realm", "pin", "pinned.example.com", "b")
    ctl(dsn, "realm", "split", "split.example.com", "a", "c", "c")
    ctl(dsn, "regex", "add", r"eu\d*\.", "c")
    ctl(dsn, "regex", "add", r".*\.split\.org$", "b", "a")
    ctl(dsn, "user", "move", "split.example.com", "4", "b", "--no-reload")
    authority = PostgresAuthority(dsn)
    until(lambda: placement.assignment == authority.load(), 5, "the rules")
    assignment = authority.load()
    authority.close()
    realms = ["pinned.example.com", "split.example.com", "eu7.example.com", "x.split.org",
              "Other.Example.com:443", "hashed.example.net"]  # fmt: skip
    for host in realms:
        for user in range(9):
            expected = place_queue(assignment, host.lower().split(":")[0], user)
            assert expected is not None
            assert placement.shard_for_new_queue(host, user).name == expected.shard, (host, user)
            assert placement.shards_for_user(host, user)[0].name == expected.shard
    grouped = placement.users_by_shard("split.example.com", [0, 1, {"id": 2, "flags": []}, 4])
    assert {s.name: users for s, users in grouped.items()} == {
        "a": [0],
        "c": [1, {"id": 2, "flags": []}],  # as given, in order
        "b": [4],
    }
    assert [s.name for s in placement.realm_shards("split.example.com")] == ["a", "c", "b"]
    assert placement.may_hold("split.example.com", 4, 9801)  # b's port
    assert not placement.may_hold("split.example.com", 4, 9800)


@pytest.mark.parametrize(
    ("changes", "now"),
    [
        ([("realm", "pin", "r.example.com", "c")], "c"),
        ([("realm", "split", "r.example.com", "b", "c")], "c"),  # user 1: 1 % 2
        ([("regex", "add", "r\\.", "b"), ("realm", "unpin", "r.example.com")], "b"),
        ([("user", "move", "r.example.com", "1", "b", "--no-reload")], "b"),
    ],
)
def test_follows_a_change_within_a_second(
    dsn: str, placement: Placement, changes: list[tuple[str, ...]], now: str
) -> None:
    ctl(dsn, "realm", "pin", "r.example.com", "a")
    until(lambda: placement.shard_for_new_queue("r.example.com", 1).name == "a", 5, "the pin")
    started = time.monotonic()
    for change in changes:
        ctl(dsn, *change)
    until(lambda: placement.shard_for_new_queue("r.example.com", 1).name == now, 5, "the change")
    assert time.monotonic() - started < 1.0


def sessions(dsn: str, application_name: str) -> list[int]:
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND datname = current_database() ORDER BY pid",
            (application_name,),
        )
        pids = [int(row[0]) for row in cur.fetchall()]
    conn.close()
    return pids


def test_reconnects_and_reloads_what_it_missed(dsn: str, placement: Placement) -> None:
    until(lambda: terminate_sessions(dsn, "kansas-placement-listen") == 1, 5, "the LISTEN session")
    # Changed while the LISTEN connection is down (or coming back): not lost.
    ctl(dsn, "realm", "pin", "lost.example.com", "c")
    until(lambda: placement.shard_for_new_queue("lost.example.com", 1).name == "c", 10,
          "the change made while disconnected")  # fmt: skip
    # And it listens again.
    ctl(dsn, "realm", "pin", "lost.example.com", "b")
    until(lambda: placement.shard_for_new_queue("lost.example.com", 1).name == "b", 2, "NOTIFY")


def test_a_change_without_notify_arrives_by_the_periodic_reload(dsn: str) -> None:
    with Placement(dsn, reload_interval=0.3) as placement:
        conn = psycopg2.connect(dsn)
        with conn, conn.cursor() as cur:  # one transaction: the trigger is off for it only
            cur.execute("ALTER TABLE kansas_realm_pins DISABLE TRIGGER kansas_realm_pins_changed")
            cur.execute("INSERT INTO kansas_realm_pins (realm, shard) VALUES ('quiet', 'c')")
            cur.execute("ALTER TABLE kansas_realm_pins ENABLE TRIGGER kansas_realm_pins_changed")
        conn.close()
        until(lambda: placement.shard_for_new_queue("quiet", 1).name == "c", 3, "the reload")


def test_errors_are_one_line(postgres_dsn: str) -> None:
    dead = f"host=127.0.0.1 port={free_port()} dbname=x user=postgres password=s3cret"
    with pytest.raises(PlacementError) as caught:
        Placement(dead).start()
    message = str(caught.value)
    assert message.startswith("cannot reach PostgreSQL") and "\n" not in message
    assert "s3cret" not in message
    with pytest.raises(PlacementError, match="run `kansas-ctl migrate`"):
        Placement(postgres_dsn).start()  # no schema yet
    with pytest.raises(PlacementError, match="bad Redis URL"):
        Placement(postgres_dsn, redis_url="http://x")


def _child(placement: Placement, queue: Any) -> None:
    try:
        queue.put(placement.shard_for_new_queue("forked.example.com", 1).name)
    finally:
        placement.close()


def test_a_forked_child_starts_afresh_and_leaves_the_parent_alone(
    dsn: str, placement: Placement
) -> None:
    ctl(dsn, "realm", "pin", "forked.example.com", "b")
    until(lambda: placement.shard_for_new_queue("forked.example.com", 1).name == "b", 5, "pin")
    listening = sessions(dsn, "kansas-placement-listen")
    assert len(listening) == 1
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(placement, queue))
    child.start()
    assert queue.get(timeout=30) == "b"
    child.join(timeout=30)
    assert child.exitcode == 0
    # The parent's LISTEN session is the same one (the child did not end it) ...
    until(lambda: sessions(dsn, "kansas-placement-listen") == listening, 5, "the child's exit")
    # ... and still follows.
    ctl(dsn, "realm", "pin", "forked.example.com", "c")
    until(lambda: placement.shard_for_new_queue("forked.example.com", 1).name == "c", 2,
          "a change after the fork")  # fmt: skip


# -- older queues: kansas never moves a queue, so after a change the old shard still
# -- holds some; only kansas's Redis table says which.
def put_route(redis_url: str, route: QueueRoute) -> None:
    client = RespClient(RedisURL.parse(redis_url), 5)
    try:
        client.call("SET", f"kansas:queue:{route.queue_id}", route.to_json(), "EX", "600")
    finally:
        client.close()


def delete_route(redis_url: str, queue_id: str) -> None:
    client = RespClient(RedisURL.parse(redis_url), 5)
    try:
        client.call("DEL", f"kansas:queue:{queue_id}")
    finally:
        client.close()


def names(placement: Placement, realm: str, user: int) -> list[str]:
    return [shard.name for shard in placement.shards_for_user(realm, user)]


def test_older_queues_are_found_through_redis(dsn: str, redis_url: str) -> None:
    realm = "moving.example.com"
    ctl(dsn, "realm", "pin", realm, "a")
    # A queue kansas created before this process started, on a.
    put_route(redis_url, QueueRoute("q-old-7", "a", realm, 7, 600))
    with (
        Placement(dsn, reload_interval=3600) as plain,
        Placement(
            dsn, redis_url=redis_url, redis_interval=3600, reload_interval=3600
        ) as with_redis,
    ):
        assert names(with_redis, realm, 7) == ["a"] == names(plain, realm, 7)
        ctl(dsn, "realm", "pin", realm, "b")
        until(lambda: names(plain, realm, 7) == ["b"], 2, "the re-pin")
        # Without Redis only the new placement is known; with it, the old queue's shard too.
        until(lambda: names(with_redis, realm, 7) == ["b", "a"], 2, "old and new shard")
        # User 8's queue was created after the last Redis read, under the pin to a: the
        # assignments in force since that read cover it.
        assert names(with_redis, realm, 8) == ["b", "a"]
        put_route(redis_url, QueueRoute("q-old-8", "a", realm, 8, 600))
        grouped = with_redis.users_by_shard(realm, [7, 8, 9])
        assert {s.name: u for s, u in grouped.items()} == {"b": [7, 8, 9], "a": [7, 8, 9]}

        with_redis._read_redis()  # the next periodic read, now
        # Only what Redis says is left of the past: 9 has no queue on a.
        assert names(with_redis, realm, 7) == ["b", "a"]
        assert names(with_redis, realm, 9) == ["b"]
        delete_route(redis_url, "q-old-7")  # the old queue expired, or was deleted
        with_redis._read_redis()
        assert names(with_redis, realm, 7) == ["b"] and names(with_redis, realm, 8) == ["b", "a"]


def test_redis_reads_happen_in_the_background_and_survive_redis_trouble(
    dsn: str, redis_url: str
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with Placement(dsn, redis_url=dead, redis_interval=0.1) as placement:
        assert placement.redis_reads == 0  # answered from the rules alone meanwhile
        assert names(placement, "x.example.com", 1)
    with Placement(dsn, redis_url=redis_url, redis_interval=0.1) as placement:
        until(lambda: placement.redis_reads >= 3, 5, "periodic Redis reads")


# -- the whole event path: kansas places the queue, the module routes the event ----------
@pytest.fixture
def live(tmp_path: Path, dsn: str, redis_url: str) -> Iterator[dict[str, Any]]:
    shards = [DemoShardProcess(n, tmp_path, SECRET, heartbeat=30).start() for n in "xy"]
    sharding = {
        "shard_map": {
            "pinned.example.com": shards[1].port,
            "split.example.com": [shards[0].port, shards[1].port],
        },
        "shard_regexes": [[r"eu\.", shards[1].port]],
    }
    path = tmp_path / "sharding.json"
    path.write_text(json.dumps(sharding))
    # Zulip's default port is 9800; here the first demo shard stands for it.
    ctl(dsn, "import-zulip-sharding", str(path), "--default-port", str(shards[0].port))
    kansas = KansasProcess(tmp_path, dsn, redis_url).start()
    try:
        yield {"kansas": kansas, "shards": {s.port: s for s in shards}}
    finally:
        kansas.stop()
        for shard in shards:
            shard.stop()


def test_kansas_and_the_module_agree_on_live_queues(
    live: dict[str, Any], dsn: str, redis_url: str
) -> None:
    kansas: KansasProcess = live["kansas"]
    by_port: dict[int, DemoShardProcess] = live["shards"]
    with Placement(dsn, redis_url=redis_url, reload_interval=3600) as placement:
        created = {}
        user = 0
        for realm in ("pinned.example.com", "split.example.com", "eu.example.com", "other.org"):
            for _ in range(4):
                user += 1  # distinct ids: demo shards know users, not realms
                form = {"secret": SECRET, "dont_block": "true", "client": "internal",
                        "user_profile_id": user}  # fmt: skip
                reply = call(kansas.internal_port, "POST", "/api/v1/events/internal",
                             host=realm, form=form)  # fmt: skip
                assert reply.status == 200, reply
                created[realm, user] = reply.json["queue_id"]
        for (realm, user), queue_id in created.items():
            shard = placement.shard_for_new_queue(realm, user)
            held = call(by_port[shard.port].port, "GET", "/demo/queues").json["queues"]
            assert queue_id in {q["queue_id"] for q in held}, (realm, user, shard)
            # The event path: the module names the shard, the event goes straight there
            # (as Django publishes to notify_tornado_port_<port>), the client sees it
            # through kansas.
            for target, users in placement.users_by_shard(realm, [user]).items():
                data = json.dumps({"event": {"type": "message", "n": user}, "users": users})
                reply = call(target.port, "POST", "/api/internal/notify_tornado",
                             form={"secret": SECRET, "data": data})  # fmt: skip
                assert reply.status == 200, reply
            got = call(kansas.public_port, "GET", "/api/v1/events", host=realm,
                       params={"queue_id": queue_id, "last_event_id": -1,
                               "dont_block": "true"})  # fmt: skip
            assert [e.get("n") for e in got.json["events"]] == [user], got.json


def placement_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kansas.placement", *argv],
                          capture_output=True, text=True, timeout=60, cwd=CHECKOUT)  # fmt: skip


def test_the_command_line_answers_too(dsn: str) -> None:
    ctl(dsn, "realm", "split", "cli.example.com", "a", "b")
    result = placement_cli("--postgres", dsn, "cli.example.com", "1", "2", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "b\thttp://127.0.0.1:9801\t1 3",
        "a\thttp://127.0.0.1:9800\t2",
    ]
    result = placement_cli("--postgres", f"host=127.0.0.1 port={free_port()} dbname=x", "r", "1")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
