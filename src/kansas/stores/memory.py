"""In-memory reference implementations of the stores, for tests and for reasoning."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from kansas.errors import KansasError, UnknownShard
from kansas.model import (
    Assignment,
    QueueRoute,
    RegexRule,
    Shard,
    check_shard_args,
    check_split,
    compile_realm_regex,
)
from kansas.schema import SCHEMA_VERSION
from kansas.stores.interface import ROUTE_SLACK_SECONDS, IAuthority, IRouteStore


@implementer(IRouteStore)
class MemoryRouteStore:
    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._routes: dict[str, tuple[QueueRoute, float]] = {}

    def _live(self, queue_id: str) -> QueueRoute | None:
        entry = self._routes.get(queue_id)
        if entry is None:
            return None
        route, expires = entry
        if expires <= self._clock.seconds():
            del self._routes[queue_id]
            return None
        return route

    def _expiry(self, route: QueueRoute) -> float:
        return self._clock.seconds() + route.timeout + ROUTE_SLACK_SECONDS

    def get(self, queue_id: str) -> Deferred[QueueRoute | None]:
        return succeed(self._live(queue_id))

    def put(self, route: QueueRoute) -> Deferred[None]:
        self._routes[route.queue_id] = (route, self._expiry(route))
        return succeed(None)

    def touch(self, route: QueueRoute) -> Deferred[None]:
        current = self._live(route.queue_id)
        if current is not None:
            self._routes[route.queue_id] = (current, self._expiry(current))
        return succeed(None)

    def delete(self, queue_id: str) -> Deferred[None]:
        self._routes.pop(queue_id, None)
        return succeed(None)

    def routes(self, realm: str | None = None) -> Deferred[list[QueueRoute]]:
        live = [r for r in map(self._live, list(self._routes)) if r is not None]
        return succeed(sorted((r for r in live if realm in (None, r.realm)), key=_order))

    def close(self) -> Deferred[None]:
        return succeed(None)


def _order(route: QueueRoute) -> tuple[str, str]:
    return route.realm, route.queue_id


@implementer(IAuthority)
class MemoryAuthority:
    description = "memory"

    def __init__(self) -> None:
        self._version = 0
        self._shards: dict[str, Shard] = {}
        self._pins: dict[str, str] = {}
        self._overrides: dict[tuple[str, int], str] = {}
        self._splits: dict[str, tuple[str, ...]] = {}
        self._regexes: dict[str, tuple[str, ...]] = {}  # in matching order

    def schema_version(self) -> int:
        return self._version

    def migrate(self) -> int:
        self._version = SCHEMA_VERSION
        return self._version

    def load(self) -> Assignment:
        return Assignment(
            dict(self._shards),
            dict(self._pins),
            dict(self._overrides),
            dict(self._splits),
            [RegexRule(pattern, shards) for pattern, shards in self._regexes.items()],
        )

    def add_shard(self, name: str, url: str, weight: int) -> Shard:
        check_shard_args(name, url, weight)
        if name in self._shards:
            raise KansasError(f"shard {name!r} already exists")
        shard = self._shards[name] = Shard(name, url, weight)
        return shard

    def list_shards(self) -> list[Shard]:
        return [self._shards[n] for n in sorted(self._shards)]

    def _known(self, shard: str) -> None:
        if shard not in self._shards:
            raise UnknownShard(f"no shard named {shard!r}")

    def pin_realm(self, realm: str, shard: str) -> None:
        self._known(shard)
        self._pins[realm] = shard
        self._splits.pop(realm, None)

    def unpin_realm(self, realm: str) -> bool:
        return self._pins.pop(realm, None) is not None

    def move_user(self, realm: str, user_id: int, shard: str) -> None:
        self._known(shard)
        self._overrides[realm, user_id] = shard

    def _known_all(self, shards: Sequence[str]) -> tuple[str, ...]:
        names = check_split(shards)
        for name in names:
            self._known(name)
        return names

    def split_realm(self, realm: str, shards: Sequence[str]) -> None:
        self._splits[realm] = self._known_all(shards)
        self._pins.pop(realm, None)

    def unsplit_realm(self, realm: str) -> bool:
        return self._splits.pop(realm, None) is not None

    def add_regex_rule(self, pattern: str, shards: Sequence[str]) -> None:
        compile_realm_regex(pattern)
        self._regexes[pattern] = self._known_all(shards)

    def remove_regex_rule(self, pattern: str) -> bool:
        return self._regexes.pop(pattern, None) is not None

    def set_regex_rules(self, rules: Sequence[RegexRule]) -> None:
        checked = {rule.pattern: self._known_all(rule.shards) for rule in rules}
        if len(checked) != len(rules):
            raise KansasError("the same regex twice in one rule list")
        self._regexes.clear()
        self._regexes.update(checked)

    @contextmanager
    def atomic(self) -> Iterator[None]:
        # Every value is immutable: copies of the dicts are a full snapshot.
        saved = [dict(d) for d in self._tables()]
        try:
            yield
        except BaseException:
            for table, before in zip(self._tables(), saved, strict=True):
                table.clear()
                table.update(before)
            raise

    def _tables(self) -> tuple[dict[Any, Any], ...]:
        return self._shards, self._pins, self._overrides, self._splits, self._regexes

    def close(self) -> None:
        pass
