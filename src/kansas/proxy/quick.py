"""The common exchange in a few C-speed passes: a Zulip poll and its shard's JSON answer.

Nearly every request on the public listener has one shape: ``GET /json/events?...``
(or ``/api/v1/events``, or a DELETE without a body) over HTTP/1.1 with ordinary header
lines, in one read; and nearly every answer too: HTTP/1.1, a JSON body of known length,
all of it in one read. For that shape a handful of regular-expression passes replace
the general parser's per-header Python loop, and the header block goes on to the other
side as it came, minus the lines a proxy must drop, instead of being cut into pairs and
joined again.

Everything here is a pure function that either gives exactly what the general path
(``kansas.http.wire`` with ``upstream_head``/``downstream_headers``) would give for the
same bytes, or None when the bytes are anything else, or anything odd: then the general
path handles them as if this module did not exist. ``tests/test_quick.py`` checks that
equivalence on generated traffic.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from kansas.http.wire import MAX_HEADERS, valid_host
from kansas.proxy.forwarding import is_ip_address

_VALUE_END = rb"[\x21-\x7e\x80-\xff]"
#: A header line in the form everyone sends: ``Name: value``, one space after the colon
#: and no whitespace at the end, so the general parser would write it back unchanged.
_LINE = (
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+: (?:" + _VALUE_END + rb"(?:[\t\x20-\x7e\x80-\xff]*"
    + _VALUE_END + rb")?)?\r\n"
)  # fmt: skip
_REQUEST = re.compile(
    rb"(GET|DELETE) ((/json/events|/api/v1/events)(?:\?([\x21-\x7e]*))?) HTTP/1\.1\r\n"
    rb"((?:" + _LINE + rb")*)\r\n"
)
_RESPONSE = re.compile(
    rb"HTTP/1\.1 ([2-5][0-9][0-9]) [\t\x20-\x7e\x80-\xff]*\r\n((?:" + _LINE + rb")*)\r\n"
)
# The header passes below run over the block with a CRLF put in front, so that every
# line starts with one: a literal the regex engine finds fast, where a multi-line "^"
# is tried at every byte.
#: Request headers the quick path must look at: those kansas reads, replaces or drops,
#: and those that send the request down the general path (a body, Expect, or a header
#: named like a ``Connection`` token, which that header would have dropped).
_REQUEST_SPECIAL = re.compile(
    rb"\r\n(?i:(host|x-real-ip|x-forwarded-for|x-request-id|connection|keep-alive|close|"
    rb"proxy-connection|te|trailer|transfer-encoding|upgrade|proxy-authenticate|"
    rb"proxy-authorization|content-length|expect)): ([^\r]*)"
)
#: The lines of those a shard never sees (all but Host), without their CRLF.
_REQUEST_DROPPED = re.compile(
    rb"\r\n(?i:x-real-ip|x-forwarded-for|x-request-id|connection|keep-alive|proxy-connection|"
    rb"te|trailer|upgrade|proxy-authenticate|proxy-authorization): [^\r]*(?=\r\n)"
)
#: Response headers the quick path looks at, in a lower-cased block (it needs only
#: lower-cased values: a length, a media type, Connection tokens), and those that send
#: the answer down the general path.
_RESPONSE_SPECIAL = re.compile(
    rb"\r\n(content-length|content-type|transfer-encoding|connection|keep-alive|close|"
    rb"proxy-connection|te|trailer|upgrade|proxy-authenticate|proxy-authorization|"
    rb"x-request-id|x-accel-redirect): ([^\r]*)"
)
#: The lines of a shard's answer a client never sees, without their CRLF.
_RESPONSE_DROPPED = re.compile(
    rb"\r\n(?i:connection|keep-alive|proxy-connection|te|trailer|upgrade|proxy-authenticate|"
    rb"proxy-authorization|x-request-id): [^\r]*(?=\r\n)"
)
#: The only ``Connection`` tokens the quick path takes: anything else names a header
#: to drop, which the general path does.
_PLAIN_TOKENS = frozenset({b"keep-alive", b"close", b""})
#: The query arguments the router reads (the quick path only sees queries with nothing
#: percent- or plus-encoded, so names and values are literal).
_ARGUMENTS = re.compile(rb"&(queue_id|last_event_id)=([^&]*)")  # over "&" + query


class QuickRequest(NamedTuple):
    method: bytes
    target: bytes
    path: bytes
    query: bytes
    host: bytes  # the last Host header's value
    keep_alive: bool
    headers: bytes  # the header lines for the shard: dropped and replaced ones removed
    forwarded_for: bytes  # the last X-Forwarded-For, or b""
    real_ips: tuple[bytes, ...]  # the X-Real-Ip values, in order
    request_id: bytes | None  # the last X-Request-Id


def quick_request(data: bytes) -> QuickRequest | None:
    """``data`` as one whole bodiless GET or DELETE on an event path, or None.

    The caller checks that ``data`` is everything buffered and within the head limit.
    """
    m = _REQUEST.fullmatch(data)
    if m is None:
        return None
    method, target, path, query, block = m.groups()
    if block.count(b"\n") > MAX_HEADERS:
        return None
    host = forwarded_for = connection = None
    request_id = None
    real_ips: list[bytes] = []
    dropped = False
    for name, value in _REQUEST_SPECIAL.findall(b"\r\n" + block):
        lname = name.lower()
        if lname == b"host":
            if host is not None:
                return None  # two Host lines: the general parser's 400
            host = value
            continue
        dropped = True
        if lname == b"x-forwarded-for":
            forwarded_for = value
        elif lname == b"x-real-ip":
            real_ips.append(value)
        elif lname == b"x-request-id":
            request_id = value
        elif lname == b"connection":
            if connection is not None:
                return None  # a list over several lines: the general path combines them
            connection = value
        elif lname in (b"content-length", b"transfer-encoding", b"expect", b"close"):
            return None
    if host is None or not valid_host(host):
        return None
    keep_alive = True
    if connection is not None and connection != b"keep-alive":
        tokens = {t.strip().lower() for t in connection.split(b",")}
        if not tokens <= _PLAIN_TOKENS:
            return None
        keep_alive = b"close" not in tokens
    if dropped:
        block = _REQUEST_DROPPED.sub(b"", b"\r\n" + block)[2:]
    return QuickRequest(method, target, path, query or b"", host, keep_alive, block,
                        forwarded_for or b"", tuple(real_ips), request_id)  # fmt: skip


def quick_upstream_head(
    request: QuickRequest, peer: str, trust_real_ip: bool, request_id: bytes
) -> bytes:
    """What ``upstream_head`` makes of the same request."""
    peer_bytes = peer.encode()
    real_ip = peer_bytes
    if trust_real_ip:
        for value in request.real_ips:
            if is_ip_address(value):
                real_ip = value
    forwarded_for = request.forwarded_for
    chain = forwarded_for + b", " + peer_bytes if forwarded_for else peer_bytes
    rid = b"X-Request-Id: %s\r\n" % request_id if request_id else b""
    return b"%s %s HTTP/1.1\r\n%sX-Forwarded-For: %s\r\nX-Real-Ip: %s\r\n%s\r\n" % (
        request.method,
        request.target,
        request.headers,
        chain,
        real_ip,
        rid,
    )


def quick_arguments(query: bytes) -> dict[bytes, bytes] | None:
    """``queue_id`` and ``last_event_id`` as ``_params`` reads them, or None when the
    query has anything encoded in it."""
    if b"%" in query or b"+" in query:
        return None
    return dict(_ARGUMENTS.findall(b"&" + query))


class QuickResponse(NamedTuple):
    status: int
    headers: bytes  # the header lines for the client: hop-by-hop ones removed
    body: bytes
    reusable: bool  # the shard keeps the connection open


def quick_response(data: bytes) -> QuickResponse | None:
    """``data`` as one whole HTTP/1.1 JSON answer with a Content-Length (nothing after
    it), or None. Not for the answer to a HEAD request."""
    m = _RESPONSE.match(data)
    if m is None:
        return None
    status_bytes, block = m.groups()
    status = int(status_bytes)
    if status == 204 or status == 304 or block.count(b"\n") > MAX_HEADERS:
        return None
    length = content_type = connection = None
    dropped = False
    for lname, value in _RESPONSE_SPECIAL.findall(b"\r\n" + block.lower()):
        if lname == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 18:
                return None
            length = int(value)
        elif lname == b"content-type":
            if content_type is None:
                content_type = value
        elif lname == b"connection":
            if connection is not None:
                return None  # a list over several lines: the general path combines them
            connection = value
            dropped = True
        elif lname in (b"transfer-encoding", b"close", b"x-accel-redirect"):
            return None  # a redirect is followed, never relayed (the general path)
        else:
            dropped = True
    if length is None or content_type is None or b"json" not in content_type:
        return None
    head_end = m.end()
    if len(data) != head_end + length:
        return None
    reusable = True
    if connection is not None and connection != b"keep-alive":
        tokens = {t.strip() for t in connection.split(b",")}
        if not tokens <= _PLAIN_TOKENS:
            return None
        reusable = b"close" not in tokens
    if dropped:
        block = _RESPONSE_DROPPED.sub(b"", b"\r\n" + block)[2:]
    return QuickResponse(status, block, data[head_end:], reusable)
