"""The data kansas routes by: shards, the assignment that PostgreSQL holds, queue routes.

Plain immutable values: the router is a set of pure functions over them, and every
store speaks in them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import urlsplit

from kansas.errors import ConfigError, KansasError

#: The shard's own idle timeout for a queue (Zulip's default); a larger ``lifespan_secs``
#: replaces it.
DEFAULT_QUEUE_TIMEOUT = 600
#: Zulip caps ``lifespan_secs`` at 7 days.
MAX_QUEUE_TIMEOUT = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Shard:
    """One Tornado process: where it listens and how much of the load it should take."""

    name: str
    url: str
    weight: int = 100
    #: (host, port), parsed from ``url`` once: it is needed on every request.
    address: tuple[str, int] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", parse_shard_url(self.url))

    @property
    def port(self) -> int:
        """The shard's TCP port: Zulip names a Tornado process (and its RabbitMQ queue,
        ``notify_tornado_port_<port>``) by it."""
        return self.address[1]


def parse_shard_url(url: str) -> tuple[str, int]:
    """``http://host:port`` -> (host, port); anything else is a ConfigError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"bad shard URL {url!r}: {e}") from None
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(f"bad shard URL {url!r}: expected http://HOST:PORT")
    return parts.hostname, port or 80


#: Regex matching follows Zulip's ``sharding.json``: ``re.match`` (anchored at the start
#: only), case-insensitive, Python syntax.
REGEX_FLAGS = re.IGNORECASE


@dataclass(frozen=True, slots=True)
class RegexRule:
    """Realms whose name matches ``pattern`` go to ``shards[user_id % len(shards)]``."""

    pattern: str
    shards: tuple[str, ...]
    compiled: re.Pattern[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", check_split(self.shards))
        object.__setattr__(self, "compiled", compile_realm_regex(self.pattern))


def compile_realm_regex(pattern: str) -> re.Pattern[str]:
    """The compiled rule, or a ConfigError naming what is wrong with it."""
    try:
        return re.compile(pattern, REGEX_FLAGS)
    except (re.error, TypeError) as e:
        raise ConfigError(f"bad regex {pattern!r}: {e}") from None


def check_split(shards: Iterable[str]) -> tuple[str, ...]:
    """A split's shard list as a tuple: at least one name; repeats are allowed (a shard
    named twice takes twice the users, as in Zulip's ``sharding.json``)."""
    names = tuple(shards)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"bad shard list {list(names)!r}: name at least one shard")
    return names


#: Realms whose regex verdict one snapshot remembers; beyond, the memory starts afresh.
REGEX_CACHE_SIZE = 65536


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where queues should go, as PostgreSQL says: a snapshot, replaced whole on change.

    ``realm_splits`` maps a realm to an ordered list of shards; a user of that realm goes
    to ``shards[user_id % n]`` (Zulip's split of a realm across Tornado ports).
    ``regex_rules`` are tried in order, after the exact rules (pins and splits) of a
    realm, before the hash.
    """

    shards: Mapping[str, Shard] = field(default_factory=dict)
    realm_pins: Mapping[str, str] = field(default_factory=dict)
    user_overrides: Mapping[tuple[str, int], str] = field(default_factory=dict)
    realm_splits: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    regex_rules: Sequence[RegexRule] = ()
    #: Realms with a move in progress (``kansas_moves``): the proxy re-reads their
    #: queues' mappings from Redis on every request, so an invalidation is seen at once.
    moving_realms: frozenset[str] = frozenset()
    #: realm -> index of its first matching regex rule (-1: none); see kansas.router.
    regex_cache: dict[str, int] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Snapshots are shared between callers: make them read-only.
        for name in ("shards", "realm_pins", "user_overrides"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        splits = {realm: check_split(names) for realm, names in self.realm_splits.items()}
        object.__setattr__(self, "realm_splits", MappingProxyType(splits))
        object.__setattr__(self, "regex_rules", tuple(self.regex_rules))
        object.__setattr__(self, "moving_realms", frozenset(self.moving_realms))


@dataclass(frozen=True, slots=True)
class QueueRoute:
    """One row of the queue -> shard table kept in Redis."""

    queue_id: str
    shard: str
    realm: str
    user_id: int | None = None
    timeout: int = DEFAULT_QUEUE_TIMEOUT
    #: Invalidated by a move: the next request gets BAD_EVENT_QUEUE_ID from kansas.
    invalid: bool = False
    #: A transparent move is switching the queue to this shard: requests on it are held
    #: until the marker goes, or until ``moving_until`` (Unix time) passes.
    moving_to: str | None = None
    moving_until: float = 0.0

    def moving(self, now: float) -> bool:
        """True while a transparent move holds requests on this queue (``now``: Unix time)."""
        return self.moving_to is not None and now < self.moving_until

    def to_json(self) -> str:
        data: dict[str, object] = {
            "shard": self.shard,
            "realm": self.realm,
            "user": self.user_id,
            "timeout": self.timeout,
        }
        if self.invalid:
            data["invalid"] = True
        if self.moving_to is not None:
            data["moving"] = {"to": self.moving_to, "until": self.moving_until}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, queue_id: str, raw: str | bytes) -> QueueRoute:
        data = json.loads(raw)
        moving = data.get("moving")
        if not isinstance(moving, dict):
            moving = {}
        return cls(
            queue_id=queue_id,
            shard=str(data["shard"]),
            realm=str(data["realm"]),
            user_id=None if data.get("user") is None else int(data["user"]),
            timeout=int(data.get("timeout", DEFAULT_QUEUE_TIMEOUT)),
            invalid=data.get("invalid") is True,
            moving_to=None if moving.get("to") is None else str(moving["to"]),
            moving_until=float(moving.get("until", 0.0)),
        )


def queue_timeout(lifespan_secs: str | int | None) -> int:
    """The idle timeout a shard applies to a queue created with this ``lifespan_secs``."""
    try:
        lifespan = int(lifespan_secs or 0)
    except ValueError:
        return DEFAULT_QUEUE_TIMEOUT
    if lifespan <= 0:
        return DEFAULT_QUEUE_TIMEOUT
    return min(lifespan, MAX_QUEUE_TIMEOUT)


def shard_in_use_message(name: str, counts: dict[str, int]) -> str:
    """One line: what still names a shard that cannot be removed."""
    parts = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    return f"shard {name!r} is still in use: {parts}"


def check_shard_args(name: str, url: str, weight: int) -> None:
    """The checks every authority applies before registering a shard."""
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise KansasError(f"bad shard name {name!r}: use letters, digits, '-', '_' and '.'")
    parse_shard_url(url)
    if weight < 0:
        raise KansasError(f"bad weight {weight}: must be >= 0")


@dataclass(frozen=True, slots=True)
class Move:
    """A move of a realm (``user_id`` None) or of one user to ``to_shard``: a row of
    ``kansas_moves``. ``invalidated`` is the progress last reported."""

    id: int
    realm: str
    user_id: int | None
    to_shard: str
    reload_rate: float
    state: str = "running"
    invalidated: int = 0
