"""kansas-ctl status/trace failures are one line; the observability options are checked."""

from __future__ import annotations

import io

import pytest

from kansas.ctl import main
from kansas.testing.servers import free_port

#: kansas.tap imports twisted.web.proxy, whose import warns (deprecated HTTPClient).
_TAP_IMPORT = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "--internal", "http://127.0.0.1:{port}"], "cannot reach kansas at"),
        (["status", "--internal", "ftp://127.0.0.1"], "bad --internal URL"),
        (["trace", "not a queue id"], "cannot be a queue id"),
        (["trace", "q1", "--internal", "http://127.0.0.1:{port}"], "cannot reach kansas at"),
    ],
)
def test_status_and_trace_failures_are_one_line(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert run("--postgres", postgres_dsn, "migrate")[0] == 0
    argv = [a.format(port=free_port()) for a in argv]  # nobody listens there
    capsys.readouterr()
    code, _out = run("--postgres", postgres_dsn, *argv)
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("kansas-ctl: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--access-log", "xml"], "bad --access-log 'xml'"),
        (["--trace-queues", "-1"], "--trace-queues must be >= 0"),
    ],
)
@_TAP_IMPORT
def test_bad_observability_options_stop_twistd_with_one_line(argv: list[str], message: str) -> None:
    from kansas.tap import Options

    with pytest.raises(SystemExit) as stopped:
        Options().parseOptions(["--postgres", "dbname=kansas", *argv])
    assert str(stopped.value) == f"twistd kansas: {message}" + (
        ": json, text or off" if "access-log" in message else ""
    )


@_TAP_IMPORT
def test_observability_defaults() -> None:
    from kansas.tap import Options

    options = Options()
    options.parseOptions(["--postgres", "dbname=kansas"])
    assert options["access-log"] == "off" and options["trace-queues"] == 2000
