"""The differential fuzzer's corpus, replayed: kansas's request parser (and the quick
path) against h11 on every input in ``tests/corpus/parser``, none of which may show a
finding (``kansas.testing.differential``; ``make fuzz`` grows the corpus, ``make
fuzz-corpus`` folds what it found into this directory).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from kansas.testing.differential import ORACLE_STRICTER, STRICTER, check

CORPUS = Path(__file__).parent / "corpus" / "parser"
WIRE = Path(__file__).parent.parent / "src" / "kansas" / "http" / "wire.py"


def test_the_corpus_replays_without_a_finding() -> None:
    inputs = sorted(CORPUS.iterdir())
    assert len(inputs) >= 100
    notes: Counter[str] = Counter()
    findings = []
    for path in inputs:
        verdict = check(path.read_bytes())
        if verdict.finding is not None:
            findings.append((path.name, verdict.finding))
        notes[verdict.note] += 1
    assert findings == []
    # Not vacuous: the parsers agree on many inputs and differ in many listed classes.
    assert notes["agree"] >= 50
    assert len(set(notes) & set(STRICTER)) >= 8


def test_every_listed_stricter_class_is_one_of_the_parsers_errors() -> None:
    """The list in kansas.testing.differential names errors wire.py still raises."""
    raised = set(re.findall(r'HttpError\(\d+, "([^"]+)"\)', WIRE.read_text()))
    assert set(STRICTER) <= raised
    assert all(reason for reason in [*STRICTER.values(), *ORACLE_STRICTER.values()])
