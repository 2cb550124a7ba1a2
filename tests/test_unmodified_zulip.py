"""kansas in front of an unmodified Zulip: stage 1 of docs/deploy.md, end to end.

Two demo shards act as Zulip 9's Tornado with its own port checks (``--sharding``, one
sharding.json): a realm split by user id across both ports, another realm on the second
port. Django's part is played here as unmodified Zulip does it: queues created straight
on the user's port (``ports[user_id % n]``), events published to each user's port (the
shard's notify endpoint standing in for its RabbitMQ queue). Clients long-poll through
kansas only, with HTTP Basic credentials, and kansas's rules come from
``kansas-ctl import-zulip-sharding``. kansas must follow Tornado's redirects for the
users of the split realm's second port, learn where their queues are, answer unknown
and deleted queues with the owner's BAD_EVENT_QUEUE_ID, and hide a shard restart.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kansas.ctl import main as ctl
from kansas.observe import client as observe
from kansas.testing.client import Reply, call
from kansas.testing.processes import DemoShardProcess, KansasProcess
from kansas.testing.servers import free_port
from kansas.testing.waiting import until

pytestmark = pytest.mark.timeout(180)

SECRET = "unmodified-zulip-secret"
SPLIT, ONE = "split.example.com", "one.example.com"
SPLIT_USERS = range(1, 9)  # even ids on the first port of the split, odd on the second
ONE_USERS = range(100, 104)  # all on the second port


def auth(realm: str, user: int) -> dict[str, str]:
    token = base64.b64encode(f"user{user}@{realm}:key-{user}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class Zulip:
    """Django's side, unmodified: it places queues and events by sharding.json."""

    def __init__(self, tmp: Path) -> None:
        self.ports = sorted([free_port(), free_port()])
        self.sharding = {SPLIT: self.ports, ONE: [self.ports[1]]}
        self.sharding_path = tmp / "sharding.json"
        self.sharding_path.write_text(json.dumps({"shard_map": self.sharding}))
        self.shards = {
            port: DemoShardProcess(
                f"tornado-{port}", tmp, SECRET, port=port, sharding=self.sharding_path
            ).start()
            for port in self.ports
        }

    def port_of(self, realm: str, user: int) -> int:
        ports = self.sharding[realm]
        return ports[user % len(ports)]

    def register(self, realm: str, user: int) -> str:
        port = self.port_of(realm, user)  # Django posts to http://127.0.0.1:<port>
        form = {"secret": SECRET, "dont_block": "true", "client": "internal",
                "user_profile_id": user, "user_client": "ZulipPython"}  # fmt: skip
        reply = call(port, "POST", "/api/v1/events/internal", host=f"127.0.0.1:{port}",
                     form=form)  # fmt: skip
        assert reply.status == 200, reply
        return str(reply.json["queue_id"])

    def send(self, event: dict[str, object], users: dict[str, list[int]]) -> None:
        """``send_event``: one publication per port, to that port's queue."""
        by_port: dict[int, list[int]] = {}
        for realm, ids in users.items():
            for user in ids:
                by_port.setdefault(self.port_of(realm, user), []).append(user)
        for port, ids in by_port.items():
            form = {"secret": SECRET, "data": json.dumps({"event": event, "users": ids})}
            reply = call(port, "POST", "/api/internal/notify_tornado",
                         host=f"127.0.0.1:{port}", form=form)  # fmt: skip
            assert reply.status == 200, reply

    def stop(self) -> None:
        for shard in self.shards.values():
            shard.stop()


@dataclass
class Stack:
    zulip: Zulip
    kansas: KansasProcess
    pg: list[str]

    def get(self, realm: str, user: int, queue_id: str, last: int = -1,
            block: bool = False) -> Reply:  # fmt: skip
        params = {"queue_id": queue_id, "last_event_id": last,
                  "dont_block": "false" if block else "true"}  # fmt: skip
        return call(self.kansas.public_port, "GET", "/api/v1/events", host=realm,
                    params=params, headers=auth(realm, user), timeout=90)  # fmt: skip

    def delete(self, realm: str, user: int, queue_id: str) -> Reply:
        return call(self.kansas.public_port, "DELETE", "/api/v1/events", host=realm,
                    form={"queue_id": queue_id}, headers=auth(realm, user))  # fmt: skip

    def counter(self, name: str) -> dict[tuple[str, ...], float]:
        seen = observe.metrics(f"http://127.0.0.1:{self.kansas.internal_port}")
        return {tuple(labels.values()): n for labels, n in seen.get(name, [])}


@pytest.fixture
def stack(tmp_path: Path, postgres_dsn: str, redis_url: str) -> Iterator[Stack]:
    zulip = Zulip(tmp_path)
    kansas = None
    try:
        pg = ["--postgres", postgres_dsn, "--redis", redis_url]
        assert ctl([*pg, "migrate"]) == 0
        assert ctl([*pg, "import-zulip-sharding", str(zulip.sharding_path),
                    "--default-port", str(zulip.ports[0])]) == 0  # fmt: skip
        kansas = KansasProcess(tmp_path, postgres_dsn, redis_url).start()
        yield Stack(zulip, kansas, pg)
    finally:
        if kansas is not None:
            kansas.stop()
        zulip.stop()


@dataclass
class Client:
    """A Zulip API client: long-polls, keeps the ids of the test events it gets."""

    stack: Stack
    realm: str
    user: int
    queue_id: str = ""
    got: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        last = -1
        try:
            while not stop.is_set():
                reply = self.stack.get(self.realm, self.user, self.queue_id, last, block=True)
                if reply.status != 200:
                    self.errors.append(f"{reply.status} {reply.body[:200]!r}")
                    return
                for event in reply.json["events"]:
                    last = max(last, event["id"])
                    if event["type"] == "test":
                        self.got.append(event["n"])
        except Exception as e:  # reported by the test, not lost in the thread
            self.errors.append(repr(e))


class Clients:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.all = [Client(stack, SPLIT, u) for u in SPLIT_USERS]
        self.all += [Client(stack, ONE, u) for u in ONE_USERS]
        for c in self.all:
            c.queue_id = stack.zulip.register(c.realm, c.user)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=c.run, args=(self.stop,), daemon=True)
                        for c in self.all]  # fmt: skip

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def send(self, n: int) -> None:
        users = {SPLIT: list(SPLIT_USERS), ONE: list(ONE_USERS)}
        self.stack.zulip.send({"type": "test", "n": n}, users)

    def wait_parked(self) -> None:
        """Every client's long-poll waits at its own shard (kansas found it)."""

        def parked() -> bool:
            waiting = set()
            for shard in self.stack.zulip.shards.values():
                queues = call(shard.port, "GET", "/demo/queues").json["queues"]
                waiting |= {q["queue_id"] for q in queues if q.get("parked")}
            return {c.queue_id for c in self.all} <= waiting

        until(parked, 30, "every long-poll parked at its shard")

    def finish(self) -> None:
        self.stop.set()
        self.send(0)  # ends every long-poll
        for t in self.threads:
            t.join(timeout=20)
            assert not t.is_alive()
        assert [(c.user, c.errors) for c in self.all if c.errors] == []


def test_a_split_realm_gets_every_event_once_on_both_halves(stack: Stack) -> None:
    clients = Clients(stack)
    clients.start()
    clients.wait_parked()
    for n in range(1, 21):
        clients.send(n)
    until(lambda: all(len(c.got) >= 20 for c in clients.all), 30, "every event delivered")
    clients.finish()
    for c in clients.all:
        assert c.got[:20] == list(range(1, 21)), (c.realm, c.user, c.got)  # once, in order

    # Users of the split realm's second port were redirected once each, then routed
    # straight to their shard: kansas learned (and recorded) where their queues are.
    first, second = (f"tornado-{p}" for p in stack.zulip.ports)
    redirected = [c for c in clients.all if c.realm == SPLIT and c.user % 2]
    assert stack.counter("kansas_tornado_redirects_total") == {(first, second): len(redirected)}
    assert stack.counter("kansas_shard_unusable_answers_total") == {}
    for c in redirected:
        reply = stack.get(c.realm, c.user, c.queue_id)
        assert reply.status == 200
    assert stack.counter("kansas_tornado_redirects_total")[(first, second)] == len(redirected)


@pytest.mark.parametrize("user", [2, 3], ids=["first-port", "second-port"])
def test_unknown_and_deleted_queues_are_bad_event_queue_id_never_502(
    stack: Stack, user: int
) -> None:
    unknown = str(uuid.uuid4())
    reply = stack.get(SPLIT, user, unknown)
    assert reply.status == 400, reply
    assert reply.json == {"result": "error", "msg": f"Bad event queue ID: {unknown}",
                          "code": "BAD_EVENT_QUEUE_ID", "queue_id": unknown}  # fmt: skip

    # Deleted while kansas knows where it is (it was polled through kansas).
    known = stack.zulip.register(SPLIT, user)
    assert stack.get(SPLIT, user, known).status == 200
    assert stack.delete(SPLIT, user, known).status == 200
    gone = stack.get(SPLIT, user, known)
    assert (gone.status, gone.json["code"]) == (400, "BAD_EVENT_QUEUE_ID")

    # Deleted before kansas ever saw it: the realm's first shard gets the DELETE and,
    # for a user of the other port, publishes a cleanup to it (as Tornado does).
    unseen = stack.zulip.register(SPLIT, user)
    assert stack.delete(SPLIT, user, unseen).status == 200

    def deleted() -> bool:
        reply = stack.get(SPLIT, user, unseen)
        assert reply.status in (200, 400), reply
        return reply.status == 400 and reply.json["code"] == "BAD_EVENT_QUEUE_ID"

    until(deleted, 10, "the unseen queue deleted")
    assert stack.counter("kansas_shard_unusable_answers_total") == {}


def test_a_shard_restart_is_hidden_from_both_halves(stack: Stack) -> None:
    clients = Clients(stack)
    clients.start()
    clients.wait_parked()
    clients.send(1)
    until(lambda: all(c.got == [1] for c in clients.all), 30, "the first event delivered")
    clients.wait_parked()
    second = stack.zulip.shards[stack.zulip.ports[1]]
    second.stop()  # SIGTERM: it dumps its queues and drops its long-polls
    stack.kansas.wait_for(r"is down")
    second.start()  # reloads them (same ids, a restart event each), kansas replays
    clients.wait_parked()
    for n in range(2, 6):
        clients.send(n)
    until(lambda: all(len(c.got) >= 5 for c in clients.all), 30, "every event delivered")
    clients.finish()  # no client saw anything but 200s
    for c in clients.all:
        assert c.got[:5] == [1, 2, 3, 4, 5], (c.realm, c.user, c.got)
