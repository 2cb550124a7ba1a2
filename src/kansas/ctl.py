"""``kansas-ctl``: the operator's handle on the authority (PostgreSQL) and the table (Redis).

Every failure is one line on stderr and a non-zero exit: 2 for a bad command line,
1 for anything else (unreachable database, unknown shard, ...).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, Protocol
from urllib.parse import urlsplit

from kansas import __version__
from kansas.errors import KansasError
from kansas.model import Assignment, QueueRoute, parse_shard_url
from kansas.moves import (
    DEFAULT_RELOAD_RATE,
    DEFAULT_SETTLE_SECONDS,
    describe,
    drain_shard,
    move_realm,
)
from kansas.moves import move_user as move_user_queues
from kansas.observe import client as observe_client
from kansas.proxy.forwarding import QUEUE_ID
from kansas.router import place_queue, realm_home
from kansas.schema import SCHEMA_VERSION
from kansas.stores.interface import IAuthority
from kansas.stores.postgres import PostgresAuthority
from kansas.transparent.protocol import DEFAULT_BATCH, DEFAULT_DEADLINE
from kansas.zulip_sharding import (
    DEFAULT_URL_TEMPLATE,
    ZULIP_DEFAULT_PORT,
    apply_plan,
    load_sharding,
    plan_import,
    plan_rows,
)

#: How long kansas-ctl waits for a shard to accept a connection, then to answer.
PROBE_TIMEOUT = 2.0
#: Any HTTP server answers it, and no Tornado acts on it (Zulip's answers 404).
_PROBE_REQUEST = b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
_PROBE_READ_LIMIT = 65536


class Connection(Protocol):
    """What ``probe_shard`` needs of a socket."""

    def sendall(self, data: bytes, /) -> None: ...
    def recv(self, size: int, /) -> bytes: ...
    def close(self) -> None: ...


Connect = Callable[[tuple[str, int], float], Connection]


def probe_shard(
    url: str, timeout: float = PROBE_TIMEOUT, connect: Connect = socket.create_connection
) -> str | None:
    """Why nothing answers HTTP at a shard's ``url``, or None if something does: a TCP
    connect, then ``GET /``, each given ``timeout`` seconds; any HTTP answer counts."""
    host, port = parse_shard_url(url)
    try:
        conn = connect((host, port), timeout)
    except TimeoutError:
        return f"no connection within {timeout:g} s"
    except OSError as e:
        return _os_reason(e)
    answer = b""
    try:
        conn.sendall(_PROBE_REQUEST % urlsplit(url).netloc.encode("ascii", "replace"))
        # Read the answer to its end (closing on unread bytes would reset the shard's
        # connection mid-write); its first bytes are enough to tell.
        while len(answer) < _PROBE_READ_LIMIT:
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    except TimeoutError:
        if not answer:
            return f"it accepts connections but sent no answer within {timeout:g} s"
    except OSError as e:
        if not answer:
            return f"it accepts connections, then {_os_reason(e)}"
    finally:
        conn.close()
    if not answer:
        return "it accepts connections but closes them without an answer"
    if not answer.startswith(b"HTTP/"):
        return "it accepts connections but does not answer HTTP"
    return None


def _os_reason(error: OSError) -> str:
    text = error.strerror or str(error) or type(error).__name__
    return text[:1].lower() + text[1:]


def warn_unanswered(
    shards: Mapping[str, str], probe: Callable[[str], str | None] = probe_shard
) -> int:
    """Probe every shard (name -> URL) at once; one loud line on stderr for each that
    does not answer. How many did not."""
    if not shards:
        return 0
    with ThreadPoolExecutor(max_workers=min(len(shards), 16)) as pool:
        reasons = list(pool.map(probe, shards.values()))
    for (name, url), reason in zip(shards.items(), reasons, strict=True):
        if reason is not None:
            print(f"WARNING: nothing answers at {url} for shard {name} ({reason}); realms "
                  "placed there will get no events until it does", file=sys.stderr)  # fmt: skip
    return sum(reason is not None for reason in reasons)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: scripts and humans both read it.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _port(value: str) -> int:
    number = int(value)
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"{value} is not a port")
    return number


def _nonnegative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not > 0")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not > 0")
    return number


def _nonnegative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return number


def _reload_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reload-rate", type=_positive_float, default=DEFAULT_RELOAD_RATE,
        help="queues invalidated per second (their clients re-register) [default %(default)s]",
    )  # fmt: skip
    parser.add_argument(
        "--settle",
        type=_nonnegative_float,
        default=DEFAULT_SETTLE_SECONDS,
        help="seconds every kansas is given to apply the change before the first "
        "invalidation [default %(default)s]",
    )


def _internal_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--internal",
        default=os.environ.get("KANSAS_INTERNAL"),
        metavar="URL",
        help="a running kansas's internal listener, e.g. http://127.0.0.1:9798 "
        "[env KANSAS_INTERNAL]",
    )


def _transparent_options(parser: argparse.ArgumentParser, batch: bool) -> None:
    parser.add_argument(
        "--transparent", action="store_true",
        help="move the queues themselves, without a page reload (docs/transparent-moves.md)",
    )  # fmt: skip
    if batch:
        parser.add_argument(
            "--batch", type=_positive_int,
            help="move the users N at a time (piecewise), then pin; with --transparent: "
            f"queues per batch [default {DEFAULT_BATCH}]",
        )  # fmt: skip
    parser.add_argument(
        "--deadline", type=_positive_float, default=DEFAULT_DEADLINE,
        help="--transparent: longest a batch may hold its clients' requests, seconds "
        "[default %(default)s]",
    )  # fmt: skip
    parser.add_argument(
        "--secret", default=os.environ.get("KANSAS_SHARD_SECRET"),
        help="--transparent: the shards' shared secret (Zulip's SHARED_SECRET) "
        "[env KANSAS_SHARD_SECRET]",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kansas-ctl", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--version", action="version", version=f"kansas {__version__}")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("KANSAS_POSTGRES"),
        help="PostgreSQL DSN of the assignments [env KANSAS_POSTGRES]",
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("KANSAS_REDIS", "redis://127.0.0.1:6379/0"),
        help="Redis URL of the queue table [env KANSAS_REDIS; default %(default)s]",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("migrate", help="create or upgrade the schema")

    shard = commands.add_parser("shard", help="register and list shards")
    shard_cmds = shard.add_subparsers(dest="action", required=True, parser_class=_Parser)
    add = shard_cmds.add_parser(
        "add", help="register a Tornado shard (warns if nothing answers at its URL)"
    )
    add.add_argument("name")
    add.add_argument("url", help="http://HOST:PORT")
    add.add_argument("--weight", type=_nonnegative, default=100, help="default %(default)s")
    shard_cmds.add_parser("list", help="list the shards")
    weight = shard_cmds.add_parser(
        "weight", help="change a shard's weight (0: no new queues by hashing)"
    )
    weight.add_argument("name")
    weight.add_argument("weight", type=_nonnegative)
    drain = shard_cmds.add_parser(
        "drain", help="weight 0, and move its realms and queues away at a bounded rate"
    )
    drain.add_argument("name")
    drain.add_argument(
        "--rate", type=_positive_float, default=DEFAULT_RELOAD_RATE,
        help="queues invalidated per second [default %(default)s]",
    )  # fmt: skip
    drain.add_argument(
        "--settle", type=_nonnegative_float, default=DEFAULT_SETTLE_SECONDS,
        help="seconds every kansas is given to apply a change [default %(default)s]",
    )  # fmt: skip
    undrain = shard_cmds.add_parser("undrain", help="give a drained shard its weight back")
    undrain.add_argument("name")
    remove = shard_cmds.add_parser(
        "remove", help="unregister a shard (refused while it owns realms or live queues)"
    )
    remove.add_argument("name")

    realm = commands.add_parser("realm", help="pin realms to shards")
    realm_cmds = realm.add_subparsers(dest="action", required=True, parser_class=_Parser)
    pin = realm_cmds.add_parser("pin", help="send a realm's new queues to a shard")
    pin.add_argument("realm")
    pin.add_argument("shard")
    unpin = realm_cmds.add_parser(
        "unpin", help="remove a realm's pin (back to the regex rules, else hashing)"
    )
    unpin.add_argument("realm")
    split = realm_cmds.add_parser(
        "split", help="split a realm by user: user U goes to SHARDS[U %% n] (as Zulip does)"
    )
    split.add_argument("realm")
    split.add_argument("shards", nargs="+", metavar="shard")
    unsplit = realm_cmds.add_parser("unsplit", help="remove a realm's split")
    unsplit.add_argument("realm")
    realm_cmds.add_parser("list", help="list the realms' pins and splits")
    realm_move = realm_cmds.add_parser(
        "move",
        help="pin a realm to a shard and reload its queues elsewhere at a bounded rate",
    )
    realm_move.add_argument("realm")
    realm_move.add_argument("shard")
    _reload_options(realm_move)
    _transparent_options(realm_move, batch=True)
    realm_move.add_argument(
        "--interval", type=_nonnegative_float, default=0.0,
        help="seconds between batches [default %(default)s]",
    )  # fmt: skip

    regex = commands.add_parser("regex", help="realms by regex (after pins and splits)")
    regex_cmds = regex.add_subparsers(dest="action", required=True, parser_class=_Parser)
    regex_cmds.add_parser("list", help="list the regex rules, in matching order")
    regex_add = regex_cmds.add_parser(
        "add", help="send realms matching PATTERN (re.match, case-insensitive) to shards"
    )
    regex_add.add_argument("pattern")
    regex_add.add_argument("shards", nargs="+", metavar="shard")
    regex_remove = regex_cmds.add_parser("remove", help="remove a regex rule")
    regex_remove.add_argument("pattern")

    imp = commands.add_parser(
        "import-zulip-sharding",
        help="create shards and rules from Zulip's sharding.json (every realm stays put); "
        "warns about every shard URL where nothing answers",
    )
    imp.add_argument("path", help="Zulip's sharding.json (usually /etc/zulip/sharding.json)")
    imp.add_argument(
        "--shard-url-template",
        default=DEFAULT_URL_TEMPLATE,
        help="URL of the Tornado process on {port} [default %(default)s]",
    )
    imp.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    default = imp.add_mutually_exclusive_group()
    default.add_argument(
        "--default-port",
        type=_port,
        help="Zulip's TORNADO_PORTS[0], where realms the file does not name live "
        "[the lowest port in the file; required if it names none: "
        f"{ZULIP_DEFAULT_PORT} on a standard install]",
    )
    default.add_argument(
        "--no-default",
        action="store_true",
        help="leave realms the file does not name to kansas's hash (they move)",
    )

    user = commands.add_parser("user", help="per-user overrides")
    user_cmds = user.add_subparsers(dest="action", required=True, parser_class=_Parser)
    move = user_cmds.add_parser("move", help="send a user's new queues to a shard")
    move.add_argument("realm")
    move.add_argument("user_id", type=_nonnegative)
    move.add_argument("shard")
    _reload_options(move)
    move.add_argument(
        "--no-reload", dest="reload", action="store_false",
        help="only send the user's new queues there; existing queues stay until they expire "
        "(by default they are invalidated at --reload-rate and the clients re-register)",
    )  # fmt: skip
    move.add_argument("--reload", dest="reload", action="store_true", help=argparse.SUPPRESS)
    _transparent_options(move, batch=False)

    status = commands.add_parser(
        "status",
        help="shards, weights, live queues per shard (Redis), moves in progress; with "
        "--internal, what a running kansas sees (health, long-polls, parked requests)",
    )
    _internal_option(status)
    trace = commands.add_parser(
        "trace", help="where a queue is, why, and its recent requests (with --internal)"
    )
    trace.add_argument("queue_id")
    _internal_option(trace)

    where = commands.add_parser("where", help="which shard a new queue would go to, and why")
    where.add_argument("realm")
    where.add_argument("user_id", type=_nonnegative, nargs="?")

    queues = commands.add_parser("queues", help="list the queue -> shard table (from Redis)")
    queues.add_argument("--realm")
    return parser


def _authority(args: argparse.Namespace) -> IAuthority:
    if not args.postgres:
        raise KansasError("--postgres DSN is required (or set KANSAS_POSTGRES)")
    return PostgresAuthority(args.postgres, application_name="kansas-ctl")


def _run(args: argparse.Namespace, out: Any) -> None:
    if args.command == "queues":
        _print_queues(_read_queues(args.redis, args.realm), out)
        return
    authority = _authority(args)
    try:
        if args.command == "migrate":
            before = authority.schema_version()
            after = authority.migrate()
            print(f"schema version {after} (was {before})", file=out)
            return
        if authority.schema_version() != SCHEMA_VERSION:
            raise KansasError("the kansas schema is missing or old: run `kansas-ctl migrate`")
        if args.command == "shard" and args.action == "add":
            shard = authority.add_shard(args.name, args.url, args.weight)
            print(f"added shard {shard.name} at {shard.url} (weight {shard.weight})", file=out)
            warn_unanswered({shard.name: shard.url})
        elif args.command == "shard" and args.action == "weight":
            shard = authority.set_weight(args.name, args.weight)
            print(f"shard {shard.name} now has weight {shard.weight}", file=out)
        elif args.command == "shard" and args.action == "drain":
            _drain(authority, args, out)
        elif args.command == "shard" and args.action == "undrain":
            weight = authority.undrain_shard(args.name)
            print(f"shard {args.name} undrained: weight {weight}", file=out)
        elif args.command == "shard" and args.action == "remove":
            _remove_shard(authority, args, out)
        elif args.command == "shard":
            _print_shards(authority, out)
        elif args.command == "realm" and args.action == "split":
            authority.split_realm(args.realm.lower(), args.shards)
            n = len(args.shards)
            print(f"split {args.realm.lower()}: user U goes to shard U % {n} of "
                  f"{' '.join(args.shards)}", file=out)  # fmt: skip
        elif args.command == "realm" and args.action == "unsplit":
            if not authority.unsplit_realm(args.realm.lower()):
                raise KansasError(f"realm {args.realm.lower()!r} has no split")
            print(f"unsplit {args.realm.lower()}", file=out)
        elif args.command == "realm" and args.action == "move":
            _move(authority, args, out)
        elif args.command == "realm" and args.action == "list":
            _print_realms(authority.load(), out)
        elif args.command == "regex":
            _regex(authority, args, out)
        elif args.command == "import-zulip-sharding":
            _import(authority, args, out)
        elif args.command == "realm" and args.action == "pin":
            authority.pin_realm(args.realm.lower(), args.shard)
            print(f"pinned {args.realm.lower()} to {args.shard}", file=out)
        elif args.command == "realm":
            if not authority.unpin_realm(args.realm.lower()):
                raise KansasError(f"realm {args.realm.lower()!r} has no pin")
            print(f"unpinned {args.realm.lower()}", file=out)
        elif args.command == "user" and not args.reload and not args.transparent:
            authority.move_user(args.realm.lower(), args.user_id, args.shard)
            print(f"user {args.user_id} of {args.realm.lower()} now goes to {args.shard}", file=out)
        elif args.command == "user":
            _move(authority, args, out)
        elif args.command == "status":
            _status(authority, args.redis, out, args.internal)
        elif args.command == "trace":
            _trace(authority, args, out)
        elif args.command == "where":
            decision = place_queue(authority.load(), args.realm.lower(), args.user_id)
            if decision is None:
                raise KansasError("no shard can take new queues (none registered, or all weight 0)")
            print(f"{decision.shard} ({decision.reason})", file=out)
    finally:
        authority.close()


def _print_realms(assignment: Assignment, out: Any) -> None:
    rows = [("REALM", "RULE", "SHARDS")]
    rows += [(realm, "pin", shard) for realm, shard in assignment.realm_pins.items()]
    rows += [(realm, "split", " ".join(s)) for realm, s in assignment.realm_splits.items()]
    _table([rows[0], *sorted(rows[1:])], out)


def _regex(authority: IAuthority, args: argparse.Namespace, out: Any) -> None:
    if args.action == "add":
        authority.add_regex_rule(args.pattern, args.shards)
        print(f"realms matching {args.pattern} go to {' '.join(args.shards)}", file=out)
    elif args.action == "remove":
        if not authority.remove_regex_rule(args.pattern):
            raise KansasError(f"no regex rule {args.pattern!r}")
        print(f"removed regex rule {args.pattern}", file=out)
    else:
        rows = [("#", "PATTERN", "SHARDS")]
        rules = authority.load().regex_rules
        rows += [(str(i), r.pattern, " ".join(r.shards)) for i, r in enumerate(rules, start=1)]
        _table(rows, out)


def _import(authority: IAuthority, args: argparse.Namespace, out: Any) -> None:
    sharding = load_sharding(args.path)
    plan = plan_import(
        sharding,
        authority.load(),
        args.shard_url_template,
        default_port=args.default_port,
        keep_default=not args.no_default,
    )
    _table(plan_rows(plan), out)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=out)
    warn_unanswered(plan.shards)
    if args.dry_run:
        print(f"dry run: {plan.changes} change(s) planned, nothing written", file=out)
    elif plan.changes:
        apply_plan(plan, authority)
        print(f"{plan.changes} change(s) applied", file=out)
    else:
        print(f"nothing to change: kansas already places realms as {args.path} does", file=out)


#: Realms named per shard in ``shard list``; ``realm list`` shows them all.
REALMS_SHOWN = 5


def realms_by_shard(assignment: Assignment) -> dict[str, list[str]]:
    """Each shard's realms, by name: those pinned to it, and those split over it with
    its place in the split (``big.example.com (split 1/2)``: users U with U % 2 == 0)."""
    labelled: list[tuple[str, str, str]] = [
        (realm, shard, realm) for realm, shard in assignment.realm_pins.items()
    ]
    for realm, shards in assignment.realm_splits.items():
        for shard in dict.fromkeys(shards):  # a shard may hold several places
            places = ",".join(str(i) for i, s in enumerate(shards, start=1) if s == shard)
            labelled.append((realm, shard, f"{realm} (split {places}/{len(shards)})"))
    found: dict[str, list[str]] = {}
    for _realm, shard, label in sorted(labelled):
        found.setdefault(shard, []).append(label)
    return found


def _print_shards(authority: IAuthority, out: Any) -> None:
    realms = realms_by_shard(authority.load())
    rows = [("NAME", "URL", "WEIGHT", "PINNED REALMS")]
    for s in authority.list_shards():
        named = realms.get(s.name, [])
        shown = ", ".join(named[:REALMS_SHOWN]) or "-"
        if len(named) > REALMS_SHOWN:
            shown += f", +{len(named) - REALMS_SHOWN} more (kansas-ctl realm list)"
        rows.append((s.name, s.url, str(s.weight), shown))
    _table(rows, out)


def _move(authority: IAuthority, args: argparse.Namespace, out: Any) -> None:
    """``realm move`` / ``user move``: commit, then invalidate at the reload rate."""
    realm = args.realm.lower()
    if args.shard not in authority.load().shards:
        raise KansasError(f"no shard named {args.shard!r}")  # before touching Redis

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    if args.transparent:
        _move_transparently(authority, args, realm, say)
        return

    async def work(store: Any, reactor: Any) -> None:
        if args.command == "realm":
            say(f"moving {realm} to {args.shard}, reloading at {args.reload_rate:g}/s")
            progress = await move_realm(
                authority, store, reactor, realm, args.shard, args.reload_rate,
                args.batch, args.interval, args.settle, say,
            )  # fmt: skip
            say(f"moved {realm} to {args.shard}: {describe(progress)}")
        else:
            progress = await move_user_queues(
                authority, store, reactor, realm, args.user_id, args.shard,
                args.reload_rate, args.settle, say,
            )  # fmt: skip
            say(f"user {args.user_id} of {realm} now goes to {args.shard}: {describe(progress)}")

    _with_redis(args.redis, "move queues in Redis", work)


def _move_transparently(
    authority: IAuthority, args: argparse.Namespace, realm: str, say: Any
) -> None:
    """``--transparent``: the queues move with their events; no client reloads."""
    from kansas.transparent.mover import ShardClient, move_transparently
    from kansas.transparent.mover import describe as describe_transparent

    if not args.secret:
        raise KansasError("--transparent needs the shards' secret: --secret or KANSAS_SHARD_SECRET")
    user_id = args.user_id if args.command == "user" else None
    batch = getattr(args, "batch", None) or DEFAULT_BATCH
    who = realm if user_id is None else f"user {user_id} of {realm}"

    async def work(store: Any, reactor: Any) -> None:
        client = ShardClient(reactor, args.secret)
        say(f"moving {who} to {args.shard} transparently, {batch} queue(s) per batch")
        try:
            progress = await move_transparently(
                authority, store, client, reactor, realm, args.shard, user_id=user_id,
                batch=batch, interval=getattr(args, "interval", 0.0), deadline=args.deadline,
                settle=args.settle, say=say,
            )  # fmt: skip
        finally:
            client.close()
        say(f"moved {who} to {args.shard}: {describe_transparent(progress)}")

    _with_redis(args.redis, "move queues", work)


def _drain(authority: IAuthority, args: argparse.Namespace, out: Any) -> None:
    if args.name not in authority.load().shards:
        raise KansasError(f"no shard named {args.name!r}")  # before touching Redis

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    async def work(store: Any, reactor: Any) -> None:
        progress = await drain_shard(
            authority, store, reactor, args.name, args.rate, args.settle, say
        )
        say(f"drained {args.name}: {describe(progress)}")

    _with_redis(args.redis, "move queues in Redis", work)


def _remove_shard(authority: IAuthority, args: argparse.Namespace, out: Any) -> None:
    if args.name not in authority.load().shards:
        raise KansasError(f"no shard named {args.name!r}")
    live = sum(1 for r in _read_queues(args.redis, None) if r.shard == args.name and not r.invalid)
    if live:
        raise KansasError(f"shard {args.name!r} is still in use: {live} live queue(s) in Redis "
                          "(move its realms away and let them reload or expire)")  # fmt: skip
    authority.remove_shard(args.name)
    print(f"removed shard {args.name}", file=out)


def _status(authority: IAuthority, redis_url: str, out: Any, internal: str | None = None) -> None:
    seen = observe_client.metrics(internal) if internal else None  # first: fail fast
    routes = _read_queues(redis_url, None)
    live: dict[str, int] = {}
    invalid: dict[str, int] = {}
    for route in routes:
        counts = invalid if route.invalid else live
        counts[route.shard] = counts.get(route.shard, 0) + 1
    realms = realms_by_shard(authority.load())
    header: tuple[str, ...] = ("SHARD", "URL", "WEIGHT", "STATE", "PINNED REALMS",
                               "LIVE QUEUES", "INVALIDATED")  # fmt: skip
    if seen is not None:
        header += ("HEALTH", "LONG-POLLS", "PARKED")
        up = observe_client.by_label(seen, "kansas_shard_up", "shard")
        held = observe_client.by_label(seen, "kansas_longpolls_held", "shard")
        parked = observe_client.by_label(seen, "kansas_parked_requests", "shard")
    rows: list[tuple[str, ...]] = [header]
    drained = authority.drained_shards()
    for shard in authority.list_shards():
        state = "active" if shard.weight > 0 else "weight 0"
        if shard.name in drained:
            state = f"drained (was {drained[shard.name]})"
        row: tuple[str, ...] = (shard.name, shard.url, str(shard.weight), state,
                                str(len(realms.get(shard.name, []))), str(live.get(shard.name, 0)),
                                str(invalid.get(shard.name, 0)))  # fmt: skip
        if seen is not None:
            health = {1.0: "up", 0.0: "DOWN"}.get(up.get(shard.name, -1.0), "unknown")
            row += (health, f"{held.get(shard.name, 0):.0f}", f"{parked.get(shard.name, 0):.0f}")
        rows.append(row)
    _table(rows, out)
    if seen is not None:
        _print_seen(seen, internal or "", out)
    moves = authority.list_moves(running_only=True)
    if not moves:
        print("no move in progress", file=out)
        return
    print("moves in progress:", file=out)
    rows = [("ID", "REALM", "USER", "TO", "RATE/S", "INVALIDATED", "")]
    rows += [(str(m.id), m.realm, "-" if m.user_id is None else str(m.user_id), m.to_shard,
              f"{m.reload_rate:g}", str(m.invalidated), "") for m in moves]  # fmt: skip
    _table(rows, out)


def _print_seen(seen: observe_client.Samples, internal: str, out: Any) -> None:
    """A few lines on what the running kansas sees (its /metrics)."""
    total = observe_client.total
    hits, misses = (
        total(seen, "kansas_route_cache_hits_total"),
        total(seen, "kansas_route_cache_misses_total"),
    )
    ratio = f"{hits / (hits + misses):.1%}" if hits + misses else "-"
    moving = sorted(observe_client.by_label(seen, "kansas_realm_moving", "realm"))
    errors = observe_client.by_label(seen, "kansas_redis_errors_total", "op")
    pg_errors = observe_client.by_label(seen, "kansas_postgres_errors_total", "what")
    lines = [
        f"kansas at {internal} ({total(seen, 'kansas_workers'):.0f} process(es)): "
        f"{total(seen, 'kansas_requests_total'):.0f} requests answered, "
        f"{total(seen, 'kansas_client_connections'):.0f} client connections, "
        f"route cache {ratio} hits ({total(seen, 'kansas_route_cache_entries'):.0f} routes)",
        f"  assignment loaded {total(seen, 'kansas_assignment_age_seconds'):.0f} s ago, "
        f"LISTEN {'up' if total(seen, 'kansas_postgres_listening') else 'DOWN'}; "
        f"PostgreSQL errors: {_counts(pg_errors)}; Redis errors: {_counts(errors)}; "
        f"mappings waiting for Redis: {total(seen, 'kansas_route_journal_entries'):.0f}",
        f"  realms it sees moving: {' '.join(moving) if moving else 'none'}; requests "
        f"answered BAD_EVENT_QUEUE_ID after a move: "
        f"{total(seen, 'kansas_invalidated_answers_total'):.0f}",
        f"  redirects followed (Tornado's X-Accel-Redirect for a user of another port): "
        f"{total(seen, 'kansas_tornado_redirects_total'):.0f}",
    ]
    unusable = [
        f"{labels.get('shard')} {labels.get('problem')} {n:.0f}"
        for labels, n in seen.get("kansas_shard_unusable_answers_total", [])
        if n
    ]
    if unusable:
        lines.append(f"  UNUSABLE shard answers (each a 502 to a client; kansas's log says "
                     f"why): {', '.join(sorted(unusable))}")  # fmt: skip
    for line in lines:
        print(line, file=out)


def _counts(counts: dict[str, float]) -> str:
    found = [f"{name} {n:.0f}" for name, n in sorted(counts.items()) if n]
    return ", ".join(found) if found else "none"


def _trace(authority: IAuthority, args: argparse.Namespace, out: Any) -> None:
    """``kansas-ctl trace QUEUE_ID``: where the queue is (Redis), why (the rules now),
    and what a running kansas knows of its last requests (``--internal``)."""
    queue_id = args.queue_id
    if QUEUE_ID.fullmatch(queue_id) is None:
        raise KansasError(f"{queue_id!r} cannot be a queue id")
    seen = observe_client.trace(args.internal, queue_id) if args.internal else None
    found: list[QueueRoute | None] = []

    async def work(store: Any, reactor: Any) -> None:
        found.append(await store.get(queue_id))

    _with_redis(args.redis, "read the queue from Redis", work)
    route = found[0]
    assignment = authority.load()
    realm = route.realm if route is not None else None
    if route is None:
        print(f"queue {queue_id}: no mapping in Redis (expired, deleted, never seen by kansas, "
              "or lost with Redis)", file=out)  # fmt: skip
        records = seen.get("requests", []) if seen else []
        realm = next((r["realm"] for r in reversed(records) if r.get("realm")), None)
        if realm is not None:
            home = realm_home(assignment, realm)
            where = f"{home.shard} ({home.reason})" if home else "no shard (none registered)"
            print(f"  a request on it (realm {realm}) is looked for on the realm's shards, "
                  f"first its home: {where}", file=out)  # fmt: skip
    else:
        user = "-" if route.user_id is None else str(route.user_id)
        registered = "" if route.shard in assignment.shards else " (no longer registered!)"
        print(f"queue {queue_id}: on shard {route.shard}{registered} (queue mapping in Redis: "
              f"realm {route.realm}, user {user}, timeout {route.timeout} s)",
              file=out)  # fmt: skip
        if route.invalid:
            print("  invalidated by a move: its next request gets BAD_EVENT_QUEUE_ID and the "
                  "client registers again, on the new shard", file=out)  # fmt: skip
        decision = place_queue(assignment, route.realm, route.user_id)
        if decision is None:
            print("  a new queue of this user would find no shard (none takes new queues)",
                  file=out)  # fmt: skip
        else:
            same = "the same shard" if decision.shard == route.shard else "ANOTHER shard"
            print(f"  a new queue of this user would go to {decision.shard} ({decision.reason}): "
                  f"{same}", file=out)  # fmt: skip
    if realm is not None:
        moves = [m for m in authority.list_moves(running_only=True) if m.realm == realm]
        for m in moves:
            who = "the realm" if m.user_id is None else f"user {m.user_id}"
            print(f"  move {m.id} in progress: {who} to {m.to_shard} ({m.invalidated} queues "
                  "invalidated so far)", file=out)  # fmt: skip
    if seen is None:
        print("recent requests: ask a running kansas with --internal URL", file=out)
        return
    cached = seen.get("cached_route")
    if cached:
        print(f"  kansas at {args.internal} has it cached: shard {cached.get('shard')}", file=out)
    records = seen.get("requests", [])
    if not seen.get("tracing", True):
        print(f"recent requests: kansas at {args.internal} keeps none (--trace-queues 0)",
              file=out)  # fmt: skip
        return
    if not records:
        print(f"recent requests: none known to kansas at {args.internal} (it keeps the last "
              "few of recently seen queues)", file=out)  # fmt: skip
        return
    print(f"recent requests (kansas at {args.internal}, oldest first):", file=out)
    rows: list[tuple[str, ...]] = [("TIME (UTC)", "REQUEST ID", "LISTENER", "METHOD",
                                    "STATUS", "SHARD", "RULE", "ROUTE MS", "BACKEND MS",
                                    "TOTAL MS")]  # fmt: skip
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(r.get("ts") or 0)))
        rows.append(tuple(_cell(v) for v in (when, r.get("id"), r.get("listener"),
                          r.get("method"), r.get("status"), r.get("shard"), r.get("rule"),
                          r.get("route_ms"), r.get("backend_ms"), r.get("total_ms"))))  # fmt: skip
    _table(rows, out)


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _with_redis(redis_url: str, what: str, work: Any) -> None:
    """Run ``await work(store, reactor)`` with a Redis route store, in a reactor of its
    own; failures become one-line KansasErrors."""
    from twisted.internet import defer, task
    from twisted.internet.defer import ensureDeferred

    from kansas.stores.redis import RedisRouteStore, parse_redis_url

    address = parse_redis_url(redis_url)
    try:  # fail fast and plainly, before txredisapi starts reconnecting in the background
        socket.create_connection((address.host, address.port), timeout=5).close()
    except OSError as e:
        raise KansasError(f"cannot reach Redis ({address}): {e.strerror or e}") from None
    failure: list[str] = []

    async def main(reactor: Any) -> None:
        store = RedisRouteStore(address, reactor, call_timeout=5.0, poolsize=1)
        try:
            await work(store, reactor)
        except defer.TimeoutError:
            failure.append(f"cannot {what} ({address}): no answer in 5 s")
        except KansasError as e:
            failure.append(str(e))
        except Exception as e:
            failure.append(f"cannot {what} ({address}): {e}")
        finally:
            await store.close()

    try:
        task.react(lambda reactor: ensureDeferred(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            failure.append(f"cannot {what} ({address})")
    if failure:
        raise KansasError(failure[0])


def _read_queues(redis_url: str, realm: str | None) -> list[QueueRoute]:
    found: list[QueueRoute] = []

    async def work(store: Any, reactor: Any) -> None:
        found.extend(await store.routes(realm.lower() if realm else None))

    _with_redis(redis_url, "read queues from Redis", work)
    return found


def _print_queues(routes: list[QueueRoute], out: Any) -> None:
    rows = [("QUEUE", "SHARD", "REALM", "USER", "TIMEOUT")]
    rows += [
        (r.queue_id, r.shard, r.realm, "-" if r.user_id is None else str(r.user_id), str(r.timeout))
        for r in routes
    ]
    _table(rows, out)
    print(f"{len(routes)} queue(s)", file=out)


def _table(rows: Sequence[Sequence[str]], out: Any) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _run(args, out or sys.stdout)
    except KansasError as e:
        print(f"kansas-ctl: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
