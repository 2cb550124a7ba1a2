"""The shipped alerts and dashboard against a real Prometheus scraping a running kansas.

A private Prometheus (temp dir, free port, 1 s scrapes and evaluations) scrapes kansas
with 2 workers in front of two demo shards, a third "shard" that is not Tornado (it
answers with HTML, or redirects to shard b as Zulip's port check does), Redis and
PostgreSQL. The rules it evaluates are the shipped file with every ``for:`` cut to a
few seconds, derived from it here: the expressions are the shipped ones.

While clients long-poll, shard a is stopped and restarted: KansasShardDown goes
pending, then firing, then resolves. Along the way kansas meets each thing its
dashboard shows (a Redis outage, a lost LISTEN connection, a realm moved and one whose
move never ends, answers it cannot use, a Tornado redirect), and then every expression
of the dashboard returns data from the scrape. Last, a worker killed three times makes
KansasWorkersRespawning fire, and kansas stopped makes KansasNotScraped fire.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import yaml

from kansas.testing.client import call
from kansas.testing.processes import CHECKOUT, Child, DemoShardProcess, KansasProcess
from kansas.testing.servers import RedisServer, ServerError, free_port
from tests.conftest import redis_command, terminate_sessions
from tests.test_end_to_end import ONE, SECRET, THREE, TWO
from tests.test_prometheus_rules import DASHBOARD, RULES

pytestmark = pytest.mark.timeout(300)

STUCK = "stuck.example.com"
#: ``for:`` of every alert in the test copy of the rules.
SHORT_FOR = "4s"
#: What Grafana puts for the dashboard's variables (All) and its rate interval.
VARIABLES = {"$instance": ".*", "$shard": ".*", "$__rate_interval": "1m"}


def rules_for_test(dest: Path) -> Path:
    """The shipped rules with each ``for:`` cut to SHORT_FOR and 1 s evaluations:
    the expressions, labels and annotations are the shipped ones."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = SHORT_FOR
    dest.write_text(yaml.safe_dump(rules, sort_keys=False))
    shipped = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    copied = yaml.safe_load(dest.read_text())["groups"][0]["rules"]
    assert [r["expr"] for r in copied] == [r["expr"] for r in shipped]
    return dest


class Prometheus(Child):
    """A private Prometheus: its own config, data dir and free port."""

    def __init__(self, tmp: Path, target_port: int, rules: Path) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "kansas",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }))  # fmt: skip
        binary = shutil.which("prometheus")
        assert binary is not None
        argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}"]  # fmt: skip
        super().__init__("prometheus", argv, tmp)

    def start(self) -> Prometheus:
        self.spawn()
        self.wait_for_port(self.port)
        poll_until(lambda: call(self.port, "GET", "/-/ready").status == 200, "prometheus ready")
        return self

    def api(self, path: str, **params: str) -> Any:
        reply = call(self.port, "GET", "/api/v1/" + path, params=params or None)
        assert reply.status == 200, (path, params, reply.body[:500])
        body = reply.json
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return list(data["result"])

    def alerts(self, name: str, state: str | None = None) -> list[dict[str, Any]]:
        """The active alerts of that name (pending or firing, or only those in ``state``)."""
        return [a for a in self.api("alerts")["alerts"]
                if a["labels"]["alertname"] == name and state in (None, a["state"])]  # fmt: skip


def poll_until(ready: Callable[[], object], what: str, deadline: float = 60) -> Any:
    """Poll ``ready`` until it returns something true, at most ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        try:
            got = ready()
        except (OSError, ServerError):
            got = None
        if got:
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def workers_scraped(prometheus: Prometheus) -> set[str]:
    """The workers (pids) of the latest scrape that holds all of kansas's workers."""
    latest = prometheus.query('process_start_time_seconds{job="kansas"}'
                              ' and on() kansas_workers{job="kansas"} == 2')  # fmt: skip
    return {sample["metric"]["worker"] for sample in latest}


class NotTornado(BaseHTTPRequestHandler):
    """A "shard" that is not Tornado: HTML for any request, but GETs of the queues in
    ``server.redirects`` are redirected to ``server.owner_port`` with Zulip's
    X-Accel-Redirect, as a Tornado process does for a user it does not own."""

    protocol_version = "HTTP/1.1"
    server: Any

    def do_GET(self) -> None:
        queue = self.path.partition("queue_id=")[2].partition("&")[0]
        if queue in self.server.redirects:
            self.answer(b"", {"X-Accel-Redirect": f"/internal/tornado/{self.server.owner_port}"
                                                  f"{self.path}"})  # fmt: skip
        else:
            self.answer(b"<html>not Tornado</html>", {})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.answer(b"<html>not Tornado</html>", {})

    def do_DELETE(self) -> None:
        self.answer(b"<html>not Tornado</html>", {})

    def answer(self, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class Clients:
    """Clients long-polling their queues in a loop (with last_event_id, as Zulip's
    do), so that kansas holds long-polls, parks them, and answers them."""

    def __init__(self, port: int, queues: dict[str, str]) -> None:
        self.port, self.queues = port, queues
        self.stopping = threading.Event()
        self.answers: dict[int, int] = {}
        self.threads = [threading.Thread(target=self.poll, args=(q, realm), daemon=True)
                        for q, realm in queues.items()]  # fmt: skip
        for thread in self.threads:
            thread.start()

    def poll(self, queue: str, realm: str) -> None:
        last = -1
        while not self.stopping.is_set():
            params = {"queue_id": queue, "last_event_id": last, "dont_block": "false"}
            try:
                reply = call(self.port, "GET", "/json/events", host=realm, params=params,
                             timeout=90)  # fmt: skip
            except OSError:
                continue
            self.answers[reply.status] = self.answers.get(reply.status, 0) + 1
            if reply.status == 200:
                events = reply.json.get("events", [])
                if events:
                    last = max(last, *(int(e["id"]) for e in events))
            else:
                self.stopping.wait(0.2)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(100)


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip("prometheus not installed (Debian's prometheus package; make test "
                    "installs it with scripts/system-deps.sh)")  # fmt: skip
    return found


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # kansas's health probes connect and hang up: not an error


@pytest.fixture
def not_tornado() -> Iterator[ThreadingHTTPServer]:
    server = QuietServer(("127.0.0.1", free_port()), NotTornado)
    server.daemon_threads = True
    server.redirects = set()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_alerts_and_dashboard_against_a_real_prometheus(
    prometheus_binary: str,
    tmp_path: Path,
    postgres_dsn: str,
    redis_url: str,
    redis_server: RedisServer,
    not_tornado: ThreadingHTTPServer,
) -> None:
    def ctl(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "kansas.ctl", "--postgres", postgres_dsn, "--redis",
             redis_url, *args],
            capture_output=True, text=True, timeout=60, check=False, cwd=CHECKOUT,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    shards = {n: DemoShardProcess(n, tmp_path, SECRET, heartbeat=5).start() for n in ("a", "b")}
    ctl("migrate")
    for name, shard in shards.items():
        ctl("shard", "add", name, shard.url)
    ctl("shard", "add", "c", f"http://127.0.0.1:{not_tornado.server_address[1]}", "--weight", "0")
    for realm, shard_name in ((ONE, "a"), (TWO, "b"), (THREE, "b")):
        ctl("realm", "pin", realm, shard_name)
    not_tornado.owner_port = shards["b"].port  # type: ignore[attr-defined]
    kansas = KansasProcess(tmp_path, postgres_dsn, redis_url, workers=2).start()
    prometheus = Prometheus(tmp_path, kansas.internal_port, rules_for_test(tmp_path / "rules.yml"))
    clients: Clients | None = None
    try:
        prometheus.start()

        def create(realm: str, user: int, port: int = kansas.internal_port) -> str:
            form = {"secret": SECRET, "dont_block": "true", "client": "internal",
                    "user_profile_id": user}  # fmt: skip
            reply = call(port, "POST", "/api/v1/events/internal", host=realm, form=form)
            assert reply.status == 200, reply
            return str(reply.json["queue_id"])

        def get(queue: str, realm: str) -> int:
            params = {"queue_id": queue, "last_event_id": -1, "dont_block": "true"}
            reply = call(kansas.public_port, "GET", "/json/events", host=realm, params=params)
            return reply.status

        def map_queue(queue: str, shard: str, realm: str, user: int) -> None:
            route = {"shard": shard, "realm": realm, "user": user, "timeout": 600}
            key = "kansas:queue:" + queue
            assert redis_command(redis_server, "SET", key, json.dumps(route)) == b"+OK\r\n"

        poll_until(lambda: prometheus.query('kansas_workers{job="kansas"} == 2'),
                   "a scrape holding both workers")  # fmt: skip

        # Clients long-poll on both shards; a few quick GETs.
        queues = {create(ONE, u): ONE for u in (1, 2, 3)} | {create(TWO, u): TWO for u in (4, 5)}
        clients = Clients(kansas.public_port, queues)
        for queue, realm in queues.items():
            assert get(queue, realm) == 200

        # A Tornado redirect (the queue lives on b; its mapping says c, the port-check
        # answer sends kansas to b), and an answer that is not JSON (502).
        redirected = create(TWO, 6, port=shards["b"].port)  # on b, bypassing kansas
        not_tornado.redirects.add(redirected)  # type: ignore[attr-defined]
        map_queue(redirected, "c", TWO, 6)
        assert get(redirected, TWO) == 200
        garbled = str(uuid.uuid4())
        map_queue(garbled, "c", TWO, 7)
        assert get(garbled, TWO) == 502

        # A realm moved with a reload: its queue's next request is BAD_EVENT_QUEUE_ID.
        moved = create(THREE, 8)
        ctl("realm", "move", THREE, "a")
        assert get(moved, THREE) == 400
        # A move that never ends (its mover died): the realm stays "moving".
        with psycopg2.connect(postgres_dsn) as conn, conn.cursor() as cur:
            cur.execute("INSERT INTO kansas_moves (realm, to_shard, reload_rate)"
                        " VALUES (%s, 'a', 50)", (STUCK,))  # fmt: skip
        conn.close()

        # PostgreSQL drops kansas's LISTEN connections (kansas connects again).
        assert terminate_sessions(postgres_dsn, "kansas-listen") >= 1
        # Redis goes away for a moment: lookups fail, a new mapping waits in the journal.
        redis_server.stop()
        assert get(str(uuid.uuid4()), ONE) in (400, 502)  # looked for on the realm's home
        created_meanwhile = create(ONE, 9)
        poll_until(lambda: prometheus.query('kansas_redis_errors_total{job="kansas"} > 0'),
                   "Redis errors scraped")  # fmt: skip
        redis_server.start(redis_server.port)
        poll_until(lambda: prometheus.query("kansas_route_journal_entries == 0"),
                   "the journal drained once Redis was back")  # fmt: skip
        assert get(created_meanwhile, ONE) == 200

        # Shard a stops: KansasShardDown goes pending, then fires; a DELETE for it is 502.
        shard_down = 'ALERTS{alertname="KansasShardDown", shard="a"}'
        assert not prometheus.alerts("KansasShardDown")
        shards["a"].stop()
        pending = poll_until(lambda: prometheus.alerts("KansasShardDown", "pending"), "pending")
        assert [a["labels"]["shard"] for a in pending] == ["a"]
        delete = call(kansas.public_port, "DELETE", "/api/v1/events", host=ONE,
                      params={"queue_id": created_meanwhile})  # fmt: skip
        assert delete.status == 502
        firing = poll_until(lambda: prometheus.alerts("KansasShardDown", "firing"), "firing")
        assert firing[0]["labels"] == {"alertname": "KansasShardDown", "job": "kansas",
                                       "instance": f"127.0.0.1:{kansas.internal_port}",
                                       "severity": "critical", "shard": "a"}  # fmt: skip
        assert firing[0]["annotations"]["runbook_url"] == "docs/observability.md#kansassharddown"
        poll_until(lambda: prometheus.query('sum(kansas_parked_requests{shard="a"}) > 0'),
                   "the long-polls of shard a parked")  # fmt: skip

        # It comes back: the alert resolves, the parked long-polls are replayed.
        shards["a"].start()
        poll_until(lambda: not prometheus.alerts("KansasShardDown"), "KansasShardDown resolved")
        was_firing = f'max_over_time({shard_down[:-1]}, alertstate="firing"}}[5m])'
        assert prometheus.query(was_firing)  # the ALERTS series Prometheus keeps
        poll_until(lambda: prometheus.query("kansas_parked_released_total > 0"),
                   "parked long-polls released")  # fmt: skip

        # The answer kansas could not use made its alert fire too.
        unusable = poll_until(lambda: prometheus.alerts("KansasShardUnusableAnswers", "firing"),
                              "KansasShardUnusableAnswers firing")  # fmt: skip
        assert unusable[0]["labels"]["shard"] == "c"
        assert unusable[0]["labels"]["problem"] == "not-json"

        # Every expression of the dashboard returns data from this scrape.
        board = json.loads(DASHBOARD.read_text())
        exprs = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
        assert len(exprs) > 30
        empty = []
        for title, expr in exprs:
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            if not prometheus.query(expr):
                empty.append((title, expr))
        assert empty == []
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                query = variable["definition"].replace("$instance", ".*")
                metric = query.partition("(")[2].rpartition(",")[0]
                assert prometheus.api("series", **{"match[]": metric}), variable["name"]
        shard_values = prometheus.api("label/shard/values")
        assert {"a", "b", "c"} <= set(shard_values)

        # A worker killed three times over: KansasWorkersRespawning fires (workers are
        # named by pid: 5 distinct in the window, for 2 workers).
        assert not prometheus.alerts("KansasWorkersRespawning")
        for _ in range(3):
            seen = workers_scraped(prometheus)
            os.kill(int(min(seen)), signal.SIGKILL)
            poll_until(lambda seen=seen: len(workers_scraped(prometheus) - seen) == 1,
                       "the respawned worker scraped")  # fmt: skip
        respawning = poll_until(lambda: prometheus.alerts("KansasWorkersRespawning", "firing"),
                                "KansasWorkersRespawning firing")  # fmt: skip
        assert respawning[0]["value"] in ("5e+00", "5")

        # kansas stops: KansasNotScraped fires.
        assert not prometheus.alerts("KansasNotScraped")
        clients.stop()
        kansas.stop()
        poll_until(lambda: prometheus.alerts("KansasNotScraped", "firing"), "KansasNotScraped")
    finally:
        if clients is not None:
            clients.stopping.set()
        prometheus.stop()
        kansas.stop()
        for shard in shards.values():
            shard.stop()
        if clients is not None:
            clients.stop()
        if not redis_server.alive():
            redis_server.start(redis_server.port)
