"""Complete responses kansas writes itself: Zulip-shaped JSON, never a traceback."""

from __future__ import annotations

from http import HTTPStatus

from kansas.errors import bad_queue_body, zulip_error_body

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


def json_response(
    status: int,
    body: bytes,
    keep_alive: bool = True,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    head = [
        status_line(status),
        b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
    ]
    head += [name + b": " + value + b"\r\n" for name, value in extra]
    head.append(b"\r\n" if keep_alive else b"Connection: close\r\n\r\n")
    return b"".join(head) + body


def error_response(
    status: int,
    msg: str,
    code: str = "BAD_REQUEST",
    keep_alive: bool = True,
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    return json_response(status, zulip_error_body(msg, code), keep_alive, extra)


def bad_queue_response(queue_id: str, keep_alive: bool = True) -> bytes:
    return json_response(400, bad_queue_body(queue_id), keep_alive)
