"""kansas-ctl import-zulip-sharding: every realm lands where Zulip puts it today.

Zulip's rule, restated from its sharding code (facts, re-implemented here as the
oracle): a host's ports are ``shard_map[host]``, else those of the first regex that
``re.match``-es it case-insensitively, else ``[TORNADO_PORTS[0]]`` (the lowest port of
[tornado_sharding], from which the file is rendered: its lowest port); user U of the
realm is on ``ports[U % len(ports)]``.
"""

from __future__ import annotations

import io
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kansas.ctl import PROBE_TIMEOUT, main, probe_shard, warn_unanswered
from kansas.errors import KansasError
from kansas.model import Assignment
from kansas.router import place_queue, realm_from_host
from kansas.stores.memory import MemoryAuthority
from kansas.stores.postgres import PostgresAuthority
from kansas.testing.servers import free_port, not_found_server
from kansas.zulip_sharding import apply_plan, needs_port, parse_sharding, plan_import

CURRENT = {
    "shard_map": {
        "chat.example.com": 9801,
        "big.example.com": [9802, 9803],
        "bigger.example.com": [9803, 9802, 9804],
        "solo.example.com": [9804],
        "zulip.example.com": 9800,
    },
    "shard_regexes": [
        [r"eu[0-9]*\.", 9805],  # re.match: only at the start
        [r".*\.split\.example\.com$", [9806, 9807]],
        [r"(?:.*\.)?CHAT\.", 9806],  # never reached for chat.example.com: exact first
    ],
}
FLAT = {"chat.example.com": 9801, "other.example.com": 9802}


def tornado_ports(data: dict[str, Any]) -> list[int]:
    """Zulip's TORNADO_PORTS, as far as the file rendered from [tornado_sharding] says."""
    values = [*data.get("shard_map", data).values()]
    values += [ports for _, ports in data.get("shard_regexes", [])]
    return sorted({p for v in values for p in (v if isinstance(v, list) else [v])})


def zulip_port(data: dict[str, Any], host: str, user_id: int, default: int = 9800) -> int:
    """Where Zulip's Django and nginx send this user's queue today (``default``: the
    TORNADO_PORTS[0] of a file that names no port)."""
    shard_map = data.get("shard_map", data)
    regexes = data.get("shard_regexes", [])
    tornado_ports_ = tornado_ports(data) or [default]
    ports: Any = shard_map.get(host)
    if ports is None:
        ports = next((v for rx, v in regexes if re.match(rx, host, re.IGNORECASE)), None)
    if ports is None:
        ports = tornado_ports_[0]
    ports = ports if isinstance(ports, list) else [ports]
    return int(ports[user_id % len(ports)])


def ctl(dsn: str, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["--postgres", dsn, *argv], out=out)
    return code, out.getvalue()


def write(tmp_path: Path, data: object, name: str = "sharding.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


@pytest.fixture
def dsn(postgres_dsn: str) -> str:
    assert ctl(postgres_dsn, "migrate")[0] == 0
    return postgres_dsn


def load(dsn: str) -> Assignment:
    authority = PostgresAuthority(dsn)
    try:
        return authority.load()
    finally:
        authority.close()


HOSTS = [
    *CURRENT["shard_map"],  # type: ignore[list-item]
    "eu.example.com", "eu12.example.com", "x.eu1.example.com", "a.split.example.com",
    "b.c.split.example.com", "split.example.com", "x.chat.example.com", "nowhere.org",
]  # fmt: skip


def assert_same_as_zulip(data: dict[str, Any], assignment: Assignment, users: range) -> None:
    for host in HOSTS:
        for user in users:
            decision = place_queue(assignment, host, user)
            assert decision is not None, host
            shard = assignment.shards[decision.shard]
            assert shard.port == zulip_port(data, host, user), (host, user, decision)


def test_dry_run_prints_the_plan_and_writes_nothing(dsn: str, tmp_path: Path) -> None:
    path = write(tmp_path, CURRENT)
    code, out = ctl(dsn, "import-zulip-sharding", path, "--dry-run")
    assert code == 0, out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert lines[0] == "ACTION KIND WHAT TO"
    for expected in (
        "create shard tornado-9800 http://127.0.0.1:9800",
        "create split bigger.example.com tornado-9803 tornado-9802 tornado-9804 (user_id % 3)",
        "create pin solo.example.com tornado-9804",  # a list of one port: a pin
        r"create regex #1 eu[0-9]*\. tornado-9805",
        "create regex #2 .*\\.split\\.example\\.com$ tornado-9806 tornado-9807 (user_id % 2)",
        "create default #4 .* tornado-9800",  # Zulip's TORNADO_PORTS[0]
    ):
        assert expected in lines, (expected, out)
    # 8 shards, 5 exact hosts, 3 regexes and the default.
    assert lines[-1] == "dry run: 17 change(s) planned, nothing written"
    assert load(dsn) == Assignment()


def test_import_keeps_every_realm_where_zulip_has_it(dsn: str, tmp_path: Path) -> None:
    path = write(tmp_path, CURRENT)
    code, out = ctl(dsn, "import-zulip-sharding", path)
    assert code == 0 and out.endswith("17 change(s) applied\n"), out
    assignment = load(dsn)
    assert assignment.realm_splits["bigger.example.com"] == (
        "tornado-9803", "tornado-9802", "tornado-9804")  # fmt: skip
    assert [r.pattern for r in assignment.regex_rules][-1] == ".*"
    assert_same_as_zulip(CURRENT, assignment, range(12))
    assert ctl(dsn, "where", "bigger.example.com", "4") == (0, "tornado-9802 (realm-split)\n")
    assert ctl(dsn, "where", "EU3.example.com", "4") == (0, "tornado-9805 (regex)\n")


def test_import_is_idempotent(dsn: str, tmp_path: Path, postgres_server: Any) -> None:
    path = write(tmp_path, CURRENT)
    assert ctl(dsn, "import-zulip-sharding", path)[0] == 0
    before = load(dsn)
    stamps = _updated_at(dsn)
    code, out = ctl(dsn, "import-zulip-sharding", path)
    assert code == 0
    assert out.splitlines()[-1] == f"nothing to change: kansas already places realms as {path} does"
    assert all(line.startswith(("ACTION", "keep", "nothing")) for line in out.splitlines())
    assert load(dsn) == before and _updated_at(dsn) == stamps  # not a row rewritten
    assert ctl(dsn, "import-zulip-sharding", path, "--dry-run")[1].splitlines()[-1] == (
        "dry run: 0 change(s) planned, nothing written"
    )


def _updated_at(dsn: str) -> list[Any]:
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT updated_at FROM kansas_realm_pins UNION ALL"
            " SELECT updated_at FROM kansas_realm_splits UNION ALL"
            " SELECT updated_at FROM kansas_regex_rules ORDER BY 1"
        )
        rows = cur.fetchall()
    conn.close()
    return rows


def test_the_older_flat_format(dsn: str, tmp_path: Path) -> None:
    path = write(tmp_path, FLAT)
    code, out = ctl(dsn, "import-zulip-sharding", path)
    assert code == 0, out
    assignment = load(dsn)
    assert dict(assignment.realm_pins) == {
        "chat.example.com": "tornado-9801",
        "other.example.com": "tornado-9802",
    }
    # TORNADO_PORTS[0] is the file's lowest port, 9801: no shard on 9800.
    assert sorted(assignment.shards) == ["tornado-9801", "tornado-9802"]
    assert [(r.pattern, r.shards) for r in assignment.regex_rules] == [(".*", ("tornado-9801",))]
    assert_same_as_zulip(FLAT, assignment, range(3))


def test_the_default_is_the_files_lowest_port_not_9800(dsn: str, tmp_path: Path) -> None:
    # A development server: one realm per Tornado port, none of them 9800.
    data = {"shard_map": {"zulip.localhost:9991": 9993}, "shard_regexes": [["eu", 9994]]}
    code, out = ctl(dsn, "import-zulip-sharding", write(tmp_path, data), "--dry-run")
    assert code == 0, out
    assert "create default #2 .* tornado-9993" in [" ".join(x.split()) for x in out.splitlines()]
    assert "9800" not in out
    # --default-port says otherwise (a lowest [tornado_sharding] port naming no realm).
    code, out = ctl(dsn, "import-zulip-sharding", write(tmp_path, data), "--default-port", "9992")
    assert code == 0, out
    assert [(r.pattern, r.shards) for r in load(dsn).regex_rules][-1] == (".*", ("tornado-9992",))


def test_a_file_without_ports_needs_the_default_port(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, {})  # one Tornado, no sharding: the file says nothing of it
    assert ctl(dsn, "import-zulip-sharding", path) == (1, "")
    err = capsys.readouterr().err
    assert err.startswith("kansas-ctl: error: the file names no port") and err.count("\n") == 1
    assert "--default-port" in err and load(dsn) == Assignment()
    assert ctl(dsn, "import-zulip-sharding", path, "--default-port", "9800")[0] == 0
    assignment = load(dsn)
    assert list(assignment.shards) == ["tornado-9800"]
    assert_same_as_zulip({}, assignment, range(3))
    assert ctl(dsn, "import-zulip-sharding", path, "--no-default")[0] == 0  # needs none


def test_a_changed_file_changes_only_what_changed(dsn: str, tmp_path: Path) -> None:
    assert ctl(dsn, "import-zulip-sharding", write(tmp_path, CURRENT))[0] == 0
    changed = json.loads(json.dumps(CURRENT))
    changed["shard_map"]["chat.example.com"] = [9801, 9808]  # now split, on a new port
    changed["shard_regexes"].reverse()
    code, out = ctl(dsn, "import-zulip-sharding", write(tmp_path, changed, "new.json"))
    assert code == 0, out
    actions = {(line.split()[0], line.split()[1]) for line in out.splitlines()[1:-1]}
    assert ("create", "shard") in actions and ("change", "split") in actions
    assert ("change", "regex") in actions
    assert sum(line.startswith("keep    pin") for line in out.splitlines()) == 2
    assert_same_as_zulip(changed, load(dsn), range(12))


def test_existing_shards_are_reused_and_other_rules_reported(dsn: str, tmp_path: Path) -> None:
    assert ctl(dsn, "shard", "add", "old-a", "http://127.0.0.1:9801")[0] == 0
    assert ctl(dsn, "shard", "add", "x", "http://127.0.0.1:9900")[0] == 0
    assert ctl(dsn, "realm", "pin", "kept.example.org", "x")[0] == 0
    assert ctl(dsn, "user", "move", "chat.example.com", "7", "x", "--no-reload")[0] == 0
    code, out = ctl(dsn, "import-zulip-sharding", write(tmp_path, FLAT))
    assert code == 0, out
    assert "keep    shard    old-a" in out
    assert load(dsn).realm_pins["chat.example.com"] == "old-a"
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, out
    assert "kept.example.org" in warnings[0] and "1 user override" in warnings[1]
    assert load(dsn).realm_pins["kept.example.org"] == "x"  # left alone


def test_url_template_default_port_and_no_default(dsn: str, tmp_path: Path) -> None:
    path = write(tmp_path, FLAT)
    code, out = ctl(dsn, "import-zulip-sharding", path, "--no-default",
                    "--shard-url-template", "http://127.0.0.7:{port}")  # fmt: skip
    assert code == 0, out
    assert "warning: --no-default" in out
    assignment = load(dsn)
    assert assignment.regex_rules == ()
    assert assignment.shards["tornado-9801"].url == "http://127.0.0.7:9801"
    code, out = ctl(dsn, "import-zulip-sharding", path, "--default-port", "9802",
                    "--shard-url-template", "http://127.0.0.7:{port}")  # fmt: skip
    assert code == 0, out
    assert [(r.pattern, r.shards) for r in load(dsn).regex_rules] == [(".*", ("tornado-9802",))]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{not json", "is not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"a.example.com": "9800"}, "a port must be an integer 1-65535, not '9800'"),
        ({"a.example.com": True}, "a port must be an integer"),
        ({"a.example.com": []}, "an empty list of ports"),
        ({"a.example.com": 70000}, "a port must be an integer"),
        ({"shard_map": {}, "shard_regexes": [["(", 9800]]}, "shard_regexes[0]: bad regex"),
        ({"shard_map": {}, "shard_regexes": [["x"]]}, "expected [regex, port | [ports]]"),
        ({"shard_map": [], "shard_regexes": []}, "shard_map must be an object"),
        ({"shard_map": {}, "extra": 1}, "unknown keys"),
        ({"A.example.com": 9800, "a.example.com": 9801}, "listed twice"),
        ({"bad host!": 9800}, "not a realm host"),
    ],
)
def test_bad_files_are_one_line_and_change_nothing(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: Any, message: str
) -> None:
    path = str(tmp_path / "missing.json") if content is None else write(tmp_path, content)
    code, out = ctl(dsn, "import-zulip-sharding", path)
    err = capsys.readouterr().err
    assert code == 1 and out == ""
    assert err.startswith("kansas-ctl: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert load(dsn) == Assignment()


def test_a_name_taken_at_another_url_is_refused(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ctl(dsn, "shard", "add", "tornado-9801", "http://127.0.0.1:19801")[0] == 0
    capsys.readouterr()  # its warning: nothing answers there
    assert ctl(dsn, "import-zulip-sharding", write(tmp_path, FLAT))[0] == 1
    err = capsys.readouterr().err
    assert "tornado-9801 exists at http://127.0.0.1:19801" in err and err.count("\n") == 1
    assert list(load(dsn).shards) == ["tornado-9801"]
    code, _ = ctl(dsn, "import-zulip-sharding", write(tmp_path, FLAT), "--shard-url-template",
                  "ftp://x:{port}")  # fmt: skip
    assert code == 1 and "bad --shard-url-template" in capsys.readouterr().err


def test_a_failed_apply_writes_nothing() -> None:
    authority = MemoryAuthority()
    authority.migrate()
    plan = plan_import(parse_sharding(CURRENT), authority.load())
    plan.pins["sabotaged.example.com"] = "no-such-shard"
    with pytest.raises(KansasError):
        apply_plan(plan, authority)
    assert authority.load() == Assignment()
    plan.pins.pop("sabotaged.example.com")
    apply_plan(plan, authority)
    assert_same_as_zulip(CURRENT, authority.load(), range(12))


# Random sharding files: the import agrees with Zulip for every host and user.
ports = st.integers(9800, 9810)
port_values = st.one_of(ports, st.lists(ports, min_size=1, max_size=4))
hosts = st.from_regex(r"[a-e]{1,3}(\.[a-e]{1,3})?\.example\.com", fullmatch=True)
regex_texts = st.sampled_from(
    [r"a", r"b.*\.c", r".*\.example", r"[cd]+\.", r"e\.", r".*x", r"(?:a|b)\."]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(hosts, port_values, max_size=6),
    st.lists(st.tuples(regex_texts, port_values), max_size=4, unique_by=lambda r: r[0]),
    st.lists(hosts, min_size=1, max_size=10),
    st.booleans(),
)
def test_random_files_agree_with_zulip(
    shard_map: dict[str, Any],
    regexes: list[tuple[str, Any]],
    probes: list[str],
    flat: bool,
) -> None:
    data: dict[str, Any] = (
        dict(shard_map)
        if flat
        else {"shard_map": shard_map, "shard_regexes": [list(r) for r in regexes]}
    )
    authority = MemoryAuthority()
    authority.migrate()
    # A file without ports needs the default port said (9800: Zulip's single Tornado).
    default = None if tornado_ports(data) else 9800
    apply_plan(plan_import(parse_sharding(data), authority.load(), default_port=default), authority)
    assignment = authority.load()
    for host in [*probes, *shard_map]:
        for user in range(6):
            decision = place_queue(assignment, host, user)
            assert decision is not None
            assert assignment.shards[decision.shard].port == zulip_port(data, host, user)
    # And a second import changes nothing.
    assert plan_import(parse_sharding(data), assignment, default_port=default).changes == 0


@pytest.mark.parametrize(
    "extra", [["--default-port", "70000"], ["--default-port", "9800", "--no-default"], []]
)
def test_bad_arguments_exit_2_with_one_line(extra: list[str]) -> None:
    import subprocess
    import sys

    argv = [sys.executable, "-m", "kansas.ctl", "--postgres", "dbname=x", "import-zulip-sharding"]
    argv += ["f.json", *extra] if extra else []
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("kansas-ctl") and result.stderr.count("\n") == 1, result.stderr


# Probing the shards: something must answer HTTP at every URL the import names.


class FakeConnection:
    """A socket for probe_shard: answers with ``chunks`` (an exception is raised)."""

    def __init__(self, *chunks: bytes | Exception) -> None:
        self.chunks = list(chunks)
        self.sent = b""
        self.closed = False

    def sendall(self, data: bytes, /) -> None:
        self.sent += data

    def recv(self, size: int, /) -> bytes:
        chunk = self.chunks.pop(0) if self.chunks else b""
        if isinstance(chunk, Exception):
            raise chunk
        return chunk

    def close(self) -> None:
        self.closed = True


def connecting_to(result: FakeConnection | Exception) -> Any:
    seen: list[tuple[tuple[str, int], float]] = []

    def connect(address: tuple[str, int], timeout: float) -> FakeConnection:
        seen.append((address, timeout))
        if isinstance(result, Exception):
            raise result
        return result

    connect.seen = seen  # type: ignore[attr-defined]
    return connect


def test_the_probe_without_sockets() -> None:
    url = "http://127.0.0.1:9800"
    conn = FakeConnection(b"HT", b"TP/1.1 404 Not Found\r\n")  # any HTTP answer: alive
    connect = connecting_to(conn)
    assert probe_shard(url, 2.0, connect) is None
    assert connect.seen == [(("127.0.0.1", 9800), 2.0)] and conn.closed
    assert conn.sent.startswith(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:9800\r\n")
    assert probe_shard(
        url, 2.0, connecting_to(ConnectionRefusedError(111, "Connection refused"))
    ) == ("connection refused")
    assert probe_shard(url, 2.0, connecting_to(TimeoutError())) == "no connection within 2 s"
    silent = FakeConnection(TimeoutError())
    assert probe_shard(url, 2.0, connecting_to(silent)) == (
        "it accepts connections but sent no answer within 2 s"
    )
    assert silent.closed
    assert probe_shard(url, 2.0, connecting_to(FakeConnection())) == (
        "it accepts connections but closes them without an answer"
    )
    assert probe_shard(url, 2.0, connecting_to(FakeConnection(b"-ERR wrong protocol\r\n"))) == (
        "it accepts connections but does not answer HTTP"
    )
    reset = FakeConnection(ConnectionResetError(104, "Connection reset by peer"))
    assert probe_shard(url, 2.0, connecting_to(reset)) == (
        "it accepts connections, then connection reset by peer"
    )


@pytest.fixture
def answering_port() -> Iterator[int]:
    """A port where an HTTP server answers (404, as a Tornado answers GET /)."""
    with not_found_server() as port:
        yield port


def test_the_probe_with_a_listening_socket_and_a_closed_port(answering_port: int) -> None:
    assert probe_shard(f"http://127.0.0.1:{answering_port}") is None
    assert probe_shard(f"http://127.0.0.1:{free_port()}") == "connection refused"
    # A socket that accepts (the kernel does it) but never answers: the timeout.
    with socket.create_server(("127.0.0.1", 0)) as mute:
        reason = probe_shard(f"http://127.0.0.1:{mute.getsockname()[1]}", timeout=0.2)
    assert reason == "it accepts connections but sent no answer within 0.2 s"
    assert PROBE_TIMEOUT <= 2.0  # the operator waits at most this (twice) per shard


def test_warnings_are_one_line_per_shard_that_does_not_answer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    answers = {"http://127.0.0.1:9800": None, "http://127.0.0.1:9801": "connection refused"}
    shards = {"tornado-9800": "http://127.0.0.1:9800", "tornado-9801": "http://127.0.0.1:9801"}
    assert warn_unanswered(shards, answers.__getitem__) == 1
    assert capsys.readouterr().err == (
        "WARNING: nothing answers at http://127.0.0.1:9801 for shard tornado-9801 (connection "
        "refused); realms placed there will get no events until it does\n"
    )


def test_the_import_warns_about_every_shard_nothing_answers_at(
    dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], answering_port: int
) -> None:
    dead = free_port()
    assert ctl(dsn, "shard", "add", "up", f"http://127.0.0.1:{answering_port}")[0] == 0
    assert capsys.readouterr().err == ""  # it answers: no warning
    data = {"a.example.com": answering_port, "b.example.com": dead}
    path = write(tmp_path, data)
    expected = (
        f"WARNING: nothing answers at http://127.0.0.1:{dead} for shard tornado-{dead} "
        "(connection refused); realms placed there will get no events until it does\n"
    )
    for dry_run in (["--dry-run"], []):
        code, out = ctl(dsn, "import-zulip-sharding", path, *dry_run)
        assert code == 0, out
        assert capsys.readouterr().err == expected  # the kept shard "up" answers
        assert "keep    shard  up" in out or "keep    shard    up" in out, out
    assert sorted(load(dsn).shards) == sorted(["up", f"tornado-{dead}"])
    # shard add probes likewise.
    code, out = ctl(dsn, "shard", "add", "later", f"http://127.0.0.1:{dead}")
    assert code == 0 and out.startswith("added shard later"), out
    err = capsys.readouterr().err
    assert err.startswith(f"WARNING: nothing answers at http://127.0.0.1:{dead} for shard later ")
    assert err.count("\n") == 1


# Hosts with a port: Zulip's realm.host on a development server is localhost:9991.


def test_hosts_keyed_with_a_port_route_with_and_without_it(dsn: str, tmp_path: Path) -> None:
    data = {"shard_map": {"localhost:9991": 9993, "zulip.localhost:9991": [9993, 9994]}}
    code, out = ctl(dsn, "import-zulip-sharding", write(tmp_path, data))
    assert code == 0, out
    assignment = load(dsn)
    assert dict(assignment.realm_pins) == {"localhost": "tornado-9993"}
    assert dict(assignment.realm_splits) == {"zulip.localhost": ("tornado-9993", "tornado-9994")}
    # nginx passes Host $http_host (localhost:9991) or $host (localhost): the same rule.
    for host, user in (("localhost", 1), ("zulip.localhost", 0), ("zulip.localhost", 1)):
        with_port = place_queue(assignment, realm_from_host(f"{host}:9991"), user)
        assert with_port == place_queue(assignment, realm_from_host(host), user)
        assert with_port is not None and with_port.reason in ("realm-pin", "realm-split")
        assert assignment.shards[with_port.shard].port == zulip_port(data, f"{host}:9991", user)


def test_needs_port() -> None:
    for pattern in (r"zulip\.localhost:9991", r".*\.localhost\:9991$", r"x(?P<n>a):1"):
        assert needs_port(pattern), pattern
    for pattern in (r"(?:.*\.)?CHAT\.", r"[a-z:]+", r"(?i:eu)\d", r"eu:?", r"(?#a:b)x", "zulip"):
        assert not needs_port(pattern), pattern


def test_a_regex_that_needs_the_port_is_reported(dsn: str, tmp_path: Path) -> None:
    data = {
        "shard_map": {"localhost:9991": 9993},
        "shard_regexes": [[r"(?:.*\.)?zulip\.localhost:9991", 9994], [r"(?:eu)\.", 9995]],
    }
    code, out = ctl(dsn, "import-zulip-sharding", write(tmp_path, data), "--dry-run")
    assert code == 0, out
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, out
    assert warnings[0].startswith(
        r"warning: shard_regexes[0] '(?:.*\\.)?zulip\\.localhost:9991' can only match a host "
        "with its port"
    ), warnings
    # Indeed it places nothing: the realm goes by the next rules (the default, here).
    authority = MemoryAuthority()
    authority.migrate()
    apply_plan(plan_import(parse_sharding(data), authority.load()), authority)
    decision = place_queue(authority.load(), realm_from_host("chat.zulip.localhost:9991"), 1)
    assert decision is not None and decision.shard == "tornado-9993"  # TORNADO_PORTS[0]


# The lookup itself, as a Tornado process makes it (the demo shard's port check).


def test_port_for_exact_regex_default_and_split() -> None:
    sharding = parse_sharding(CURRENT)
    assert sharding.port_for("chat.example.com", 7, default=9800) == 9801  # exact
    assert sharding.port_for("eu1.example.com", 7, default=9800) == 9805  # a regex
    assert sharding.port_for("x.chat.example.com", 7, default=9800) == 9806  # ignoring case
    assert sharding.port_for("x.eu1.example.com", 7, default=9811) == 9811  # match: at 0
    assert sharding.port_for("nowhere.org", 7, default=9811) == 9811  # the default
    # Several ports: user U on ports[U % n], in the file's order.
    assert [sharding.port_for("bigger.example.com", u, 9800) for u in range(4)] == [
        9803, 9802, 9804, 9803,
    ]  # fmt: skip
    assert [sharding.port_for("a.split.example.com", u, 9800) for u in range(3)] == [
        9806, 9807, 9806,
    ]  # fmt: skip
    assert sharding.realm_ports("nowhere.org") is None
    assert sharding.realm_ports("big.example.com") == (9802, 9803)


def test_port_for_uses_hosts_as_the_parser_normalised_them() -> None:
    sharding = parse_sharding({"shard_map": {"Chat.Example.com:443": [9801, 9802]}})
    assert sharding.port_for("chat.example.com", 3, default=9800) == 9802


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(hosts, port_values, max_size=6),
    st.lists(st.tuples(regex_texts, port_values), max_size=4, unique_by=lambda r: r[0]),
    st.lists(hosts, min_size=1, max_size=10),
)
def test_port_for_agrees_with_zulip(
    shard_map: dict[str, Any], regexes: list[tuple[str, Any]], probes: list[str]
) -> None:
    data = {"shard_map": shard_map, "shard_regexes": [list(r) for r in regexes]}
    sharding = parse_sharding(data)
    for host in [*probes, *shard_map]:
        for user in range(6):
            default = sharding.default_port or 9800  # TORNADO_PORTS[0]
            assert sharding.port_for(host, user, default) == zulip_port(data, host, user)
