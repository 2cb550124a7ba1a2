"""The quick path says exactly what the general path says, wherever it says anything.

``kansas.proxy.quick`` takes the common exchange in a few regex passes and falls back
to the general parser for everything else. These properties generate traffic around
the common shape (header case, spacing, hop-by-hop and forwarding headers, Connection
tokens, bodies, encoded queries, odd statuses and framings) and check, for every input
the quick path accepts, that its result is the general path's; and end to end, that a
FrontFactory with the quick path and one without answer alike and send alike.
"""

from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kansas.http.responses import status_line
from kansas.http.wire import Header, HttpError, RequestParser, ResponseParser, is_json
from kansas.observe.request_id import RequestIds
from kansas.proxy.forwarding import downstream_headers, upstream_head
from kansas.proxy.quick import quick_arguments, quick_request, quick_response, quick_upstream_head
from tests.test_proxy import Q1, Harness

EXAMPLES = int(os.environ.get("KANSAS_FUZZ_EXAMPLES", "400"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = [b"Host", b"host", b"HOST", b"X-Real-Ip", b"X-Real-IP", b"x-forwarded-for",
         b"X-Forwarded-For", b"X-Request-Id", b"Connection", b"connection", b"Keep-Alive",
         b"Close", b"TE", b"Te-Foo", b"Trailer", b"Upgrade", b"Proxy-Authorization",
         b"Proxy-Connection", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Cookie",
         b"User-Agent", b"Accept", b"X-Custom", b"Hostx", b"Bad Name"]  # fmt: skip
VALUES = [b"chat.example.com", b"Chat.Example.com:443", b"", b"6.6.6.6", b"10.0.0.1, 6.6.6.6",
          b"not an ip", b"keep-alive", b"close", b"Keep-Alive, close", b"keep-alive, X-Custom",
          b"upgrade", b"0", b"5", b"chunked", b"100-continue", b"rid-1", b"a b\tc", b"\xff\x80",
          b"sp ace ", b"\ttab", b"a\rb", b"a\nb"]  # fmt: skip
SEPARATORS = [b": ", b": ", b": ", b":", b":  ", b":\t", b" : "]
QUERY_PARTS = [b"queue_id=" + Q1.encode(), b"queue_id=" + Q1.encode(), b"queue_id=bad id",
               b"queue_id=", b"queue_id=x%2Dy", b"last_event_id=-1", b"last_event_id=12",
               b"last_event_id=1x", b"dont_block=true", b"dont_block=false", b"a+b=c",
               b"client_gravatar=true", b"", b"queue_id=2:7", b"x=queue_id=1"]  # fmt: skip


CLEAN_VALUES = [v for v in VALUES if not re.search(rb"[\r\n]|^[ \t]|[ \t]$", v)]


def pick(draw: st.DrawFn, plain: bool, common: list[bytes], odd: list[bytes]) -> bytes:
    """One of ``common``; or, unless ``plain``, sometimes one of ``odd`` too."""
    return draw(st.sampled_from(common if plain else common + odd))


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """Half plain (the shape the quick path is for, with any headers), half anything."""
    plain = draw(st.booleans())
    method = pick(draw, plain, [b"GET", b"DELETE"], [b"POST", b"HEAD"])
    path = pick(draw, plain, [b"/json/events", b"/api/v1/events"],
                [b"/json/events/x", b"/api/v1/events/internal", b"/"])  # fmt: skip
    parts = draw(st.lists(st.sampled_from(QUERY_PARTS), max_size=5))
    query = b"?" + b"&".join(parts) if parts or draw(st.booleans()) else b""
    version = pick(draw, plain, [b"HTTP/1.1"], [b"HTTP/1.0"])
    lines = [b"Host: chat.example.com"] if plain or draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(NAMES))
        separator = pick(draw, plain, [b": "], SEPARATORS)
        value = pick(draw, plain, CLEAN_VALUES, VALUES)
        lines.append(name + separator + value)
    draw(st.randoms()).shuffle(lines)
    head = b"%s %s%s %s\r\n" % (method, path, query, version)
    return head + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def general_request(data: bytes) -> object:
    parser = RequestParser(64 * 1024)
    parser.feed(data)
    try:
        return parser.next_request(), parser.buffered
    except HttpError:
        return None, -1


TRICKY_REQUESTS = [  # a header that Connection names is dropped too
    b"GET /json/events HTTP/1.1\r\nConnection: close\r\nClose: x\r\nHost: a\r\n\r\n",
    b"GET /json/events HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Custom\r\n"
    b"X-Custom: 1\r\n\r\n",
]


@fuzz
@given(request_heads(), st.sampled_from(["10.1.2.3", "127.0.0.1"]), st.booleans(),
       st.sampled_from([b"", b"abc-1"]))  # fmt: skip
@example(TRICKY_REQUESTS[0], "10.1.2.3", False, b"")
@example(TRICKY_REQUESTS[1], "10.1.2.3", False, b"")
def test_a_quick_request_is_the_general_parsers_request(
    data: bytes, peer: str, trusted: bool, rid: bytes
) -> None:
    quick = quick_request(data)
    if quick is None:
        return
    request, left = general_request(data)
    assert request is not None and left == 0 and not request.body
    assert (quick.method, quick.target, quick.keep_alive) == (
        request.method, request.target, request.keep_alive)  # fmt: skip
    assert quick.host == request.header(b"host")
    assert quick.request_id == request.header(b"x-request-id")
    path, _, query = request.target.partition(b"?")
    assert (quick.path, quick.query) == (path, query)
    general = upstream_head(request.method, request.target, request.headers, peer, 0, trusted, rid)
    assert quick_upstream_head(quick, peer, trusted, rid) == general


@fuzz
@given(st.lists(st.sampled_from(QUERY_PARTS), max_size=6))
def test_quick_arguments_are_the_general_ones(parts: list[bytes]) -> None:
    from kansas.proxy.front import _params

    query = b"&".join(parts)
    quick = quick_arguments(query)
    if quick is None:
        assert b"%" in query or b"+" in query
        return
    general = _params(query)
    for name in (b"queue_id", b"last_event_id"):
        assert quick.get(name) == general.get(name)


RESPONSE_NAMES = [b"Content-Type", b"content-type", b"Content-Length", b"CONTENT-LENGTH",
                  b"Connection", b"Keep-Alive", b"Close", b"Transfer-Encoding", b"X-Request-Id",
                  b"Server", b"Date", b"Vary", b"TE", b"Upgrade", b"X-Custom",
                  b"X-Accel-Redirect"]  # fmt: skip


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    """Half plain (HTTP/1.1, JSON, the right Content-Length, any other headers), half
    anything."""
    plain = draw(st.booleans())
    body = draw(st.sampled_from([b'{"result":"success","msg":""}', b"", b"x" * 3]))
    status = pick(
        draw,
        plain,
        [b"200 OK", b"400 Bad Request", b"502 Bad Gateway"],
        [b"204 No Content", b"304 Not Modified", b"100 Continue", b"200", b"999 What"],
    )
    version = pick(draw, plain, [b"HTTP/1.1"], [b"HTTP/1.0"])
    lines = []
    if plain or draw(st.booleans()):
        lines.append(b"Content-Type: " + pick(draw, plain,
            [b"application/json", b"application/JSON; charset=utf-8"], [b"text/html"]))  # fmt: skip
    if plain or draw(st.booleans()):
        off = 0 if plain else draw(st.sampled_from([0, 1, -1]))
        lines.append(b"Content-Length: %d" % (len(body) + off))
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(RESPONSE_NAMES))
        common = [b"keep-alive", b"close", b"x, keep-alive", b"chunked", b"nginx", b"3",
                  b"application/json", b""]  # fmt: skip
        value = pick(draw, plain, common, [b" pad "])
        lines.append(name + pick(draw, plain, [b": "], SEPARATORS) + value)
    draw(st.randoms()).shuffle(lines)
    head = version + b" " + status + b"\r\n" + b"".join(line + b"\r\n" for line in lines)
    tail = b"" if plain else draw(st.sampled_from([b"", b"EXTRA"]))
    return head + b"\r\n" + body + tail


def general_response(data: bytes) -> tuple[int, list[Header], bytes, bool] | None:
    got: dict[str, object] = {}
    body: list[bytes] = []
    parser = ResponseParser(
        lambda status, headers: got.update(status=status, headers=headers),
        body.append,
        lambda reusable: got.update(reusable=reusable),
    )
    parser.expect()
    try:
        parser.feed(data)
    except HttpError:
        return None
    if "reusable" not in got:
        return None
    return got["status"], got["headers"], b"".join(body), got["reusable"]  # type: ignore[return-value]


@fuzz
@given(responses())
@example(
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nClose: x\r\nContent-Type: application/json"
    b"\r\nContent-Length: 0\r\n\r\n"
)
@example(
    b"HTTP/1.1 200 OK\r\nX-Request-Id: theirs\r\nContent-Type: application/json"
    b"\r\nContent-Length: 0\r\n\r\n"
)
@example(  # two Connection lines: one list (close, keep-alive), not the last line's
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: close\r\nConnection: keep-alive\r\n\r\n{}"
)
def test_a_quick_response_is_the_general_parsers_response(data: bytes) -> None:
    quick = quick_response(data)
    if quick is None:
        return
    general = general_response(data)
    assert general is not None
    status, headers, body, reusable = general
    assert (quick.status, quick.body, quick.reusable) == (status, body, reusable)
    relayed = b"".join(name + b": " + value + b"\r\n" for _l, name, value in
                       downstream_headers(headers))  # fmt: skip
    assert quick.headers == relayed
    assert is_json(headers)


def exchange(quick: bool, request: bytes, reply: bytes) -> tuple[object, ...]:
    """One request on a warm route, answered with ``reply``: what the client got, what
    the shard got, and what was recorded."""
    h = Harness()
    h.front.quick = quick
    h.front.ids.new = RequestIds(b"same").new  # type: ignore[method-assign]
    h.route()
    warm, _t = h.client()  # a first request caches the route (the general path)
    warm.dataReceived(b"GET /json/events?queue_id=%s HTTP/1.1\r\nHost: chat.example.com\r\n"
                      b"\r\n" % Q1.encode())  # fmt: skip
    conn, shard = h.shard_connection(9800)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 2\r\n\r\n{}")  # fmt: skip
    shard.clear()
    client, transport = h.client()
    client.dataReceived(request)
    sent = shard.value()
    if sent:
        conn.dataReceived(reply)
    kinds = sorted((k, sum(v.counts)) for k, v in h.front.recorder.kinds.items())
    return (
        transport.value(),
        transport.disconnecting,
        sent,
        shard.disconnecting,
        kinds,
        h.table.hits,
    )


@fuzz
@given(request_heads(), responses())
def test_with_or_without_the_quick_path_kansas_answers_alike(request: bytes, reply: bytes) -> None:
    request = re.sub(rb"Host: [^\r]*", b"Host: chat.example.com", request, count=1)
    assert exchange(True, request, reply) == exchange(False, request, reply)


def test_the_quick_path_takes_what_nginx_sends_and_what_tornado_answers() -> None:
    """Not vacuous: the common shapes do take the quick path."""
    nginx = (b"GET /json/events?dont_block=false&queue_id=%s&last_event_id=3 HTTP/1.1\r\n"
             b"Host: chat.example.com\r\nX-Real-Ip: 6.6.6.6\r\nX-Forwarded-For: 6.6.6.6\r\n"
             b"X-Forwarded-Proto: https\r\nUser-Agent: ZulipMobile/27\r\n"
             b"Cookie: sessionid=x\r\n\r\n" % Q1.encode())  # fmt: skip
    request = quick_request(nginx)
    assert request is not None and request.keep_alive
    assert b"X-Real-Ip" not in request.headers and b"Cookie: sessionid=x\r\n" in request.headers
    tornado = (b"HTTP/1.1 200 OK\r\nServer: TornadoServer/6.4\r\n"
               b"Content-Type: application/json\r\nDate: Sun, 06 Dec 2026 10:00:00 GMT\r\n"
               b"Content-Length: 2\r\n\r\n{}")  # fmt: skip
    answer = quick_response(tornado)
    assert answer is not None and answer.reusable and answer.body == b"{}"
    assert status_line(answer.status) == b"HTTP/1.1 200 OK\r\n"
    # And end to end: the second request on a warm route is counted as a cache hit the
    # quick path made (the general path is not called: its _events is replaced).
    h = Harness()
    h.route()
    first, _t = h.client()
    first.dataReceived(nginx)
    conn, shard = h.shard_connection(9800)
    conn.dataReceived(tornado)
    second, transport = h.client()
    second._events = None  # type: ignore[assignment,method-assign]
    second.dataReceived(nginx)
    assert shard.value().count(b"GET /json/events?") == 2
    conn.dataReceived(tornado)
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\nX-Request-Id: ")
    assert transport.value().endswith(b"\r\n\r\n{}") and h.table.hits == 1
