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


#: A header block as RFC 9112 has it: ``token ":" value CRLF`` lines, values of visible
#: bytes, spaces, tabs and obs-text only (no NUL, bare CR or LF, other controls, nor
#: obsolete line folding). Checked in one regex pass, then cut into pairs in another.
_HEADER_BLOCK = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
_HEADER_PAIRS = re.compile(rb"([^:]+):[\t ]*([^\r]*)\r\n")


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
        if lname == b"content-length" and index.get(lname, value) != value:
            raise HttpError(400, "conflicting Content-Length headers")
        headers.append((lname, name, value))
        index[lname] = value
    return first, headers, index


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
        if head.startswith(CRLF):  # tolerate stray CRLFs between requests (RFC 9112 2.2)
            head = head.lstrip(CRLF)
        request_line, headers, index = _split_head(head)
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[0] or not _TOKEN_CHARS.issuperset(parts[0]):
            raise HttpError(400, "malformed request line")
        method, target, version = parts
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
        return Request(method, target, version, headers, b"", keep_alive, index)

    def _body_length(self, request: Request) -> int | None:
        te = request.header(b"transfer-encoding")
        cl = request.header(b"content-length")
        if te is not None:
            if cl is not None:
                raise HttpError(400, "both Content-Length and Transfer-Encoding")
            if te.lower() != b"chunked":
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
                if len(buf) - pos > 1024:
                    raise HttpError(400, "bad chunk size line")
                return None
            size_field = buf[pos:eol].split(b";", 1)[0].strip()
            try:
                chunk = int(size_field, 16)
            except ValueError:
                raise HttpError(400, "bad chunk size") from None
            if chunk < 0 or len(size_field) > 16:
                raise HttpError(400, "bad chunk size")
            size += chunk
            if size > self.max_body:
                raise HttpError(413, "request body too large")
            start = eol + 2
            if chunk == 0:
                # Trailers (ignored) end with an empty line.
                end = buf.find(b"\r\n\r\n", eol)
                if end == -1:
                    if buf.startswith(CRLF, start):
                        self._buf = buf[start + 2 :]
                        return b"".join(parts)
                    return None
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
                if len(buf) > 1024:
                    raise HttpError(502, "bad chunk from backend")
                return False
            try:
                size = int(buf[:eol].split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HttpError(502, "bad chunk from backend") from None
            self._buf = buf[eol + 2 :]
            if size < 0:
                raise HttpError(502, "bad chunk from backend")
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
        # _TRAILER: skip trailer lines until the empty one.
        eol = buf.find(CRLF)
        if eol == -1:
            return False
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
            if te.lower() != b"chunked" or cl is not None:
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
