"""The router and the consistent hash, as pure functions: no reactor, no I/O."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kansas import hashing
from kansas.model import Assignment, RegexRule, Shard
from kansas.router import (
    Decision,
    Reason,
    place_queue,
    realm_from_host,
    realm_home,
    realm_host_problem,
    realm_shards,
    regex_rule_index,
)

REALMS = [f"realm{i}.example.com" for i in range(10_000)]


def shards(*specs: tuple[str, int]) -> dict[str, Shard]:
    return {
        name: Shard(name, f"http://127.0.0.1:{9800 + i}", w) for i, (name, w) in enumerate(specs)
    }


def test_realm_from_host() -> None:
    assert realm_from_host("Chat.Example.COM:443") == "chat.example.com"
    assert realm_from_host(b"chat.example.com") == "chat.example.com"
    assert realm_from_host("chat.example.com.") == "chat.example.com"
    assert realm_from_host("[::1]:9799") == "[::1]"
    assert realm_from_host(None) == ""
    # Zulip's development realm keeps its port in realm.host: the same realm either way.
    assert realm_from_host("localhost:9991") == realm_from_host("localhost") == "localhost"


@pytest.mark.parametrize(
    ("host", "problem"),
    [
        (None, "missing"),
        (b"  ", "missing"),
        ("127.0.0.1", "an IP address"),
        ("127.0.0.1:9798", "an IP address"),
        ("10.1.2.3.", "an IP address"),
        ("[::1]", "an IP address"),
        ("[::1]:9798", "an IP address"),
        ("::1", "an IP address"),
        ("fe80::1:9798", "an IP address"),
        ("localhost:9798", "kansas's own internal listener"),  # Django forgot the Host
        ("chat.example.com:9798", "kansas's own internal listener"),
        ("chat example", "not a host name"),
        ("localhost", None),  # Zulip's development realm, with or without its port
        ("localhost:9991", None),
        (b"Chat.Example.com", None),
        ("chat.example.com:443", None),
        ("1.example.com", None),
    ],
)
def test_realm_host_problem(host: str | bytes | None, problem: str | None) -> None:
    assert realm_host_problem(host, own_port=9798) == problem


def test_user_override_beats_pin_beats_hash() -> None:
    a = Assignment(
        shards(("a", 100), ("b", 100), ("c", 100)),
        realm_pins={"big.example.com": "b"},
        user_overrides={("big.example.com", 7): "c"},
    )
    assert place_queue(a, "big.example.com", 7) == Decision("c", Reason.USER_OVERRIDE)
    assert place_queue(a, "big.example.com", 8) == Decision("b", Reason.REALM_PIN)
    assert place_queue(a, "big.example.com", None) == Decision("b", Reason.REALM_PIN)
    hashed = place_queue(a, "small.example.com", 7)
    assert hashed is not None and hashed.reason is Reason.HASH
    assert realm_home(a, "big.example.com") == Decision("b", Reason.REALM_PIN)


def test_no_shard_and_stale_names() -> None:
    assert place_queue(Assignment(), "x", 1) is None
    # Weight 0 takes no new queues by hash, but an explicit pin still holds.
    a = Assignment(shards(("a", 0)), realm_pins={"p": "a"})
    assert place_queue(a, "x", 1) is None
    assert place_queue(a, "p", 1) == Decision("a", Reason.REALM_PIN)
    # A pin or override naming a shard that is gone falls through to the hash.
    b = Assignment(shards(("a", 100)), {"p": "gone"}, {("p", 1): "gone"})
    assert place_queue(b, "p", 1) == Decision("a", Reason.HASH)


def placement(specs: list[tuple[str, int]], realms: list[str]) -> dict[str, str | None]:
    return {r: hashing.pick(r, specs) for r in realms}


shard_specs = st.lists(
    st.tuples(st.from_regex(r"[a-z]{1,6}", fullmatch=True), st.integers(1, 500)),
    min_size=1,
    max_size=8,
    unique_by=lambda s: s[0],
)


@settings(max_examples=50, deadline=None)
@given(shard_specs, st.from_regex(r"[a-z]{1,6}", fullmatch=True), st.integers(1, 500))
def test_adding_a_shard_moves_only_realms_to_it(
    specs: list[tuple[str, int]], new: str, weight: int
) -> None:
    if new in dict(specs):
        return
    realms = REALMS[:2000]
    before = placement(specs, realms)
    after = placement([*specs, (new, weight)], realms)
    moved = {r for r in realms if before[r] != after[r]}
    assert all(after[r] == new for r in moved)


@settings(max_examples=50, deadline=None)
@given(shard_specs.filter(lambda s: len(s) >= 2), st.data())
def test_removing_a_shard_moves_only_its_realms(
    specs: list[tuple[str, int]], data: st.DataObject
) -> None:
    gone = data.draw(st.sampled_from([name for name, _ in specs]))
    realms = REALMS[:2000]
    before = placement(specs, realms)
    after = placement([s for s in specs if s[0] != gone], realms)
    moved = {r for r in realms if before[r] != after[r]}
    assert moved == {r for r in realms if before[r] == gone}


def shares(specs: list[tuple[str, int]]) -> Counter[str | None]:
    return Counter(hashing.pick(r, specs) for r in REALMS)


def test_shares_follow_weights_within_5_percent() -> None:
    specs = [("a", 100), ("b", 200), ("c", 300)]
    counts = shares(specs)
    for name, weight in specs:
        expected = len(REALMS) * weight / 600
        assert abs(counts[name] - expected) <= 0.05 * expected, counts


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=2, max_size=5))
def test_shares_follow_any_weights(weights: list[int]) -> None:
    specs = [(f"shard{i}", w * 100) for i, w in enumerate(weights)]
    counts = shares(specs)
    n, total = len(REALMS), sum(weights)
    for i, w in enumerate(weights):
        p = w / total
        expected, sigma = n * p, (n * p * (1 - p)) ** 0.5
        # ±5 %, or 4 standard deviations where a small share makes 5 % mere noise.
        assert abs(counts[f"shard{i}"] - expected) <= max(0.05 * expected, 4 * sigma), counts


# -- split realms and regex rules (Zulip's sharding.json) -----------------------------------
names = st.sampled_from(["a", "b", "c", "d"])
split_lists = st.lists(names, min_size=1, max_size=5).map(tuple)


def four() -> dict[str, Shard]:
    return shards(("a", 100), ("b", 100), ("c", 100), ("d", 100))


@settings(max_examples=200, deadline=None)
@given(split_lists, st.integers(0, 10**9))
def test_a_split_sends_user_u_to_shard_u_mod_n(split: tuple[str, ...], user: int) -> None:
    a = Assignment(four(), realm_splits={"big.example.com": split})
    assert place_queue(a, "big.example.com", user) == Decision(
        split[user % len(split)], Reason.REALM_SPLIT
    )


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.none(), names),  # override
    st.one_of(st.none(), names),  # pin
    st.one_of(st.none(), split_lists),  # split
    st.one_of(st.none(), split_lists),  # a matching regex rule
    st.integers(0, 1000),
)
def test_override_beats_pin_or_split_beats_regex_beats_hash(
    override: str | None,
    pin: str | None,
    split: tuple[str, ...] | None,
    regex: tuple[str, ...] | None,
    user: int,
) -> None:
    realm = "big.example.com"
    a = Assignment(
        four(),
        realm_pins={realm: pin} if pin else {},
        user_overrides={(realm, user): override} if override else {},
        realm_splits={realm: split} if split else {},
        regex_rules=[RegexRule("nomatch", ("d",)), RegexRule("BIG\\.", regex)] if regex else [],
    )
    decision = place_queue(a, realm, user)
    assert decision is not None
    if override:
        assert decision == Decision(override, Reason.USER_OVERRIDE)
    elif pin:  # a realm has a pin or a split (the authority keeps one); the pin is read first
        assert decision == Decision(pin, Reason.REALM_PIN)
    elif split:
        assert decision == Decision(split[user % len(split)], Reason.REALM_SPLIT)
    elif regex:
        assert decision == Decision(regex[user % len(regex)], Reason.REGEX)
    else:
        assert decision.reason is Reason.HASH
    assert decision.shard in realm_shards(a, realm)


def test_regex_rules_match_like_zulip_first_match_wins() -> None:
    rules = [
        RegexRule(r"eu\d*\.", ("a",)),  # re.match: anchored at the start only
        RegexRule(r".*\.example\.com$", ("b", "c")),
        RegexRule(r".*", ("d",)),
    ]
    a = Assignment(four(), realm_pins={"eu1.pinned.org": "c"}, regex_rules=rules)
    assert place_queue(a, "eu1.example.com", 1) == Decision("a", Reason.REGEX)
    assert place_queue(a, "x.eu1.example.com", 1) == Decision("c", Reason.REGEX)  # 1 % 2
    assert place_queue(a, "x.eu1.example.com", 2) == Decision("b", Reason.REGEX)
    assert place_queue(a, "elsewhere.org", 5) == Decision("d", Reason.REGEX)
    assert place_queue(a, "eu1.pinned.org", 5) == Decision("c", Reason.REALM_PIN)  # exact first
    # Case-insensitive, as Zulip compiles them (realms are lower-cased anyway).
    assert regex_rule_index(Assignment(regex_rules=[RegexRule("EU", ("a",))]), "eu.x") == 0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.from_regex(r"[a-c]{1,2}\.?\*?", fullmatch=True), split_lists),
        max_size=5,
        unique_by=lambda r: r[0],
    ),
    st.lists(st.from_regex(r"[a-d]{0,4}(\.org)?", fullmatch=True), min_size=1, max_size=20),
)
def test_the_regex_cache_changes_no_answer(
    rules: list[tuple[str, tuple[str, ...]]], realms: list[str]
) -> None:
    import re

    a = Assignment(four(), regex_rules=[RegexRule(p, s) for p, s in rules])
    for realm in realms * 2:  # the second pass answers from the cache
        expected = next((i for i, (p, _) in enumerate(rules) if re.match(p, realm, re.I)), -1)
        assert regex_rule_index(a, realm) == expected
    # A new snapshot starts with an empty cache, and equal snapshots stay equal.
    b = Assignment(four(), regex_rules=[RegexRule(p, s) for p, s in rules])
    assert b.regex_cache == {} and a == b


def test_a_rule_on_a_shard_that_is_gone_falls_to_the_next_rule() -> None:
    two = shards(("a", 100), ("b", 100))
    a = Assignment(
        two,
        realm_splits={"big": ("a", "gone")},
        regex_rules=[RegexRule("big", ("b",))],
    )
    assert place_queue(a, "big", 2) == Decision("a", Reason.REALM_SPLIT)
    assert place_queue(a, "big", 3) == Decision("b", Reason.REGEX)  # split -> gone
    assert realm_shards(a, "big") == ("a", "b")
    assert realm_home(a, "big") == Decision("a", Reason.REALM_SPLIT)  # user 0's shard
    lone = Assignment(two, realm_splits={"big": ("gone",)})
    decision = place_queue(lone, "big", 1)
    assert decision is not None and decision.reason is Reason.HASH
    assert realm_shards(lone, "big") == (decision.shard,)


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(st.none(), split_lists),
    st.one_of(st.none(), split_lists),
    st.dictionaries(st.integers(0, 50), names, max_size=4),
)
def test_realm_shards_holds_every_placement_of_the_realm(
    split: tuple[str, ...] | None, regex: tuple[str, ...] | None, overrides: dict[int, str]
) -> None:
    two_alive = shards(("a", 100), ("b", 100))  # "c" and "d" are gone
    a = Assignment(
        two_alive,
        user_overrides={("r", u): s for u, s in overrides.items()},
        realm_splits={"r": split} if split else {},
        regex_rules=[RegexRule("r", regex)] if regex else [],
    )
    placed = {d.shard for u in range(60) if (d := place_queue(a, "r", u)) is not None}
    assert placed <= set(realm_shards(a, "r"))
    assert set(realm_shards(a, "r")) <= set(two_alive)


@settings(max_examples=50, deadline=None)
@given(shard_specs.filter(lambda s: len(s) >= 2), st.data(), st.integers(0, 1000))
def test_changing_a_weight_moves_only_realms_to_or_from_that_shard(
    specs: list[tuple[str, int]], data: st.DataObject, weight: int
) -> None:
    """``kansas-ctl shard weight``: a heavier shard only gains realms, a lighter one only
    loses some, and no realm moves between two other shards; weight 0 empties it."""
    changed = data.draw(st.sampled_from([name for name, _ in specs]))
    old = dict(specs)[changed]
    realms = REALMS[:2000]
    before = placement(specs, realms)
    after = placement([(n, weight if n == changed else w) for n, w in specs], realms)
    moved = {r for r in realms if before[r] != after[r]}
    if weight >= old:
        assert all(after[r] == changed for r in moved)
    else:
        assert all(before[r] == changed for r in moved)
    if weight == 0:
        assert moved == {r for r in realms if before[r] == changed}
