"""A fixed pool of common English words for the project's own task generators.

The pool is split by position into disjoint train / valid / eval parts, so held-out instances of
word tasks never reuse a training word.
"""

from __future__ import annotations

from pathlib import Path

WORDS_FILE = Path(__file__).resolve().parent.parent / "assets" / "words.txt"
WORDS = WORDS_FILE.read_text().split()
# keep the first occurrence of each word
WORDS = list(dict.fromkeys(WORDS))


def word_pool(split: str) -> list[str]:
    """Disjoint word pools: train (3/5 of the words), valid (1/5), eval (1/5)."""
    if split == "train":
        return [w for i, w in enumerate(WORDS) if i % 5 < 3]
    if split == "valid":
        return [w for i, w in enumerate(WORDS) if i % 5 == 3]
    if split == "eval":
        return [w for i, w in enumerate(WORDS) if i % 5 == 4]
    raise ValueError(f"unknown split {split!r}")
