"""Which Tornado shard(s) hold the event queues of these users: kansas's answer, for Django.

Zulip's Django publishes every event to the RabbitMQ queue of each Tornado process
(``notify_tornado_port_<port>``) that holds a queue of a recipient. Once kansas places
new queues, Django must ask kansas's rules instead of ``sharding.json``, or events go
to the wrong process and are lost. This module answers from the same PostgreSQL
authority with the same pure functions as kansas's router (``kansas.router``), so the
answers agree. It needs psycopg2 and the standard library only: no Twisted, no zope.

Use::

    from kansas.placement import get_placement

    placement = get_placement(settings.KANSAS_POSTGRES, redis_url=settings.KANSAS_REDIS)
    for shard, users in placement.users_by_shard(realm.host, users).items():
        publish(f"notify_tornado_port_{shard.port}", {"event": event, "users": users})

``users`` are user ids, or dicts with an ``"id"`` (as Zulip's ``send_event`` takes).

**Fresh.** The whole assignment is held in memory and read without I/O. A background
thread LISTENs on ``kansas_assignment`` and reloads on every NOTIFY (a change is followed
within milliseconds), reconnects with backoff when the connection drops, reloads
everything after each reconnect (notifications sent meanwhile are lost), and reloads
every ``reload_interval`` seconds anyway. If PostgreSQL goes away the last assignment
is kept.

**Which shards.** ``users_by_shard`` returns, for each user, the shard kansas would put
a new queue of that user on -- plus every shard that may still hold an *older* queue of
theirs. kansas never moves a queue: after a change (``realm pin``, ``user move``, an
import) the queues created before it stay on their old shard until they expire, which
for a client that keeps polling is never. Which users still have such queues is known
only to kansas's Redis table (``kansas:queue:<id>`` -> shard, realm, user):

* with ``redis_url``, this module reads that table (a full ``SCAN``, every
  ``redis_interval`` seconds, in a second thread) and keeps the queues that are not
  where the current rules would put them; between two reads it also answers with every
  assignment in force since the last read began. Together that is every shard that may
  hold a queue of the user (a queue created by a kansas that had not yet seen the
  latest change, a few milliseconds' window, is the exception);
* without Redis, it answers with the current rules only: exact as long as no change
  affected users with live queues; after one, events for their older queues stop until
  those clients register again.

**Processes.** One instance per process (``get_placement``); it notices a ``fork`` and
starts afresh in the child, leaving the parent's connections alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg2
import psycopg2.extensions

from kansas.errors import KansasError
from kansas.model import Assignment, QueueRoute, Shard
from kansas.router import place_queue, realm_from_host, realm_shards
from kansas.schema import NOTIFY_CHANNEL, SCHEMA_VERSION, read_assignment

log = logging.getLogger("kansas.placement")

#: The Redis keys of kansas's queue table (``kansas.stores.redis.KEY_PREFIX``).
QUEUE_KEY_PREFIX = "kansas:queue:"
CONNECT_TIMEOUT_SECONDS = 5
#: Keys asked for per SCAN step (and per MGET).
SCAN_COUNT = 1000

User = TypeVar("User", int, Mapping[str, Any])


class PlacementError(KansasError):
    """The authority cannot be read, or has no shard for a queue; one line."""


class NoShard(PlacementError):
    """No shard can take a new queue for this realm (none registered, or all weight 0)."""


def _describe(dsn: str) -> str:
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as e:
        raise PlacementError(f"bad PostgreSQL DSN: {str(e).strip()}") from None
    params.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def _connect(dsn: str, application_name: str) -> Any:
    try:
        return psycopg2.connect(
            dsn, connect_timeout=CONNECT_TIMEOUT_SECONDS, application_name=application_name
        )
    except psycopg2.OperationalError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PlacementError(f"cannot reach PostgreSQL ({_describe(dsn)}): {first}") from None


def _read(conn: Any) -> Assignment:
    """The whole assignment in one REPEATABLE READ snapshot, on an autocommit
    connection (the LISTEN one, or a fresh one)."""
    with conn.cursor() as cur:
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            return read_assignment(cur)
        finally:
            cur.execute("COMMIT")  # a ROLLBACK if the read failed


def _check_schema(conn: Any, where: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('kansas_schema_version') IS NOT NULL")
        row = cur.fetchone()
        version = 0
        if row is not None and row[0]:
            cur.execute("SELECT version FROM kansas_schema_version")
            found = cur.fetchone()
            version = 0 if found is None else int(found[0])
    if version < SCHEMA_VERSION:
        raise PlacementError(
            f"PostgreSQL ({where}) has kansas schema version {version}, this module needs "
            f"{SCHEMA_VERSION}: run `kansas-ctl migrate`"
        )
    if version > SCHEMA_VERSION:
        raise PlacementError(
            f"PostgreSQL ({where}) has kansas schema version {version}, newer than this "
            f"module ({SCHEMA_VERSION}): upgrade kansas where Django runs"
        )


# -- a tiny Redis client (RESP over a socket): SCAN, MGET, AUTH, SELECT are all we need ---
class RedisError(PlacementError):
    """Redis answered with an error, or not at all."""


@dataclass(frozen=True)
class RedisURL:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """``redis://[[user]:password@]host[:port][/db]``."""
        try:
            parts = urlsplit(url)
            port = parts.port or 6379
        except ValueError as e:
            raise PlacementError(f"bad Redis URL {url!r}: {e}") from None
        path = parts.path.lstrip("/")
        if parts.scheme != "redis" or not parts.hostname or (path and not path.isdigit()):
            raise PlacementError(f"bad Redis URL {url!r}: expected redis://HOST[:PORT][/DB]")
        return cls(
            parts.hostname,
            port,
            int(path or 0),
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


class RespClient:
    """One blocking connection speaking RESP2; every call bounded by ``timeout``."""

    def __init__(self, url: RedisURL, timeout: float) -> None:
        self.url = url
        try:
            self._sock = socket.create_connection((url.host, url.port), timeout=timeout)
        except OSError as e:
            raise RedisError(f"cannot reach Redis ({url}): {e.strerror or e}") from None
        self._file = self._sock.makefile("rb")
        if url.password is not None:
            auth = [url.username, url.password] if url.username else [url.password]
            self.call("AUTH", *auth)
        if url.db:
            self.call("SELECT", str(url.db))

    def call(self, *args: str) -> Any:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        try:
            self._sock.sendall(b"".join(parts))
            return self._reply()
        except OSError as e:
            raise RedisError(f"Redis ({self.url}) failed: {e.strerror or e}") from None

    def _reply(self) -> Any:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise RedisError(f"Redis ({self.url}) closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(f"Redis ({self.url}): {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = self._file.read(length + 2)
            if len(data) != length + 2:
                raise RedisError(f"Redis ({self.url}) closed the connection")
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise RedisError(f"Redis ({self.url}) spoke no RESP: {line[:40]!r}")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def scan_queue_routes(client: RespClient) -> list[QueueRoute]:
    """Every queue route in kansas's Redis table (SCAN + MGET, a step at a time)."""
    routes: list[QueueRoute] = []
    cursor = "0"
    while True:
        reply = client.call(
            "SCAN", cursor, "MATCH", QUEUE_KEY_PREFIX + "*", "COUNT", str(SCAN_COUNT)
        )
        cursor = reply[0].decode()
        keys = [key.decode() for key in reply[1]]
        if keys:
            for key, raw in zip(keys, client.call("MGET", *keys), strict=True):
                if raw is None:
                    continue  # expired between SCAN and MGET
                try:
                    routes.append(QueueRoute.from_json(key[len(QUEUE_KEY_PREFIX) :], raw))
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring a malformed queue route in Redis: %s", key)
        if cursor == "0":
            return routes


# -- the placement -------------------------------------------------------------------------
@dataclass(frozen=True)
class _State:
    """Everything an answer needs, replaced whole (readers never lock)."""

    assignment: Assignment
    #: (since when, assignment): every assignment in force since the last complete
    #: Redis read began, oldest first; the last is ``assignment``. Only with Redis.
    history: tuple[tuple[float, Assignment], ...] = ()
    #: (realm, user or None) -> shards holding a queue the current rules would not put
    #: there, from the last Redis read.
    displaced: Mapping[tuple[str, int | None], tuple[str, ...]] = field(default_factory=dict)


def _user_id(user: int | Mapping[str, Any]) -> int:
    return user if isinstance(user, int) else int(user["id"])


class Placement:
    """kansas's placement of event queues, kept fresh in the background.

    ``start()`` loads the assignment (PlacementError if it cannot) and starts following
    it; ``close()`` stops. Every query is answered from memory.
    """

    def __init__(
        self,
        dsn: str,
        *,
        redis_url: str | None = None,
        reload_interval: float = 60.0,
        retry_max: float = 10.0,
        redis_interval: float = 60.0,
        redis_timeout: float = 5.0,
        application_name: str = "kansas-placement",
    ) -> None:
        self.description = _describe(dsn)
        self._dsn = dsn
        self._redis = RedisURL.parse(redis_url) if redis_url else None
        self.reload_interval = reload_interval
        self.retry_max = retry_max
        self.redis_interval = redis_interval
        self.redis_timeout = redis_timeout
        self.application_name = application_name
        self._state = _State(Assignment())
        #: Counters, for tests and operators: reloads done, Redis reads completed.
        self.reloads = 0
        self.redis_reads = 0
        self._pid = -1  # the process it runs in; -1: not started
        self._closed = False
        self._loaded = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = -1, -1

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> Placement:
        """Load the assignment now, then follow it; idempotent."""
        if self._pid == os.getpid():
            return self
        if self._pid != -1:  # started in the parent of this (forked) process
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)  # our copies only: the parent keeps its own
        self._pid = os.getpid()
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        try:
            conn = _connect(self._dsn, self.application_name)
            try:
                conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
                _check_schema(conn, self.description)
                self._install(_read(conn))
            except psycopg2.Error as e:
                raise PlacementError(f"PostgreSQL ({self.description}) failed: {e}") from None
            finally:
                conn.close()
        except BaseException:
            self._pid = -1
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise
        self._threads = [threading.Thread(target=self._follow, name="kansas-placement")]
        if self._redis is not None:
            try:
                self._read_redis()  # the first read before the first answer, if it can
            except RedisError as e:
                log.warning("%s; answering with the current rules until Redis is back", e)
            self._threads.append(
                threading.Thread(target=self._follow_redis, name="kansas-placement-redis")
            )
        for thread in self._threads:
            thread.daemon = True
            thread.start()
        return self

    def close(self) -> None:
        """Stop following (waits for the threads, at most a few seconds)."""
        if self._pid != os.getpid():
            self._closed = True
            return
        self._closed = True
        self._stop.set()
        os.write(self._wake_w, b"x")
        for thread in self._threads:
            thread.join(timeout=CONNECT_TIMEOUT_SECONDS + self.redis_timeout + 1)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._pid = -1

    def __enter__(self) -> Placement:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _current(self) -> _State:
        if self._pid != os.getpid():
            if self._closed:
                raise PlacementError("this Placement is closed")
            # A new process (a fork, or never started): the parent's threads did not come
            # along. Its connections are left alone (closing a psycopg2 connection would
            # end the parent's session too); start afresh.
            self._pid = -1
            self.start()
        return self._state

    # -- answers ------------------------------------------------------------------------
    @property
    def assignment(self) -> Assignment:
        """The current snapshot of kansas's rules."""
        return self._current().assignment

    def shard_for_new_queue(self, realm_host: str, user_id: int) -> Shard:
        """Where kansas puts a new queue of this user (NoShard if nowhere)."""
        assignment = self._current().assignment
        realm = realm_from_host(realm_host)
        decision = place_queue(assignment, realm, user_id)
        if decision is None:
            raise NoShard(f"no shard can take new queues of realm {realm}")
        return assignment.shards[decision.shard]

    def shards_for_user(self, realm_host: str, user_id: int) -> list[Shard]:
        """Every shard that may hold a queue of this user, new placement first."""
        state = self._current()
        return self._resolve(state, self._names(state, realm_from_host(realm_host), user_id))

    def users_by_shard(self, realm_host: str, users: Iterable[User]) -> dict[Shard, list[User]]:
        """The users (ids or dicts with "id", kept as given) grouped by every shard that
        may hold a queue of theirs; a user with several such shards is in each group."""
        state = self._current()
        realm = realm_from_host(realm_host)
        grouped: dict[str, list[User]] = {}
        for user in users:
            for name in self._names(state, realm, _user_id(user)):
                grouped.setdefault(name, []).append(user)
        shards = self._resolve(state, list(grouped))
        return {shard: grouped[shard.name] for shard in shards}

    def realm_shards(self, realm_host: str) -> list[Shard]:
        """Every shard kansas may put a new queue of this realm on (not older queues)."""
        state = self._current()
        return self._resolve(
            state, list(realm_shards(state.assignment, realm_from_host(realm_host)))
        )

    def may_hold(self, realm_host: str, user_id: int, port: int) -> bool:
        """Whether the Tornado process on ``port`` may hold a queue of this user (for
        Tornado's own "did this reach the right process?" checks)."""
        return any(shard.port == port for shard in self.shards_for_user(realm_host, user_id))

    @staticmethod
    def _names(state: _State, realm: str, user_id: int) -> list[str]:
        found: dict[str, None] = {}
        decision = place_queue(state.assignment, realm, user_id)
        if decision is not None:
            found[decision.shard] = None
        for _since, older in state.history[:-1]:
            decision = place_queue(older, realm, user_id)
            if decision is not None:
                found[decision.shard] = None
        if state.displaced:
            found.update(dict.fromkeys(state.displaced.get((realm, user_id), ())))
            found.update(dict.fromkeys(state.displaced.get((realm, None), ())))
        return list(found)

    @staticmethod
    def _resolve(state: _State, names: list[str]) -> list[Shard]:
        shards = []
        for name in names:
            shard = state.assignment.shards.get(name)
            for _since, older in reversed(state.history):
                if shard is not None:
                    break
                shard = older.shards.get(name)
            if shard is None:
                log.warning("shard %s holds queues but is not registered any more", name)
                continue
            shards.append(shard)
        return shards

    # -- following PostgreSQL -----------------------------------------------------------
    def _install(self, assignment: Assignment) -> None:
        with self._lock:
            self.reloads += 1
            state = self._state
            if self._loaded and assignment == state.assignment:
                return
            self._loaded = True
            if self._redis is None:
                self._state = _State(assignment)
            else:
                history = (*state.history, (time.monotonic(), assignment))
                self._state = _State(assignment, history, state.displaced)
        log.info(
            "kansas assignment loaded: %d shards, %d pins, %d splits, %d regex rules, "
            "%d user overrides",
            len(assignment.shards),
            len(assignment.realm_pins),
            len(assignment.realm_splits),
            len(assignment.regex_rules),
            len(assignment.user_overrides),
        )

    def _reload(self, conn: Any) -> None:
        """Read everything; again if a change was announced while reading."""
        while True:
            conn.notifies.clear()
            try:
                assignment = _read(conn)
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                raise  # the connection is gone: reconnect
            except (psycopg2.Error, KansasError) as e:
                log.warning("reading the kansas assignment failed, keeping the last: %s", e)
                return
            self._install(assignment)
            if not conn.notifies:
                return

    def _listen(self) -> Any:
        conn = _connect(self._dsn, self.application_name + "-listen")
        try:
            conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except psycopg2.Error:
            conn.close()
            raise
        return conn

    def _follow(self) -> None:
        delay = 0.5
        conn: Any = None
        poller: Any = None
        next_reload = 0.0
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = self._listen()
                    delay = 0.5
                    self._reload(conn)  # whatever changed while not listening
                    next_reload = time.monotonic() + self.reload_interval
                    poller = select.poll()  # not select(): descriptors may be > 1023
                    poller.register(conn.fileno(), select.POLLIN)
                    poller.register(self._wake_r, select.POLLIN)
                wait = max(0.0, next_reload - time.monotonic())
                ready = {fd for fd, _event in poller.poll(wait * 1000)}
                if self._wake_r in ready:
                    continue  # close(): the loop ends
                if ready:
                    conn.poll()
                if conn.notifies or time.monotonic() >= next_reload:
                    self._reload(conn)
                    next_reload = time.monotonic() + self.reload_interval
            except Exception as e:
                if conn is not None:
                    _close_quietly(conn)
                    conn = None
                if isinstance(e, PlacementError | psycopg2.Error | OSError):
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    log.warning(
                        "kansas placement: %s; keeping the last assignment, retrying in %.1f s",
                        first,
                        delay,
                    )
                else:  # a bug: say so loudly, but keep following
                    log.exception("kansas placement: unexpected error; retrying in %.1f s", delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry_max)
        if conn is not None:
            _close_quietly(conn)

    # -- following Redis ----------------------------------------------------------------
    def _read_redis(self) -> None:
        assert self._redis is not None
        started = time.monotonic()
        client = RespClient(self._redis, self.redis_timeout)
        try:
            routes = scan_queue_routes(client)
        finally:
            client.close()
        with self._lock:
            state = self._state
            # Keep the assignments in force at some time since this read began.
            history = state.history
            keep = [
                entry
                for i, entry in enumerate(history)
                if i == len(history) - 1 or history[i + 1][0] > started
            ]
            in_force = [assignment for _since, assignment in keep]
            displaced: dict[tuple[str, int | None], dict[str, None]] = {}
            for route in routes:
                if route.user_id is not None and any(
                    (d := place_queue(a, route.realm, route.user_id)) is not None
                    and d.shard == route.shard
                    for a in in_force
                ):
                    continue  # where the rules put it: answered without the table
                displaced.setdefault((route.realm, route.user_id), {})[route.shard] = None
            self._state = _State(
                state.assignment,
                tuple(keep),
                {key: tuple(names) for key, names in displaced.items()},
            )
            self.redis_reads += 1

    def _follow_redis(self) -> None:
        failures = 0
        wait = self.redis_interval
        while not self._stop.wait(wait):
            try:
                self._read_redis()
                failures, wait = 0, self.redis_interval
            except Exception as e:
                failures += 1
                wait = min(0.5 * 2**failures, self.retry_max, self.redis_interval)
                if isinstance(e, PlacementError):
                    log.warning("kansas placement: %s; retrying in %.1f s", e, wait)
                else:  # a bug: say so loudly, but keep reading
                    log.exception("kansas placement: reading Redis failed; retrying")


def _close_quietly(conn: Any) -> None:
    with contextlib.suppress(psycopg2.Error):
        conn.close()


_instances: dict[tuple[str, str | None], Placement] = {}
_instances_lock = threading.Lock()


def get_placement(dsn: str, *, redis_url: str | None = None, **options: Any) -> Placement:
    """The process's one Placement for this DSN (and Redis URL), started on first use."""
    key = (dsn, redis_url)
    with _instances_lock:
        placement = _instances.get(key)
        if placement is None:
            placement = _instances[key] = Placement(dsn, redis_url=redis_url, **options)
    placement._current()  # starts it (again, in a forked child)
    return placement


def main(argv: list[str] | None = None) -> int:
    """``python -m kansas.placement REALM USER_ID...``: which shards, as Django would ask."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m kansas.placement",
        description="Which Tornado shards may hold queues of these users (kansas's rules).",
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get("KANSAS_POSTGRES"),
        help="PostgreSQL DSN of the assignments [env KANSAS_POSTGRES]",
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("KANSAS_REDIS"),
        help="kansas's Redis, for older queues [env KANSAS_REDIS; optional]",
    )
    parser.add_argument("realm")
    parser.add_argument("user_ids", nargs="+", type=int, metavar="user_id")
    args = parser.parse_args(argv)
    try:
        if not args.postgres:
            raise PlacementError("--postgres DSN is required (or set KANSAS_POSTGRES)")
        with Placement(args.postgres, redis_url=args.redis) as placement:
            grouped = placement.users_by_shard(args.realm, args.user_ids)
    except KansasError as e:
        print(f"kansas.placement: error: {e}", file=sys.stderr)
        return 1
    for shard, users in grouped.items():
        print(f"{shard.name}\t{shard.url}\t{' '.join(map(str, users))}")
    return 0


__all__ = [
    "NoShard",
    "Placement",
    "PlacementError",
    "RespClient",
    "get_placement",
    "scan_queue_routes",
]

if __name__ == "__main__":
    raise SystemExit(main())
