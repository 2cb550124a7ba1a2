"""One contract per store interface, run against every backend.

The in-memory stores are the reference; Redis and PostgreSQL run as real private
servers (see conftest.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from kansas.errors import KansasError, SchemaError, UnknownShard
from kansas.model import Assignment, QueueRoute, RegexRule, Shard
from kansas.schema import SCHEMA_VERSION
from kansas.stores.interface import ROUTE_SLACK_SECONDS, IAuthority, IRouteStore
from kansas.stores.memory import MemoryAuthority, MemoryRouteStore
from kansas.stores.postgres import PostgresAuthority
from kansas.stores.redis import KEY_PREFIX, REALM_PREFIX, RedisRouteStore, parse_redis_url
from kansas.testing.servers import RedisSentinel
from tests.conftest import redis_command, terminate_sessions

A = QueueRoute("0b6e7c1e-0000-4000-8000-000000000001", "a", "one.example.com", 7, 600)
B = QueueRoute("0b6e7c1e-0000-4000-8000-000000000002", "b", "two.example.com", None, 3600)
C = QueueRoute("007", "a", "one.example.com", 8, 600)  # numeric-looking ids stay text


class RouteStoreContract:
    """Every IRouteStore: put/get/delete, listing, text stays text."""

    def test_provides_interface(self, store: IRouteStore) -> None:
        assert verifyObject(IRouteStore, store)

    @pytest_twisted.ensureDeferred
    async def test_put_get_delete(self, store: IRouteStore) -> None:
        assert await store.get(A.queue_id) is None
        await store.put(A)
        await store.put(B)
        assert await store.get(A.queue_id) == A
        assert await store.get(B.queue_id) == B
        await store.delete(A.queue_id)
        assert await store.get(A.queue_id) is None
        await store.delete("never-there")  # no error

    @pytest_twisted.ensureDeferred
    async def test_overwrite_and_touch(self, store: IRouteStore) -> None:
        await store.put(A)
        moved = QueueRoute(A.queue_id, "b", A.realm, A.user_id, A.timeout)
        await store.put(moved)
        await store.touch(moved)
        await store.touch(B)  # unknown: no error, nothing created
        assert await store.get(A.queue_id) == moved
        assert await store.get(B.queue_id) is None

    @pytest_twisted.ensureDeferred
    async def test_routes_by_realm(self, store: IRouteStore) -> None:
        for route in (A, B, C):
            await store.put(route)
        assert await store.routes() == sorted([A, B, C], key=lambda r: (r.realm, r.queue_id))
        assert await store.routes("one.example.com") == [C, A]
        assert await store.routes("nowhere") == []

    @pytest_twisted.ensureDeferred
    async def test_invalidate_once_and_keep_the_route(self, store: IRouteStore) -> None:
        await store.put(A)
        await store.put(C)
        assert await store.invalidate(A.queue_id) is True
        assert await store.invalidate(A.queue_id) is False  # never twice
        assert await store.invalidate("never-there") is False
        got = await store.get(A.queue_id)
        assert got == QueueRoute(A.queue_id, A.shard, A.realm, A.user_id, A.timeout, True)
        assert [r.invalid for r in await store.routes(A.realm)] == [False, True]  # C, A
        await store.touch(got)  # still expires with its queue, still invalid
        assert (await store.get(A.queue_id)) == got

    @pytest_twisted.ensureDeferred
    async def test_a_route_moved_to_another_realm_leaves_the_old_listing(
        self, store: IRouteStore
    ) -> None:
        await store.put(A)
        await store.put(QueueRoute(A.queue_id, "a", "elsewhere.example.com", 7, 600))
        assert await store.routes(A.realm) == []
        assert [r.queue_id for r in await store.routes("elsewhere.example.com")] == [A.queue_id]
        await store.delete(A.queue_id)
        assert await store.routes("elsewhere.example.com") == []

    @pytest_twisted.ensureDeferred
    async def test_locks(self, store: IRouteStore) -> None:
        assert await store.acquire("move:x", "one", 10) is True
        assert await store.acquire("move:x", "one", 10) is True  # renewed by its owner
        assert await store.acquire("move:x", "two", 10) is False
        await store.release("move:x", "two")  # not the owner: nothing happens
        assert await store.acquire("move:x", "two", 10) is False
        await store.release("move:x", "one")
        assert await store.acquire("move:x", "two", 10) is True

    @pytest_twisted.ensureDeferred
    async def test_transparent_move_markers_and_journal(self, store: IRouteStore) -> None:
        for route in (A, B, C):
            await store.put(route)
        assert await store.get_many([A.queue_id, "never-there", C.queue_id]) == {
            A.queue_id: A,
            C.queue_id: C,
        }
        assert await store.get_many([]) == {}
        assert await store.journal(A.realm) is None
        until = 1764000000.25
        # B is on another shard: not marked.
        ids = [A.queue_id, B.queue_id, C.queue_id, "never-there"]
        marked = await store.mark_moving(A.realm, '{"state":"marked"}', ids, "a", "b", until)
        assert marked == [A.queue_id, C.queue_id]
        assert await store.journal(A.realm) == '{"state":"marked"}'
        got = await store.get(A.queue_id)
        assert got is not None and got.moving_to == "b" and got.moving_until == until
        assert got.moving(until - 1) and not got.moving(until)
        assert got.shard == "a"
        # Marking for another destination does not steal it; the same one is a no-op.
        assert await store.mark_moving(A.realm, "j", [A.queue_id], "a", "c", until) == []
        assert await store.mark_moving(A.realm, "j", [A.queue_id], "a", "b", until) == [A.queue_id]
        # A commits to b, C rolls back to a; the journal goes.
        changed = await store.end_moving(A.realm, None, [A.queue_id], "b", [C.queue_id])
        assert changed == 2
        assert await store.journal(A.realm) is None
        assert await store.get(A.queue_id) == QueueRoute(A.queue_id, "b", A.realm, 7, 600)
        assert await store.get(C.queue_id) == C
        assert await store.end_moving(A.realm, "again", [A.queue_id], "b", []) == 0
        assert await store.journal(A.realm) == "again"
        assert [r.shard for r in await store.routes(A.realm)] == ["a", "b"]  # C, A


class TestMemoryRouteStore(RouteStoreContract):
    @pytest.fixture
    def store(self) -> MemoryRouteStore:
        return MemoryRouteStore(Clock())

    @pytest_twisted.ensureDeferred
    async def test_expiry_follows_timeout_plus_slack(self) -> None:
        clock = Clock()
        store = MemoryRouteStore(clock)
        await store.put(A)
        clock.advance(A.timeout + ROUTE_SLACK_SECONDS - 1)
        await store.touch(A)
        clock.advance(A.timeout + ROUTE_SLACK_SECONDS - 1)
        assert await store.get(A.queue_id) == A
        clock.advance(1)
        assert await store.get(A.queue_id) is None


class TestRedisRouteStore(RouteStoreContract):
    @pytest_twisted.async_yield_fixture
    async def store(self, redis_url: str) -> AsyncIterator[RedisRouteStore]:
        from twisted.internet import reactor

        store = RedisRouteStore(parse_redis_url(redis_url), reactor)
        yield store
        await store.close()

    @pytest_twisted.ensureDeferred
    async def test_operator_can_read_it_and_it_expires(
        self, store: RedisRouteStore, redis_server: object
    ) -> None:
        await store.put(B)
        raw = redis_command(redis_server, "GET", KEY_PREFIX + B.queue_id)  # type: ignore[arg-type]
        assert b'"shard":"b"' in raw and b'"realm":"two.example.com"' in raw
        ttl = int(redis_command(redis_server, "TTL", KEY_PREFIX + B.queue_id)[1:])  # type: ignore[arg-type]
        assert B.timeout < ttl <= B.timeout + ROUTE_SLACK_SECONDS

    @pytest_twisted.ensureDeferred
    async def test_the_realm_index_outlives_no_mapping(
        self, store: RedisRouteStore, redis_server: object
    ) -> None:
        server: Any = redis_server
        await store.put(A)  # 600 s
        await store.put(QueueRoute("long", "a", A.realm, 1, 3600))
        await store.put(C)
        assert _members(server, REALM_PREFIX + A.realm) == {A.queue_id, "long", C.queue_id}
        ttl = int(redis_command(server, "TTL", REALM_PREFIX + A.realm)[1:])
        assert 3600 < ttl <= 3600 + ROUTE_SLACK_SECONDS  # as long as its longest member
        await store.delete("long")
        await store.delete(A.queue_id)
        await store.delete(C.queue_id)
        assert redis_command(server, "EXISTS", REALM_PREFIX + A.realm) == b":0\r\n"

    @pytest_twisted.ensureDeferred
    async def test_gc_leaves_no_key_behind(
        self, store: RedisRouteStore, redis_server: object, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import time

        import kansas.stores.redis as redis_module

        server: Any = redis_server
        monkeypatch.setattr(redis_module, "ROUTE_SLACK_SECONDS", 0)  # expire in 1-2 s
        routes = [QueueRoute(f"gc{i}", "ab"[i % 2], f"r{i % 3}.example.com", i, 1 + i % 2)
                  for i in range(12)]  # fmt: skip
        for route in routes:
            await store.put(route)
        await store.invalidate("gc0")
        await store.touch(routes[1])
        assert int(redis_command(server, "DBSIZE")[1:]) == 12 + 3
        deadline = time.monotonic() + 10
        while int(redis_command(server, "DBSIZE")[1:]) != 0:
            assert time.monotonic() < deadline, redis_command(server, "KEYS", "*")
            time.sleep(0.1)

    @pytest_twisted.ensureDeferred
    async def test_dead_redis_fails_fast(self) -> None:
        from twisted.internet import defer, reactor

        from kansas.testing.servers import free_port

        dead = RedisRouteStore(parse_redis_url(f"redis://127.0.0.1:{free_port()}"), reactor, 0.3)
        try:
            with pytest.raises(defer.TimeoutError):
                await dead.get("x")
        finally:
            await dead.close()


class TestSentinelRouteStore(RouteStoreContract):
    """The same contract through Redis Sentinel: the master is found by asking it."""

    @pytest_twisted.async_yield_fixture
    async def store(
        self, redis_url: str, redis_sentinel: RedisSentinel
    ) -> AsyncIterator[RedisRouteStore]:
        from twisted.internet import reactor

        store = RedisRouteStore(parse_redis_url(redis_sentinel.url), reactor)
        yield store
        await store.close()


def test_sentinel_url_parsing() -> None:
    address = parse_redis_url("redis+sentinel://:pw@10.0.0.1,10.0.0.2:26380/mymaster/3")
    assert address.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (address.service, address.db, address.password) == ("mymaster", 3, "pw")
    assert str(address) == "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/mymaster/3"
    for bad in ("redis+sentinel://h", "redis+sentinel://h:x/s", "redis+sentinel://h/s/db"):
        with pytest.raises(KansasError):
            parse_redis_url(bad)


def test_redis_url_parsing() -> None:
    address = parse_redis_url("redis://:s3cret@10.0.0.1:6380/2")
    assert (address.host, address.port, address.db, address.password) == (
        "10.0.0.1",
        6380,
        2,
        "s3cret",
    )
    assert "s3cret" not in str(address)
    for bad in ("http://x", "redis://", "redis://h/db", "redis://h:notaport"):
        with pytest.raises(KansasError):
            parse_redis_url(bad)


def _members(server: Any, key: str) -> set[str]:
    raw = redis_command(server, "SMEMBERS", key).decode()
    lines = raw.split("\r\n")[1:]
    return {line for line in lines[1::2]}


class AuthorityContract:
    """Every IAuthority: schema, shards, pins, overrides, snapshots."""

    def test_provides_interface(self, authority: IAuthority) -> None:
        assert verifyObject(IAuthority, authority)

    def test_migrate_is_idempotent(self, authority: IAuthority) -> None:
        assert authority.migrate() == SCHEMA_VERSION
        assert authority.migrate() == SCHEMA_VERSION
        assert authority.schema_version() == SCHEMA_VERSION

    def test_shards_pins_overrides(self, authority: IAuthority) -> None:
        authority.migrate()
        assert authority.load() == Assignment()
        authority.add_shard("b", "http://127.0.0.1:9801", 50)
        authority.add_shard("a", "http://127.0.0.1:9800", 100)
        with pytest.raises(KansasError, match="already exists"):
            authority.add_shard("a", "http://127.0.0.1:9802", 1)
        for name, url, weight in (("", "http://h:1", 1), ("x y", "http://h:1", 1),
                                  ("c", "ftp://h", 1), ("c", "http://h:1", -1)):  # fmt: skip
            with pytest.raises(KansasError):
                authority.add_shard(name, url, weight)
        assert [s.name for s in authority.list_shards()] == ["a", "b"]
        authority.pin_realm("big.example.com", "a")
        authority.pin_realm("big.example.com", "b")  # re-pin replaces
        authority.move_user("big.example.com", 42, "a")
        with pytest.raises(UnknownShard):
            authority.pin_realm("x", "nope")
        with pytest.raises(UnknownShard):
            authority.move_user("x", 1, "nope")
        assert authority.load() == Assignment(
            {
                "a": Shard("a", "http://127.0.0.1:9800", 100),
                "b": Shard("b", "http://127.0.0.1:9801", 50),
            },
            {"big.example.com": "b"},
            {("big.example.com", 42): "a"},
        )
        assert authority.unpin_realm("big.example.com") is True
        assert authority.unpin_realm("big.example.com") is False
        assert authority.load().realm_pins == {}

    def _three(self, authority: IAuthority) -> None:
        authority.migrate()
        for i, name in enumerate("abc"):
            authority.add_shard(name, f"http://127.0.0.1:{9800 + i}", 100)

    def test_splits(self, authority: IAuthority) -> None:
        self._three(authority)
        authority.split_realm("big.example.com", ["b", "a", "b"])  # order and repeats kept
        assert authority.load().realm_splits == {"big.example.com": ("b", "a", "b")}
        authority.pin_realm("big.example.com", "c")  # a pin replaces the split ...
        loaded = authority.load()
        assert loaded.realm_pins == {"big.example.com": "c"} and loaded.realm_splits == {}
        authority.split_realm("big.example.com", ["a", "c"])  # ... and a split the pin
        loaded = authority.load()
        assert loaded.realm_pins == {} and loaded.realm_splits == {"big.example.com": ("a", "c")}
        with pytest.raises(UnknownShard, match="nope"):
            authority.split_realm("x", ["a", "nope"])
        with pytest.raises(KansasError):
            authority.split_realm("x", [])
        assert authority.unsplit_realm("big.example.com") is True
        assert authority.unsplit_realm("big.example.com") is False
        assert authority.load() == Assignment(authority.load().shards)

    def test_regex_rules_keep_their_order(self, authority: IAuthority) -> None:
        self._three(authority)
        authority.add_regex_rule(r"eu\.", ["a"])
        authority.add_regex_rule(r".*", ["b", "c"])
        authority.add_regex_rule(r"eu\.", ["c"])  # a known pattern keeps its place
        assert list(authority.load().regex_rules) == [
            RegexRule(r"eu\.", ("c",)),
            RegexRule(r".*", ("b", "c")),
        ]
        with pytest.raises(KansasError, match="bad regex"):
            authority.add_regex_rule("(", ["a"])
        with pytest.raises(UnknownShard):
            authority.add_regex_rule("x", ["nope"])
        assert authority.remove_regex_rule(r"eu\.") is True
        assert authority.remove_regex_rule(r"eu\.") is False
        rules = [RegexRule("z", ("a",)), RegexRule("y", ("b", "a")), RegexRule("x", ("c",))]
        authority.set_regex_rules(rules)
        assert list(authority.load().regex_rules) == rules
        authority.add_regex_rule("w", ["a"])  # after the others
        assert [r.pattern for r in authority.load().regex_rules] == ["z", "y", "x", "w"]
        with pytest.raises(UnknownShard):
            authority.set_regex_rules([RegexRule("v", ("nope",))])
        with pytest.raises(KansasError, match="twice"):
            authority.set_regex_rules([RegexRule("v", ("a",)), RegexRule("v", ("b",))])
        assert [r.pattern for r in authority.load().regex_rules] == ["z", "y", "x", "w"]
        authority.set_regex_rules([])
        assert authority.load().regex_rules == ()

    def test_atomic_is_all_or_nothing(self, authority: IAuthority) -> None:
        self._three(authority)
        before = authority.load()
        with pytest.raises(UnknownShard), authority.atomic():
            authority.add_shard("d", "http://127.0.0.1:9803", 100)
            authority.pin_realm("one", "d")
            authority.split_realm("two", ["a", "b"])
            authority.set_regex_rules([RegexRule(".*", ("c",))])
            authority.move_user("one", 1, "nope")
        assert authority.load() == before
        with authority.atomic():
            authority.add_shard("d", "http://127.0.0.1:9803", 100)
            authority.pin_realm("one", "d")
            assert authority.load().realm_pins == {"one": "d"}  # reads see the writes
        assert authority.load().realm_pins == {"one": "d"}

    def test_moves(self, authority: IAuthority) -> None:
        self._three(authority)
        with pytest.raises(UnknownShard):
            authority.start_move("one", None, "nope", 50)
        move = authority.start_move("one", None, "b", 50)
        assert (move.realm, move.user_id, move.to_shard, move.state) == (
            "one",
            None,
            "b",
            "running",
        )
        assert authority.load().moving_realms == {"one"}
        same = authority.start_move("one", None, "c", 20)  # resumed, not a second move
        assert (same.id, same.to_shard, same.reload_rate) == (move.id, "c", 20)
        user = authority.start_move("one", 7, "b", 50)
        assert user.id != move.id
        authority.update_move(move.id, 12)
        assert [(m.id, m.invalidated) for m in authority.list_moves(running_only=True)] == [
            (user.id, 0), (move.id, 12)
        ]  # fmt: skip
        authority.update_move(move.id, 15, "done")
        authority.update_move(user.id, 1, "interrupted")
        assert authority.load().moving_realms == frozenset()
        assert authority.list_moves(running_only=True) == []
        assert [(m.state, m.invalidated) for m in authority.list_moves()] == [
            ("interrupted", 1), ("done", 15)
        ]  # fmt: skip

    def test_weights_and_removal(self, authority: IAuthority) -> None:
        self._three(authority)
        assert authority.set_weight("b", 0) == Shard("b", "http://127.0.0.1:9801", 0)
        assert authority.load().shards["b"].weight == 0
        with pytest.raises(UnknownShard):
            authority.set_weight("nope", 1)
        with pytest.raises(KansasError):
            authority.set_weight("a", -1)
        authority.pin_realm("one", "c")
        authority.pin_realm("two", "c")
        authority.split_realm("three", ["c", "a", "c"])
        authority.add_regex_rule("x.*", ["c"])
        authority.move_user("four", 1, "c")
        with pytest.raises(KansasError) as refused:
            authority.remove_shard("c")
        assert str(refused.value) == (
            "shard 'c' is still in use: 2 pinned realm(s), 1 split realm(s), "
            "1 regex rule(s), 1 user override(s)"
        )
        assert "c" in authority.load().shards
        authority.remove_shard("b")
        assert sorted(authority.load().shards) == ["a", "c"]
        with pytest.raises(UnknownShard):
            authority.remove_shard("b")

    def test_drain_and_undrain(self, authority: IAuthority) -> None:
        self._three(authority)
        authority.set_weight("b", 70)
        assert authority.drain_shard("b") is True
        assert authority.drain_shard("b") is False  # already: the weight to restore stays
        assert authority.load().shards["b"].weight == 0
        assert authority.drained_shards() == {"b": 70}
        assert authority.undrain_shard("b") == 70
        assert authority.load().shards["b"].weight == 70
        assert authority.drained_shards() == {}
        with pytest.raises(KansasError, match="not drained"):
            authority.undrain_shard("b")
        with pytest.raises(UnknownShard):
            authority.drain_shard("nope")

    def test_clear_user_overrides(self, authority: IAuthority) -> None:
        self._three(authority)
        authority.move_user("one", 1, "a")
        authority.move_user("one", 2, "b")
        authority.move_user("two", 3, "a")
        assert authority.clear_user_overrides("one", "a") == 1
        assert authority.load().user_overrides == {("one", 2): "b", ("two", 3): "a"}


class TestMemoryAuthority(AuthorityContract):
    @pytest.fixture
    def authority(self) -> MemoryAuthority:
        return MemoryAuthority()


class TestPostgresAuthority(AuthorityContract):
    @pytest.fixture
    def authority(self, postgres_dsn: str) -> Iterator[PostgresAuthority]:
        authority = PostgresAuthority(postgres_dsn)
        yield authority
        authority.close()

    def test_refuses_old_schema_with_a_clear_message(self, authority: PostgresAuthority) -> None:
        with pytest.raises(SchemaError, match="kansas-ctl --postgres DSN migrate"):
            authority.require_current_schema()
        authority.migrate()
        authority.require_current_schema()

    def test_unreachable_database_is_one_line(self) -> None:
        from kansas.testing.servers import free_port

        dead = PostgresAuthority(
            f"host=127.0.0.1 port={free_port()} dbname=x user=postgres password=pw"
        )
        with pytest.raises(KansasError) as caught:
            dead.schema_version()
        assert "cannot reach PostgreSQL" in str(caught.value) and "\n" not in str(caught.value)
        assert "pw" not in str(caught.value)

    def test_survives_a_dropped_connection(
        self, authority: PostgresAuthority, postgres_dsn: str
    ) -> None:

        authority.migrate()
        assert terminate_sessions(postgres_dsn, "kansas") == 1
        assert authority.list_shards() == []  # reconnected
