"""End to end against a live Zulip with ``kansas.zulip`` enabled (stage 2 of deploy.md).

Skipped unless ``KANSAS_LIVE_ZULIP`` names a small JSON file describing that Zulip and
the kansas in front of it (``make zulip-e2e`` runs it, printing its figures)::

    {
      "include": "live-zulip.json",           # optional: another file merged in first
      "django": "http://127.0.0.1:9991",      # where clients register and send
      "events_url": "http://127.0.0.1:80",    # nginx (or kansas's public listener):
                                              #   where clients long-poll /api/v1/events
      "kansas_internal": "http://127.0.0.1:9798",
      "kansas_postgres": "host=127.0.0.1 dbname=kansas user=kansas",
      "kansas_redis": "redis://127.0.0.1:6379/0",
      "kansas_sighup": "kill -HUP $(cat /run/kansas.pid)",
      "restart_tornado": {"9800": "COMMAND restarting the Tornado process on 9800", ...},
      "sharding_json": "/etc/zulip/sharding.json",           # optional: roll-back check
      "realms": {"HOST": {"users": [{"email": ..., "api_key": ..., "user_id": N,
                                     "tornado_port": P}, ...]}, ...}
    }

It needs a realm split across two ports and a realm on one port, each with at least
three users (the last one of each realm only sends). It changes kansas's placement
(a user move and a realm move, with reload) and puts it back at the end.

Checked, with the real ``zulip`` client, each user long-polling in a thread:
register lands via kansas (its Redis key names the user, on the shard kansas's rules
name); every message arrives exactly once; Tornado never redirects (kansas's
``kansas_tornado_redirects_total`` does not grow); a Tornado restart and a kansas
SIGHUP while messages are sent: no client sees an error, nothing lost or doubled; a
``user move`` and a ``realm move`` with reload: each moved client gets exactly one
``BAD_EVENT_QUEUE_ID``, registers again on the new shard (which sharding.json does not
name: Tornado serves it there), and gets its messages there exactly once; nobody else
notices.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CONFIG_ENV = "KANSAS_LIVE_ZULIP"
#: A moved client hears BAD_EVENT_QUEUE_ID on its next request: at once if kansas
#: answers its held long-poll, at the latest after Tornado's heartbeat (45-55 s).
MOVE_SECONDS = 80

pytestmark = pytest.mark.skipif(
    not os.environ.get(CONFIG_ENV),
    reason=f"no live Zulip configured: set {CONFIG_ENV}=/path/to/live.json "
    "(see tests/test_zulip_live.py and docs/zulip-integration.md); `make zulip-e2e` runs it",
)


def load_config(path: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(Path(path).read_text())
    include = config.pop("include", None)
    if include:
        base = load_config(str(Path(path).parent / include))  # relative to this file
        base.update(config)
        config = base
    return config


def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Live:
    """The configured Zulip and kansas, and the calls the test makes on them."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.django = config["django"]
        self.events_url = config["events_url"]
        self.internal = config["kansas_internal"]
        realms = config["realms"]
        self.split = next(h for h, r in realms.items() if len(_ports(r)) > 1)
        self.solo = next(h for h, r in realms.items() if len(_ports(r)) == 1)
        self.users = {h: realms[h]["users"] for h in (self.split, self.solo)}
        self.senders: dict[str, Any] = {}

    def client(self, host: str, user: dict[str, Any], base: str) -> Any:
        import zulip

        c = zulip.Client(
            email=user["email"], api_key=user["api_key"], site=self.django, client="kansas-e2e"
        )
        c.ensure_session()
        c.session.headers["Host"] = host
        c.base_url = base.rstrip("/") + "/api/"
        return c

    def ctl(self, *argv: str) -> str:
        env = dict(
            os.environ,
            KANSAS_POSTGRES=self.config["kansas_postgres"],
            KANSAS_REDIS=self.config["kansas_redis"],
        )
        out = subprocess.run(
            [sys.executable, "-m", "kansas.ctl", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, f"kansas-ctl {' '.join(argv)}: {out.stderr}{out.stdout}"
        return out.stdout

    def route(self, queue_id: str) -> dict[str, Any] | None:
        from kansas.placement import QUEUE_KEY_PREFIX, RedisURL, RespClient

        client = RespClient(RedisURL.parse(self.config["kansas_redis"]), 5.0)
        try:
            raw = client.call("GET", QUEUE_KEY_PREFIX + queue_id)
        finally:
            client.close()
        return None if raw is None else dict(json.loads(raw))

    def redirects(self) -> float:
        from kansas.observe import client

        return client.total(client.metrics(self.internal), "kansas_tornado_redirects_total")


def _ports(realm: dict[str, Any]) -> set[int]:
    return {int(u["tornado_port"]) for u in realm["users"]}


class Poller(threading.Thread):
    """One user: registers through Django, long-polls through ``events_url`` with the
    real zulip client, registers again on BAD_EVENT_QUEUE_ID; records every answer."""

    def __init__(self, live: Live, host: str, user: dict[str, Any]) -> None:
        super().__init__(daemon=True, name=f"poll-{user['email']}")
        self.live, self.host, self.user = live, host, user
        self.register_client = live.client(host, user, live.django)
        self.events = live.client(host, user, live.events_url)
        self.seen: Counter[str] = Counter()
        self.queues: list[str] = []
        self.bad_queue = 0
        self.problems: list[str] = []  # anything a client should not see
        self.polls = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        session = self.events.session
        session.hooks["response"].append(self._answered)
        request = session.request

        def recorded(*args: Any, **kwargs: Any) -> Any:
            try:
                return request(*args, **kwargs)
            except Exception as e:
                if not self.stopping.is_set():
                    self.problems.append(f"{type(e).__name__}: {e}")
                raise

        session.request = recorded

    def _answered(self, response: Any, *args: Any, **kwargs: Any) -> None:
        if response.status_code == 200 or self.stopping.is_set():
            return
        try:
            code = response.json().get("code")
        except ValueError:
            code = None
        if not (response.status_code == 400 and code == "BAD_EVENT_QUEUE_ID"):
            self.problems.append(f"HTTP {response.status_code} {code}: {response.text[:200]}")

    def register(self) -> None:
        reply = self.register_client.register(event_types=["message"])
        assert reply["result"] == "success", reply
        self.queue_id, self.last = reply["queue_id"], reply["last_event_id"]
        with self.lock:
            self.queues.append(self.queue_id)

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                reply = self.events.get_events(queue_id=self.queue_id, last_event_id=self.last)
                self.polls += 1
                if reply.get("result") == "success":
                    for event in reply["events"]:
                        self.last = max(self.last, event["id"])
                        if event["type"] == "message":
                            with self.lock:
                                self.seen[event["message"]["content"]] += 1
                elif reply.get("code") == "BAD_EVENT_QUEUE_ID":
                    self.bad_queue += 1
                    self.register()
                elif not self.stopping.is_set():
                    self.problems.append(f"get_events: {reply}")
                    time.sleep(1)
        except Exception as e:  # a dead poller must fail the test, not hang it
            if not self.stopping.is_set():
                self.problems.append(f"poller died: {type(e).__name__}: {e}")


@pytest.fixture(scope="module")
def live() -> Live:
    return Live(load_config(os.environ[CONFIG_ENV]))


@pytest.fixture(scope="module")
def pollers(live: Live) -> Iterator[dict[int, Poller]]:
    found: dict[int, Poller] = {}
    for host in (live.split, live.solo):
        for user in live.users[host][:-1]:
            poller = Poller(live, host, user)
            poller.register()
            found[user["user_id"]] = poller
    for poller in found.values():
        poller.start()
    yield found
    for poller in found.values():
        poller.stopping.set()
        for queue_id in set(poller.queues):
            with contextlib.suppress(Exception):
                poller.events.deregister(queue_id, timeout=5)


def say(line: str) -> None:
    print(f"[zulip-e2e] {line}", flush=True)


def send_round(live: Live, pollers: dict[int, Poller], label: str) -> list[tuple[Poller, str]]:
    """A DM to every polling user from their realm's last user."""
    sent = []
    for host in (live.split, live.solo):
        sender = live.senders.get(host)
        if sender is None:
            sender = live.senders[host] = live.client(host, live.users[host][-1], live.django)
        for poller in (p for p in pollers.values() if p.host == host):
            content = f"{label} {poller.user['email']} {uuid.uuid4()}"
            reply = sender.send_message(
                {"type": "private", "to": [poller.user["email"]], "content": content}
            )
            assert reply["result"] == "success", reply
            sent.append((poller, content))
    return sent


def exactly_once(sent: list[tuple[Poller, str]], since: float, timeout: float = 60) -> float:
    """Seconds from ``since`` until every message arrived; then none may come twice."""
    until(lambda: all(p.seen[c] >= 1 for p, c in sent), timeout, "every message to arrive")
    took = time.monotonic() - since
    time.sleep(1.0)  # a duplicate would come now
    doubled = [(p.user["email"], c) for p, c in sent if p.seen[c] != 1]
    assert not doubled, f"not exactly once: {doubled}"
    return took


def no_problems(pollers: dict[int, Poller]) -> None:
    seen = {p.user["email"]: p.problems for p in pollers.values() if p.problems}
    assert not seen, f"clients saw errors: {seen}"


@pytest.mark.timeout(900)
def test_zulip_follows_kansas(live: Live, pollers: dict[int, Poller]) -> None:
    from kansas.placement import Placement

    split_users = [p for p in pollers.values() if p.host == live.split]
    solo_users = [p for p in pollers.values() if p.host == live.solo]
    mover = split_users[0]  # a user of the split realm
    home = f"tornado-{mover.user['tornado_port']}"
    away = next(
        f"tornado-{port}"
        for port in _ports(live.config["realms"][live.split])
        if f"tornado-{port}" != home
    )
    solo_home = f"tornado-{solo_users[0].user['tornado_port']}"
    solo_away = next(
        f"tornado-{port}"
        for port in _ports(live.config["realms"][live.split])
        if f"tornado-{port}" != solo_home
    )
    try:
        # 1. Register lands via kansas, on the shard kansas's rules name.
        with Placement(live.config["kansas_postgres"]) as placement:
            for poller in pollers.values():
                route = live.route(poller.queue_id)
                assert route is not None, (
                    f"{poller.user['email']}: no kansas:queue:{poller.queue_id}"
                )
                expected = placement.shard_for_new_queue(poller.host, poller.user["user_id"])
                assert route["user"] == poller.user["user_id"], route
                assert route["shard"] == expected.name, route
        say(f"register via kansas: {len(pollers)} queues in kansas's Redis, each with its user")

        # 2. Messages exactly once, without a redirect.
        redirects = live.redirects()
        start = time.monotonic()
        took = exactly_once(send_round(live, pollers, "plain"), start)
        assert live.redirects() == redirects, "Tornado redirected (the app is not active there?)"
        no_problems(pollers)
        say(
            f"messages: {len(pollers)} sent, each arrived exactly once in {took:.2f} s; "
            f"redirects followed: +0 (total {redirects:.0f})"
        )

        # 3. A Tornado restart, messages sent while it is down.
        port = mover.user["tornado_port"]
        restart = subprocess.Popen(
            live.config["restart_tornado"][str(port)],
            shell=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        down = until(lambda: not port_open(port), 30, f"Tornado {port} to stop")
        sent = send_round(live, pollers, "during-restart")
        was_down = not port_open(port)
        assert restart.wait(timeout=120) == 0, "the restart command failed"
        took = exactly_once(sent, time.monotonic(), timeout=90)
        no_problems(pollers)
        say(
            f"Tornado {port} restart: down after {down:.1f} s, {len(sent)} messages sent "
            f"{'while it was down' if was_down else '(it was already back)'}; each arrived "
            f"exactly once {took:.1f} s after the restart command ended; clients saw no error"
        )

        # 4. A kansas SIGHUP (new generation of workers), messages sent through it.
        redirects = live.redirects()
        start = time.monotonic()
        subprocess.run(live.config["kansas_sighup"], shell=True, check=True)
        sent = send_round(live, pollers, "during-sighup")
        time.sleep(3)
        sent += send_round(live, pollers, "after-sighup")
        took = exactly_once(sent, start)
        no_problems(pollers)
        say(
            f"kansas SIGHUP: {len(sent)} messages sent in the {took:.1f} s after it, each "
            "arrived exactly once; clients saw no error"
        )

        # 5. user move with reload: one BAD_EVENT_QUEUE_ID, a new queue on the new shard.
        redirects = live.redirects()
        before = {p.user["user_id"]: p.bad_queue for p in pollers.values()}
        old_queue = {p.user["user_id"]: p.queue_id for p in pollers.values()}
        start = time.monotonic()
        live.ctl("user", "move", live.split, str(mover.user["user_id"]), away)
        ctl_took = time.monotonic() - start
        took = until(
            lambda: (
                mover.bad_queue == before[mover.user["user_id"]] + 1
                and mover.queue_id != old_queue[mover.user["user_id"]]
                and live.route(mover.queue_id) is not None
            ),
            MOVE_SECONDS,
            "the moved user to register again",
        )
        route = live.route(mover.queue_id)
        assert route is not None and route["shard"] == away, route
        sent = send_round(live, pollers, "after-user-move")
        exactly_once(sent, time.monotonic())
        assert mover.bad_queue == before[mover.user["user_id"]] + 1
        assert all(p.bad_queue == before[uid] for uid, p in pollers.items() if p is not mover)
        assert live.redirects() == redirects
        no_problems(pollers)
        say(
            f"user move {mover.user['email']} {home} -> {away}: 1 BAD_EVENT_QUEUE_ID, "
            f"registered again on {route['shard']} {took:.1f} s after kansas-ctl returned "
            f"(it took {ctl_took:.1f} s, 2 s settle included), its messages arrive "
            f"there exactly once; the other {len(pollers) - 1} clients noticed nothing"
        )

        # 6. realm move with reload.
        before = {p.user["user_id"]: p.bad_queue for p in pollers.values()}
        old_queue = {p.user["user_id"]: p.queue_id for p in pollers.values()}
        start = time.monotonic()
        live.ctl("realm", "move", live.solo, solo_away)
        ctl_took = time.monotonic() - start
        took = until(
            lambda: all(
                p.bad_queue == before[p.user["user_id"]] + 1
                and p.queue_id != old_queue[p.user["user_id"]]
                and live.route(p.queue_id) is not None
                for p in solo_users
            ),
            MOVE_SECONDS,
            "every client of the moved realm to register again",
        )
        shards = {live.route(p.queue_id)["shard"] for p in solo_users}  # type: ignore[index]
        assert shards == {solo_away}, shards
        sent = send_round(live, pollers, "after-realm-move")
        exactly_once(sent, time.monotonic())
        assert all(p.bad_queue == before[uid] + 1 for uid, p in pollers.items() if p in solo_users)
        assert all(p.bad_queue == before[uid] for uid, p in pollers.items() if p not in solo_users)
        assert live.redirects() == redirects
        no_problems(pollers)
        say(
            f"realm move {live.solo} {solo_home} -> {solo_away}: each of its "
            f"{len(solo_users)} clients got 1 BAD_EVENT_QUEUE_ID and registered again on "
            f"{solo_away} within {took:.1f} s of kansas-ctl's return (it took "
            f"{ctl_took:.1f} s); messages exactly once; the split realm's "
            f"{len(split_users)} clients noticed nothing; redirects followed: +0"
        )
    finally:
        # Put kansas's placement back as sharding.json has it.
        live.ctl("realm", "move", live.solo, solo_home)
        live.ctl("user", "move", live.split, str(mover.user["user_id"]), home)
        from kansas.stores.postgres import PostgresAuthority

        authority = PostgresAuthority(live.config["kansas_postgres"])
        try:
            authority.clear_user_overrides(live.split, home)
        finally:
            authority.close()
    if live.config.get("sharding_json"):
        plan = live.ctl("import-zulip-sharding", live.config["sharding_json"], "--dry-run")
        say(f"placement put back: {plan.strip().splitlines()[-1]}")
