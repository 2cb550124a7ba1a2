"""Versioned SQL for the PostgreSQL authority: ``NNN_name.sql`` applied in order.

Also the one query that reads the whole assignment, shared by kansas (through
``kansas.stores.postgres``) and by ``kansas.placement`` (inside Django): this module
must stay free of Twisted.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from kansas.model import Assignment, RegexRule, Shard

#: The schema version this kansas needs.
SCHEMA_VERSION = 3
#: Every change to the assignment tables is announced on this channel (by triggers).
NOTIFY_CHANNEL = "kansas_assignment"


def schema_files() -> list[tuple[int, str]]:
    """(version, SQL) of every migration shipped, in order."""
    found = []
    for entry in resources.files(__name__).iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:3].isdigit():
            found.append((int(name[:3]), entry.read_text()))
    return sorted(found)


def read_assignment(cur: Any) -> Assignment:
    """The whole assignment, read with a psycopg2 cursor. Run it inside one
    REPEATABLE READ transaction, so that it sees one consistent snapshot."""
    cur.execute("SELECT name, url, weight FROM kansas_shards")
    shards = {name: Shard(name, url, weight) for name, url, weight in cur}
    cur.execute("SELECT realm, shard FROM kansas_realm_pins")
    pins = dict(cur.fetchall())
    cur.execute("SELECT realm, user_id, shard FROM kansas_user_overrides")
    overrides = {(realm, int(uid)): shard for realm, uid, shard in cur}
    cur.execute("SELECT realm, shard FROM kansas_realm_splits ORDER BY realm, position")
    splits: dict[str, list[str]] = {}
    for realm, shard in cur:
        splits.setdefault(realm, []).append(shard)
    cur.execute(
        "SELECT r.pattern, s.shard FROM kansas_regex_rules r"
        " JOIN kansas_regex_rule_shards s USING (pattern) ORDER BY r.priority, s.position"
    )
    rules: dict[str, list[str]] = {}  # insertion-ordered by priority
    for pattern, shard in cur:
        rules.setdefault(pattern, []).append(shard)
    cur.execute("SELECT DISTINCT realm FROM kansas_moves WHERE state = 'running'")
    moving = frozenset(realm for (realm,) in cur)
    return Assignment(
        shards,
        pins,
        overrides,
        {realm: tuple(names) for realm, names in splits.items()},
        [RegexRule(pattern, tuple(names)) for pattern, names in rules.items()],
        moving,
    )
