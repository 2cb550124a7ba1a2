"""A shard restart under N held long-polls: kansas's memory per parked GET, and the
release rate it actually keeps when the shard is back.

N clients (raw sockets in this process) long-poll through kansas on one demo shard;
the shard gets SIGTERM (it drops their long-polls: kansas parks every one), kansas's
RSS is read, the shard is started again, and kansas's own log line says how fast it
released them (``--release-rate``, 200/s by default).

    .venv/bin/python bench/parking.py --clients 5000
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import tempfile
import time
from pathlib import Path

from common import (  # bench/common.py (this folder)
    create_queues,
    long_poll,
    one_shard_stack,
    parked_at,
    raise_open_file_limit,
    rss_kib,
)

from kansas.testing.processes import KansasProcess

REALM = "bench.example.com"
# Long-polls are held by the shard until this bench is done with them.
SECRET = "bench-secret"


def wait(condition: object, what: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: timed out waiting for {what}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5000)
    args = parser.parse_args()
    n = args.clients
    raise_open_file_limit()
    tmp = Path(tempfile.mkdtemp(prefix="kansas-bench-"))
    tmp.chmod(0o755)
    with one_shard_stack(tmp, SECRET) as (redis, postgres, shard):
        kansas = KansasProcess(tmp, postgres.dsn, redis.url).start()
        assert kansas.proc is not None
        try:
            queues = create_queues(kansas.internal_port, SECRET, REALM, range(n))
            clients = [long_poll(kansas.public_port, REALM, q) for q in queues]
            wait(lambda: parked_at(shard.port) == n, "the long-polls to reach the shard")
            held = rss_kib(kansas.proc.pid)
            shard.stop()  # SIGTERM: every long-poll is cut, kansas parks them all
            wait(lambda: "is down" in kansas.log_text(), "kansas to see the shard down")
            time.sleep(2)  # let the cut connections close and the parking settle
            parked = rss_kib(kansas.proc.pid)
            shard.start()
            wait(lambda: "released" in kansas.log_text(), "the parked GETs to be released")
            line = re.search(r"released \d+ parked requests.*", kansas.log_text())
            answered = 0
            for s in clients:
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answered += s.recv(100).startswith(b"HTTP/1.1 200 ")
                s.close()
        finally:
            kansas.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{n:,} long-polls held through kansas, then their shard restarted:")
    print(f"- kansas RSS while the shard held them: {held:,} KiB; while kansas parked them: "
          f"{parked:,} KiB ({(parked - held) * 1024 / n:+,.0f} bytes per GET: the backend "
          "connection goes, the parking entry comes)")  # fmt: skip
    print(f"- kansas: {line.group(0) if line else '(no release line)'}")
    # This bench's clients do not poll again; a GET that had waited 85 s in all (here
    # mostly at the shard, which has no heartbeat in this bench) is answered with an
    # empty success instead of being parked.
    print(f"- clients answered with the empty success (patience used up): {answered:,}")


if __name__ == "__main__":
    main()
