"""In-memory reference implementations of the stores, for tests and for reasoning."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from kansas.errors import KansasError, UnknownShard
from kansas.model import (
    Assignment,
    Move,
    QueueRoute,
    RegexRule,
    Shard,
    check_shard_args,
    check_split,
    compile_realm_regex,
    shard_in_use_message,
)
from kansas.schema import SCHEMA_VERSION
from kansas.stores.interface import ROUTE_SLACK_SECONDS, IAuthority, IRouteStore


@implementer(IRouteStore)
class MemoryRouteStore:
    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._routes: dict[str, tuple[QueueRoute, float]] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._journals: dict[str, str] = {}

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

    def invalidate(self, queue_id: str) -> Deferred[bool]:
        route = self._live(queue_id)
        if route is None or route.invalid:
            return succeed(False)
        expires = self._routes[queue_id][1]
        self._routes[queue_id] = (replace(route, invalid=True), expires)
        return succeed(True)

    def get_many(self, queue_ids: Sequence[str]) -> Deferred[dict[str, QueueRoute]]:
        found = {q: self._live(q) for q in queue_ids}
        return succeed({q: r for q, r in found.items() if r is not None})

    def journal(self, realm: str) -> Deferred[str | None]:
        return succeed(self._journals.get(realm))

    def _replace(self, route: QueueRoute) -> None:
        self._routes[route.queue_id] = (route, self._routes[route.queue_id][1])

    def mark_moving(
        self, realm: str, journal: str, queue_ids: Sequence[str], from_shard: str,
        to_shard: str, until: float,
    ) -> Deferred[list[str]]:  # fmt: skip
        marked = []
        for queue_id in queue_ids:
            route = self._live(queue_id)
            if route is None or route.invalid or route.shard != from_shard:
                continue
            if route.moving_to not in (None, to_shard):
                continue
            self._replace(replace(route, moving_to=to_shard, moving_until=until))
            marked.append(queue_id)
        self._journals[realm] = journal
        return succeed(marked)

    def end_moving(
        self, realm: str, journal: str | None, commit: Sequence[str], to_shard: str,
        unmark: Sequence[str],
    ) -> Deferred[int]:  # fmt: skip
        changed = 0
        for queue_id, committing in [(q, True) for q in commit] + [(q, False) for q in unmark]:
            route = self._live(queue_id)
            if route is None or route.moving_to is None:
                continue
            shard = to_shard if committing and route.moving_to == to_shard else route.shard
            self._replace(replace(route, shard=shard, moving_to=None, moving_until=0.0))
            changed += 1
        if journal is None:
            self._journals.pop(realm, None)
        else:
            self._journals[realm] = journal
        return succeed(changed)

    def acquire(self, name: str, owner: str, seconds: float) -> Deferred[bool]:
        now = self._clock.seconds()
        held = self._locks.get(name)
        if held is not None and held[1] > now and held[0] != owner:
            return succeed(False)
        self._locks[name] = (owner, now + seconds)
        return succeed(True)

    def release(self, name: str, owner: str) -> Deferred[None]:
        if self._locks.get(name, ("", 0.0))[0] == owner:
            del self._locks[name]
        return succeed(None)

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
        self._moves: dict[int, Move] = {}
        self._drained: dict[str, int] = {}

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
            frozenset(m.realm for m in self._moves.values() if m.state == "running"),
        )

    def add_shard(self, name: str, url: str, weight: int) -> Shard:
        check_shard_args(name, url, weight)
        if name in self._shards:
            raise KansasError(f"shard {name!r} already exists")
        shard = self._shards[name] = Shard(name, url, weight)
        return shard

    def set_weight(self, name: str, weight: int) -> Shard:
        self._known(name)
        check_shard_args(name, self._shards[name].url, weight)
        shard = self._shards[name] = Shard(name, self._shards[name].url, weight)
        return shard

    def drain_shard(self, name: str) -> bool:
        self._known(name)
        if name in self._drained:
            return False
        self._drained[name] = self._shards[name].weight
        self.set_weight(name, 0)
        return True

    def undrain_shard(self, name: str) -> int:
        self._known(name)
        if name not in self._drained:
            raise KansasError(f"shard {name!r} is not drained")
        weight = self._drained.pop(name)
        self.set_weight(name, weight)
        return weight

    def drained_shards(self) -> dict[str, int]:
        return dict(self._drained)

    def remove_shard(self, name: str) -> None:
        self._known(name)
        counts = {
            "pinned realm(s)": sum(s == name for s in self._pins.values()),
            "split realm(s)": sum(name in s for s in self._splits.values()),
            "regex rule(s)": sum(name in s for s in self._regexes.values()),
            "user override(s)": sum(s == name for s in self._overrides.values()),
        }
        if any(counts.values()):
            raise KansasError(shard_in_use_message(name, counts))
        del self._shards[name]
        self._drained.pop(name, None)

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

    def clear_user_overrides(self, realm: str, shard: str) -> int:
        gone = [k for k, s in self._overrides.items() if k[0] == realm and s == shard]
        for key in gone:
            del self._overrides[key]
        return len(gone)

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

    def start_move(
        self, realm: str, user_id: int | None, to_shard: str, reload_rate: float
    ) -> Move:
        self._known(to_shard)
        for move in self._moves.values():
            if move.state == "running" and (move.realm, move.user_id) == (realm, user_id):
                taken = replace(move, to_shard=to_shard, reload_rate=reload_rate)
                self._moves[move.id] = taken
                return taken
        move = Move(len(self._moves) + 1, realm, user_id, to_shard, reload_rate)
        self._moves[move.id] = move
        return move

    def update_move(self, move_id: int, invalidated: int, state: str = "running") -> None:
        self._moves[move_id] = replace(self._moves[move_id], invalidated=invalidated, state=state)

    def list_moves(self, running_only: bool = False) -> list[Move]:
        moves = sorted(self._moves.values(), key=lambda m: -m.id)
        return [m for m in moves if m.state == "running" or not running_only]

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
        return (
            self._shards, self._pins, self._overrides, self._splits, self._regexes, self._moves,
            self._drained,
        )  # fmt: skip

    def close(self) -> None:
        pass
