"""``make run``: the whole of kansas live on one machine, with demo shards.

Starts a private redis-server (AOF, fsync every second) and PostgreSQL with their data
under ``.run/`` (kept between runs), two demo shards, registers them, and runs
``twistd -n kansas`` in front; prints what to try. Ctrl-C stops all of it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kansas.ctl import main as ctl
from kansas.testing.processes import Child, DemoShardProcess, KansasProcess, port_open
from kansas.testing.servers import PostgresServer, RedisServer, ServerError

SECRET = "demo-secret"
REALM = "chat.example.com"


def _ports_free(ports: dict[str, int]) -> None:
    busy = [f"{name} ({port})" for name, port in ports.items() if port_open(port)]
    if busy:
        raise SystemExit(f"make run: ports in use: {', '.join(busy)}; stop what uses them first")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kansas.demo.stack", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path(".run"), help="data and logs")
    parser.add_argument("--public-port", type=int, default=9799)
    parser.add_argument("--internal-port", type=int, default=9798)
    parser.add_argument("--shard-ports", type=int, nargs=2, default=[9800, 9801])
    parser.add_argument("--redis-port", type=int, default=9379)
    parser.add_argument("--postgres-port", type=int, default=9432)
    args = parser.parse_args(argv)
    base: Path = args.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    logs = base / "logs"
    logs.mkdir(exist_ok=True)
    _ports_free({"kansas": args.public_port, "kansas internal": args.internal_port,
                 "shard a": args.shard_ports[0], "shard b": args.shard_ports[1],
                 "redis": args.redis_port, "postgres": args.postgres_port})  # fmt: skip

    started: list[Child | RedisServer | PostgresServer] = []

    def stop_all(*_: object) -> None:
        for thing in reversed(started):
            thing.stop()
        started.clear()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        print("starting redis and postgres (data in .run/) ...", flush=True)
        redis = RedisServer(base / "redis", durable=True).start(args.redis_port)
        started.append(redis)
        postgres = PostgresServer(base / "postgres").start(args.postgres_port)
        started.append(postgres)
        env_line = f"export KANSAS_POSTGRES={shlex.quote(postgres.dsn)} KANSAS_REDIS={redis.url}"
        common = ["--postgres", postgres.dsn, "--redis", redis.url]
        if ctl([*common, "migrate"]) != 0:
            raise SystemExit(1)
        shards = []
        for name, port in zip("ab", args.shard_ports, strict=True):
            shard = DemoShardProcess(name, logs, SECRET, port=port)
            shard.state_file = base / f"shard-{name}.json"
            shard.start()
            started.append(shard)
            shards.append(shard)
        registered = {line.split()[0] for line in _shard_names(common)}
        for shard in shards:
            if shard.name not in registered:
                ctl([*common, "shard", "add", shard.name, shard.url])
        kansas = KansasProcess(logs, postgres.dsn, redis.url, public_port=args.public_port,
                               internal_port=args.internal_port,
                               workers=os.cpu_count() or 1)  # fmt: skip
        kansas.start()
        started.append(kansas)
        assert kansas.proc is not None
        print(_instructions(args, env_line, logs, kansas.proc.pid), flush=True)
        while all(thing.alive() for thing in started):
            time.sleep(0.5)
        dead = ", ".join(getattr(t, "name", "?") for t in started if not t.alive())
        print(f"make run: {dead} exited; stopping", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    except ServerError as e:
        print(f"make run: {e}", file=sys.stderr)
    finally:
        stop_all()


def _shard_names(common: list[str]) -> list[str]:
    import io

    out = io.StringIO()
    ctl([*common, "shard", "list"], out=out)
    return out.getvalue().splitlines()[1:]


def _instructions(args: argparse.Namespace, env_line: str, logs: Path, master: int) -> str:
    pub, internal = args.public_port, args.internal_port
    return f"""
kansas is running (Ctrl-C stops everything):
  public listener    http://127.0.0.1:{pub}   (nginx sends /json/events, /api/v1/events here)
  internal listener  http://127.0.0.1:{internal}   (Django creates queues here)
  demo shards        a: 127.0.0.1:{args.shard_ports[0]}  b: 127.0.0.1:{args.shard_ports[1]}
  shared secret      {SECRET}
  logs               {logs}/

Try it, in another terminal:
  # 1. create a queue the way Django does (the realm is the Host header):
  curl -s -H 'Host: {REALM}' -d secret={SECRET} -d user_profile_id=10 -d dont_block=true \\
       http://127.0.0.1:{internal}/api/v1/events/internal
  # 2. long-poll it through the public port (put the queue_id from step 1 in Q):
  curl -s -H 'Host: {REALM}' "http://127.0.0.1:{pub}/json/events?queue_id=$Q&last_event_id=-1"
  # 3. meanwhile, send user 10 an event; the long-poll answers with it:
  curl -s -H 'Host: {REALM}' -d secret={SECRET} \\
       --data-urlencode 'data={{"event":{{"type":"message","content":"hello"}},"users":[10]}}' \\
       http://127.0.0.1:{internal}/api/internal/notify_tornado
  #    (or as Zulip's Django does under kansas: ask kansas.placement which shard holds
  #    user 10's queues, and notify that shard directly)
  {env_line}
  .venv/bin/python -m kansas.placement {REALM} 10
  # 4. look at the routing table and steer the realm:
  .venv/bin/kansas-ctl queues
  .venv/bin/kansas-ctl shard list
  .venv/bin/kansas-ctl realm pin {REALM} b
  # 5. replace kansas's workers with fresh ones (new code), not dropping a connection:
  kill -HUP {master}    # then: grep generation {logs}/kansas.log
"""


if __name__ == "__main__":
    main()
