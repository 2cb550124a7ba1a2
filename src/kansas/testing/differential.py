"""kansas's request parser against h11, on the same bytes: where does each request end?

``check(data)`` feeds ``data`` (a client's byte stream, possibly several pipelined
requests) to ``kansas.http.wire.RequestParser`` and to h11 (a well-kept pure-Python
HTTP/1.1 parser), lines up the requests each one cut out of it, and says whether they
disagree in a way that matters. llhttp (Node's parser, through httptools) is a second
oracle, compared on methods, targets and bodies only, by the same rules.
``scripts/fuzz_parser.py`` calls it under atheris (coverage-guided, ``make fuzz``);
``tests/test_parser_corpus.py`` replays the corpus (``tests/corpus/parser/``) through it
in ``make test``.

A **finding** is one of:

- kansas accepts (a whole request, or a request head it then waits for the body of)
  what h11 refuses, outside the listed classes below;
- both accept, but frame differently: another method, target, version, header list
  (Content-Length and Transfer-Encoding aside: h11 merges and lower-cases them), body,
  keep-alive, or number of bytes left after the last request;
- kansas ends a request where h11 is still reading it;
- the quick path (``kansas.proxy.quick.quick_request``) takes bytes that the general
  parser does not read as exactly that one bodiless request;
- kansas gives other requests when the same bytes arrive in pieces;
- kansas refuses what h11 accepts for a reason not listed in ``STRICTER`` (not a hole,
  but the list must stay complete);
- against llhttp: kansas accepts what llhttp refuses, outside ``LLHTTP_STRICTER``, or
  ends a request elsewhere.

kansas refusing what h11 accepts is never a finding by itself: kansas is a proxy in
front of other parsers and is stricter on purpose, class by class, each with its RFC
reason in ``STRICTER`` (keyed by kansas's error message). The few places where h11
refuses what kansas accepts on purpose are in ``ORACLE_STRICTER``, each with its RFC
reason; anything else kansas accepts and h11 refuses is a finding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h11
import httptools
from h11._state import MIGHT_SWITCH_PROTOCOL

from kansas.http.wire import MAX_HEAD_BYTES, HttpError, Request, RequestParser
from kansas.proxy.quick import quick_request

#: The body limit for the comparison: far above any fuzz input, so 413 never hides a
#: framing difference (the limits themselves are tested in tests/test_wire.py).
MAX_BODY = 1 << 20

#: kansas's refusals where h11 accepts, by kansas's error message: each class where
#: kansas is stricter on purpose, with its reason (RFC 9112 unless said otherwise).
STRICTER: dict[str, str] = {
    "malformed header line": (
        '5, 5.2; RFC 9110 5.5: a field line is token ":" OWS value OWS with visible '
        "bytes, spaces, tabs and obs-text only. h11 takes any byte but NUL and "
        "whitespace in a value (so other controls and DEL), and unfolds obs-fold, "
        "which a server MUST either refuse or replace (kansas refuses)"
    ),
    "lines must end with CRLF": (
        "2.2: a recipient MAY take a bare LF as a line end; kansas does not, since a "
        "parser before or behind it that does not would cut the stream elsewhere "
        "(h11 does)"
    ),
    "bad chunk size line": (
        "7.1, 7.1.1: chunk-size is hex digits (kansas: at most 16, a 64-bit size), then "
        'chunk-ext = *( BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ] ). '
        'h11 takes up to 20 digits, ";" followed by anything, and whitespace after the '
        "size or the extensions"
    ),
    "malformed trailer section": (
        "7.1.2: a trailer section is field lines; kansas applies the same rules as to "
        "the head (no obs-fold, no controls), h11 its own lenient ones"
    ),
    "both Content-Length and Transfer-Encoding": (
        "6.3 (3): such a message ought to be handled as an error, and a server MAY "
        "refuse it; it is the CL.TE / TE.CL smuggling shape, so kansas refuses (h11 "
        "lets Transfer-Encoding win)"
    ),
    "bad Content-Length": (
        "6.3 (5), RFC 9110 8.6: Content-Length = 1*DIGIT; a recipient MAY take a list "
        'of identical values ("5, 5") as one, kansas does not; at most 18 digits'
    ),
    "invalid Host header": (
        '3.2, RFC 3986 3.2.2: Host = uri-host [ ":" port ], a reg-name, IPv4 or '
        "bracketed IP literal and digits after the colon; a server MUST answer 400 to an "
        "invalid Host (h11 does not look at its value)"
    ),
    "unsupported HTTP version": (
        "2.3, 2.5: kansas speaks HTTP/1.0 and HTTP/1.1 only and answers 505 to any "
        "other version (h11 reads any HTTP/d.d as 1.1)"
    ),
    "request target must be a path": (
        "3.2.1: kansas is an origin server for nginx, which only sends origin-form; "
        "absolute-form (3.2.2, meant for proxies), authority-form (CONNECT) and "
        "asterisk-form (OPTIONS *) are refused, so no other form can carry a second "
        "Host"
    ),
    "Transfer-Encoding in an HTTP/1.0 request": (
        "6.1: a server MUST treat an HTTP/1.0 message with Transfer-Encoding as having "
        "faulty framing and close the connection (h11 reads it chunked)"
    ),
    "malformed request line": (
        "3: request-line = method SP request-target SP HTTP-version, single spaces; "
        "kansas tolerates one CRLF before it (2.2), h11 none, kansas not two"
    ),
    "CONNECT is not served": (
        "RFC 9110 9.3.6: a CONNECT request has no content, and the bytes after its head "
        "belong to a tunnel (3.2.3: its target is authority-form); h11 reads a "
        "Content-Length body and then a next request, llhttp no body and then a tunnel. "
        "kansas tunnels nothing and refuses CONNECT in any form (400, closed)"
    ),
    "request body too large": "a limit (413): --max-body-bytes",
    "request head too large": "a limit (431): --max-head-bytes",
    "trailer section too large": "a limit (431): the head limit, for trailers",
    "too many headers": "a limit (431): 100 field lines",
}

#: Where h11 refuses what kansas accepts on purpose, by h11's error message (a prefix):
#: each says why kansas's reading is the RFC's, and why it is safe.
ORACLE_STRICTER: dict[str, str] = {
    "Missing mandatory Host: header": (
        "the parser leaves a missing Host to the listener, which answers it 400 "
        "(3.2: MUST); the message's framing is unambiguous, so the connection may "
        "stay open"
    ),
    "no request line received": (
        "2.2: a server SHOULD ignore at least one empty line (CRLF) before a "
        "request-line; kansas ignores one, h11 none"
    ),
}


#: The second oracle, llhttp (through httptools), compared on methods, targets and
#: bodies only: where it refuses what kansas and h11 accept, by its error message.
LLHTTP_STRICTER: dict[str, str] = {
    "Invalid method encountered": (
        "llhttp knows a fixed list of methods; a method is any token (RFC 9110 9.1), "
        "and kansas's listeners answer 405 to all but the few they serve"
    ),
    "Expected space after method": (
        'the same list: llhttp reads a method by its known names ("GETX" fails after '
        '"GET"), kansas as a token'
    ),
    "Data after `Connection: close`": (
        "keep-alive, not framing: llhttp also closes on Proxy-Connection: close, a "
        "pre-standard field that RFC 9110 7.6.1 has intermediaries drop; kansas reads "
        "keep-alive from Connection only (RFC 9112 9.3), as h11 does, and the h11 "
        "comparison checks keep-alive"
    ),
    "Duplicate Content-Length": (
        "RFC 9112 6.3 (5), RFC 9110 8.6: repeated identical values MAY be taken as one "
        "(h11 does too); conflicting ones are 400"
    ),
}


@dataclass(frozen=True, slots=True)
class Framed:
    """One request as a parser cut it out of the stream."""

    method: bytes
    target: bytes
    version: bytes  # b"1.1"
    headers: tuple[tuple[bytes, bytes], ...]  # lower-cased names, framing headers aside
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class Outcome:
    """What one parser made of the whole stream."""

    requests: list[Framed] = field(default_factory=list)
    #: "error", "incomplete" (waiting for more bytes), or "closed" (the last request
    #: ends the connection: nothing after it is read)
    end: str = "incomplete"
    head_pending: bool = False  # incomplete, with the next request's head accepted
    message: str = ""  # the error
    status: int = 0
    left: int = 0  # bytes after the last request, when "closed"


_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


def _headers(pairs: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((n, v) for n, v in pairs if n not in _FRAMING)


def _kansas_framed(request: Request) -> Framed:
    return Framed(
        request.method,
        request.target,
        request.version.removeprefix(b"HTTP/"),
        _headers([(lname, value) for lname, _name, value in request.headers]),
        request.body,
        request.keep_alive,
    )


def kansas_outcome(data: bytes, pieces: int = 1) -> Outcome:
    """kansas's reading of ``data``, fed whole or in ``pieces`` about equal parts."""
    parser = RequestParser(MAX_BODY, MAX_HEAD_BYTES)
    out = Outcome()
    step = max(1, -(-len(data) // pieces))
    try:
        for start in range(0, max(len(data), 1), step):
            parser.feed(data[start : start + step])
            while (request := parser.next_request()) is not None:
                out.requests.append(_kansas_framed(request))
                if not request.keep_alive:
                    out.end = "closed"
                    out.left = parser.buffered + len(data) - min(len(data), start + step)
                    return out
    except HttpError as e:
        out.end, out.message, out.status = "error", e.message, e.status
        return out
    out.head_pending = parser._pending is not None
    return out


def h11_outcome(data: bytes) -> Outcome:
    """h11's reading of ``data``, as a server answering each request at once."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    conn.receive_data(data)
    out = Outcome()
    head: h11.Request | None = None
    body: list[bytes] = []
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                out.head_pending = head is not None
                return out
            if isinstance(event, h11.Request):
                head, body = event, []
            elif isinstance(event, h11.Data):
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                if conn.their_state in (h11.DONE, MIGHT_SWITCH_PROTOCOL):
                    # A 404 (as kansas's listener would answer most of what fuzzing makes)
                    # turns down an Upgrade or a CONNECT, so that h11 reads on.
                    try:
                        conn.send(
                            h11.Response(status_code=404, headers=[(b"content-length", b"0")])
                        )
                        conn.send(h11.EndOfMessage())
                    except h11.LocalProtocolError:
                        pass  # h11 cannot answer: it reads no further (keep_alive is False)
                keep_alive = conn.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}
                pairs = [(n, v) for n, v in head.headers]
                out.requests.append(
                    Framed(
                        head.method,
                        head.target,
                        head.http_version,
                        _headers(pairs),
                        b"".join(body),
                        keep_alive,
                    )
                )
                head = None
                if not keep_alive:
                    out.end, out.left = "closed", len(conn.trailing_data[0])
                    return out
                conn.start_next_cycle()
            else:  # PAUSED or a ConnectionClosed: nothing more is read
                out.end = "closed"
                out.left = len(conn.trailing_data[0])
                return out
    except h11.RemoteProtocolError as e:
        out.end, out.message, out.status = "error", str(e), e.error_status_hint
        out.head_pending = head is not None  # the error is in the body
        return out


class _Llhttp:
    """httptools's callbacks, collecting what the request parser cut out."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.out = Outcome()
        self.target = b""
        self.body: list[bytes] = []

    def on_message_begin(self) -> None:
        self.target, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_headers_complete(self) -> None:
        self.out.head_pending = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method()
        self.out.requests.append(Framed(method, self.target, b"", (), b"".join(self.body),
                                        keep_alive))  # fmt: skip
        self.out.head_pending = False


def llhttp_outcome(data: bytes) -> Outcome:
    """llhttp's reading of ``data`` (methods, targets, bodies and keep-alive only)."""
    ll = _Llhttp()
    try:
        ll.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        ll.out.end = "closed"
    except httptools.HttpParserError as e:
        ll.out.end, ll.out.message = "error", str(e)
    return ll.out


@dataclass(frozen=True, slots=True)
class Verdict:
    """``finding`` is None when the parsers agree or differ only in a listed class."""

    finding: str | None
    note: str  # "agree", or the listed class that explains the difference


def _oracle_class(message: str) -> str | None:
    for prefix in ORACLE_STRICTER:
        if message.startswith(prefix):
            return prefix
    return None


def _h11_refuses_here(h: Outcome, n: int) -> bool:
    return h.end == "error" and len(h.requests) == n


def check(data: bytes) -> Verdict:
    """Compare kansas's and h11's readings of ``data`` (see the module docstring)."""
    k = kansas_outcome(data)
    quick = quick_request(data)
    if quick is not None:
        end = "incomplete" if quick.keep_alive else "closed"
        one = len(k.requests) == 1 and k.end == end and not k.head_pending and not k.left
        first = k.requests[0] if one else None
        if first is None or first.body or (
            (quick.method, quick.target, quick.keep_alive, quick.host, quick.request_id)
            != (first.method, first.target, first.keep_alive, _last(first, b"host"),
                _last(first, b"x-request-id"))
        ):  # fmt: skip
            return Verdict("the quick path takes what the general parser does not", "")
    for pieces in (2, 3):
        split = kansas_outcome(data, pieces)
        if (split.requests, split.end == "error") != (k.requests, k.end == "error"):
            return Verdict(f"kansas reads the stream in {pieces} pieces differently", "")
    second = _against_llhttp(k, llhttp_outcome(data))
    if second is not None:
        return Verdict(second, "")
    h = h11_outcome(data)
    n = 0
    for kr, hr in zip(k.requests, h.requests, strict=False):
        if kr.version == b"1.0" and kr.keep_alive and not hr.keep_alive:
            # h11 closes every HTTP/1.0 connection; kansas honours keep-alive (9.3), and
            # the framing up to there is what is compared.
            kr = Framed(kr.method, kr.target, kr.version, kr.headers, kr.body, False)
            if kr == hr:
                return Verdict(None, "HTTP/1.0 keep-alive")
        if kr != hr:
            return Verdict(f"request {n + 1} framed differently: kansas {kr!r}, h11 {hr!r}", "")
        n += 1
        if not kr.keep_alive:
            if k.left != h.left and (len(k.requests), len(h.requests)) == (n, n):
                return Verdict(f"{k.left} bytes left after the last request, h11 {h.left}", "")
            return Verdict(None, "agree")
    if len(k.requests) > n:
        # kansas has a whole request h11 does not.
        if _h11_refuses_here(h, n):
            cls = _oracle_class(h.message)
            if cls is not None:
                return Verdict(None, cls)
            return Verdict(f"kansas accepts request {n + 1}, which h11 refuses: {h.message}", "")
        return Verdict(f"kansas ends request {n + 1} where h11 is still reading it", "")
    if len(h.requests) > n:
        # h11 has a whole request kansas does not: kansas refused it, or waits.
        if k.end == "error":
            return _stricter(k)
        return Verdict(None, "kansas waits for more")
    # Neither has another whole request.
    if k.end == "error":
        return _stricter(k) if h.end != "error" else Verdict(None, "agree")
    if k.head_pending and h.end == "error" and not h.head_pending:
        cls = _oracle_class(h.message)
        if cls is not None:
            return Verdict(None, cls)
        return Verdict(f"kansas accepts the head of request {n + 1}, which h11 refuses: "
                       f"{h.message}", "")  # fmt: skip
    return Verdict(None, "agree")


def _last(request: Framed, name: bytes) -> bytes | None:
    """The value of a header's last line, as ``Request.header`` gives it."""
    values = [v for n, v in request.headers if n == name]
    return values[-1] if values else None


def _stricter(k: Outcome) -> Verdict:
    if k.message in STRICTER:
        return Verdict(None, k.message)
    return Verdict(f"kansas refuses, for a reason not listed as deliberate: {k.message}", "")


def _against_llhttp(k: Outcome, ll: Outcome) -> str | None:
    """A finding against llhttp, on methods, targets and bodies, or None."""
    n = 0
    for kr, lr in zip(k.requests, ll.requests, strict=False):
        if (kr.method, kr.target, kr.body) != (lr.method, lr.target, lr.body):
            return f"request {n + 1} framed differently: kansas {kr!r}, llhttp {lr!r}"
        n += 1
    if k.end == "closed" and n == len(k.requests):
        return None  # llhttp goes on reading, or refuses the bytes after a close
    if len(k.requests) > n or (k.head_pending and not ll.head_pending):
        if ll.end == "error" and len(ll.requests) == n:
            if any(ll.message.startswith(m) for m in LLHTTP_STRICTER):
                return None
            return f"kansas accepts request {n + 1}, which llhttp refuses: {ll.message}"
        if len(k.requests) > n and ll.end != "closed":
            return f"kansas ends request {n + 1} where llhttp is still reading it"
    return None
