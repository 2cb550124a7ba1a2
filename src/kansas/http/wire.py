"""HTTP/1.1 framing without I/O: bytes in, parsed requests and response events out.

Only what a reverse proxy in front of Zulip's Tornado needs, and strict about the rest
(request smuggling lives in lenient parsers): one Content-Length or ``chunked``, never
both; no obsolete line folding; bounded heads and bodies.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
#: A chunk size line longer than this (extensions included) is refused.
MAX_CHUNK_LINE = 1024
CRLF = b"\r\n"

#: Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection, never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

#: Bytes allowed in a request target: visible ASCII (no controls, spaces or 8-bit).
_TARGET_BYTES = bytes(range(0x21, 0x7F))
_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class HttpError(Exception):
    """The peer broke the protocol; ``status`` is what to answer a client with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Header = tuple[bytes, bytes, bytes]  # (lower-cased name, name as sent, value)


@dataclass(slots=True)
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list[Header]
    body: bytes = b""
    keep_alive: bool = True
    _index: dict[bytes, bytes] = field(default_factory=dict, repr=False)

    def header(self, name: bytes) -> bytes | None:
        """The (last) value of a header, by lower-case name."""
        return self._index.get(name)


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: A header block as RFC 9112 has it: ``token ":" value CRLF`` lines, values of visible
#: bytes, spaces, tabs and obs-text only (no NUL, bare CR or LF, other controls, nor
#: obsolete line folding). Checked in one regex pass, then cut into pairs in another.
#: Trailer sections (after a last chunk) are the same field lines.
_HEADER_BLOCK = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
_HEADER_PAIRS = re.compile(rb"([^:]+):[\t ]*([^\r]*)\r\n")
#: Fields whose repeated lines make one comma-separated list (RFC 9110 5.3): read as
#: the list, never as the last line alone (two Transfer-Encoding lines are two codings).
_LISTS = frozenset({b"transfer-encoding", b"connection"})
#: A chunk's size line (RFC 9112 7.1, 7.1.1), CRLF excluded: hex digits only (no sign,
#: prefix, underscore or whitespace), then extensions of a token name and a token or
#: quoted-string value, and no whitespace anywhere: stricter than the RFC's BWS around
#: ";" and "=", which llhttp refuses everywhere and h11 before the first ";" (the
#: differential fuzzer found kansas taking "5\t;a", which h11 refuses).
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
)  # fmt: skip
#: Host = uri-host [ ":" port ] (RFC 9112 3.2, RFC 3986 3.2.2): a name, an IPv4
#: address or a bracketed IPv6 literal, and digits only after the colon (at least one:
#: stricter than the RFC's empty port, which no client sends).
_HOST = re.compile(rb"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _split_head(head: bytes) -> tuple[bytes, list[Header], dict[bytes, bytes]]:
    first, _, block = head.partition(CRLF)
    headers: list[Header] = []
    index: dict[bytes, bytes] = {}
    if not block:
        return first, headers, index
    block += CRLF
    if _HEADER_BLOCK.fullmatch(block) is None:
        raise HttpError(400, "malformed header line")
    pairs = _HEADER_PAIRS.findall(block)
    if len(pairs) > MAX_HEADERS:
        raise HttpError(431, "too many headers")
    for name, value in pairs:
        lname = name.lower()
        value = value.rstrip(b" \t")
        if lname in index:
            if lname == b"content-length" and index[lname] != value:
                raise HttpError(400, "conflicting Content-Length headers")
            if lname in _LISTS:
                index[lname] += b", " + value
                headers.append((lname, name, value))
                continue
        headers.append((lname, name, value))
        index[lname] = value
    return first, headers, index


def valid_host(value: bytes) -> bool:
    """A ``Host`` value kansas accepts: what RFC 9112 3.2 allows, minus the rarely used
    percent-encoded and sub-delimiter characters of a registered name."""
    return _HOST.fullmatch(value) is not None


def chunk_size(line: bytes) -> int | None:
    """The size a chunk's size line (without its CRLF) gives, or None if it is not one."""
    m = _CHUNK_LINE.fullmatch(line)
    return None if m is None else int(m.group(1), 16)


#: Fields that frame or route a message, never allowed in a trailer section (RFC 9110
#: 6.5.1): h11 reads Content-Length and Transfer-Encoding there as it does in a head.
_NOT_TRAILERS = re.compile(rb"(?:^|\n)(?i:content-length|transfer-encoding|host):")


def valid_trailers(section: bytes) -> bool:
    """A trailer section (its field lines, each ending in CRLF, without the final empty
    line) is field lines only, none of them framing or routing the message: anything
    else after a last chunk is a smuggling attempt."""
    return _HEADER_BLOCK.fullmatch(section) is not None and not _NOT_TRAILERS.search(section)


def codings(value: bytes) -> list[bytes]:
    """A Transfer-Encoding list (its lines combined), lower-cased, without the empty
    elements a list may have (RFC 9110 5.6.1); an element that is not a bare token
    (quoted, or with parameters) is kept as it is, so it is never taken for chunked."""
    return [c for c in (c.strip(b" \t").lower() for c in value.split(b",")) if c]


def _content_length(value: bytes) -> int:
    if not value.isdigit() or len(value) > 18:
        raise HttpError(400, "bad Content-Length")
    return int(value)


def _connection_tokens(index: dict[bytes, bytes]) -> set[bytes]:
    value = index.get(b"connection")
    if value is None:
        return set()
    return {t.strip().lower() for t in value.split(b",")}


class RequestParser:
    """Cuts a client's byte stream into complete requests (head and whole body).

    ``feed`` bytes as they arrive, then call ``next_request`` until it returns None.
    Raises HttpError on a malformed or oversized request; the connection should then
    be answered and closed, as the stream can no longer be trusted.
    """

    __slots__ = ("_buf", "_pending", "max_body", "max_head")

    def __init__(self, max_body: int, max_head: int = MAX_HEAD_BYTES) -> None:
        self._buf = b""
        self._pending: Request | None = None  # head parsed, body still arriving
        self.max_body = max_body
        self.max_head = max_head

    def feed(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def wants_continue(self) -> bool:
        """A request head arrived with ``Expect: 100-continue`` and its body has not:
        the client waits for ``100 Continue`` (answered once)."""
        pending = self._pending
        if pending is None or pending.header(b"expect") is None:
            return False
        if pending.header(b"expect") != b"100-continue" or pending.version != b"HTTP/1.1":
            return False
        pending._index[b"expect"] = b"answered"
        return True

    def next_request(self) -> Request | None:
        request = self._pending
        if request is None:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end == -1:
                if len(buf) > self.max_head:
                    raise HttpError(431, "request head too large")
                if b"\n\n" in buf:
                    raise HttpError(400, "lines must end with CRLF")
                return None
            if end > self.max_head:
                raise HttpError(431, "request head too large")
            request = self._parse_head(buf[:end])
            self._buf = buf[end + 4 :]
        length = self._body_length(request)
        if length is None:  # chunked
            body = self._take_chunked()
            if body is None:
                self._pending = request
                return None
            request.body = body
        elif length:
            if len(self._buf) < length:
                self._pending = request
                return None
            request.body, self._buf = self._buf[:length], self._buf[length:]
        self._pending = None
        return request

    def _parse_head(self, head: bytes) -> Request:
        if head.startswith(CRLF):  # tolerate one stray CRLF before a request (RFC 9112
            head = head[2:]  # 2.2), not any run of CR and LF bytes (a bare LF or CR)
        request_line, headers, index = _split_head(head)
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[0] or not _TOKEN_CHARS.issuperset(parts[0]):
            raise HttpError(400, "malformed request line")
        method, target, version = parts
        if method == b"CONNECT":
            # RFC 9110 9.3.6: a CONNECT request has no content, and what follows its head
            # is a tunnel's, not a next request's: parsers disagree on its end (llhttp
            # reads no body, h11 a Content-Length one), so kansas, which tunnels nothing,
            # refuses it and closes.
            raise HttpError(400, "CONNECT is not served")
        if version == b"HTTP/1.1":
            keep_alive = b"close" not in _connection_tokens(index)
        elif version == b"HTTP/1.0":
            keep_alive = b"keep-alive" in _connection_tokens(index)
        else:
            raise HttpError(505, "unsupported HTTP version")
        if not target.startswith(b"/"):
            raise HttpError(400, "request target must be a path")
        if target.translate(None, _TARGET_BYTES):
            raise HttpError(400, "invalid bytes in the request target")
        # A missing Host is answered by the listener (400, and it may keep the
        # connection); one that is there must be one, and well-formed (RFC 9112 3.2).
        host = index.get(b"host")
        if host is None:
            pass
        elif sum(1 for h in headers if h[0] == b"host") > 1:
            raise HttpError(400, "more than one Host header")
        elif not valid_host(host):
            raise HttpError(400, "invalid Host header")
        if version == b"HTTP/1.0" and b"transfer-encoding" in index:
            # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        return Request(method, target, version, headers, b"", keep_alive, index)

    def _body_length(self, request: Request) -> int | None:
        te = request.header(b"transfer-encoding")
        cl = request.header(b"content-length")
        if te is not None:
            if cl is not None:
                raise HttpError(400, "both Content-Length and Transfer-Encoding")
            if any(not c.strip(b" \t") for c in te.split(b",")):
                # Stricter than RFC 9110 5.6.1 (ignore empty elements) for the one field
                # that frames the body: h11 and nginx take only "chunked" itself.
                raise HttpError(400, "empty element in Transfer-Encoding")
            listed = codings(te)
            # RFC 9112 6.3: unless chunked is the final coding (and applied once, 7.1),
            # the length cannot be known: 400, and the connection is closed.
            if not listed or listed[-1] != b"chunked" or listed.count(b"chunked") > 1:
                raise HttpError(400, "chunked must be the final Transfer-Encoding, once")
            if len(listed) > 1:  # 6.1: a coding kansas does not decode, before chunked
                raise HttpError(501, "unsupported Transfer-Encoding")
            return None
        if cl is None:
            return 0
        length = _content_length(cl)
        if length > self.max_body:
            raise HttpError(413, "request body too large")
        return length

    def _take_chunked(self) -> bytes | None:
        """The whole de-chunked body if it has all arrived (consumed), else None."""
        buf, pos, size = self._buf, 0, 0
        parts: list[bytes] = []
        while True:
            eol = buf.find(CRLF, pos)
            if eol == -1:
                if len(buf) - pos > MAX_CHUNK_LINE:
                    raise HttpError(400, "bad chunk size line")
                return None
            chunk = chunk_size(buf[pos:eol])
            if chunk is None:
                raise HttpError(400, "bad chunk size line")
            size += chunk
            if size > self.max_body:
                raise HttpError(413, "request body too large")
            start = eol + 2
            if chunk == 0:
                # Trailer field lines (checked, then dropped) end with an empty line.
                end = buf.find(b"\r\n\r\n", eol)
                if end == -1:
                    if len(buf) - start > self.max_head:
                        raise HttpError(431, "trailer section too large")
                    return None
                if not valid_trailers(buf[start : end + 2]):
                    raise HttpError(400, "malformed trailer section")
                self._buf = buf[end + 4 :]
                return b"".join(parts)
            if len(buf) < start + chunk + 2:
                return None
            if buf[start + chunk : start + chunk + 2] != CRLF:
                raise HttpError(400, "bad chunk terminator")
            parts.append(buf[start : start + chunk])
            pos = start + chunk + 2


class ResponseParser:
    """Follows a backend's response stream, calling out as parts arrive.

    ``on_head(status, headers)``, ``on_body(bytes)`` (de-chunked), ``on_end(reusable)``;
    raises HttpError when the backend breaks the protocol. One response at a time:
    ``expect(head_request)`` arms it for the next.
    """

    __slots__ = (
        "_buf",
        "_chunk_left",
        "_head_request",
        "_left",
        "_mode",
        "_reusable",
        "_trailers",
        "on_body",
        "on_end",
        "on_head",
    )

    _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _CLOSE, _IDLE = range(8)

    def __init__(
        self,
        on_head: Callable[[int, list[Header]], None],
        on_body: Callable[[bytes], None],
        on_end: Callable[[bool], None],
    ) -> None:
        self.on_head = on_head
        self.on_body = on_body
        self.on_end = on_end
        self._buf = b""
        self._mode = self._IDLE
        self._left = 0
        self._chunk_left = 0
        self._reusable = True
        self._head_request = False
        self._trailers = 0  # bytes of the trailer section read so far

    def expect(self, head_request: bool = False) -> None:
        self._mode = self._HEAD
        self._head_request = head_request

    @property
    def idle(self) -> bool:
        return self._mode == self._IDLE

    @property
    def awaits_head(self) -> bool:
        """Armed for a response to a GET or DELETE, none of it read yet."""
        return self._mode == self._HEAD and not self._buf and not self._head_request

    def took_whole(self) -> None:
        """The awaited response was read whole elsewhere (``kansas.proxy.quick``)."""
        self._mode = self._IDLE

    @property
    def reads_until_close(self) -> bool:
        return self._mode == self._CLOSE

    def feed(self, data: bytes) -> None:
        if self._mode == self._IDLE:
            if data.strip():
                raise HttpError(502, "unexpected bytes from backend")
            return
        self._buf = self._buf + data if self._buf else data
        while self._buf and self._mode != self._IDLE:
            if not self._step():
                return

    def connection_closed(self) -> bool:
        """The backend closed; True if that properly ended a response read until close."""
        if self._mode == self._CLOSE:
            self._mode = self._IDLE
            self.on_end(False)
            return True
        return self._mode == self._IDLE

    def _step(self) -> bool:
        mode = self._mode
        buf = self._buf
        if mode == self._HEAD:
            end = buf.find(b"\r\n\r\n")
            if end == -1:
                if len(buf) > MAX_HEAD_BYTES:
                    raise HttpError(502, "backend response head too large")
                return False
            self._buf = buf[end + 4 :]
            self._start(buf[:end])
            return True
        if mode == self._LENGTH:
            piece = buf[: self._left]
            self._buf = buf[len(piece) :]
            self._left -= len(piece)
            if piece:
                self.on_body(piece)
            if self._left == 0:
                self._finish()
            return True
        if mode == self._CLOSE:
            self._buf = b""
            self.on_body(buf)
            return False
        if mode == self._CHUNK_SIZE:
            eol = buf.find(CRLF)
            if eol == -1:
                if len(buf) > MAX_CHUNK_LINE:
                    raise HttpError(502, "bad chunk from backend")
                return False
            size = chunk_size(buf[:eol])
            if size is None:
                raise HttpError(502, "bad chunk from backend")
            self._buf = buf[eol + 2 :]
            self._trailers = 0
            self._chunk_left = size
            self._mode = self._TRAILER if size == 0 else self._CHUNK_DATA
            return True
        if mode == self._CHUNK_DATA:
            piece = buf[: self._chunk_left]
            self._buf = buf[len(piece) :]
            self._chunk_left -= len(piece)
            if piece:
                self.on_body(piece)
            if self._chunk_left == 0:
                self._mode = self._CHUNK_CRLF
            return True
        if mode == self._CHUNK_CRLF:
            if len(buf) < 2:
                return False
            if buf[:2] != CRLF:
                raise HttpError(502, "bad chunk from backend")
            self._buf = buf[2:]
            self._mode = self._CHUNK_SIZE
            return True
        # _TRAILER: check and drop trailer field lines until the empty one.
        eol = buf.find(CRLF)
        if eol == -1:
            if self._trailers + len(buf) > MAX_HEAD_BYTES:
                raise HttpError(502, "backend trailer section too large")
            return False
        if eol and not valid_trailers(buf[: eol + 2]):
            raise HttpError(502, "malformed trailer from backend")
        self._trailers += eol + 2
        if self._trailers > MAX_HEAD_BYTES:
            raise HttpError(502, "backend trailer section too large")
        self._buf = buf[eol + 2 :]
        if eol == 0:
            self._finish()
        return True

    def _start(self, head: bytes) -> None:
        status_line, headers, index = _split_head(head)
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isdigit():
            raise HttpError(502, "malformed status line from backend")
        status = int(parts[1])
        tokens = _connection_tokens(index)
        if parts[0] == b"HTTP/1.0":
            self._reusable = b"keep-alive" in tokens
        else:
            self._reusable = b"close" not in tokens
        if 100 <= status < 200:
            # Interim responses (100 Continue) are swallowed; the real one follows.
            return
        self.on_head(status, headers)
        te = index.get(b"transfer-encoding")
        cl = index.get(b"content-length")
        if self._head_request or status in (204, 304):
            self._finish()
        elif te is not None:
            if codings(te) != [b"chunked"] or cl is not None:
                raise HttpError(502, "unsupported framing from backend")
            self._mode = self._CHUNK_SIZE
        elif cl is not None:
            try:
                self._left = _content_length(cl)
            except HttpError:
                raise HttpError(502, "bad Content-Length from backend") from None
            self._mode = self._LENGTH
            if self._left == 0:
                self._finish()
        else:
            self._reusable = False
            self._mode = self._CLOSE

    def _finish(self) -> None:
        self._mode = self._IDLE
        self.on_end(self._reusable and not self._buf)


def is_json(headers: list[Header]) -> bool:
    for lname, _name, value in headers:
        if lname == b"content-type":
            return b"json" in value.lower()
    return False
