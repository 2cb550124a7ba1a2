"""Fuzzing the public request path (parser, router, head rewriting) with hypothesis.

Bounded in `make test`; `make fuzz` runs the same properties far longer
(KANSAS_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import json
import os
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from tests.test_proxy import Harness

EXAMPLES = int(os.environ.get("KANSAS_FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HEADER_LINE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [^\r\n\x00]*$")

token = st.sampled_from([b"GET", b"DELETE", b"POST", b"PUT", b"G\x00T", b"", b"HEAD"])
path = st.sampled_from([b"/json/events", b"/api/v1/events", b"/api/v1/events/internal",
                        b"/api/internal/notify_tornado", b"/", b"*", b"http://x/"])  # fmt: skip
query_value = st.one_of(
    st.sampled_from([b"5b0c6c58-1f8c-4c57-9a4a-000000000001", b"-1", b"1x", b"%00", b"%ff"]),
    st.binary(max_size=40),
)
header = st.tuples(
    st.sampled_from(
        [
            b"Host",
            b"Content-Length",
            b"Transfer-Encoding",
            b"Connection",
            b"X-Real-Ip",
            b"X-Forwarded-For",
            b"Expect",
            b"Bad Name",
            b"",
            b"Cookie",
            b"X-Custom",
            b"User-Agent",
        ]
    ),
    st.one_of(
        st.sampled_from(
            [
                b"chat.example.com",
                b"5",
                b"chunked",
                b"close",
                b"0",
                b"a\rb",
                b"a\nb",
                b"a\x00b",
                b"a\rX-Evil: 1",
                b"keep-alive, X-Custom",
            ]
        ),
        st.binary(max_size=30),
    ),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """Mostly well-formed event requests (so they reach the forwarding code) with
    hostile parts mixed in: odd methods and paths, junk query values and headers."""
    valid = draw(st.booleans())
    if valid:
        line = draw(st.sampled_from([b"GET", b"DELETE"])) + b" /json/events?queue_id="
        line += b"5b0c6c58-1f8c-4c57-9a4a-000000000001&last_event_id=-1 HTTP/1.1"
        headers = [(b"Host", b"chat.example.com")]
    else:
        query = b"&".join(
            draw(st.sampled_from([b"queue_id", b"last_event_id", b"dont_block", b""])) + b"=" + v
            for v in draw(st.lists(query_value, max_size=3))
        )
        line = draw(token) + b" " + draw(path) + (b"?" + query if query else b"") + b" "
        line += draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"FOO"]))
        headers = []
    headers += draw(st.lists(header, max_size=4))
    body = draw(st.binary(max_size=64))
    return line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n" + body


def check_answer(out: bytes) -> None:
    """Whatever kansas wrote itself is a well-formed HTTP answer with a JSON body."""
    while out:
        if out.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
            out = out[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
            continue
        head, sep, rest = out.partition(b"\r\n\r\n")
        assert sep, out
        status_line, *lines = head.split(b"\r\n")
        assert re.fullmatch(rb"HTTP/1\.1 [1-5]\d\d [ -~]*", status_line), status_line
        fields = dict(line.split(b": ", 1) for line in lines)
        length = int(fields[b"Content-Length"])
        body, out = rest[:length], rest[length:]
        data = json.loads(body)
        assert data["result"] in ("success", "error")
        if data["result"] == "error":
            assert data["msg"] and data["code"]


@fuzz
@given(st.lists(requests(), min_size=1, max_size=3), st.lists(st.integers(0, 400), max_size=4))
def test_any_bytes_get_a_clean_answer_or_a_clean_forward(
    stream: list[bytes], cuts: list[int]
) -> None:
    h = Harness()
    h.route("5b0c6c58-1f8c-4c57-9a4a-000000000001")
    client, transport = h.client()
    data = b"".join(stream)
    start = 0
    for cut in [*sorted(c for c in cuts if c < len(data)), len(data)]:
        client.dataReceived(data[start:cut])
        start = cut
    # Anything forwarded is one well-formed request head: no injected lines, no
    # hop-by-hop or client-chosen forwarding headers.
    for _host, _port, factory, _t, _b in h.reactor.tcpClients:
        upstream = StringTransport()
        factory.buildProtocol(None).makeConnection(upstream)
        sent = upstream.value()
        head, sep, _ = sent.partition(b"\r\n\r\n")
        assert sep
        request_line, *lines = head.split(b"\r\n")
        assert re.fullmatch(rb"(GET|DELETE) /(json|api/v1)/events\?[!-~]* HTTP/1\.1", request_line)
        for line in lines:
            assert HEADER_LINE.match(line), line
            assert not line.lower().startswith((b"connection:", b"transfer-encoding:"))
        assert lines.count(b"X-Real-Ip: 10.1.2.3") == 1
    check_answer(transport.value())
