"""The PostgreSQL authority: shard assignments, versioned schema, change notification.

Synchronous psycopg2: ``kansas-ctl`` calls it directly; the kansas process calls
``load`` in a thread when told of a change (see ``kansas.follower``), never while
serving a request.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import psycopg2
import psycopg2.errors
from zope.interface import implementer

from kansas.errors import ConfigError, KansasError, SchemaError, UnknownShard
from kansas.model import Assignment, Shard, check_shard_args
from kansas.schema import SCHEMA_VERSION, schema_files
from kansas.stores.interface import IAuthority

NOTIFY_CHANNEL = "kansas_assignment"
#: So that operators (and tests) can tell kansas's sessions apart in pg_stat_activity.
APPLICATION_NAME = "kansas"
CONNECT_TIMEOUT_SECONDS = 5


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
    try:
        return psycopg2.connect(
            dsn, connect_timeout=CONNECT_TIMEOUT_SECONDS, application_name=application_name
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

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self._dsn, self._application_name)
        return self._conn

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement in its own transaction; a dropped connection is retried once."""
        for attempt in (1, 2):
            conn = self._connection()
            try:
                with conn, conn.cursor() as cur:
                    cur.execute(sql, args)
                    return list(cur.fetchall()) if cur.description else []
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
                self.close()
                if attempt == 2:
                    raise KansasError(f"PostgreSQL ({self.description}) failed: {e}") from None
        raise AssertionError("unreachable")

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
        conn = self._connection()
        try:
            # One snapshot for all three tables, so a reload never sees half a change.
            conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
            with conn, conn.cursor() as cur:
                cur.execute("SELECT name, url, weight FROM kansas_shards")
                shards = {name: Shard(name, url, weight) for name, url, weight in cur}
                cur.execute("SELECT realm, shard FROM kansas_realm_pins")
                pins = dict(cur.fetchall())
                cur.execute("SELECT realm, user_id, shard FROM kansas_user_overrides")
                overrides = {(realm, int(uid)): shard for realm, uid, shard in cur}
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
            self.close()
            raise KansasError(f"PostgreSQL ({self.description}) failed: {e}") from None
        finally:
            if not conn.closed:
                conn.set_session(isolation_level="DEFAULT", readonly=False)
        return Assignment(shards, pins, overrides)

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

    def list_shards(self) -> list[Shard]:
        rows = self._run("SELECT name, url, weight FROM kansas_shards ORDER BY name")
        return [Shard(name, url, weight) for name, url, weight in rows]

    def _to_shard(self, sql: str, args: tuple[Any, ...], shard: str) -> None:
        try:
            self._run(sql, args)
        except psycopg2.errors.ForeignKeyViolation:
            raise UnknownShard(f"no shard named {shard!r}") from None

    def pin_realm(self, realm: str, shard: str) -> None:
        self._to_shard(
            "INSERT INTO kansas_realm_pins (realm, shard) VALUES (%s, %s) ON CONFLICT (realm)"
            " DO UPDATE SET shard = EXCLUDED.shard, updated_at = now()",
            (realm, shard),
            shard,
        )

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

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None
