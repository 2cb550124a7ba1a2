"""Errors kansas raises, and the Zulip-shaped JSON error bodies it answers with."""

from __future__ import annotations

import json


class KansasError(Exception):
    """Base of kansas's own errors; the message is one line, fit for a user."""


class ConfigError(KansasError):
    """A bad argument, URL, DSN or setting."""


class SchemaError(KansasError):
    """The PostgreSQL schema is missing or older than this kansas."""


class UnknownShard(KansasError):
    """A name that is not a registered shard."""


def zulip_error_body(msg: str, code: str = "BAD_REQUEST", **extra: str) -> bytes:
    """The JSON body Zulip uses for errors: ``{"result":"error","msg":…,"code":…}``."""
    body: dict[str, str] = {"result": "error", "msg": msg, "code": code}
    body.update(extra)
    return json.dumps(body, separators=(",", ":")).encode()


def bad_queue_body(queue_id: str) -> bytes:
    """Zulip's exact BAD_EVENT_QUEUE_ID body: clients reload (web) or re-register (API)."""
    return zulip_error_body(
        f"Bad event queue ID: {queue_id}", "BAD_EVENT_QUEUE_ID", queue_id=queue_id
    )
