"""Request smuggling, class by class (RFC 9112): what a scan of kansas's public listener
found accepted, each as a named regression test.

At the parser: the answer a malformed message gets (the connection is then closed).
Through the public listener: the bytes after a malformed message never reach a shard
as a second request.
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport

from kansas.http.wire import HttpError, RequestParser
from tests.test_proxy import Q1, Harness

HEAD = b"DELETE /api/v1/events HTTP/1.1\r\nHost: chat.example.com\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
SMUGGLED = b"GET /json/events?queue_id=SMUGGLED HTTP/1.1\r\nHost: chat.example.com\r\n\r\n"


def outcome(raw: bytes) -> int | bytes:
    """The status of the parser's error, or the body of the one request parsed."""
    parser = RequestParser(1024)
    parser.feed(raw)
    try:
        request = parser.next_request()
    except HttpError as e:
        return e.status
    assert request is not None, "incomplete"
    return request.body


# Chunk sizes: hex digits only (7.1).
@pytest.mark.parametrize(
    "size_line",
    [b"0x5", b"+5", b"-5", b"5_0", b" 5", b"5 ", b"\t5", b"5\x00", b"\x0b5", b"5\r",
     b"\n5", b"5\n", b"", b"g", b"1" * 17, b"0x0"],
    ids=["0x-prefix", "plus", "minus", "underscore", "space-before", "space-after", "tab",
         "nul", "vtab", "bare-cr", "bare-lf-before", "bare-lf-after", "empty", "not-hex",
         "too-long", "zero-0x"],
)  # fmt: skip
def test_only_hex_digits_are_a_chunk_size(size_line: bytes) -> None:
    assert outcome(CHUNKED + size_line + b"\r\nhello\r\n0\r\n\r\n") == 400


def test_a_last_chunk_is_zeros_and_a_valid_one_parses() -> None:
    assert outcome(CHUNKED + b"5\r\nhello\r\n000\r\n\r\n") == b"hello"
    assert outcome(CHUNKED + b"00005\r\nhello\r\n0\r\n\r\n") == b"hello"


# Chunk extensions: token names, token or quoted-string values (7.1.1).
@pytest.mark.parametrize(
    "extension",
    [b";", b";=x", b';a="open', b";a=b\x01", b";a\nb", b";a=b c", b'; a="x"y', b";a=",
     b";a b", b";\x7f"],
    ids=["empty", "empty-name", "unterminated-quote", "control", "bare-lf", "space-in-value",
         "after-quote", "empty-value", "space-in-name", "del"],
)  # fmt: skip
def test_malformed_chunk_extensions_are_refused(extension: bytes) -> None:
    assert outcome(CHUNKED + b"5" + extension + b"\r\nhello\r\n0\r\n\r\n") == 400


@pytest.mark.parametrize(
    "extension", [b";a", b";a=b", b';a="x \\" y"', b";a=b;c;d=e", b";A1-_=0x5", b';a=""']
)
def test_well_formed_chunk_extensions_are_ignored(extension: bytes) -> None:
    assert outcome(CHUNKED + b"5" + extension + b"\r\nhello\r\n0" + extension + b"\r\n\r\n") == (
        b"hello"
    )


# Trailers: field lines only (7.1.2, 5.1).
@pytest.mark.parametrize(
    "trailers",
    [b"not a field\r\n", b"X : 1\r\n", b"GET /smuggled HTTP/1.1\r\nHost: x\r\n",
     b"X: a\x00b\r\n", b" X: 1\r\n", b": 1\r\n", b"X: 1\r\n folded\r\n"],
    ids=["no-colon", "space-before-colon", "request-head", "nul", "leading-space",
         "empty-name", "folded"],
)  # fmt: skip
def test_a_trailer_section_is_field_lines_only(trailers: bytes) -> None:
    assert outcome(CHUNKED + b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n") == 400


def test_valid_trailers_are_dropped() -> None:
    assert outcome(CHUNKED + b"5\r\nhello\r\n0\r\nX-A: 1\r\nX-B:\r\n\r\n") == b"hello"


# Transfer-Encoding: lines combine into one list (RFC 9110 5.3); chunked final, once.
@pytest.mark.parametrize(
    ("fields", "status"),
    [
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
        (b"Transfer-Encoding: chunked, chunked\r\n", 400),
        (b"Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n", 501),
        (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 501),
        (b"Transfer-Encoding: gzip, chunked\r\n", 501),
        (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", 400),
        (b"Transfer-Encoding: chunked, gzip\r\n", 400),
        (b"Transfer-Encoding: gzip\r\n", 400),
        (b'Transfer-Encoding: "chunked"\r\n', 400),
        (b"Transfer-Encoding: chunked;q=1\r\n", 400),
        (b"Transfer-Encoding: \r\n", 400),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400),
    ],
    ids=["chunked-twice-lines", "chunked-twice-list", "identity-then-chunked",
         "gzip-then-chunked-lines", "gzip-then-chunked-list", "chunked-then-gzip-lines",
         "chunked-then-gzip-list", "gzip-only", "quoted", "parameter", "empty", "with-cl"],
)  # fmt: skip
def test_transfer_encoding_is_the_whole_list(fields: bytes, status: int) -> None:
    assert outcome(HEAD + fields + b"\r\n5\r\nhello\r\n0\r\n\r\n") == status


# Host: exactly one, well-formed (3.2).
@pytest.mark.parametrize(
    "fields",
    [b"Host: a.example.com\r\nHost: a.example.com\r\n", b"Host: a.example.com\r\nHost: b\r\n",
     b"Host: a.example.com:abc\r\n", b"Host: a.example.com:\r\n", b"Host: a b\r\n",
     b"Host: a.example.com:80:80\r\n", b"Host: [::1\r\n", b"Host: a@b\r\n",
     b"Host: a.example.com:123456\r\n"],
    ids=["twice-same", "twice-different", "port-not-numeric", "port-empty", "space",
         "two-ports", "open-bracket", "userinfo", "port-too-long"],
)  # fmt: skip
def test_one_well_formed_host(fields: bytes) -> None:
    assert outcome(b"GET /json/events?queue_id=q HTTP/1.1\r\n" + fields + b"\r\n") == 400


@pytest.mark.parametrize(
    "host", [b"chat.example.com", b"chat.example.com:443", b"127.0.0.1:9799", b"[::1]:80",
             b"localhost", b"my_host.example.com"]
)  # fmt: skip
def test_ordinary_hosts_pass(host: bytes) -> None:
    assert outcome(b"GET /json/events?queue_id=q HTTP/1.1\r\nHost: " + host + b"\r\n\r\n") == b""


def test_http_10_with_transfer_encoding_is_refused() -> None:
    raw = (b"DELETE /api/v1/events HTTP/1.0\r\nHost: chat.example.com\r\nConnection: keep-alive"
           b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")  # fmt: skip
    assert outcome(raw) == 400


# Found by the differential fuzzer (scripts/fuzz_parser.py, kansas.testing.differential):
# kansas took each of these, which h11 refuses.


@pytest.mark.parametrize(
    "size_line",
    [b"5\t;\ta=1", b"5 ;a", b"5; a", b"5;a =b", b"5;a= b", b"5;a=b ", b"5;a\t"],
    ids=["tab-around-semicolon", "space-before-semicolon", "space-after-semicolon",
         "space-before-equals", "space-after-equals", "space-after-value", "tab-at-end"],
)  # fmt: skip
def test_fuzz_whitespace_in_a_chunk_size_line_is_refused(size_line: bytes) -> None:
    """RFC 9112 7.1.1 allows BWS around ";" and "=", h11 refuses it before the first ";"
    and llhttp everywhere: kansas took "5\\t;\\ta=1" as chunked, h11 refused it."""
    assert outcome(CHUNKED + size_line + b"\r\nhello\r\n0\r\n\r\n") == 400


@pytest.mark.parametrize(
    "value", [b", chunked", b"chunked,", b"chunked, ", b" ,chunked"],
    ids=["leading", "trailing", "trailing-space", "space-leading"],
)  # fmt: skip
def test_fuzz_empty_transfer_encoding_elements_are_refused(value: bytes) -> None:
    """Stricter than RFC 9110 5.6.1 for the field that frames the body: h11 and nginx
    take only "chunked" itself."""
    assert outcome(HEAD + b"Transfer-Encoding: " + value + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n") == (
        400
    )


def test_fuzz_an_empty_second_transfer_encoding_line_is_refused() -> None:
    raw = HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: \r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    assert outcome(raw) == 400


@pytest.mark.parametrize(
    "trailers",
    [b"Content-Length: 5\r\n", b"content-length: 4\r\nContent-Length: 5\r\n",
     b"X-A: 1\r\nTransfer-Encoding: chunked\r\n", b"Host: evil.example.com\r\n"],
    ids=["content-length", "conflicting-lengths", "transfer-encoding", "host"],
)  # fmt: skip
def test_fuzz_framing_fields_in_a_trailer_section_are_refused(trailers: bytes) -> None:
    """RFC 9110 6.5.1: fields that frame or route a message are not trailers; h11 reads
    Content-Length and Transfer-Encoding there as in a head and refused what kansas took."""
    assert outcome(CHUNKED + b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n") == 400


@pytest.mark.parametrize(
    "prefix", [b"\r\n\n\r", b"\n", b"\r", b"\n\r", b"\r\r\n", b"\r\n\r\n"],
    ids=["crlf-lf-cr", "lf", "cr", "lf-cr", "cr-crlf", "two-crlf"],
)  # fmt: skip
def test_fuzz_only_one_crlf_may_come_before_a_request(prefix: bytes) -> None:
    """RFC 9112 2.2: one empty line (CRLF) before a request-line is ignored; kansas
    stripped any run of CR and LF bytes, so a bare LF or CR was taken whole but refused
    when the bytes arrived in two reads."""
    request = b"GET /json/events HTTP/1.1\r\nHost: chat.example.com\r\n\r\n"
    assert outcome(prefix + request) == 400
    assert outcome(b"\r\n" + request) == b""


@pytest.mark.parametrize(
    "head",
    [b"CONNECT /nts HTTP/1.1\r\nHost: chat.example.com\r\nContent-Length: 5\r\n\r\nhello",
     b"CONNECT /json/events HTTP/1.1\r\nHost: chat.example.com\r\n\r\n",
     b"CONNECT chat.example.com:443 HTTP/1.1\r\nHost: chat.example.com:443\r\n\r\n"],
    ids=["with-length", "origin-form", "authority-form"],
)  # fmt: skip
def test_fuzz_connect_is_refused(head: bytes) -> None:
    """RFC 9110 9.3.6: a CONNECT request has no content and a tunnel follows it: kansas
    read a Content-Length body and a next request after it, llhttp no body and a tunnel."""
    assert outcome(head + SMUGGLED) == 400


# Through the public listener: nothing after a refused message reaches a shard.
ATTACKS = [
    CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n",
    CHUNKED + b"5;a\nb\r\nhello\r\n0\r\n\r\n",
    CHUNKED + b"0\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    HEAD + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /json/events?queue_id=" + Q1.encode() + b" HTTP/1.1\r\nHost: chat.example.com\r\n"
    b"Host: chat.example.com\r\n\r\n",
    b"GET /json/events?queue_id=" + Q1.encode() + b" HTTP/1.1\r\nHost: chat.example.com:x\r\n\r\n",
    b"DELETE /api/v1/events HTTP/1.0\r\nHost: chat.example.com\r\nConnection: keep-alive\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"CONNECT /json/events HTTP/1.1\r\nHost: chat.example.com\r\nContent-Length: 5\r\n\r\nhello",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_nothing_after_a_refused_message_is_forwarded(attack: bytes) -> None:
    h = Harness()
    h.route()
    client, transport = h.client()
    client.dataReceived(attack + SMUGGLED)
    sent = b"".join(t.value() for _c, t in _opened(h))
    assert b"SMUGGLED" not in sent and b"smuggled" not in sent
    assert transport.value()[9:12] in (b"400", b"501")
    assert transport.disconnecting  # the stream can no longer be trusted


def _opened(h: Harness) -> list[tuple[object, StringTransport]]:
    """Every connection kansas opened to a shard, accepted (the test plays the shard)."""
    return [h.shard_connection(c[1]) for c in list(h.reactor.tcpClients[h.connected :])]
