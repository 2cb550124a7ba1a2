"""The two stores kansas keeps, each behind one interface with several backends.

* ``IRouteStore``: the queue -> shard table (Redis in production). Asynchronous: the
  proxy consults it when its in-process cache misses.
* ``IAuthority``: the shard assignments (PostgreSQL in production). Synchronous: the
  operator CLI calls it directly and kansas loads snapshots of it in a thread, never
  on the request path.

Each has an in-memory reference implementation and one contract-test mixin
(``tests/test_store_contracts.py``) run against every backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from kansas.model import Assignment, Move, QueueRoute, RegexRule, Shard

#: How much longer than the shard's own idle timeout a queue mapping lives. kansas
#: refreshes a mapping at most once a minute per queue, so it always outlives its queue.
ROUTE_SLACK_SECONDS = 180


class IRouteStore(Interface):
    def get(queue_id: str) -> Deferred[QueueRoute | None]:
        """The route of a queue, or None if none is recorded (or it expired)."""

    def put(route: QueueRoute) -> Deferred[None]:
        """Record a route; it expires ``route.timeout + ROUTE_SLACK_SECONDS`` from now."""

    def touch(route: QueueRoute) -> Deferred[None]:
        """Push a route's expiry back to ``route.timeout + ROUTE_SLACK_SECONDS`` from now."""

    def delete(queue_id: str) -> Deferred[None]:
        """Forget a queue (no error if it is unknown)."""

    def routes(realm: str | None = None) -> Deferred[list[QueueRoute]]:
        """Every recorded route (of one realm), for operators and moves; not for the
        request path."""

    def invalidate(queue_id: str) -> Deferred[bool]:
        """Mark a queue's route invalid (a move): True if this call did it, False if it
        was already invalid or is unknown. Atomic: of two concurrent calls, one wins.
        The route keeps its expiry."""

    def get_many(queue_ids: Sequence[str]) -> Deferred[dict[str, QueueRoute]]:
        """The routes of these queues (those with none are left out)."""

    def journal(realm: str) -> Deferred[str | None]:
        """The transparent-move journal of a realm (opaque text), or None."""

    def mark_moving(
        realm: str,
        journal: str,
        queue_ids: Sequence[str],
        from_shard: str,
        to_shard: str,
        until: float,
    ) -> Deferred[list[str]]:
        """Transparent move: mark these queues as moving to ``to_shard`` until ``until``
        (Unix time), and write the realm's journal, in one atomic step. Only queues whose
        route exists, is valid, is on ``from_shard`` and is not being moved elsewhere are
        marked; returns those. Routes keep their expiry."""

    def end_moving(
        realm: str,
        journal: str | None,
        commit: Sequence[str],
        to_shard: str,
        unmark: Sequence[str],
    ) -> Deferred[int]:
        """Transparent move: in one atomic step, the ``commit`` queues marked as moving
        to ``to_shard`` now live there (marker gone), the ``unmark`` queues lose their
        marker and stay where they are, and the realm's journal is written (None:
        deleted). Returns how many routes changed."""

    def acquire(name: str, owner: str, seconds: float) -> Deferred[bool]:
        """Take (or extend, for the same owner) a lock that expires after ``seconds``."""

    def release(name: str, owner: str) -> Deferred[None]:
        """Give a lock back, if ``owner`` still holds it."""

    def close() -> Deferred[None]:
        """Release connections."""


class IAuthority(Interface):
    description = Attribute("Where the authority lives, for messages (no password).")

    def schema_version() -> int:
        """The schema version in place (0: none)."""

    def migrate() -> int:
        """Bring the schema to the current version; returns the version now in place."""

    def load() -> Assignment:
        """A consistent snapshot of every shard, realm pin and user override."""

    def add_shard(name: str, url: str, weight: int) -> Shard:
        """Register a shard (KansasError if the name is taken)."""

    def set_weight(name: str, weight: int) -> Shard:
        """Change a shard's weight (UnknownShard, KansasError for a negative weight)."""

    def drain_shard(name: str) -> bool:
        """Weight 0, keeping the weight to give back on undrain; False if it was
        drained already (UnknownShard if there is no such shard)."""

    def undrain_shard(name: str) -> int:
        """Give a drained shard its weight back (returned); KansasError if not drained."""

    def drained_shards() -> dict[str, int]:
        """Drained shards, with the weight each gets back on undrain."""

    def remove_shard(name: str) -> None:
        """Unregister a shard; KansasError, with counts, while a pin, split, regex rule
        or user override still names it (UnknownShard if there is no such shard)."""

    def list_shards() -> list[Shard]:
        """Every registered shard, by name."""

    def pin_realm(realm: str, shard: str) -> None:
        """Pin a realm to a shard (UnknownShard if it is not registered); replaces the
        realm's split if it had one."""

    def unpin_realm(realm: str) -> bool:
        """Remove a realm's pin; False if it had none."""

    def move_user(realm: str, user_id: int, shard: str) -> None:
        """Send a user's new queues to a shard, whatever the realm's placement."""

    def clear_user_overrides(realm: str, shard: str) -> int:
        """Remove the realm's user overrides that point to ``shard``; how many."""

    def split_realm(realm: str, shards: Sequence[str]) -> None:
        """Split a realm by user: user U's new queues go to ``shards[U % len(shards)]``
        (UnknownShard for a name not registered, KansasError for an empty list);
        replaces the realm's pin or split."""

    def unsplit_realm(realm: str) -> bool:
        """Remove a realm's split; False if it had none."""

    def add_regex_rule(pattern: str, shards: Sequence[str]) -> None:
        """Send realms matching ``pattern`` (and no pin or split) to ``shards`` (split by
        user if several): a new pattern is tried after the others, a known one keeps its
        place and gets the new shards. KansasError for a bad regex."""

    def remove_regex_rule(pattern: str) -> bool:
        """Remove a regex rule; False if there was none."""

    def set_regex_rules(rules: Sequence[RegexRule]) -> None:
        """Replace every regex rule by these, tried in this order."""

    def start_move(realm: str, user_id: int | None, to_shard: str, reload_rate: float) -> Move:
        """Record a move as running (UnknownShard if ``to_shard`` is not registered).
        A move of the same realm and user still running is taken over (resumed)."""

    def update_move(move_id: int, invalidated: int, state: str = "running") -> None:
        """Record a move's progress; ``state`` 'done' or 'interrupted' ends it."""

    def list_moves(running_only: bool = False) -> list[Move]:
        """Moves, newest first."""

    def atomic() -> AbstractContextManager[None]:
        """Calls made inside ``with authority.atomic():`` take effect together or not at
        all (one transaction, so kansas reloads once and never sees half of them)."""

    def close() -> None:
        """Release the connection."""
