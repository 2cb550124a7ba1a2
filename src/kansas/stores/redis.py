"""The queue -> shard table in Redis, readable by operators with ``redis-cli``.

One string key per queue, ``kansas:queue:<queue_id>``, holding compact JSON
(``{"shard":…,"realm":…,"user":…,"timeout":…}``) and expiring a little after the shard
would drop the queue. ``SET … EX`` writes a route in one atomic command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from kansas.errors import ConfigError
from kansas.model import QueueRoute
from kansas.stores.interface import ROUTE_SLACK_SECONDS, IRouteStore

KEY_PREFIX = "kansas:queue:"
#: No Redis call may hang a request: txredisapi waits forever while Redis is down.
DEFAULT_CALL_TIMEOUT = 1.0


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str
    port: int
    db: int
    password: str | None = None
    username: str | None = None

    def __str__(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]`` -> RedisAddress, or ConfigError."""
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as e:
        raise ConfigError(f"bad Redis URL {url!r}: {e}") from None
    if parts.scheme != "redis" or not parts.hostname:
        raise ConfigError(f"bad Redis URL {url!r}: expected redis://HOST[:PORT][/DB]")
    path = parts.path.lstrip("/")
    if path and not path.isdigit():
        raise ConfigError(f"bad Redis URL {url!r}: database must be a number")
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=int(path or 0),
        password=unquote(parts.password) if parts.password else None,
        username=unquote(parts.username) if parts.username else None,
    )


@implementer(IRouteStore)
class RedisRouteStore:
    def __init__(
        self,
        address: RedisAddress,
        clock: IReactorTime,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        poolsize: int = 4,
    ) -> None:
        self.address = address
        self._clock = clock
        self._timeout = call_timeout
        # convertNumbers=False: routing data stays text ("007" must not become 7).
        self._redis = txredisapi.lazyConnectionPool(
            host=address.host,
            port=address.port,
            # No SELECT for db 0: txredisapi stops reconnecting for good if the
            # SELECT (or AUTH) of a new connection fails, e.g. while Redis restarts.
            dbid=address.db or None,
            poolsize=poolsize,
            password=address.password,
            username=address.username,
            convertNumbers=False,
            connectTimeout=call_timeout,
            replyTimeout=max(call_timeout, 5.0),
        )

    def _call(self, method: str, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = getattr(self._redis, method)(*args)
        d.addTimeout(self._timeout, self._clock)
        return d

    def get(self, queue_id: str) -> Deferred[QueueRoute | None]:
        d = self._call("get", KEY_PREFIX + queue_id)
        return d.addCallback(
            lambda raw: None if raw is None else QueueRoute.from_json(queue_id, raw)
        )

    def put(self, route: QueueRoute) -> Deferred[None]:
        key = KEY_PREFIX + route.queue_id
        d = self._call("set", key, route.to_json(), route.timeout + ROUTE_SLACK_SECONDS)
        return d.addCallback(lambda _: None)

    def touch(self, route: QueueRoute) -> Deferred[None]:
        key = KEY_PREFIX + route.queue_id
        d = self._call("expire", key, route.timeout + ROUTE_SLACK_SECONDS)
        return d.addCallback(lambda _: None)

    def delete(self, queue_id: str) -> Deferred[None]:
        return self._call("delete", KEY_PREFIX + queue_id).addCallback(lambda _: None)

    @inlineCallbacks
    def routes(self, realm: str | None = None):  # type: ignore[no-untyped-def]
        found: list[QueueRoute] = []
        cursor = "0"
        while True:
            cursor, keys = yield self._call("scan", cursor, KEY_PREFIX + "*", 1000)
            if keys:
                values = yield self._call("mget", keys)
                for key, raw in zip(keys, values, strict=True):
                    if raw is not None:
                        route = QueueRoute.from_json(key[len(KEY_PREFIX) :], raw)
                        if realm in (None, route.realm):
                            found.append(route)
            if str(cursor) == "0":
                break
        found.sort(key=lambda r: (r.realm, r.queue_id))
        return found

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self._redis.disconnect()
        return d if d is not None else succeed(None)
