"""kansas.zulip against stand-in Zulip modules (tests/zulip_standin: Zulip's names and
parameters, written from the facts, no Zulip code): what it patches, where, what the
patched Zulip then does, and that it refuses a Zulip it does not recognise."""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
import types
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from kansas.model import Shard
from kansas.zulip import patching
from kansas.zulip.patching import Settings, install, report

STANDIN = Path(__file__).parent / "zulip_standin"
INTERNAL = "http://127.0.0.1:9798"
ON = Settings(INTERNAL, "host=127.0.0.1 dbname=kansas", None)
MODULES = [
    "zerver.tornado.sharding",
    "zerver.tornado.descriptors",
    "zerver.tornado.django_api",
    "zerver.tornado.views",
    "zerver.lib.events",
    "zerver.actions.messages",
    "zerver.actions.aliased",
]
A = Shard("tornado-9800", "http://127.0.0.1:9800")
B = Shard("tornado-9801", "http://127.0.0.1:9801")
C = Shard("tornado-9802", "http://127.0.0.1:9802")


class Realm:
    def __init__(self, host: str) -> None:
        self.host = host


class User:
    def __init__(self, user_id: int, host: str) -> None:
        self.id = user_id
        self.realm = Realm(host)


class FakePlacement:
    """kansas's rules for the tests: user 7 moved to C; user 9 has an older queue on A."""

    def users_by_shard(self, realm_host: str, users: Iterable[Any]) -> Mapping[Any, list[Any]]:
        grouped: dict[Shard, list[Any]] = {}
        for user in users:
            uid = user if isinstance(user, int) else user["id"]
            shards = [C] if uid == 7 else [B, A] if uid == 9 else [A]
            for shard in shards:
                grouped.setdefault(shard, []).append(user)
        return grouped


def _drop_zerver() -> None:
    for name in [n for n in sys.modules if n == "zerver" or n.startswith("zerver.")]:
        del sys.modules[name]


@pytest.fixture
def zulip(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, types.ModuleType]]:
    """Fresh stand-in modules, imported as Zulip's would be before the app's ready()."""
    patching.uninstall()
    _drop_zerver()
    monkeypatch.syspath_prepend(str(STANDIN))
    yield {name: importlib.import_module(name) for name in MODULES}
    patching.uninstall()
    _drop_zerver()


def snapshot(modules: dict[str, types.ModuleType]) -> dict[str, dict[str, int]]:
    return {name: {k: id(v) for k, v in vars(m).items()} for name, m in modules.items()}


def test_importable_without_django() -> None:
    code = (
        "import sys; sys.modules['django'] = None\n"
        "import kansas.zulip, kansas.zulip.patching\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_unset_internal_url_leaves_zulip_untouched(zulip: dict[str, types.ModuleType]) -> None:
    before = snapshot(zulip)
    assert install(Settings(None, "dsn", None), lambda: FakePlacement()) is None
    assert snapshot(zulip) == before
    api = zulip["zerver.tornado.django_api"]
    zulip["zerver.lib.events"].do_events_register(User(6, "split.example.com"))
    assert [url for url, _form, _h in api.posted] == [
        "http://127.0.0.1:9800/api/v1/events/internal"
    ] * 2


def test_every_reference_replaced_and_only_those(zulip: dict[str, types.ModuleType]) -> None:
    api = zulip["zerver.tornado.django_api"]
    original = api.send_event
    unrelated = zulip["zerver.actions.aliased"].send_event
    done = install(ON, lambda: FakePlacement())
    assert done is not None
    replaced = {(c.module.__name__, c.attr) for c in done.changes}
    assert replaced == {
        ("zerver.tornado.django_api", "send_event"),
        ("zerver.tornado.django_api", "request_event_queue"),
        ("zerver.tornado.django_api", "get_user_events"),
        ("zerver.tornado.django_api", "requests_client"),
        ("zerver.tornado.views", "get_user_tornado_port"),
        ("zerver.actions.messages", "send_event"),
        ("zerver.actions.aliased", "notify_clients"),
        ("zerver.lib.events", "request_event_queue"),
        ("zerver.lib.events", "get_user_events"),
    }
    assert api.send_event is not original
    assert zulip["zerver.actions.messages"].send_event is api.send_event
    assert zulip["zerver.actions.aliased"].notify_clients is api.send_event
    assert zulip["zerver.actions.aliased"].send_event is unrelated  # same name, not Zulip's
    # The sharding module's own get_user_tornado_port is Zulip's (Django asks it).
    assert zulip["zerver.tornado.sharding"].get_user_tornado_port.__module__ == (
        "zerver.tornado.sharding"
    )
    # Installing twice patches nothing more.
    assert install(ON, lambda: FakePlacement()) is done
    patching.uninstall()
    assert api.send_event is original
    assert zulip["zerver.actions.aliased"].notify_clients is original


def test_events_go_to_the_shards_placement_names(zulip: dict[str, types.ModuleType]) -> None:
    api = zulip["zerver.tornado.django_api"]
    install(ON, lambda: FakePlacement())
    realm = Realm("split.example.com")
    zulip["zerver.actions.messages"].do_send(realm, [6, {"id": 7, "flags": []}, 9])
    assert api.published == [
        ("notify_tornado_port_9800", {"event": {"type": "message"}, "users": [6, 9]}),
        (
            "notify_tornado_port_9802",
            {"event": {"type": "message"}, "users": [{"id": 7, "flags": []}]},
        ),
        ("notify_tornado_port_9801", {"event": {"type": "message"}, "users": [9]}),
    ]
    api.published.clear()
    zulip["zerver.actions.messages"].do_send_on_commit(realm, iter([7]))  # a generator too
    zulip["zerver.actions.aliased"].do_alias(realm, [7])
    assert api.published == [
        ("notify_tornado_port_9802", {"event": {"type": "message"}, "users": [7]}),
        ("notify_tornado_port_9802", {"event": {"type": "alias"}, "users": [7]}),
    ]


def test_register_goes_to_kansas_with_the_realm_host(zulip: dict[str, types.ModuleType]) -> None:
    api = zulip["zerver.tornado.django_api"]
    install(ON, lambda: FakePlacement())
    queue_id, events = zulip["zerver.lib.events"].do_events_register(User(7, "split.example.com"))
    assert (queue_id, events) == ("q-1", [])
    (create_url, form, headers), (fetch_url, fetch, fetch_headers) = api.posted
    assert create_url == fetch_url == f"{INTERNAL}/api/v1/events/internal"
    assert headers == fetch_headers == {"Host": "split.example.com"}
    assert form == {  # Zulip's own form, untouched
        "user_profile_id": 7,
        "user_client": "website",
        "apply_markdown": True,
        "lifespan_secs": 600,
    }
    assert fetch == {"queue_id": "q-1", "last_event_id": -1, "user_profile_id": 7}
    # Outside those two calls the session talks to Tornado ports, as before.
    api.posted.clear()
    api.send_notification_http(9801, {"data": "{}"})
    assert api.posted == [("http://127.0.0.1:9801/api/internal/notify_tornado", {"data": "{}"}, {})]


def test_tornado_serves_what_kansas_routed(zulip: dict[str, types.ModuleType]) -> None:
    views = zulip["zerver.tornado.views"]
    descriptors = zulip["zerver.tornado.descriptors"]
    api = zulip["zerver.tornado.django_api"]
    alice = User(6, "split.example.com")  # sharding.json: 9800
    views.users[6] = alice
    install(ON, lambda: FakePlacement())
    # In Django (no current port) the views behave as Zulip's.
    assert views.get_events("/api/v1/events?q", alice) == (
        "X-Accel-Redirect: /internal/tornado/9800/api/v1/events?q"
    )
    # In the Tornado process on 9801, kansas's requests are served there.
    descriptors.current_port = 9801
    assert views.get_events("/api/v1/events?q", alice) == "served"
    assert views.cleanup_event_queue("/api/v1/events", alice, "q-1") == "deleted"
    assert views.get_events_internal("/api/v1/events/internal", 6) == "created"
    assert api.published == []


def _break_missing(z: dict[str, types.ModuleType]) -> str:
    del z["zerver.tornado.views"].get_events_internal
    return "zerver.tornado.views.get_events_internal not found"


def _break_signature(z: dict[str, types.ModuleType]) -> str:
    def send_event(realm: Any, event: Any, user_ids: Any) -> None: ...

    z["zerver.tornado.django_api"].send_event = send_event
    z["zerver.actions.messages"].send_event = send_event
    return "zerver.tornado.django_api.send_event takes (realm, event, user_ids)"


def _break_uses(z: dict[str, types.ModuleType]) -> str:
    def request_event_queue(user_profile: Any, user_client: Any) -> str:
        return "built its own session"

    z["zerver.tornado.django_api"].request_event_queue = request_event_queue
    return "request_event_queue no longer uses requests_client"


def _break_port(z: dict[str, types.ModuleType]) -> str:
    del z["zerver.tornado.descriptors"].current_port
    return "zerver.tornado.descriptors.current_port not found"


def _break_module(z: dict[str, types.ModuleType]) -> str:
    sys.modules["zerver.tornado.views"] = None  # type: ignore[assignment]
    return "cannot import zerver.tornado.views"


@pytest.mark.parametrize(
    "breaks", [_break_missing, _break_signature, _break_uses, _break_port, _break_module]
)
def test_refuses_an_unknown_zulip_and_changes_nothing(
    zulip: dict[str, types.ModuleType], breaks: Any, caplog: pytest.LogCaptureFixture
) -> None:
    expected = breaks(zulip)
    before = snapshot(zulip)
    with caplog.at_level(logging.INFO, logger="kansas.zulip"):
        assert install(ON, lambda: FakePlacement()) is None
    assert snapshot(zulip) == before
    assert patching.applied() is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    line = errors[0].getMessage()
    assert "NOT patching Zulip" in line and expected in line and "\n" not in line
    # check says the same, and that the app will refuse.
    lines = list(report(ON))
    assert any(line.startswith("MISSING") and expected in line for line in lines), lines
    assert "REFUSE" in lines[-1]


def test_refuses_without_postgres(
    zulip: dict[str, types.ModuleType], caplog: pytest.LogCaptureFixture
) -> None:
    before = snapshot(zulip)
    assert install(Settings(INTERNAL, None, None), lambda: FakePlacement()) is None
    assert snapshot(zulip) == before
    assert "KANSAS_POSTGRES is not" in caplog.text


def test_a_failed_apply_puts_everything_back(zulip: dict[str, types.ModuleType]) -> None:
    api = zulip["zerver.tornado.django_api"]
    before = snapshot(zulip)
    changes = patching.plan(ON, patching.PlacementHandle(lambda: FakePlacement()))
    # Something else replaced a reference between planning and applying.
    last = changes[-1]
    setattr(last.module, last.attr, lambda *a: None)
    with pytest.raises(patching.Refused, match="changed while patching"):
        patching.apply(changes)
    setattr(last.module, last.attr, last.old)
    assert snapshot(zulip) == before
    assert api.send_event.__module__ == "zerver.tornado.django_api"


def test_unreadable_rules_fall_back_to_zulips_grouping(
    zulip: dict[str, types.ModuleType], caplog: pytest.LogCaptureFixture
) -> None:
    api = zulip["zerver.tornado.django_api"]
    calls = []

    def broken() -> FakePlacement:
        calls.append(1)
        raise RuntimeError("cannot reach PostgreSQL")

    install(ON, broken)
    realm = Realm("split.example.com")
    api.send_event(realm, {"type": "x"}, [6, 7])
    api.send_event(realm, {"type": "y"}, [6])
    assert [q for q, _e in api.published] == [
        "notify_tornado_port_9800",
        "notify_tornado_port_9801",
        "notify_tornado_port_9800",
    ]
    assert len(calls) == 1  # not retried at every event
    assert "cannot read kansas's rules (cannot reach PostgreSQL)" in caplog.text


def test_check_lists_every_piece(zulip: dict[str, types.ModuleType]) -> None:
    lines = list(report(ON))
    assert lines[-1] == f"the app will patch this Zulip: queues via {INTERNAL}"
    for name in ("send_event", "request_event_queue", "get_user_events", "get_events_internal"):
        assert any(line.startswith("found") and f".{name}:" in line for line in lines), name
    assert (
        "           also referenced by zerver.actions.aliased (as notify_clients): "
        in "\n".join(lines)
    )
    install(ON, lambda: FakePlacement())
    lines = list(report(ON))
    assert any(line.startswith("patched  zerver.tornado.django_api.send_event:") for line in lines)
    assert lines[-1].startswith("the app has patched this Zulip")
    off = list(report(Settings(None, None, None)))
    assert "roll-back" in off[-1]


def test_the_app_config(
    zulip: dict[str, types.ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    """apps.py with stand-ins for django.apps and django.conf."""
    django = types.ModuleType("django")
    django_apps = types.ModuleType("django.apps")
    django_conf = types.ModuleType("django.conf")

    class AppConfig:
        def __init__(self, app_name: str, app_module: Any) -> None:
            self.name = app_name

    django_apps.AppConfig = AppConfig  # type: ignore[attr-defined]
    django_conf.settings = types.SimpleNamespace(  # type: ignore[attr-defined]
        KANSAS_INTERNAL_URL=INTERNAL, KANSAS_POSTGRES="host=127.0.0.1 dbname=kansas"
    )
    for name, module in (
        ("django", django),
        ("django.apps", django_apps),
        ("django.conf", django_conf),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "kansas.zulip.apps", raising=False)
    apps = importlib.import_module("kansas.zulip.apps")
    config = apps.KansasZulipConfig("kansas.zulip", None)
    assert config.label == "kansas_zulip"
    config.ready()
    assert patching.applied() is not None
    assert hasattr(zulip["zerver.tornado.django_api"].send_event, patching.ORIGINAL)
    monkeypatch.delitem(sys.modules, "kansas.zulip.apps")


def test_check_without_django_says_so() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kansas.zulip", "check", "--zulip-dir", "/nonexistent"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    assert out.returncode == 2, out
    assert out.stderr.startswith("python -m kansas.zulip: cannot load Zulip's Django")
