"""What ``kansas.zulip`` changes in a running Zulip, found, checked and applied as a whole.

No Django here: the app (``apps.py``) hands in the settings, and tests hand in stand-in
modules. Every Zulip object is reached through ``sys.modules`` by the names of Zulip's
source; nothing of Zulip is imported at kansas's import time.

The plan, per Zulip name (module, function):

* ``zerver.tornado.django_api.send_event`` is replaced: users are grouped by
  ``kansas.placement`` (``users_by_shard``) and each group published with Zulip's own
  ``queue_json_publish`` to ``notify_tornado_queue_name(shard.port)``, with Zulip's
  ``send_notification_http`` as the fallback without RabbitMQ. Every module that did
  ``from zerver.tornado.django_api import send_event`` holds its own reference: each
  module attribute that *is* the original function gets the replacement.
* ``request_event_queue`` and ``get_user_events`` (``django_api``, and their references,
  e.g. in ``zerver.lib.events``) are wrapped: during the call, Zulip's own
  ``requests_client()`` (same module) hands out the same session, but every POST goes to
  ``KANSAS_INTERNAL_URL`` with the path Zulip built and ``Host: <realm host>``. Zulip
  builds the form; kansas adds nothing to it.
* ``zerver.tornado.views.get_user_tornado_port`` (the views' own reference, used by the
  three port checks in ``get_events``, ``cleanup_event_queue`` and
  ``get_events_internal``) answers, inside a Tornado process, that process's own port:
  kansas delivered the request to the process holding its queue, so it is served here,
  never redirected or re-published. Outside Tornado (Django, workers) it is Zulip's.

Recognition: each function must exist, take the parameters named below, and still use
the global names the plan relies on (read from its code object). If anything is
missing, nothing is patched (:class:`Refused`).
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol
from urllib.parse import urlsplit

log = logging.getLogger("kansas.zulip")

DJANGO_API = "zerver.tornado.django_api"
VIEWS = "zerver.tornado.views"
DESCRIPTORS = "zerver.tornado.descriptors"
EVENTS = "zerver.lib.events"
#: Modules imported before looking: the plan's own, and those known to hold references.
MODULES = (DJANGO_API, VIEWS, DESCRIPTORS, EVENTS)
#: The attribute a replacement carries, naming what it replaced.
ORIGINAL = "__kansas_original__"


@dataclass(frozen=True)
class Target:
    """One Zulip function the plan touches, and how it is recognised."""

    module: str
    name: str
    #: Its leading parameters, by name, in order.
    params: tuple[str, ...]
    #: Global names its code must still use (the plan depends on them).
    uses: tuple[str, ...] = ()
    #: Whether references to it in other modules are replaced too.
    everywhere: bool = True
    why: str = ""

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


TARGETS: tuple[Target, ...] = (
    Target(
        DJANGO_API,
        "send_event",
        ("realm", "event", "users"),
        ("queue_json_publish", "notify_tornado_queue_name", "send_notification_http"),
        why="events published to the shards kansas.placement names",
    ),
    Target(
        DJANGO_API,
        "request_event_queue",
        ("user_profile",),
        ("requests_client",),
        why="queue creation POSTed to KANSAS_INTERNAL_URL with the realm's Host",
    ),
    Target(
        DJANGO_API,
        "get_user_events",
        ("user_profile", "queue_id", "last_event_id"),
        ("requests_client",),
        why="the immediate fetch POSTed to KANSAS_INTERNAL_URL with the realm's Host",
    ),
    Target(
        DJANGO_API,
        "requests_client",
        (),
        everywhere=False,
        why="(during the two calls above) sends to kansas instead of a Tornado port",
    ),
    Target(
        DJANGO_API,
        "queue_json_publish",
        ("queue_name", "event", "processor"),
        everywhere=False,
        why="used as it is, by the new send_event",
    ),
    Target(
        DJANGO_API,
        "notify_tornado_queue_name",
        ("port",),
        everywhere=False,
        why="used as it is, by the new send_event",
    ),
    Target(
        DJANGO_API,
        "send_notification_http",
        ("port", "data"),
        everywhere=False,
        why="used as it is, by the new send_event",
    ),
    Target(
        VIEWS,
        "get_user_tornado_port",
        ("user",),
        everywhere=False,
        why="in Tornado: the process's own port, so kansas's requests are served here",
    ),
    Target(
        VIEWS,
        "get_events",
        ("request", "user_profile"),
        ("get_user_tornado_port", "is_current_port"),
        everywhere=False,
        why="its port check (no X-Accel-Redirect), via get_user_tornado_port",
    ),
    Target(
        VIEWS,
        "cleanup_event_queue",
        ("request", "user_profile"),
        ("get_user_tornado_port", "is_current_port"),
        everywhere=False,
        why="its port check (deletes here, no cleanup_queue re-publish)",
    ),
    Target(
        VIEWS,
        "get_events_internal",
        ("request", "user_profile_id"),
        ("get_user_tornado_port", "is_current_port"),
        everywhere=False,
        why="its port check (no assertion failure for a queue kansas placed)",
    ),
)

#: Checked, not patched: ``is_current_port`` compares with this module's ``current_port``.
CURRENT_PORT = Target(
    DESCRIPTORS,
    "is_current_port",
    ("port",),
    everywhere=False,
    why="the port check itself (compares with current_port)",
)
#: What is replaced (the rest of TARGETS is checked and used).
REPLACED = ("send_event", "request_event_queue", "get_user_events", "requests_client")


class PlacementLike(Protocol):
    """What the new ``send_event`` needs of ``kansas.placement.Placement``."""

    def users_by_shard(self, realm_host: str, users: Iterable[Any]) -> Mapping[Any, list[Any]]:
        """``{shard (with .port): [users as given]}``."""


@dataclass(frozen=True)
class Settings:
    internal_url: str | None
    postgres: str | None
    redis: str | None

    @classmethod
    def from_django(cls, settings: Any) -> Settings:
        def get(name: str) -> str | None:
            value = getattr(settings, name, None)
            return str(value) if value else None

        return cls(get("KANSAS_INTERNAL_URL"), get("KANSAS_POSTGRES"), get("KANSAS_REDIS"))


class Refused(Exception):
    """Zulip is not what the plan expects; nothing was patched. One line."""


@dataclass
class Finding:
    target: Target
    problem: str | None = None
    #: (module name, attribute) of every reference to the original outside its module.
    references: list[tuple[str, str]] = field(default_factory=list)
    patched: bool = False


def _original(obj: Any) -> Any:
    return getattr(obj, ORIGINAL, obj)


def _import(name: str) -> ModuleType | str:
    try:
        return importlib.import_module(name)
    except Exception as e:  # any import failure means "not the Zulip we know"
        first = (str(e).splitlines() or [""])[0]
        return f"cannot import {name} ({type(e).__name__}: {first})"


def _recognise(target: Target, module: ModuleType) -> str | None:
    """None if the function is as expected, else what is wrong (a few words)."""
    if not hasattr(module, target.name):
        return f"{target.qualname} not found"
    obj = _original(getattr(module, target.name))
    code = getattr(inspect.unwrap(obj), "__code__", None)
    if not callable(obj) or code is None:
        return f"{target.qualname} is not a Python function"
    try:
        params = list(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return f"{target.qualname} has no signature"
    if tuple(params[: len(target.params)]) != target.params:
        return (
            f"{target.qualname} takes ({', '.join(params)}), "
            f"expected ({', '.join(target.params)}, ...)"
        )
    missing = [name for name in target.uses if name not in code.co_names]
    if missing:
        return f"{target.qualname} no longer uses {', '.join(missing)}"
    return None


def find() -> list[Finding]:
    """Look for every piece of the plan in the running Zulip (importing its modules)."""
    loaded: dict[str, ModuleType | str] = {name: _import(name) for name in MODULES}
    findings = []
    for target in (*TARGETS, CURRENT_PORT):
        finding = Finding(target)
        module = loaded[target.module]
        if isinstance(module, str):
            finding.problem = module
        else:
            finding.problem = _recognise(target, module)
            current = getattr(module, target.name, None)
            finding.patched = current is not None and hasattr(current, ORIGINAL)
            if finding.problem is None and target.everywhere:
                finding.references = _references(target, current)
        if finding.problem is None and target is CURRENT_PORT:
            assert not isinstance(module, str)
            if not hasattr(module, "current_port"):
                finding.problem = f"{DESCRIPTORS}.current_port not found"
        findings.append(finding)
    return findings


def _references(target: Target, current: Any) -> list[tuple[str, str]]:
    """Attributes of other modules that are the function (original or replacement)."""
    original = _original(current)
    found = []
    for name, module in list(sys.modules.items()):
        if name == target.module or module is None:
            continue
        try:
            attrs = list(vars(module).items())
        except TypeError:
            continue
        for attr, value in attrs:
            if value is current or value is original:
                found.append((name, attr))
    return found


# -- the replacements ------------------------------------------------------------------
_realm_host: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kansas_zulip_realm_host", default=None
)


class ViaKansas:
    """Zulip's Tornado session, with every POST sent to kansas as the realm's host."""

    def __init__(self, session: Any, internal_url: str, host: str) -> None:
        self._session = session
        self._base = internal_url.rstrip("/")
        self._host = host

    def post(self, url: str, *args: Any, **kwargs: Any) -> Any:
        parts = urlsplit(url)
        target = self._base + parts.path + (f"?{parts.query}" if parts.query else "")
        headers = dict(kwargs.pop("headers", None) or {})
        headers["Host"] = self._host
        return self._session.post(target, *args, headers=headers, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class PlacementHandle:
    """The process's placement, started on first use; after a failure, Zulip's own
    grouping is used for ``retry_seconds`` before trying again."""

    def __init__(self, factory: Callable[[], PlacementLike], retry_seconds: float = 10.0) -> None:
        self._factory = factory
        self._retry = retry_seconds
        self._failed_until = 0.0
        self._lock = threading.Lock()

    def get(self) -> PlacementLike | None:
        if time.monotonic() < self._failed_until:
            return None
        try:
            return self._factory()
        except Exception as e:
            with self._lock:
                self._failed_until = time.monotonic() + self._retry
            log.error(
                "kansas.zulip: cannot read kansas's rules (%s); events go to the ports "
                "sharding.json names for the next %.0f s",
                str(e).splitlines()[0] if str(e) else type(e).__name__,
                self._retry,
            )
            return None


def _mark(new: Callable[..., Any], old: Any) -> Callable[..., Any]:
    functools.update_wrapper(new, old)
    setattr(new, ORIGINAL, old)
    return new


def make_replacements(
    modules: Mapping[str, ModuleType], settings: Settings, placement: PlacementHandle
) -> dict[tuple[str, str], Callable[..., Any]]:
    """``{(module, name): replacement}`` for the names in ``REPLACED`` and the views."""
    api = modules[DJANGO_API]
    views = modules[VIEWS]
    descriptors = modules[DESCRIPTORS]
    internal_url = settings.internal_url
    assert internal_url
    old_send_event = api.send_event
    old_request_event_queue = api.request_event_queue
    old_get_user_events = api.get_user_events
    old_requests_client = api.requests_client
    old_views_port = views.get_user_tornado_port

    def send_event(realm: Any, event: Any, users: Any, *args: Any, **kwargs: Any) -> None:
        users = list(users)
        found = placement.get()
        if found is None:
            return old_send_event(realm, event, users, *args, **kwargs)  # type: ignore[no-any-return]
        for shard, shard_users in found.users_by_shard(realm.host, users).items():
            port = shard.port
            api.queue_json_publish(
                api.notify_tornado_queue_name(port),
                {"event": event, "users": shard_users},
                functools.partial(api.send_notification_http, port),
            )
        return None

    def request_event_queue(user_profile: Any, *args: Any, **kwargs: Any) -> Any:
        token = _realm_host.set(user_profile.realm.host)
        try:
            return old_request_event_queue(user_profile, *args, **kwargs)
        finally:
            _realm_host.reset(token)

    def get_user_events(user_profile: Any, *args: Any, **kwargs: Any) -> Any:
        token = _realm_host.set(user_profile.realm.host)
        try:
            return old_get_user_events(user_profile, *args, **kwargs)
        finally:
            _realm_host.reset(token)

    def requests_client(*args: Any, **kwargs: Any) -> Any:
        session = old_requests_client(*args, **kwargs)
        host = _realm_host.get()
        return session if host is None else ViaKansas(session, internal_url, host)

    def get_user_tornado_port(user: Any, *args: Any, **kwargs: Any) -> Any:
        port = getattr(descriptors, "current_port", None)
        if port is None:  # not a Tornado process: Zulip's answer
            return old_views_port(user, *args, **kwargs)
        return port

    return {
        (DJANGO_API, "send_event"): _mark(send_event, old_send_event),
        (DJANGO_API, "request_event_queue"): _mark(request_event_queue, old_request_event_queue),
        (DJANGO_API, "get_user_events"): _mark(get_user_events, old_get_user_events),
        (DJANGO_API, "requests_client"): _mark(requests_client, old_requests_client),
        (VIEWS, "get_user_tornado_port"): _mark(get_user_tornado_port, old_views_port),
    }


# -- applying ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    module: ModuleType
    attr: str
    old: Any
    new: Any

    def describe(self) -> str:
        return f"{self.module.__name__}.{self.attr}"


@dataclass
class Applied:
    changes: list[Change]

    def revert(self) -> None:
        for change in reversed(self.changes):
            if vars(change.module).get(change.attr) is change.new:
                setattr(change.module, change.attr, change.old)

    def summary(self) -> str:
        by_name: dict[str, list[str]] = {}
        for change in self.changes:
            by_name.setdefault(change.old.__name__, []).append(change.module.__name__)
        return "; ".join(
            f"{name} in {len(mods)} module(s)" for name, mods in sorted(by_name.items())
        )


_applied: Applied | None = None
_applied_lock = threading.Lock()


def applied() -> Applied | None:
    """What this process patched (None: nothing)."""
    return _applied


def problems(findings: list[Finding]) -> list[str]:
    return list(dict.fromkeys(f.problem for f in findings if f.problem is not None))


def plan(settings: Settings, placement: PlacementHandle) -> list[Change]:
    """Every attribute to replace, or Refused naming what was not found."""
    if not settings.internal_url:
        raise Refused("KANSAS_INTERNAL_URL is not set")
    if not settings.postgres:
        raise Refused("KANSAS_INTERNAL_URL is set but KANSAS_POSTGRES is not")
    findings = find()
    wrong = problems(findings)
    if wrong:
        raise Refused("; ".join(wrong))
    table = sys.modules
    zulip = {name: table[name] for name in MODULES}
    if any(hasattr(getattr(zulip[DJANGO_API], name), ORIGINAL) for name in REPLACED):
        raise Refused("Zulip is already patched in this process")
    replacements = make_replacements(zulip, settings, placement)
    changes: list[Change] = []
    by_target = {(f.target.module, f.target.name): f for f in findings}
    for (module_name, name), new in replacements.items():
        module = zulip[module_name]
        old = getattr(module, name)
        changes.append(Change(module, name, old, new))
        for ref_module, attr in by_target[(module_name, name)].references:
            holder = table[ref_module]
            if vars(holder).get(attr) is old:
                changes.append(Change(holder, attr, old, new))
    return changes


def apply(changes: list[Change]) -> Applied:
    """Replace them all, or (on any error) none."""
    done = Applied([])
    try:
        for change in changes:
            if vars(change.module).get(change.attr) is not change.old:
                raise Refused(f"{change.describe()} changed while patching")
            setattr(change.module, change.attr, change.new)
            done.changes.append(change)
    except BaseException:
        done.revert()
        raise
    return done


def install(
    settings: Settings,
    placement_factory: Callable[[], PlacementLike] | None = None,
) -> Applied | None:
    """Make this process's Zulip follow kansas, or leave it exactly as it is.

    Returns what was patched; None when switched off (no ``KANSAS_INTERNAL_URL``) or
    refused (one ERROR line on ``kansas.zulip`` says what was not found)."""
    global _applied
    if not settings.internal_url:
        log.info("kansas.zulip: KANSAS_INTERNAL_URL is not set; Zulip is left as it is")
        return None
    with _applied_lock:
        if _applied is not None:
            return _applied
        factory = placement_factory or _default_placement(settings)
        try:
            changes = plan(settings, PlacementHandle(factory))
            done = apply(changes)
        except Refused as e:
            log.error(
                "kansas.zulip: NOT patching Zulip, this is not a Zulip it recognises: %s. "
                "Zulip is left exactly as it was (kansas serves as a plain front).",
                e,
            )
            return None
        _applied = done
    log.info("kansas.zulip: Zulip follows kansas at %s: %s", settings.internal_url, done.summary())
    return done


def uninstall() -> None:
    """Put back everything ``install`` replaced (tests)."""
    global _applied
    with _applied_lock:
        if _applied is not None:
            _applied.revert()
            _applied = None


def _default_placement(settings: Settings) -> Callable[[], PlacementLike]:
    postgres, redis = settings.postgres, settings.redis
    assert postgres

    def factory() -> PlacementLike:
        from kansas.placement import get_placement

        return get_placement(postgres, redis_url=redis, application_name="kansas-zulip")

    return factory


def report(settings: Settings) -> Iterator[str]:
    """The lines of ``python -m kansas.zulip check``: per piece, found or not, and where."""
    findings = find()
    for finding in findings:
        target = finding.target
        state = "MISSING" if finding.problem else "patched" if finding.patched else "found"
        line = f"{state:<8} {target.qualname}: {target.why}"
        if finding.problem:
            line += f"  [{finding.problem}]"
        yield line
        for module, attr in finding.references:
            alias = "" if attr == target.name else f" (as {attr})"
            yield f"           also referenced by {module}{alias}: replaced there too"
    yield (
        "(references: in the modules loaded now; modules imported later take the replaced "
        "function from its own module)"
    )
    wrong = problems(findings)
    if not settings.internal_url:
        yield "KANSAS_INTERNAL_URL is not set: the app leaves Zulip as it is (roll-back state)"
    elif not settings.postgres:
        yield "KANSAS_POSTGRES is not set: the app will refuse"
    elif wrong:
        yield f"the app will REFUSE to patch this Zulip ({len(wrong)} problem(s) above)"
    elif any(f.patched for f in findings):
        yield f"the app has patched this Zulip (as loaded here): queues via {settings.internal_url}"
    else:
        yield f"the app will patch this Zulip: queues via {settings.internal_url}"
