"""The PostgreSQL authority: shard assignments, versioned schema, change notification.

Synchronous psycopg2: ``kansas-ctl`` calls it directly; the kansas process calls
``load`` in a thread when told of a change (see ``kansas.follower``), never while
serving a request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psycopg2
import psycopg2.errors
from zope.interface import implementer

from kansas.errors import ConfigError, KansasError, SchemaError, UnknownShard
from kansas.model import (
    Assignment,
    Move,
    RegexRule,
    Shard,
    check_shard_args,
    check_split,
    compile_realm_regex,
    shard_in_use_message,
)
from kansas.schema import NOTIFY_CHANNEL, SCHEMA_VERSION, read_assignment, schema_files
from kansas.stores.interface import IAuthority

__all__ = ["NOTIFY_CHANNEL", "PostgresAuthority", "connect", "describe_dsn"]
T = TypeVar("T")
#: Regex rules get priorities 10, 20, ...: room to insert one by hand between two.
PRIORITY_STEP = 10
#: So that operators (and tests) can tell kansas's sessions apart in pg_stat_activity.
APPLICATION_NAME = "kansas"
CONNECT_TIMEOUT_SECONDS = 5
#: A connection whose peer stopped answering (a silent partition: no RST, no ICMP) is
#: dropped within ~11 s: idle, by TCP keepalives (first after 5 s, then 3 every 2 s);
#: with data unacknowledged, by TCP_USER_TIMEOUT. Otherwise kansas's LISTEN connection
#: stays "up" for as long as TCP does (~15 minutes), or for ever once the server has
#: given up on it: kansas would never hear a NOTIFY again. A DSN's own values win.
LIVENESS = {
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
}


def describe_dsn(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as e:
        raise ConfigError(f"bad PostgreSQL DSN: {str(e).strip()}") from None
    params.pop("password", None)
    if dsn.startswith(("postgres://", "postgresql://")):
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        return f"postgresql://{host}:{parts.port or 5432}{parts.path}"
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def connect(dsn: str, application_name: str = APPLICATION_NAME) -> Any:
    """A psycopg2 connection, or a one-line KansasError saying why not."""
    describe_dsn(dsn)  # reject a malformed DSN with a clear message first
    given = psycopg2.extensions.parse_dsn(dsn)
    liveness = {k: v for k, v in LIVENESS.items() if k not in given}
    try:
        return psycopg2.connect(
            dsn,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            application_name=application_name,
            **liveness,
        )
    except psycopg2.OperationalError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KansasError(f"cannot reach PostgreSQL ({describe_dsn(dsn)}): {first}") from None


@implementer(IAuthority)
class PostgresAuthority:
    def __init__(self, dsn: str, application_name: str = APPLICATION_NAME) -> None:
        self.description = describe_dsn(dsn)
        self._dsn = dsn
        self._application_name = application_name
        self._conn: Any = None
        self._batch: Any = None  # the cursor of the transaction ``atomic`` holds open

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self._dsn, self._application_name)
        return self._conn

    def _write(self, work: Callable[[Any], T]) -> T:
        """``work(cursor)`` in one transaction (or in the one ``atomic`` opened); a
        dropped connection is retried once (outside ``atomic``)."""
        if self._batch is not None:
            return work(self._batch)
        for attempt in (1, 2):
            conn = self._connection()
            try:
                with conn, conn.cursor() as cur:
                    return work(cur)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
                self.close()
                if attempt == 2:
                    raise KansasError(f"PostgreSQL ({self.description}) failed: {e}") from None
        raise AssertionError("unreachable")

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement in its own transaction; a dropped connection is retried once."""

        def work(cur: Any) -> list[tuple[Any, ...]]:
            cur.execute(sql, args)
            return list(cur.fetchall()) if cur.description else []

        return self._write(work)

    @contextmanager
    def atomic(self) -> Iterator[None]:
        if self._batch is not None:  # nested: part of the outer transaction
            yield
            return
        conn = self._connection()
        try:
            with conn, conn.cursor() as cur:
                self._batch = cur
                yield
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
            self.close()
            raise KansasError(f"PostgreSQL ({self.description}) failed: {e}") from None
        finally:
            self._batch = None

    def schema_version(self) -> int:
        rows = self._run("SELECT to_regclass('kansas_schema_version') IS NOT NULL")
        if not rows[0][0]:
            return 0
        return int(self._run("SELECT version FROM kansas_schema_version")[0][0])

    def require_current_schema(self) -> None:
        version = self.schema_version()
        if version != SCHEMA_VERSION:
            raise SchemaError(
                f"PostgreSQL ({self.description}) has kansas schema version {version}, "
                f"this kansas needs {SCHEMA_VERSION}: run `kansas-ctl --postgres DSN migrate`"
            )

    def migrate(self) -> int:
        conn = self._connection()
        with conn, conn.cursor() as cur:
            # One migrator at a time, even across hosts.
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('kansas-migrate'))")
            cur.execute(
                "CREATE TABLE IF NOT EXISTS kansas_schema_version (version integer NOT NULL)"
            )
            cur.execute("SELECT version FROM kansas_schema_version")
            row = cur.fetchone()
            current = 0 if row is None else int(row[0])
            if current > SCHEMA_VERSION:
                raise SchemaError(
                    f"PostgreSQL has kansas schema version {current}, newer than this "
                    f"kansas ({SCHEMA_VERSION}): upgrade kansas"
                )
            for version, sql in schema_files():
                if version > current:
                    cur.execute(sql)
                    current = version
            cur.execute("DELETE FROM kansas_schema_version")
            cur.execute("INSERT INTO kansas_schema_version VALUES (%s)", (current,))
        return current

    def load(self) -> Assignment:
        if self._batch is not None:
            return read_assignment(self._batch)
        for attempt in (1, 2):
            conn = self._connection()
            try:
                # One snapshot for all the tables, so a reload never sees half a change.
                conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
                with conn, conn.cursor() as cur:
                    return read_assignment(cur)
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
                # A connection from before a PostgreSQL restart: one more try on a new one.
                self.close()
                if attempt == 2:
                    raise KansasError(f"PostgreSQL ({self.description}) failed: {e}") from None
            finally:
                if not conn.closed:
                    conn.set_session(isolation_level="DEFAULT", readonly=False)
        raise AssertionError("unreachable")

    def add_shard(self, name: str, url: str, weight: int) -> Shard:
        check_shard_args(name, url, weight)
        try:
            self._run(
                "INSERT INTO kansas_shards (name, url, weight) VALUES (%s, %s, %s)",
                (name, url, weight),
            )
        except psycopg2.errors.UniqueViolation:
            raise KansasError(f"shard {name!r} already exists") from None
        return Shard(name, url, weight)

    def set_weight(self, name: str, weight: int) -> Shard:
        if weight < 0:
            raise KansasError(f"bad weight {weight}: must be >= 0")
        rows = self._run(
            "UPDATE kansas_shards SET weight = %s WHERE name = %s RETURNING url", (weight, name)
        )
        if not rows:
            raise UnknownShard(f"no shard named {name!r}")
        return Shard(name, rows[0][0], weight)

    def drain_shard(self, name: str) -> bool:
        def work(cur: Any) -> bool:
            _require_shards(cur, (name,))
            cur.execute(
                "UPDATE kansas_shards SET drained_weight = weight, weight = 0"
                " WHERE name = %s AND drained_weight IS NULL RETURNING name",
                (name,),
            )
            return cur.fetchone() is not None

        return self._write(work)

    def undrain_shard(self, name: str) -> int:
        def work(cur: Any) -> int:
            _require_shards(cur, (name,))
            cur.execute(
                "UPDATE kansas_shards SET weight = drained_weight, drained_weight = NULL"
                " WHERE name = %s AND drained_weight IS NOT NULL RETURNING weight",
                (name,),
            )
            row = cur.fetchone()
            if row is None:
                raise KansasError(f"shard {name!r} is not drained")
            return int(row[0])

        return self._write(work)

    def drained_shards(self) -> dict[str, int]:
        rows = self._run(
            "SELECT name, drained_weight FROM kansas_shards WHERE drained_weight IS NOT NULL"
        )
        return {name: int(weight) for name, weight in rows}

    def remove_shard(self, name: str) -> None:
        def work(cur: Any) -> None:
            _require_shards(cur, (name,))
            cur.execute("SELECT 1 FROM kansas_shards WHERE name = %s FOR UPDATE", (name,))
            counts = {}
            for what, sql in (
                ("pinned realm(s)", "SELECT count(*) FROM kansas_realm_pins WHERE shard = %s"),
                ("split realm(s)",
                 "SELECT count(DISTINCT realm) FROM kansas_realm_splits WHERE shard = %s"),
                ("regex rule(s)",
                 "SELECT count(DISTINCT pattern) FROM kansas_regex_rule_shards WHERE shard = %s"),
                ("user override(s)", "SELECT count(*) FROM kansas_user_overrides WHERE shard = %s"),
            ):  # fmt: skip
                cur.execute(sql, (name,))
                counts[what] = int(cur.fetchone()[0])
            if any(counts.values()):
                raise KansasError(shard_in_use_message(name, counts))
            cur.execute("DELETE FROM kansas_shards WHERE name = %s", (name,))

        self._write(work)

    def list_shards(self) -> list[Shard]:
        rows = self._run("SELECT name, url, weight FROM kansas_shards ORDER BY name")
        return [Shard(name, url, weight) for name, url, weight in rows]

    def _to_shard(self, sql: str, args: tuple[Any, ...], shard: str) -> None:
        try:
            self._run(sql, args)
        except psycopg2.errors.ForeignKeyViolation:
            raise UnknownShard(f"no shard named {shard!r}") from None

    def pin_realm(self, realm: str, shard: str) -> None:
        def work(cur: Any) -> None:
            _require_shards(cur, (shard,))
            cur.execute(
                "INSERT INTO kansas_realm_pins (realm, shard) VALUES (%s, %s)"
                " ON CONFLICT (realm) DO UPDATE SET shard = EXCLUDED.shard, updated_at = now()",
                (realm, shard),
            )
            cur.execute("DELETE FROM kansas_realm_splits WHERE realm = %s", (realm,))

        self._write(work)

    def unpin_realm(self, realm: str) -> bool:
        rows = self._run("DELETE FROM kansas_realm_pins WHERE realm = %s RETURNING realm", (realm,))
        return bool(rows)

    def move_user(self, realm: str, user_id: int, shard: str) -> None:
        self._to_shard(
            "INSERT INTO kansas_user_overrides (realm, user_id, shard) VALUES (%s, %s, %s)"
            " ON CONFLICT (realm, user_id) DO UPDATE SET shard = EXCLUDED.shard,"
            " updated_at = now()",
            (realm, user_id, shard),
            shard,
        )

    def clear_user_overrides(self, realm: str, shard: str) -> int:
        rows = self._run(
            "DELETE FROM kansas_user_overrides WHERE realm = %s AND shard = %s RETURNING user_id",
            (realm, shard),
        )
        return len(rows)

    def split_realm(self, realm: str, shards: Sequence[str]) -> None:
        names = check_split(shards)

        def work(cur: Any) -> None:
            _require_shards(cur, names)
            cur.execute("DELETE FROM kansas_realm_pins WHERE realm = %s", (realm,))
            cur.execute("DELETE FROM kansas_realm_splits WHERE realm = %s", (realm,))
            cur.executemany(
                "INSERT INTO kansas_realm_splits (realm, position, shard) VALUES (%s, %s, %s)",
                [(realm, position, name) for position, name in enumerate(names)],
            )

        self._write(work)

    def unsplit_realm(self, realm: str) -> bool:
        rows = self._run(
            "DELETE FROM kansas_realm_splits WHERE realm = %s RETURNING realm", (realm,)
        )
        return bool(rows)

    def add_regex_rule(self, pattern: str, shards: Sequence[str]) -> None:
        compile_realm_regex(pattern)
        names = check_split(shards)

        def work(cur: Any) -> None:
            _require_shards(cur, names)
            # One writer of the rule order at a time.
            cur.execute("LOCK TABLE kansas_regex_rules IN SHARE ROW EXCLUSIVE MODE")
            cur.execute(
                "INSERT INTO kansas_regex_rules (pattern, priority)"
                " SELECT %s, COALESCE(max(priority), 0) + %s FROM kansas_regex_rules"
                " ON CONFLICT (pattern) DO UPDATE SET updated_at = now()",
                (pattern, PRIORITY_STEP),
            )
            _insert_rule_shards(cur, pattern, names, replace=True)

        self._write(work)

    def remove_regex_rule(self, pattern: str) -> bool:
        rows = self._run(
            "DELETE FROM kansas_regex_rules WHERE pattern = %s RETURNING pattern", (pattern,)
        )
        return bool(rows)

    def set_regex_rules(self, rules: Sequence[RegexRule]) -> None:
        if len({rule.pattern for rule in rules}) != len(rules):
            raise KansasError("the same regex twice in one rule list")

        def work(cur: Any) -> None:
            _require_shards(cur, [name for rule in rules for name in rule.shards])
            cur.execute("LOCK TABLE kansas_regex_rules IN SHARE ROW EXCLUSIVE MODE")
            cur.execute("DELETE FROM kansas_regex_rules")  # their shards go with them
            for index, rule in enumerate(rules, start=1):
                cur.execute(
                    "INSERT INTO kansas_regex_rules (pattern, priority) VALUES (%s, %s)",
                    (rule.pattern, index * PRIORITY_STEP),
                )
                _insert_rule_shards(cur, rule.pattern, rule.shards, replace=False)

        self._write(work)

    def start_move(
        self, realm: str, user_id: int | None, to_shard: str, reload_rate: float
    ) -> Move:
        def work(cur: Any) -> Move:
            _require_shards(cur, (to_shard,))
            cur.execute("LOCK TABLE kansas_moves IN SHARE ROW EXCLUSIVE MODE")
            cur.execute(
                "UPDATE kansas_moves SET to_shard = %s, reload_rate = %s"
                " WHERE state = 'running' AND realm = %s AND user_id IS NOT DISTINCT FROM %s"
                f" RETURNING {_MOVE_COLUMNS}",
                (to_shard, reload_rate, realm, user_id),
            )
            row = cur.fetchone()
            if row is None:
                cur.execute(
                    "INSERT INTO kansas_moves (realm, user_id, to_shard, reload_rate)"
                    f" VALUES (%s, %s, %s, %s) RETURNING {_MOVE_COLUMNS}",
                    (realm, user_id, to_shard, reload_rate),
                )
                row = cur.fetchone()
            return _move(row)

        return self._write(work)

    def update_move(self, move_id: int, invalidated: int, state: str = "running") -> None:
        if state == "running":
            self._run(
                "UPDATE kansas_moves SET invalidated = %s WHERE id = %s", (invalidated, move_id)
            )
        else:
            self._run(
                "UPDATE kansas_moves SET invalidated = %s, state = %s, finished_at = now()"
                " WHERE id = %s",
                (invalidated, state, move_id),
            )

    def list_moves(self, running_only: bool = False) -> list[Move]:
        where = " WHERE state = 'running'" if running_only else ""
        rows = self._run(f"SELECT {_MOVE_COLUMNS} FROM kansas_moves{where} ORDER BY id DESC")
        return [_move(row) for row in rows]

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None


_MOVE_COLUMNS = "id, realm, user_id, to_shard, reload_rate, state, invalidated"


def _move(row: Any) -> Move:
    mid, realm, user_id, to_shard, rate, state, invalidated = row
    user = None if user_id is None else int(user_id)
    return Move(int(mid), realm, user, to_shard, float(rate), state, int(invalidated))


def _require_shards(cur: Any, names: Sequence[str]) -> None:
    """UnknownShard for the first name that is not a registered shard."""
    cur.execute("SELECT name FROM kansas_shards WHERE name = ANY(%s)", (list(set(names)),))
    known = {row[0] for row in cur.fetchall()}
    for name in names:
        if name not in known:
            raise UnknownShard(f"no shard named {name!r}")


def _insert_rule_shards(cur: Any, pattern: str, names: Sequence[str], *, replace: bool) -> None:
    if replace:
        cur.execute("DELETE FROM kansas_regex_rule_shards WHERE pattern = %s", (pattern,))
    cur.executemany(
        "INSERT INTO kansas_regex_rule_shards (pattern, position, shard) VALUES (%s, %s, %s)",
        [(pattern, position, name) for position, name in enumerate(names)],
    )
