"""HTTP framing without I/O: the request parser, the response parser, head rewriting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kansas.http.wire import Header, HttpError, Request, RequestParser, ResponseParser
from kansas.proxy.forwarding import downstream_headers, upstream_head

GET = b"GET /json/events?queue_id=q1&last_event_id=3 HTTP/1.1\r\nHost: chat.example.com\r\n\r\n"
DELETE = (
    b"DELETE /api/v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\n\r\nqueue_id=q2"
)
CHUNKED = (
    b"DELETE /api/v1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nqueue\r\n6;ext=1\r\n_id=q3\r\n0\r\nX-Trailer: 1\r\n\r\n"
)


def parse_all(
    stream: bytes, pieces: list[int] | None = None, max_body: int = 1024
) -> list[Request]:
    parser = RequestParser(max_body)
    out = []
    cuts = [*sorted(set(pieces or [])), len(stream)]
    start = 0
    for cut in cuts:
        parser.feed(stream[start:cut])
        start = cut
        while (request := parser.next_request()) is not None:
            out.append(request)
    return out


def test_parses_get_delete_and_chunked() -> None:
    get, delete, chunked = parse_all(GET + DELETE + CHUNKED)
    assert (get.method, get.target, get.header(b"host")) == (
        b"GET",
        b"/json/events?queue_id=q1&last_event_id=3",
        b"chat.example.com",
    )
    assert get.keep_alive and get.body == b""
    assert delete.body == b"queue_id=q2"
    assert chunked.body == b"queue_id=q3"


@settings(max_examples=200)
@given(st.lists(st.integers(0, len(GET + DELETE + CHUNKED)), max_size=12))
def test_any_split_of_the_stream_gives_the_same_requests(cuts: list[int]) -> None:
    whole = parse_all(GET + DELETE + CHUNKED)
    assert [(r.method, r.target, r.body) for r in parse_all(GET + DELETE + CHUNKED, cuts)] == [
        (r.method, r.target, r.body) for r in whole
    ]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),  # not final: 6.3
        (b"GET /x HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nBad Header: a\r\n\r\n", 400),
        (b"GET /x HTTP/2.0\r\n\r\n", 505),
        (b"GET http://evil/ HTTP/1.1\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n", 413),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 431),
        (b"GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET /x HTTP/1.1\nHost: a\n\n", 400),
        (b"GET /x HTTP/1.1\r\nX: a\x01b\r\n\r\n", 400),
    ],
)
def test_rejects_malformed_requests(raw: bytes, status: int) -> None:
    with pytest.raises(HttpError) as caught:
        parse_all(raw)
    assert caught.value.status == status


def test_head_without_end_is_bounded() -> None:
    parser = RequestParser(1024)
    parser.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 17000)
    with pytest.raises(HttpError):
        parser.next_request()


def test_keep_alive_rules() -> None:
    (r10,) = parse_all(b"GET / HTTP/1.0\r\n\r\n")
    (r10ka,) = parse_all(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    (r11c,) = parse_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert (r10.keep_alive, r10ka.keep_alive, r11c.keep_alive) == (False, True, False)


def test_expect_continue_is_answered_once() -> None:
    parser = RequestParser(1024)
    parser.feed(b"DELETE /x HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert parser.next_request() is None
    assert parser.wants_continue() and not parser.wants_continue()
    parser.feed(b"abcd")
    request = parser.next_request()
    assert request is not None and request.body == b"abcd"


class Events:
    def __init__(self) -> None:
        self.log: list[object] = []
        self.parser = ResponseParser(
            lambda status, headers: self.log.append(("head", status)),
            lambda data: self.log.append(data),
            lambda reusable: self.log.append(("end", reusable)),
        )

    def body(self) -> bytes:
        return b"".join(x for x in self.log if isinstance(x, bytes))


@settings(max_examples=100)
@given(
    st.sampled_from(
        [
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhelloabcde",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: 1\r\n\r\n",
        ]
    ),
    st.lists(st.integers(0, 120), max_size=8),
)
def test_response_framings_survive_any_split(stream: bytes, cuts: list[int]) -> None:
    events = Events()
    events.parser.expect()
    start = 0
    for cut in [*sorted(c for c in cuts if c < len(stream)), len(stream)]:
        events.parser.feed(stream[start:cut])
        start = cut
    assert [x for x in events.log if not isinstance(x, bytes)] == [("head", 200), ("end", True)]
    assert events.body() == b"helloabcde"
    assert events.parser.idle


def test_bytes_after_a_response_make_the_connection_unusable() -> None:
    events = Events()
    events.parser.expect()
    events.parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxEXTRA")
    assert events.log[-1] == ("end", False)


def test_response_until_close_and_connection_close() -> None:
    events = Events()
    events.parser.expect()
    events.parser.feed(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\npartial")
    assert events.parser.reads_until_close
    assert events.parser.connection_closed()
    assert events.log[-1] == ("end", False)
    closing = Events()
    closing.parser.expect()
    closing.parser.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert closing.log[-1] == ("end", False)


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        # The same strict chunked decoding as for clients (kansas.http.wire.chunk_size).
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 2\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nHTTP/1.1 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ],
)
def test_backend_garbage_is_an_error(raw: bytes) -> None:
    events = Events()
    events.parser.expect()
    with pytest.raises(HttpError) as caught:
        events.parser.feed(raw)
    assert caught.value.status == 502


def test_upstream_head_rewrites_forwarding_headers() -> None:
    (request,) = parse_all(
        b"GET /json/events?queue_id=q HTTP/1.1\r\nHost: Chat.Example.com\r\n"
        b"Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n"
        b"X-Real-Ip: 6.6.6.6\r\nX-Forwarded-For: 1.2.3.4\r\nCookie: s=1\r\n\r\n"
    )
    head = upstream_head(request.method, request.target, request.headers, "127.0.0.9", 0)
    assert head.startswith(b"GET /json/events?queue_id=q HTTP/1.1\r\n")
    assert b"Host: Chat.Example.com\r\n" in head and b"Cookie: s=1\r\n" in head
    assert b"X-Forwarded-For: 1.2.3.4, 127.0.0.9\r\n" in head
    assert b"X-Real-Ip: 127.0.0.9\r\n" in head and b"6.6.6.6" not in head
    for dropped in (b"Connection", b"Keep-Alive", b"X-Secret", b"Content-Length"):
        assert dropped + b":" not in head
    assert head.endswith(b"\r\n\r\n")


def test_downstream_headers_drop_hop_by_hop() -> None:
    headers: list[Header] = [
        (b"connection", b"Connection", b"keep-alive, x-internal"),
        (b"x-internal", b"X-Internal", b"1"),
        (b"transfer-encoding", b"Transfer-Encoding", b"chunked"),
        (b"content-type", b"Content-Type", b"application/json"),
    ]
    assert downstream_headers(headers) == [headers[-1]]


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=300)
@given(st.lists(st.tuples(TEXT.filter(bool), TEXT), max_size=6))
def test_query_parsing_matches_the_standard_library(pairs: list[tuple[str, str]]) -> None:
    from urllib.parse import parse_qsl, urlencode

    from kansas.proxy.front import _params

    query = urlencode(pairs)
    expected = {k.encode(): v.encode() for k, v in parse_qsl(query, keep_blank_values=True)}
    assert _params(query.encode()) == expected


def test_a_trusted_fronts_real_ip_is_kept_if_it_is_an_address() -> None:
    (request,) = parse_all(
        b"GET /json/events?queue_id=q HTTP/1.1\r\nHost: a\r\nX-Real-Ip: 203.0.113.9\r\n\r\n"
    )
    trusted = upstream_head(request.method, request.target, request.headers, "127.0.0.1", 0, True)
    assert b"X-Real-Ip: 203.0.113.9\r\n" in trusted
    untrusted = upstream_head(request.method, request.target, request.headers, "127.0.0.1", 0)
    assert b"X-Real-Ip: 127.0.0.1\r\n" in untrusted and b"203.0.113.9" not in untrusted
    (forged,) = parse_all(
        b"GET /json/events?queue_id=q HTTP/1.1\r\nHost: a\r\nX-Real-Ip: evil, 1.2.3.4\r\n\r\n"
    )
    head = upstream_head(forged.method, forged.target, forged.headers, "127.0.0.1", 0, True)
    assert b"X-Real-Ip: 127.0.0.1\r\n" in head and b"evil" not in head
