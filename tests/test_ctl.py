"""kansas-ctl against real PostgreSQL and Redis; every failure is one line."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import pytest_twisted

from kansas.ctl import REALMS_SHOWN, main
from kansas.model import QueueRoute
from kansas.schema import SCHEMA_VERSION
from kansas.stores.redis import RedisRouteStore, parse_redis_url
from kansas.testing.servers import free_port


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_manages_shards_pins_and_overrides(postgres_dsn: str) -> None:
    pg = ("--postgres", postgres_dsn)
    v = SCHEMA_VERSION  # 2 since the split and regex rules of sharding.json
    assert run(*pg, "migrate") == (0, f"schema version {v} (was 0)\n")
    assert run(*pg, "migrate") == (0, f"schema version {v} (was {v})\n")
    assert run(*pg, "shard", "add", "a", "http://127.0.0.1:9800")[0] == 0
    assert run(*pg, "shard", "add", "b", "http://127.0.0.1:9801", "--weight", "0")[0] == 0
    assert run(*pg, "realm", "pin", "Big.Example.com", "b")[0] == 0
    code, listing = run(*pg, "shard", "list")
    assert code == 0
    assert listing.splitlines()[1:] == [
        "a     http://127.0.0.1:9800  100     -",
        "b     http://127.0.0.1:9801  0       big.example.com",
    ]
    assert run(*pg, "where", "big.example.com") == (0, "b (realm-pin)\n")
    assert run(*pg, "where", "other.example.com", "3") == (0, "a (hash)\n")
    assert run(*pg, "user", "move", "big.example.com", "3", "a", "--no-reload")[0] == 0
    assert run(*pg, "where", "big.example.com", "3") == (0, "a (user-override)\n")
    assert run(*pg, "realm", "unpin", "big.example.com")[0] == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["shard", "add", "c", "http://127.0.0.1:9802"],  # before migrate
        ["--postgres", "host=127.0.0.1 port=%PORT% dbname=x", "shard", "list"],
    ],
)
def test_failures_are_one_line(
    argv: list[str], postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("%PORT%", str(free_port())) for a in argv]
    if argv[0] != "--postgres":
        argv = ["--postgres", postgres_dsn, *argv]
    assert run(*argv)[0] == 1
    err = capsys.readouterr().err
    assert err.startswith("kansas-ctl: error: ") and err.count("\n") == 1, err


def test_authority_errors_are_one_line(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pg = ("--postgres", postgres_dsn)
    run(*pg, "migrate")
    run(*pg, "shard", "add", "a", "http://127.0.0.1:9800")
    for argv in (("shard", "add", "a", "http://127.0.0.1:9800"), ("shard", "add", "x", "ftp://h"),
                 ("realm", "pin", "r", "nope"), ("user", "move", "r", "1", "nope"),
                 ("realm", "unpin", "never-pinned")):  # fmt: skip
        capsys.readouterr()
        assert run(*pg, *argv)[0] == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("kansas-ctl: error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["shard"],
        ["shard", "add", "x"],
        ["user", "move", "r", "notanumber", "a"],
        ["shard", "add", "x", "http://h:1", "--weight", "-1"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kansas.ctl", "--postgres", "dbname=x", *argv],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("kansas-ctl") and result.stderr.count("\n") == 1, result.stderr


@pytest_twisted.ensureDeferred
async def test_queues_lists_the_redis_table(redis_url: str) -> None:
    from twisted.internet import reactor

    store = RedisRouteStore(parse_redis_url(redis_url), reactor)
    routes = [
        QueueRoute("q-1", "a", "one.example.com", 1),
        QueueRoute("q-2", "b", "two.example.com", 2),
    ]
    for route in routes:
        await store.put(route)
    await store.close()
    code, out = subprocess_ctl("--redis", redis_url, "queues", "--realm", "two.example.com")
    assert code == 0
    assert out.splitlines()[1].split() == ["q-2", "b", "two.example.com", "2", "600"]
    assert out.splitlines()[-1] == "1 queue(s)"


def subprocess_ctl(*argv: str) -> tuple[int, str]:
    # A separate process: kansas-ctl runs (and stops) its own reactor for Redis.
    result = subprocess.run([sys.executable, "-m", "kansas.ctl", *argv], capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def test_queues_with_redis_down_is_one_line() -> None:
    code, out = subprocess_ctl("--redis", f"redis://127.0.0.1:{free_port()}/0", "queues")
    assert (
        code == 1
        and out.startswith("kansas-ctl: error: cannot reach Redis")
        and out.count("\n") == 1
    )


def test_splits_and_regex_rules(postgres_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    pg = ("--postgres", postgres_dsn)
    run(*pg, "migrate")
    for name, port in (("a", 9800), ("b", 9801)):
        run(*pg, "shard", "add", name, f"http://127.0.0.1:{port}")
    assert run(*pg, "realm", "split", "Big.Example.com", "a", "b") == (
        0, "split big.example.com: user U goes to shard U % 2 of a b\n")  # fmt: skip
    assert run(*pg, "where", "big.example.com", "3") == (0, "b (realm-split)\n")
    assert run(*pg, "realm", "pin", "small.example.com", "a")[0] == 0
    code, listing = run(*pg, "realm", "list")
    assert code == 0 and listing.splitlines()[1:] == [
        "big.example.com    split  a b",
        "small.example.com  pin    a",
    ]
    # shard list names each shard's realms, its places in splits too.
    assert run(*pg, "realm", "split", "Huge.Example.com", "b", "a", "b")[0] == 0
    code, listing = run(*pg, "shard", "list")
    assert code == 0 and listing.splitlines()[1:] == [
        "a     http://127.0.0.1:9800  100     big.example.com (split 1/2), huge.example.com "
        "(split 2/3), small.example.com",
        "b     http://127.0.0.1:9801  100     big.example.com (split 2/2), huge.example.com "
        "(split 1,3/3)",
    ]
    for i in range(REALMS_SHOWN):
        run(*pg, "realm", "pin", f"r{i}.example.com", "b")
    listing = run(*pg, "shard", "list")[1]
    assert listing.splitlines()[2].endswith("r2.example.com, +2 more (kansas-ctl realm list)"), (
        listing
    )
    assert run(*pg, "realm", "unsplit", "huge.example.com")[0] == 0
    assert run(*pg, "regex", "add", r"eu\d+\.", "b")[0] == 0
    assert run(*pg, "regex", "add", ".*", "a")[0] == 0
    assert run(*pg, "where", "EU12.example.com", "1") == (0, "b (regex)\n")
    code, listing = run(*pg, "regex", "list")
    assert code == 0 and [line.split() for line in listing.splitlines()] == [
        ["#", "PATTERN", "SHARDS"], ["1", r"eu\d+\.", "b"], ["2", ".*", "a"]]  # fmt: skip
    assert run(*pg, "regex", "remove", ".*") == (0, "removed regex rule .*\n")
    assert run(*pg, "realm", "unsplit", "big.example.com") == (0, "unsplit big.example.com\n")
    for argv in (("realm", "split", "x", "a", "nope"), ("realm", "unsplit", "never"),
                 ("regex", "add", "(", "a"), ("regex", "add", "x", "nope"),
                 ("regex", "remove", "never")):  # fmt: skip
        capsys.readouterr()
        assert run(*pg, *argv)[0] == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("kansas-ctl: error: ") and err.count("\n") == 1, err


def test_every_help_page_renders() -> None:
    import argparse

    from kansas.ctl import build_parser

    def walk(parser: argparse.ArgumentParser) -> int:
        parser.format_help()  # raises on a bad help string (a stray "%", say)
        pages = 1
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                pages += sum(walk(sub) for sub in action.choices.values())
        return pages

    assert walk(build_parser()) > 10


@pytest_twisted.ensureDeferred
async def test_weight_remove_status_and_a_user_move(postgres_dsn: str, redis_url: str) -> None:
    from twisted.internet import reactor

    both = ("--postgres", postgres_dsn, "--redis", redis_url)
    pg = ("--postgres", postgres_dsn)
    assert run(*pg, "migrate")[0] == 0
    for name in "abc":
        assert (
            run(*pg, "shard", "add", name, f"http://127.0.0.1:{9800 + 'abc'.index(name)}")[0] == 0
        )
    assert run(*pg, "shard", "weight", "b", "0") == (0, "shard b now has weight 0\n")
    assert run(*pg, "realm", "pin", "one.example.com", "a")[0] == 0
    store = RedisRouteStore(parse_redis_url(redis_url), reactor)
    for i in range(3):
        await store.put(QueueRoute(f"q{i}", "a", "one.example.com", i))
    await store.put(QueueRoute("q9", "c", "two.example.com", 9))
    await store.close()

    # shard remove: refused while a pin names it, or it holds live queues; else done.
    code, out = subprocess_ctl(*both, "shard", "remove", "a")
    assert code == 1 and out.count("\n") == 1, out
    assert "3 live queue(s)" in out
    code, out = subprocess_ctl(*both, "shard", "remove", "c")
    assert code == 1 and "1 live queue(s)" in out, out
    assert subprocess_ctl(*both, "shard", "remove", "b") == (0, "removed shard b\n")

    # user move --reload: user 1's queue (on a) is invalidated; the others stay.
    code, out = subprocess_ctl(*both, "user", "move", "one.example.com", "1", "c", "--reload",
                               "--settle", "0")  # fmt: skip
    assert code == 0, out
    assert out.splitlines()[-1].startswith(
        "user 1 of one.example.com now goes to c: 1 queue(s) invalidated"
    ), out
    code, out = subprocess_ctl(*both, "status")
    assert code == 0, out
    table = {line.split()[0]: line.split() for line in out.splitlines()[1:3]}
    assert table["a"][-2:] == ["2", "1"]  # live, invalidated
    assert table["c"][-2:] == ["1", "0"]
    assert out.splitlines()[-1] == "no move in progress"

    # shard drain: weight 0, and two.example.com's queue on c (hashed) is reloaded.
    code, out = subprocess_ctl(*both, "shard", "drain", "c", "--rate", "100", "--settle", "0")
    assert code == 0, out
    assert out.splitlines()[-1].startswith("drained c: 1 queue(s) invalidated"), out
    code, out = subprocess_ctl(*both, "status")
    assert "drained (was 100)" in out, out
    assert run(*pg, "shard", "undrain", "c") == (0, "shard c undrained: weight 100\n")
