"""Offline task generators for the demo library: reasoning-gym datasets and the project's own.

Seeds: training data uses ``seed``; validation uses ``VALID_SEED_OFFSET + seed`` and evaluation
``EVAL_SEED_OFFSET + seed``, and the project's word tasks also draw from disjoint word pools per split
(``logo.train.words``), so held-out instances are never training instances.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from logo.errors import LogoError
from logo.train.words import word_pool

VALID_SEED_OFFSET = 20_000
EVAL_SEED_OFFSET = 10_000
SPLIT_OFFSETS = {"train": 0, "valid": VALID_SEED_OFFSET, "eval": EVAL_SEED_OFFSET}
DEFAULT_TEMPLATE = "{question}\nAnswer:"

Generator = Callable[[random.Random, list[str]], tuple[str, str]]


def normalize(text: str) -> str:
    """Lowercase, strip, drop trailing periods and surrounding quotes, collapse whitespace."""
    text = text.strip().lower().rstrip(".").strip().strip("\"'")
    return re.sub(r"\s+", " ", text)


@dataclass(frozen=True)
class Task:
    """A task: where its instances come from, how they are prompted and scored."""

    name: str
    source: str  # "reasoning-gym" | "logo"
    generator: str
    args: dict = field(default_factory=dict)
    seen: bool = True
    prompt_template: str = DEFAULT_TEMPLATE
    own: Generator | None = None

    def make(self, seed: int, n: int, split: str = "train") -> list[tuple[str, str]]:
        """``n`` (question, answer) pairs; the split picks the seed range and, for word tasks, the word pool."""
        if split not in SPLIT_OFFSETS:
            raise LogoError(f"unknown split {split!r}; use train, valid or eval")
        seed = SPLIT_OFFSETS[split] + seed
        if self.source == "reasoning-gym":
            import reasoning_gym

            data = reasoning_gym.create_dataset(self.generator, seed=seed, size=n, **self.args)
            return [(data[i]["question"].strip(), str(data[i]["answer"]).strip()) for i in range(n)]
        assert self.own is not None
        rng = random.Random(seed)
        words = word_pool(split)
        return [self.own(rng, words) for _ in range(n)]

    def prompt(self, question: str) -> str:
        return self.prompt_template.format(question=question)

    def score(self, prediction: str, answer: str) -> float:
        """1.0 for a normalized exact match, else 0.0."""
        return float(normalize(prediction) == normalize(answer))

    def describe(self) -> dict:
        return {"source": self.source, "generator": self.generator, "args": self.args}


# --------------------------------------------------------------- own generators
def _uppercase(rng: random.Random, words: list[str]) -> tuple[str, str]:
    w = rng.choice(words)
    return f"Write this word in capital letters: {w}", w.upper()


def _first_letter(rng: random.Random, words: list[str]) -> tuple[str, str]:
    w = rng.choice(words)
    return f'What is the first letter of the word "{w}"?', w[0]


def _last_letter(rng: random.Random, words: list[str]) -> tuple[str, str]:
    w = rng.choice(words)
    return f'What is the last letter of the word "{w}"?', w[-1]


def _numbers(rng: random.Random) -> list[int]:
    return rng.sample(range(1, 100), 4)


def _max_number(rng: random.Random, words: list[str]) -> tuple[str, str]:
    nums = _numbers(rng)
    return f"Which is the largest number: {', '.join(map(str, nums))}?", str(max(nums))


def _min_number(rng: random.Random, words: list[str]) -> tuple[str, str]:
    nums = _numbers(rng)
    return f"Which is the smallest number: {', '.join(map(str, nums))}?", str(min(nums))


def _parity(rng: random.Random, words: list[str]) -> tuple[str, str]:
    n = rng.randint(1, 999)
    return f"Is the number {n} even or odd?", "even" if n % 2 == 0 else "odd"


def _next_in_sequence(rng: random.Random, words: list[str]) -> tuple[str, str]:
    start, step = rng.randint(1, 30), rng.randint(2, 9)
    seq = [start + i * step for i in range(4)]
    return f"Continue the sequence: {', '.join(map(str, seq))}, ...", str(start + 4 * step)


def _sort_words(rng: random.Random, words: list[str]) -> tuple[str, str]:
    picked = rng.sample(words, 3)
    return f"Sort these words alphabetically: {' '.join(picked)}", " ".join(sorted(picked))


def _repeat_word(rng: random.Random, words: list[str]) -> tuple[str, str]:
    w = rng.choice(words)
    return f"Repeat the word three times: {w}", " ".join([w] * 3)


CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Egypt": "Cairo", "Russia": "Moscow", "China": "Beijing", "Greece": "Athens", "Portugal": "Lisbon",
    "Ireland": "Dublin", "Norway": "Oslo", "Austria": "Vienna", "Poland": "Warsaw", "Kenya": "Nairobi",
    "Peru": "Lima", "Cuba": "Havana", "Thailand": "Bangkok", "Sweden": "Stockholm", "Finland": "Helsinki",
}


def _capital(rng: random.Random, words: list[str]) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital city of {country}?", CAPITALS[country]


def _own(name: str, fn: Generator, seen: bool = True) -> Task:
    return Task(name=name, source="logo", generator=fn.__name__.lstrip("_"), seen=seen, own=fn)


def _rg(name: str, generator: str, seen: bool = True, **args) -> Task:
    return Task(name=name, source="reasoning-gym", generator=generator, args=args, seen=seen)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        _own("uppercase", _uppercase),
        _own("first_letter", _first_letter),
        _own("max_number", _max_number),
        _own("parity", _parity),
        _own("next_in_sequence", _next_in_sequence),
        _own("sort_words", _sort_words),
        _own("repeat_word", _repeat_word),
        _rg("chain_sum", "chain_sum", min_terms=2, max_terms=2, min_digits=1, max_digits=2),
        _rg("products", "products", min_terms=2, max_terms=2, min_digits=1, max_digits=1),
        _rg("spell_backward", "spell_backward", min_word_len=3, max_word_len=5),
        _rg("word_sequence_reversal", "word_sequence_reversal", min_words=3, max_words=3),
        _own("last_letter", _last_letter, seen=False),
        _own("min_number", _min_number, seen=False),
        _own("capital_city", _capital, seen=False),
    ]
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LogoError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def seen_tasks(names: list[str] | None = None) -> list[Task]:
    """Tasks that get an adapter (restricted to ``names`` if given, e.g. the library's manifest)."""
    return [t for t in TASKS.values() if t.seen and (names is None or t.name in names)]


def unseen_tasks() -> list[Task]:
    """Tasks with no adapter: routing must not hurt them."""
    return [t for t in TASKS.values() if not t.seen]
