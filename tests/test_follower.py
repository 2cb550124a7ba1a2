"""kansas follows the PostgreSQL authority live (real PostgreSQL, in-process reactor)."""

from __future__ import annotations

from collections.abc import Callable

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from kansas.follower import AssignmentFollower
from kansas.stores.postgres import PostgresAuthority
from tests.conftest import terminate_sessions


async def until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> float:
    """Poll ``condition`` on the reactor; the time it took (fails after ``timeout``)."""
    start = reactor.seconds()  # type: ignore[attr-defined]
    while not condition():
        if reactor.seconds() - start > timeout:  # type: ignore[attr-defined]
            raise AssertionError(f"timed out waiting for {what or condition}")
        await deferLater(reactor, 0.01)  # type: ignore[arg-type]
    return reactor.seconds() - start  # type: ignore[attr-defined,no-any-return]


@pytest_twisted.ensureDeferred
async def test_changes_arrive_by_notify_and_survive_a_lost_connection(postgres_dsn: str) -> None:
    ctl = PostgresAuthority(postgres_dsn, application_name="test-ctl")
    ctl.migrate()
    ctl.add_shard("a", "http://127.0.0.1:9800", 100)
    loader = PostgresAuthority(postgres_dsn)
    # A long safety-net interval: only NOTIFY and reconnects can explain a reload here.
    follower = AssignmentFollower(reactor, postgres_dsn, loader.load, loader.load(), 3600)
    follower.startService()
    try:
        await until(lambda: follower._reader is not None, what="LISTEN")
        ctl.pin_realm("big.example.com", "a")
        took = await until(lambda: "big.example.com" in follower.current.realm_pins, 5, "pin")
        assert took < 1.0

        # Lose the LISTEN connection; a change made meanwhile arrives after reconnecting.
        assert terminate_sessions(postgres_dsn, "kansas-listen") == 1
        await until(lambda: follower._reader is None, what="loss noticed")
        ctl.move_user("big.example.com", 7, "a")
        await until(lambda: ("big.example.com", 7) in follower.current.user_overrides, 10,
                    "resync after reconnect")  # fmt: skip
        assert follower._reader is not None
    finally:
        stopping = follower.stopService()
        if stopping is not None:
            await stopping
        loader.close()
        ctl.close()
