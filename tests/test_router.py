"""The router and the consistent hash, as pure functions: no reactor, no I/O."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from kansas import hashing
from kansas.model import Assignment, Shard
from kansas.router import Decision, Reason, place_queue, realm_from_host, realm_home

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
