"""The queue -> shard table in Redis, readable by operators with ``redis-cli``.

One string key per queue, ``kansas:queue:<queue_id>``, holding compact JSON
(``{"shard":…,"realm":…,"user":…,"timeout":…}``, plus ``"invalid":true`` once a move
has invalidated it) and expiring a little after the shard would drop the queue.

One set per realm, ``kansas:realm:<realm>``, holds the ids of the realm's queues, so a
move finds them without scanning. It is written in the same Lua script as the mapping
(one atomic step) and its expiry is pushed back to the longest of its members', so it
disappears at the latest when the last of its mappings does: nothing is left behind.
A member whose mapping expired stays in the set until then (readers skip it).
``docs/redis.md`` shows how to read all of it with ``redis-cli``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kansas.errors import ConfigError
from kansas.model import QueueRoute
from kansas.observe.metrics import CallStats
from kansas.stores.interface import ROUTE_SLACK_SECONDS, IRouteStore

KEY_PREFIX = "kansas:queue:"
log = Logger()
#: With Sentinel, how often the sentinels are asked which server is the master.
MASTER_CHECK_INTERVAL = 1.0


#: Calls allowed to wait for a pool that has never connected yet (at start-up).
MAX_QUEUED_UNCONNECTED = 1000


class RedisUnavailable(ConnectionError):
    """No connection to Redis is up."""


REALM_PREFIX = "kansas:realm:"
LOCK_PREFIX = "kansas:lock:"
JOURNAL_PREFIX = "kansas:tmove:"
#: A transparent move's journal outlives an interrupted move by this much.
JOURNAL_SECONDS = 7 * 24 * 3600

# KEYS: queue key, realm set; ARGV: route JSON, ttl, queue id, realm-set prefix.
_PUT = """
local old = redis.call('GET', KEYS[1])
if old then
  local realm = cjson.decode(old)['realm']
  if ARGV[4] .. realm ~= KEYS[2] then redis.call('SREM', ARGV[4] .. realm, ARGV[3]) end
end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
redis.call('SADD', KEYS[2], ARGV[3])
if redis.call('TTL', KEYS[2]) < ttl then redis.call('EXPIRE', KEYS[2], ttl) end
return 1
"""
# KEYS: queue key, realm set; ARGV: ttl.
_TOUCH = """
local ttl = tonumber(ARGV[1])
if redis.call('EXPIRE', KEYS[1], ttl) == 1 and redis.call('TTL', KEYS[2]) < ttl then
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 1
"""
# KEYS: queue key; ARGV: queue id, realm-set prefix.
_DELETE = """
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', ARGV[2] .. cjson.decode(old)['realm'], ARGV[1])
return 1
"""
# KEYS: queue key. 1 if this call marked it invalid; 0 if gone or already invalid.
_INVALIDATE = """
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
local route = cjson.decode(old)
if route['invalid'] == true then return 0 end
route['invalid'] = true
redis.call('SET', KEYS[1], cjson.encode(route), 'KEEPTTL')
return 1
"""
# KEYS: journal, queue keys...; ARGV: journal, from, to, until, journal ttl.
# Returns the (1-based) positions among the queue keys of those it marked.
_MARK_MOVING = """
local marked = {}
for i = 2, #KEYS do
  local old = redis.call('GET', KEYS[i])
  if old then
    local route = cjson.decode(old)
    local moving = route['moving']
    if route['invalid'] ~= true and route['shard'] == ARGV[2]
        and (moving == nil or moving == cjson.null or moving['to'] == ARGV[3]) then
      route['moving'] = {['to'] = ARGV[3], ['until'] = tonumber(ARGV[4])}
      redis.call('SET', KEYS[i], cjson.encode(route), 'KEEPTTL')
      table.insert(marked, i - 1)
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[5]))
return marked
"""
# KEYS: journal, commit keys..., unmark keys...; ARGV: journal ('' deletes it), to,
# number of commit keys, journal ttl.
_END_MOVING = """
local commits = tonumber(ARGV[3])
local changed = 0
for i = 2, #KEYS do
  local old = redis.call('GET', KEYS[i])
  if old then
    local route = cjson.decode(old)
    local moving = route['moving']
    if moving ~= nil and moving ~= cjson.null then
      if i <= commits + 1 and moving['to'] == ARGV[2] then route['shard'] = ARGV[2] end
      route['moving'] = nil
      redis.call('SET', KEYS[i], cjson.encode(route), 'KEEPTTL')
      changed = changed + 1
    end
  end
end
if ARGV[1] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[4]))
end
return changed
"""
# KEYS: lock; ARGV: owner, milliseconds. Take it if free, extend it if ours.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
#: No Redis call may hang a request: txredisapi waits forever while Redis is down.
DEFAULT_CALL_TIMEOUT = 1.0


def _text(raw: str | bytes) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str
    port: int
    db: int
    password: str | None = None
    username: str | None = None
    #: With Redis Sentinel: the sentinels to ask, and the name of the monitored master
    #: (host and port are then the first sentinel's).
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None

    def __str__(self) -> str:
        if self.sentinels:
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"redis+sentinel://{hosts}/{self.service}/{self.db}"
        return f"redis://{self.host}:{self.port}/{self.db}"


SENTINEL_PORT = 26379


def _parse_sentinel_url(url: str) -> RedisAddress:
    """``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/SERVICE[/db]``."""
    rest = url[len("redis+sentinel://") :]
    auth, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    service, _, db = path.partition("/")
    sentinels = []
    for item in hosts.split(","):
        host, colon, port = item.rpartition(":") if ":" in item else (item, "", "")
        if not host or (colon and not port.isdigit()):
            raise ConfigError(f"bad Redis Sentinel address {item!r} in {url!r}")
        sentinels.append((host, int(port) if colon else SENTINEL_PORT))
    if not service or (db and not db.isdigit()):
        raise ConfigError(
            f"bad Redis URL {url!r}: expected redis+sentinel://HOST[:PORT][,...]/SERVICE[/DB]"
        )
    username, _, password = auth.partition(":")
    return RedisAddress(
        host=sentinels[0][0],
        port=sentinels[0][1],
        db=int(db or 0),
        password=unquote(password) if password else None,
        username=unquote(username) if username else None,
        sentinels=tuple(sentinels),
        service=service,
    )


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, or a Sentinel URL
    (``redis+sentinel://…``) -> RedisAddress, or ConfigError."""
    if url.startswith("redis+sentinel://"):
        return _parse_sentinel_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as e:
        raise ConfigError(f"bad Redis URL {url!r}: {e}") from None
    if parts.scheme != "redis" or not parts.hostname:
        raise ConfigError(
            f"bad Redis URL {url!r}: expected redis://HOST[:PORT][/DB] or redis+sentinel://…"
        )
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


def _bounded(d: Deferred[Any], seconds: float, clock: IReactorTime) -> Deferred[Any]:
    """What ``d`` gives, or ``defer.TimeoutError`` after ``seconds``, whichever comes
    first, *without cancelling* ``d``: cancelling a txredisapi call also cancels its
    reply timeout, which is what drops a connection whose Redis stopped answering (a
    silent partition: no RST, so TCP keeps it up for ~15 minutes). Kept running, the
    call fails at txredisapi's reply timeout, its connection is aborted, and the calls
    after it fail at once (RedisUnavailable) instead of each waiting ``seconds``."""
    out: Deferred[Any] = Deferred()

    def expire() -> None:
        if not out.called:
            out.errback(defer.TimeoutError(f"no answer from Redis in {seconds:g} s"))

    timer = clock.callLater(seconds, expire)

    def settle(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if out.called:
            return
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        # else: the caller has had its timeout; a late failure is not an unhandled one

    d.addBoth(settle)
    return out


def _measured(result: Any, done: Any) -> Any:
    done(not isinstance(result, Failure))
    return result


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
        self._connected_once = False
        self._queued_unconnected = 0
        #: latency and failures of every call, by operation, for /metrics
        self.stats = CallStats()
        # convertNumbers=False: routing data stays text ("007" must not become 7).
        self._sentinel: Any = None
        #: called with (old, new) master address when Sentinel names a new master
        self.on_master_change: list[Any] = []
        self._master: tuple[str, int] | None = None
        self._master_check = LoopingCall(self._check_master)
        self._master_check.clock = clock
        if address.sentinels:
            # The master's address is asked of the sentinels before every connection,
            # so a failover is followed (connections to the old master are dropped).
            self._sentinel = txredisapi.Sentinel(list(address.sentinels))
            self._redis = self._sentinel.master_for(
                address.service,
                dbid=address.db or None,
                poolsize=poolsize,
                isLazy=True,
                password=address.password,
                username=address.username,
                convertNumbers=False,
                replyTimeout=max(call_timeout, 5.0),
            )
            self._master_check.start(MASTER_CHECK_INTERVAL, now=True)
            return
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

    def _check_master(self) -> None:
        """Sentinel: follow a failover at once. The old master may stay up, and keep
        taking kansas's writes, until Sentinel gets round to demoting it (seconds:
        10 s in the test); what it takes meanwhile is wiped when it resyncs as a
        replica. So once the sentinels name a new master, kansas drops its connections
        (they reconnect to the new one) and tells ``on_master_change``, whose listener
        (RouteTable) writes its recent mappings again."""
        d = self._sentinel.discover_master(self.address.service)

        def found(addr: Any) -> None:
            master = (str(_text(addr[0])), int(addr[1]))
            old, self._master = self._master, master
            if old is None or old == master:
                return
            log.warn("Redis Sentinel names a new master for {s}: {old} -> {new}; reconnecting",
                     s=self.address.service, old=f"{old[0]}:{old[1]}",
                     new=f"{master[0]}:{master[1]}")  # fmt: skip
            for conn in list(self._redis._factory.pool):
                if conn.transport is not None:
                    conn.transport.abortConnection()
            for callback in self.on_master_change:
                callback(old, master)

        d.addCallbacks(found, lambda _: None)  # no answer: ask again next time

    def _call(self, method: str, *args: Any, op: str | None = None) -> Deferred[Any]:
        """Call txredisapi's ``method``, bounded by the call timeout, timed and counted
        as ``op`` (default: the method)."""
        done = self.stats.timer(op or method)
        if self._redis._factory.size:
            self._connected_once = True
            self._queued_unconnected = 0
        elif self._connected_once or self._queued_unconnected >= MAX_QUEUED_UNCONNECTED:
            # No connection up: fail now. txredisapi would queue the call until Redis is
            # back, and a call we give up on (timeout) stays in its queue: memory that
            # grows for as long as an outage lasts. Only the very first calls, before the
            # pool has ever connected (kansas just started), are let to wait for it.
            done(False)
            return fail(RedisUnavailable(f"not connected to Redis ({self.address})"))
        else:
            self._queued_unconnected += 1
        d: Deferred[Any] = getattr(self._redis, method)(*args)
        return _bounded(d, self._timeout, self._clock).addBoth(_measured, done)

    def get(self, queue_id: str) -> Deferred[QueueRoute | None]:
        d = self._call("get", KEY_PREFIX + queue_id)
        return d.addCallback(
            lambda raw: None if raw is None else QueueRoute.from_json(queue_id, raw)
        )

    def put(self, route: QueueRoute) -> Deferred[None]:
        keys = [KEY_PREFIX + route.queue_id, REALM_PREFIX + route.realm]
        ttl = route.timeout + ROUTE_SLACK_SECONDS
        args = [route.to_json(), ttl, route.queue_id, REALM_PREFIX]
        return self._call("eval", _PUT, keys, args, op="put").addCallback(lambda _: None)

    def touch(self, route: QueueRoute) -> Deferred[None]:
        keys = [KEY_PREFIX + route.queue_id, REALM_PREFIX + route.realm]
        d = self._call("eval", _TOUCH, keys, [route.timeout + ROUTE_SLACK_SECONDS], op="touch")
        return d.addCallback(lambda _: None)

    def delete(self, queue_id: str) -> Deferred[None]:
        d = self._call(
            "eval", _DELETE, [KEY_PREFIX + queue_id], [queue_id, REALM_PREFIX], op="delete"
        )
        return d.addCallback(lambda _: None)

    def invalidate(self, queue_id: str) -> Deferred[bool]:
        d = self._call("eval", _INVALIDATE, [KEY_PREFIX + queue_id], [], op="invalidate")
        return d.addCallback(lambda done: int(done) == 1)

    def get_many(self, queue_ids: Sequence[str]) -> Deferred[dict[str, QueueRoute]]:
        ids = list(queue_ids)
        if not ids:
            return succeed({})

        def parse(values: list[Any]) -> dict[str, QueueRoute]:
            return {
                q: QueueRoute.from_json(q, raw)
                for q, raw in zip(ids, values, strict=True)
                if raw is not None
            }

        return self._call("mget", [KEY_PREFIX + q for q in ids]).addCallback(parse)

    def journal(self, realm: str) -> Deferred[str | None]:
        d = self._call("get", JOURNAL_PREFIX + realm)
        return d.addCallback(lambda raw: None if raw is None else _text(raw))

    def mark_moving(
        self, realm: str, journal: str, queue_ids: Sequence[str], from_shard: str,
        to_shard: str, until: float,
    ) -> Deferred[list[str]]:  # fmt: skip
        ids = list(queue_ids)
        keys = [JOURNAL_PREFIX + realm, *(KEY_PREFIX + q for q in ids)]
        args = [journal, from_shard, to_shard, repr(until), JOURNAL_SECONDS]
        d = self._call("eval", _MARK_MOVING, keys, args)
        return d.addCallback(lambda marked: [ids[int(i) - 1] for i in marked or []])

    def end_moving(
        self, realm: str, journal: str | None, commit: Sequence[str], to_shard: str,
        unmark: Sequence[str],
    ) -> Deferred[int]:  # fmt: skip
        keys = [JOURNAL_PREFIX + realm, *(KEY_PREFIX + q for q in [*commit, *unmark])]
        args = [journal or "", to_shard, len(commit), JOURNAL_SECONDS]
        return self._call("eval", _END_MOVING, keys, args).addCallback(int)

    def acquire(self, name: str, owner: str, seconds: float) -> Deferred[bool]:
        d = self._call(
            "eval", _ACQUIRE, [LOCK_PREFIX + name], [owner, int(seconds * 1000)], op="acquire"
        )
        return d.addCallback(lambda done: int(done) == 1)

    def release(self, name: str, owner: str) -> Deferred[None]:
        d = self._call("eval", _RELEASE, [LOCK_PREFIX + name], [owner], op="release")
        return d.addCallback(lambda _: None)

    @inlineCallbacks
    def routes(self, realm: str | None = None):  # type: ignore[no-untyped-def]
        found: list[QueueRoute] = []
        if realm is not None:  # the realm's index, not a scan of every key
            ids = sorted((yield self._call("smembers", REALM_PREFIX + realm)))
            for start in range(0, len(ids), 1000):
                chunk = ids[start : start + 1000]
                values = yield self._call("mget", [KEY_PREFIX + i for i in chunk])
                for queue_id, raw in zip(chunk, values, strict=True):
                    if raw is not None:
                        route = QueueRoute.from_json(queue_id, raw)
                        if route.realm == realm:
                            found.append(route)
            found.sort(key=lambda r: (r.realm, r.queue_id))
            return found
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
        if self._master_check.running:
            self._master_check.stop()
        d: Deferred[None] = self._redis.disconnect()
        if self._sentinel is not None:
            sentinels: Deferred[Any] = self._sentinel.disconnect()
            return DeferredList([d, sentinels], consumeErrors=True).addCallback(lambda _: None)
        return d if d is not None else succeed(None)
