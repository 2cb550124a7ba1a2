"""Coverage-guided differential fuzzing of the request parser against h11 (atheris).

    python scripts/fuzz_parser.py tests/corpus/parser -max_total_time=300   # make fuzz
    python scripts/fuzz_parser.py --seed tests/corpus/parser   # (re)write the seeds

Each input is a client's byte stream; ``kansas.testing.differential.check`` says whether
kansas's ``RequestParser`` (and the quick path, where it applies) and h11 disagree on
where its requests end or whether they are valid, beyond the classes listed there as
deliberate. Every finding is written to ``$KANSAS_FUZZ_FINDINGS`` (default
``.fuzz/findings``, git-ignored), a few inputs per kind, and printed once per kind; the
run goes on. libFuzzer's own options (``-max_total_time``, ``-max_len``, ``-jobs``, ...)
pass through; new inputs go to the first corpus directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from collections import Counter
from pathlib import Path

# Imported before instrumentation so that only the parsers are instrumented.
import twisted.internet.protocol  # noqa: F401

FINDINGS = Path(os.environ.get("KANSAS_FUZZ_FINDINGS", ".fuzz/findings"))
KEEP_PER_KIND = 5
kinds: Counter[str] = Counter()


def kind_of(finding: str) -> str:
    """The kind of a finding: its text without the requests and numbers in it."""
    text = re.split(r"bytearray\(|b'|b\"|Framed\(", finding)[0]
    return re.sub(r"\d+", "N", text).rstrip(" :,")[:120]


def test_one_input(data: bytes) -> None:
    verdict = differential.check(data)
    if verdict.finding is None:
        return
    kind = kind_of(verdict.finding)
    kinds[kind] += 1
    if kinds[kind] <= KEEP_PER_KIND:
        FINDINGS.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha1(data).hexdigest()[:16]
        (FINDINGS / name).write_bytes(data)
        (FINDINGS / (name + ".txt")).write_text(verdict.finding + "\n")
    if kinds[kind] == 1:
        print(f"\nFINDING ({kind}): {verdict.finding}\n  input: {data!r}", file=sys.stderr)


def seeds() -> list[bytes]:
    """The inputs the corpus starts from: tests/test_smuggling.py's cases (each followed
    by a second request, the smuggled one), the issue's mutation classes, and ordinary
    traffic (nginx's polls, pipelined, with bodies)."""
    from tests import test_smuggling as t

    def params(test: object) -> list[bytes]:
        marks = getattr(test, "pytestmark", [])
        values = [v for m in marks if m.name == "parametrize" for v in m.args[1]]
        return [v[0] if isinstance(v, tuple) else v for v in values]

    out: list[bytes] = []
    for size in params(t.test_only_hex_digits_are_a_chunk_size):
        out.append(t.CHUNKED + size + b"\r\nhello\r\n0\r\n\r\n")
    for ext in params(t.test_malformed_chunk_extensions_are_refused):
        out.append(t.CHUNKED + b"5" + ext + b"\r\nhello\r\n0\r\n\r\n")
    for ext in params(t.test_well_formed_chunk_extensions_are_ignored):
        out.append(t.CHUNKED + b"5" + ext + b"\r\nhello\r\n0" + ext + b"\r\n\r\n")
    for trailers in params(t.test_a_trailer_section_is_field_lines_only):
        out.append(t.CHUNKED + b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n")
    for fields in params(t.test_transfer_encoding_is_the_whole_list):
        out.append(t.HEAD + fields + b"\r\n5\r\nhello\r\n0\r\n\r\n")
    for fields in params(t.test_one_well_formed_host):
        out.append(b"GET /json/events?queue_id=q HTTP/1.1\r\n" + fields + b"\r\n")
    for host in params(t.test_ordinary_hosts_pass):
        out.append(b"GET /json/events?queue_id=q HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    out += t.ATTACKS
    out.append(t.HEAD + b"Transfer-Encoding: , chunked,\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    out.append(t.CHUNKED + b"5\r\nhello\r\n0\r\nX-A: 1\r\nX-B:\r\n\r\n")
    # CL.TE and TE.CL shapes, Content-Length abuse, line endings, request lines.
    host = b"Host: chat.example.com\r\n"
    for fields in [b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                   b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                   b"Content-Length: 5\r\nContent-Length: 5\r\n", b"Content-Length: 5, 5\r\n",
                   b"Content-Length: +5\r\n", b"Content-Length: 05\r\n",
                   b"Content-Length: 5 \r\n", b"Content-Length : 5\r\n",
                   b"Transfer-Encoding : chunked\r\n", b"Transfer-Encoding:\tchunked\r\n",
                   b"Transfer-Encoding: xchunked\r\n", b"Transfer-Encoding: CHUNKED\r\n",
                   b" Transfer-Encoding: chunked\r\n", b"X: y\r\n Transfer-Encoding: chunked\r\n",
                   b"Transfer-Encoding: chunked\r\nTransfer-Encoding: \r\n",
                   b"Transfer-Encoding: \x0bchunked\r\n", b"Transfer-Encoding: chunked\x00\r\n",
                   b"Content-Length: 5\n", b"Transfer-Encoding: chunked\r\r\n"]:  # fmt: skip
        out.append(b"POST /json/events HTTP/1.1\r\n" + host + fields + b"\r\n5\r\nhello\r\n0"
                   b"\r\n\r\n" + t.SMUGGLED)  # fmt: skip
    poll = (b"GET /json/events?dont_block=false&queue_id=q&last_event_id=3 HTTP/1.1\r\n"
            b"Host: chat.example.com\r\nX-Real-Ip: 6.6.6.6\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"User-Agent: ZulipMobile/27\r\nCookie: sessionid=x\r\n\r\n")  # fmt: skip
    out += [poll, poll + poll, b"\r\n" + poll, b"\r\n\r\n" + poll, poll.replace(b"\r\n", b"\n"),
            poll.replace(b"1.1", b"1.0"), poll.replace(b"1.1", b"1.0").replace(
                b"Cookie", b"Connection: keep-alive\r\nCookie") + poll,
            poll.replace(b"Cookie: sessionid=x", b"Connection: close") + poll,
            b"DELETE /api/v1/events HTTP/1.1\r\n" + host + b"Content-Length: 3\r\n\r\nabc" + poll,
            b"GET http://x/json/events HTTP/1.1\r\n" + host + b"\r\n",
            b"GET  /json/events HTTP/1.1\r\n" + host + b"\r\n",
            b"GET /json/events HTTP/1.1 \r\n" + host + b"\r\n",
            b"GET /json/events HTTP/1.2\r\n" + host + b"\r\n",
            b"GET /json/events HTTP/1.1\r\n" + host + b"Expect: 100-continue\r\nUpgrade: x"
            b"\r\n\r\n" + poll]  # fmt: skip
    # The quick path's special headers, each alone on an otherwise quick request.
    for extra in [b"Connection: close", b"Connection: keep-alive, close", b"Connection: Close",
                  b"Connection: keep-alive", b"Connection: upgrade", b"X-Request-Id: abc-1",
                  b"X-Request-Id: a\r\nX-Request-Id: b", b"Keep-Alive: 5", b"TE: trailers",
                  b"Proxy-Connection: close", b"Content-Length: 0", b"Expect: 100-continue",
                  b"Connection: close\r\nConnection: keep-alive", b"host: b.example.com",
                  b"Transfer-Encoding: chunked"]:  # fmt: skip
        out.append(poll.replace(b"Cookie: sessionid=x", extra))
        out.append(poll.replace(b"Cookie: sessionid=x", extra) + poll)
    return list(dict.fromkeys(out))


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for data in seeds():
        (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--seed"]:
        write_seeds(Path(sys.argv[2]))
        sys.exit(0)
    import atheris

    with atheris.instrument_imports(
        include=["h11", "kansas.http.wire", "kansas.proxy.quick", "kansas.testing.differential"]
    ):
        from kansas.testing import differential
    # libFuzzer runs argv[0] through the shell for -merge and -fork: make it this
    # interpreter (the venv's) running this file, which need not be executable.
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))}"
    atheris.Setup([command, *sys.argv[1:]], test_one_input)
    atheris.Fuzz()
