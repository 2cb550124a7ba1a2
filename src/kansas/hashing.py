"""Weighted consistent hashing of realms onto shards (weighted rendezvous hashing).

Each (realm, shard) pair gets a score ``weight / -ln(u)``, ``u`` a uniform hash in (0, 1);
the realm goes to the highest score. This is the logarithmic method of weighted
rendezvous hashing: a realm's share of shards follows the weights exactly in
expectation, adding a shard moves only the realms that now score highest on it,
removing one moves only its own realms, and no ring or virtual nodes need maintaining.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from hashlib import blake2b

_SCALE = float(2**64 + 1)


def _unit_hash(realm: str, shard: str) -> float:
    digest = blake2b(f"{shard}\x00{realm}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 1) / _SCALE  # in (0, 1), never 0 or 1


def score(realm: str, shard: str, weight: int) -> float:
    """How strongly ``realm`` wants ``shard``; a shard with weight <= 0 never wins."""
    if weight <= 0:
        return -math.inf
    return weight / -math.log(_unit_hash(realm, shard))


def pick(realm: str, shards: Iterable[tuple[str, int]]) -> str | None:
    """The shard (name) that ``realm`` hashes to among (name, weight) pairs, or None."""
    best: str | None = None
    best_score = -math.inf
    for name, weight in shards:
        s = score(realm, name, weight)
        # Ties (only ever between equal weights and equal hashes) break by name, so every
        # kansas process agrees.
        if s > best_score or (s == best_score and best is not None and name < best):
            best, best_score = name, s
    return best
