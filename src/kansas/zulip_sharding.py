"""Zulip's ``/etc/zulip/sharding.json`` turned into kansas rules: every realm stays where
Zulip puts it today, so no queue moves at cut-over.

How Zulip reads the file (facts from Zulip's ``zerver/tornado/sharding.py``):

* ``{"shard_map": {host: port | [ports]}, "shard_regexes": [[regex, port | [ports]]]}``,
  or, in the older format, the flat ``{host: port}`` (then there are no regexes);
* a realm's ports are ``shard_map[realm.host]`` if present, else those of the first
  regex that ``re.match``-es the host (case-insensitive), else ``[TORNADO_PORTS[0]]``;
  ``TORNADO_PORTS`` is the sorted set of every port in zulip.conf's
  ``[tornado_sharding]``, from which this file is rendered, so ``TORNADO_PORTS[0]`` is
  the lowest port the file names. That is 9800 on a standard production install, but
  not everywhere (a development or non-standard install); and a file that names no
  port (one Tornado, no sharding) does not say it, nor does a file whose lowest
  ``[tornado_sharding]`` port names no realm: ``--default-port`` then says it;
* with several ports, user U of the realm lives on ``ports[U % len(ports)]``.
  (Zulip's nginx map matches the same regexes unanchored, ``~*``; but queues are
  created where Django says, so kansas follows Django's ``re.match``.)
* ``realm.host`` carries the port when Zulip's ``EXTERNAL_HOST`` does (a development
  server: ``localhost:9991``). kansas's realm is the host without its port (as
  ``kansas.router.realm_from_host`` makes it from a ``Host`` header), so the import
  strips ports from the file's hosts; a regex that needs the port to match cannot
  match any kansas realm, and the import warns about it.

What kansas makes of it:

* one shard per port, named ``tornado-<port>``, at ``--shard-url-template`` (a shard
  already registered at that URL is used under its own name);
* a host with one port: a realm pin; with several: a realm split (same order, so the
  same ``user_id % n``);
* each regex, in order: a regex rule (one shard, or a split);
* last, Zulip's default: a regex rule ``.*`` to ``TORNADO_PORTS[0]`` (the file's lowest
  port, or ``--default-port``), so that realms the file does not name stay there too
  (``--no-default`` leaves them to kansas's hash instead).

``kansas-ctl`` then checks that something answers HTTP at every shard URL the import
creates or uses, and warns for each one that does not.

Importing again changes nothing if nothing changed. Pins and splits of realms the file
does not name are left alone (and reported); the regex rules are the file's, in its
order, replacing whatever regex rules kansas had.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kansas.errors import ConfigError, KansasError
from kansas.model import Assignment, RegexRule, Shard, compile_realm_regex, parse_shard_url
from kansas.router import realm_from_host, valid_realm

if TYPE_CHECKING:
    from kansas.stores.interface import IAuthority

DEFAULT_URL_TEMPLATE = "http://127.0.0.1:{port}"
#: Zulip's TORNADO_PORTS without [tornado_sharding] (one Tornado): [9800]; also where
#: a standard production install's ports start.
ZULIP_DEFAULT_PORT = 9800
#: The catch-all rule that stands for Zulip's "else TORNADO_PORTS[0]".
DEFAULT_PATTERN = ".*"
SHARD_WEIGHT = 100
#: One token of a regex: an escape, a character class, the opening syntax of a group
#: (``(?:``, ``(?P<name>``, ``(?i:``, a lookaround, ...), or one character.
_REGEX_TOKEN = re.compile(
    r"\\.|\[\^?\]?(?:\\.|[^\]\\])*\]"
    r"|\(\?(?:P<\w+>|P=\w+\)|<?[=!]|#[^)]*\)|\(\w+\)|[aiLmsux]*(?:-[imsx]*)?[:)])|.",
    re.DOTALL,
)
#: Tokens after which the one before may be absent.
_OPTIONAL_AFTER = ("?", "*", "{0", "{,")


@dataclass(frozen=True)
class ZulipSharding:
    """What a sharding.json says, normalised: realm -> ports, and ordered regex rules."""

    exact: Mapping[str, tuple[int, ...]]
    regexes: Sequence[tuple[str, tuple[int, ...]]]

    @property
    def ports(self) -> list[int]:
        found = {p for ports in self.exact.values() for p in ports}
        found.update(p for _, ports in self.regexes for p in ports)
        return sorted(found)

    @property
    def default_port(self) -> int | None:
        """Zulip's TORNADO_PORTS[0] as far as the file says: its lowest port (None if it
        names none)."""
        return min(self.ports, default=None)

    def realm_ports(self, realm: str) -> tuple[int, ...] | None:
        """The ports the file gives ``realm`` (a host as ``realm_from_host`` makes it):
        its exact entry, else the first regex that ``re.match``-es it, ignoring case;
        None if the file does not name it."""
        ports = self.exact.get(realm)
        if ports is not None:
            return ports
        for pattern, regex_ports in self.regexes:
            if compile_realm_regex(pattern).match(realm):  # re caches the compiled form
                return regex_ports
        return None

    def port_for(self, realm: str, user_id: int, default: int) -> int:
        """The Tornado port of user ``user_id`` of ``realm``, as Zulip's
        ``get_user_tornado_port`` computes it: the realm's ports (``default`` if the
        file does not name it), and of several, ``ports[user_id % len(ports)]``."""
        ports = self.realm_ports(realm) or (default,)
        return ports[user_id % len(ports)]


def _ports(value: Any, where: str) -> tuple[int, ...]:
    values = value if isinstance(value, list | tuple) else [value]
    if not values:
        raise ConfigError(f"{where}: an empty list of ports")
    for port in values:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"{where}: a port must be an integer 1-65535, not {port!r}")
    return tuple(values)


def parse_sharding(data: Any) -> ZulipSharding:
    """Both formats of sharding.json, checked; ConfigError (one line) if malformed."""
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object at the top")
    if "shard_map" in data or "shard_regexes" in data:
        unknown = sorted(set(data) - {"shard_map", "shard_regexes"})
        if unknown:
            raise ConfigError(f"unknown keys {unknown} (expected shard_map, shard_regexes)")
        shard_map = data.get("shard_map", {})
        regex_list = data.get("shard_regexes", [])
    else:  # the older flat format: {host: port}
        shard_map, regex_list = data, []
    if not isinstance(shard_map, dict):
        raise ConfigError("shard_map must be an object {host: port | [ports]}")
    if not isinstance(regex_list, list):
        raise ConfigError("shard_regexes must be a list of [regex, port | [ports]]")

    exact: dict[str, tuple[int, ...]] = {}
    for host, value in shard_map.items():
        where = f"shard_map[{host!r}]"
        realm = realm_from_host(host)
        if not valid_realm(realm):
            raise ConfigError(f"{where}: not a realm host")
        ports = _ports(value, where)
        if realm in exact and exact[realm] != ports:
            raise ConfigError(f"{where}: realm {realm} is listed twice with different ports")
        exact[realm] = ports
    regexes: list[tuple[str, tuple[int, ...]]] = []
    for index, item in enumerate(regex_list):
        where = f"shard_regexes[{index}]"
        if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"{where}: expected [regex, port | [ports]]")
        try:
            compile_realm_regex(item[0])
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        regexes.append((item[0], _ports(item[1], where)))
    return ZulipSharding(exact, regexes)


def load_sharding(path: str | Path) -> ZulipSharding:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise KansasError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise KansasError(f"{path} is not JSON: {e}") from None
    try:
        return parse_sharding(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


@dataclass(frozen=True)
class Step:
    """One line of the plan."""

    action: str  # create | change | keep | remove | note
    kind: str  # shard | pin | split | regex | default
    what: str
    target: str


@dataclass
class Plan:
    new_shards: list[Shard] = field(default_factory=list)
    #: Every shard the plan creates or uses: name -> URL (what kansas-ctl probes).
    shards: dict[str, str] = field(default_factory=dict)
    pins: dict[str, str] = field(default_factory=dict)
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: None: the regex rules already match.
    regex_rules: list[RegexRule] | None = None
    steps: list[Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def changes(self) -> int:
        return sum(step.action in ("create", "change", "remove") for step in self.steps)


def shard_url(template: str, port: int) -> str:
    if "{port}" not in template:
        raise ConfigError(f"bad --shard-url-template {template!r}: it must contain {{port}}")
    url = template.replace("{port}", str(port))
    try:
        parse_shard_url(url)
    except ConfigError as e:
        raise ConfigError(f"bad --shard-url-template {template!r}: {e}") from None
    return url


def _split_text(shards: Sequence[str]) -> str:
    if len(shards) == 1:
        return shards[0]
    return f"{' '.join(shards)} (user_id % {len(shards)})"


def plan_import(
    sharding: ZulipSharding,
    current: Assignment,
    url_template: str = DEFAULT_URL_TEMPLATE,
    default_port: int | None = None,
    keep_default: bool = True,
) -> Plan:
    """What to change so that ``current`` places every realm where Zulip does."""
    plan = Plan()
    default = (default_port or sharding.default_port) if keep_default else None
    if keep_default and default is None:
        raise ConfigError(
            "the file names no port, so it does not say where Zulip puts the realms it "
            f"does not name: pass --default-port (Zulip's TORNADO_PORTS[0]: "
            f"{ZULIP_DEFAULT_PORT} on a standard install) or --no-default"
        )
    ports = sorted({*sharding.ports, *([default] if default is not None else [])})

    # Shards: one per port, reusing a shard already registered at the same address.
    by_address = {shard.address: shard for shard in current.shards.values()}
    names: dict[int, str] = {}
    for port in ports:
        url = shard_url(url_template, port)
        existing = by_address.get(parse_shard_url(url))
        if existing is not None:
            names[port] = existing.name
            plan.shards[existing.name] = existing.url
            plan.steps.append(Step("keep", "shard", existing.name, existing.url))
            continue
        name = f"tornado-{port}"
        if name in current.shards:
            raise KansasError(
                f"shard {name} exists at {current.shards[name].url}, not at {url}: "
                "rename or fix it, or pass the right --shard-url-template"
            )
        names[port] = name
        plan.shards[name] = url
        plan.new_shards.append(Shard(name, url, SHARD_WEIGHT))
        plan.steps.append(Step("create", "shard", name, url))

    # Exact hosts: pins and splits.
    for realm in sorted(sharding.exact):
        wanted = tuple(names[p] for p in sharding.exact[realm])
        if len(set(wanted)) == 1:
            pin = wanted[0]
            if current.realm_pins.get(realm) == pin:
                plan.steps.append(Step("keep", "pin", realm, pin))
                continue
            had = realm in current.realm_pins or realm in current.realm_splits
            plan.pins[realm] = pin
            plan.steps.append(Step("change" if had else "create", "pin", realm, pin))
        else:
            if current.realm_splits.get(realm) == wanted:
                plan.steps.append(Step("keep", "split", realm, _split_text(wanted)))
                continue
            had = realm in current.realm_pins or realm in current.realm_splits
            plan.splits[realm] = wanted
            plan.steps.append(
                Step("change" if had else "create", "split", realm, _split_text(wanted))
            )

    # Regex rules, in the file's order, then Zulip's default.
    rules = [
        RegexRule(pattern, tuple(names[p] for p in regex_ports))
        for pattern, regex_ports in sharding.regexes
    ]
    with_default = default is not None and DEFAULT_PATTERN not in {r.pattern for r in rules}
    if default is not None and with_default:
        rules.append(RegexRule(DEFAULT_PATTERN, (names[default],)))
    if list(current.regex_rules) != rules:
        plan.regex_rules = rules
    before = {rule.pattern: (i, rule) for i, rule in enumerate(current.regex_rules)}
    for index, rule in enumerate(rules):
        kind = "default" if with_default and index == len(rules) - 1 else "regex"
        old = before.get(rule.pattern)
        if old is None:
            action = "create"
        elif old == (index, rule):
            action = "keep"
        else:
            action = "change"  # other shards, or another place in the order
        target = _split_text(rule.shards)
        plan.steps.append(Step(action, kind, f"#{index + 1} {rule.pattern}", target))
    patterns = {rule.pattern for rule in rules}
    for rule in current.regex_rules:
        if rule.pattern not in patterns:
            plan.steps.append(Step("remove", "regex", rule.pattern, _split_text(rule.shards)))

    _warn(plan, sharding, current, rules, default)
    return plan


def needs_port(pattern: str) -> bool:
    """Whether a regex has a literal ``:`` (not in a character class nor a group's
    syntax, nor made optional): in a realm host that is the port's separator, so the
    regex can only match hosts with their port (Zulip's ``realm.host`` on a development
    server), never kansas's realms, which have none."""
    tokens = _REGEX_TOKEN.findall(pattern)
    return any(
        token in (":", "\\:") and not "".join(tokens[i + 1 : i + 3]).startswith(_OPTIONAL_AFTER)
        for i, token in enumerate(tokens)
    )


def _warn(
    plan: Plan,
    sharding: ZulipSharding,
    current: Assignment,
    rules: list[RegexRule],
    default: int | None,
) -> None:
    others = sorted(
        realm
        for realm in {*current.realm_pins, *current.realm_splits}
        if realm not in sharding.exact
    )
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        plan.warnings.append(
            f"{len(others)} realm(s) not in the file keep their pin or split, which beats "
            f"the file's regex rules: {shown}"
        )
    mapped = [
        key
        for key in current.user_overrides
        if key[0] in sharding.exact or any(rule.compiled.match(key[0]) for rule in rules)
    ]
    if mapped:
        plan.warnings.append(
            f"{len(mapped)} user override(s) in realms of the file still apply "
            "(`kansas-ctl where REALM USER` shows each)"
        )
    for index, (pattern, _) in enumerate(sharding.regexes):
        if needs_port(pattern):
            plan.warnings.append(
                f"shard_regexes[{index}] {pattern!r} can only match a host with its port "
                "(as Zulip's realm.host is on a development server, localhost:9991), but "
                "kansas's realms are hosts without their port: it matches no realm here, "
                "and the realms it names go by the rules after it (add one without the "
                "port: kansas-ctl regex add)"
            )
    if default is None:
        port = f" {sharding.default_port}" if sharding.default_port else ""
        plan.warnings.append(
            "--no-default: realms the file does not name go by kansas's hash, not to "
            f"Zulip's default port{port}: their queues move at cut-over"
        )


def apply_plan(plan: Plan, authority: IAuthority) -> None:
    """Make the plan's changes in one transaction: kansas sees all of them or none."""
    with authority.atomic():
        for shard in plan.new_shards:
            authority.add_shard(shard.name, shard.url, shard.weight)
        for realm, pin in plan.pins.items():
            authority.pin_realm(realm, pin)
        for realm, shards in plan.splits.items():
            authority.split_realm(realm, shards)
        if plan.regex_rules is not None:
            authority.set_regex_rules(plan.regex_rules)


def plan_rows(plan: Plan) -> list[tuple[str, str, str, str]]:
    rows = [("ACTION", "KIND", "WHAT", "TO")]
    rows += [(s.action, s.kind, s.what, s.target) for s in plan.steps]
    return rows
