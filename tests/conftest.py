"""Shared fixtures: private real servers (redis-server, PostgreSQL) from kansas.testing.

Both are started once per session on free ports in temp dirs and stopped at the end;
each test gets a clean Redis and its own fresh PostgreSQL database.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator

import psycopg2
import pytest

from kansas.testing.servers import PostgresServer, RedisSentinel, RedisServer

_databases = itertools.count()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(durable=True) as server:
        server.start()
        yield server


def redis_command(server: RedisServer, *args: str) -> bytes:
    """One command over a plain socket (no reactor needed), raw reply."""
    payload = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(payload)
        return s.recv(65536)


@pytest.fixture(scope="session")
def redis_sentinel(redis_server: RedisServer) -> Iterator[RedisSentinel]:
    """A Sentinel watching the session's Redis as the master of service "kansas"."""
    with RedisSentinel(redis_server.port) as sentinel:
        sentinel.start()
        yield sentinel


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start(redis_server.port)  # a test stopped it
    assert redis_command(redis_server, "FLUSHALL").startswith(b"+OK")
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    # Every statement is logged with the client's application_name, so tests can
    # count what kansas asked of PostgreSQL.
    settings = {"log_statement": "all", "log_line_prefix": "%a|"}
    with PostgresServer(settings=settings) as server:
        server.start()
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A fresh, empty database for this test."""
    if postgres_server.proc is None or postgres_server.proc.poll() is not None:
        postgres_server.start(postgres_server.port)  # a test stopped it
    name = f"test_{next(_databases)}"
    conn = psycopg2.connect(postgres_server.dsn.replace("dbname=kansas", "dbname=postgres"))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return postgres_server.dsn.replace("dbname=kansas", f"dbname={name}")


def terminate_sessions(dsn: str, application_name: str) -> int:
    """Kill the PostgreSQL sessions of one application (a dropped connection, on demand);
    how many there were."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (application_name,),
        )
        row = cur.fetchone()
    conn.close()
    return int(row[0]) if row else 0
