"""Accuracy of a fixed mixture (base model, one adapter, ...) on held-out instances of a task."""

from __future__ import annotations

from logo.engine import LoGoEngine
from logo.router import Selection
from logo.train.tasks import Task


def first_line(text: str) -> str:
    """The prediction as the official code takes it: stripped, cut at the first line."""
    text = text.strip()
    return (text.splitlines() or [text])[0]


def task_accuracy(
    engine: LoGoEngine,
    task: Task,
    selection: Selection | None,
    n: int = 50,
    split: str = "eval",
    seed: int = 0,
    batch_size: int = 32,
    max_new_tokens: int = 24,
) -> float:
    """Greedy accuracy of ``selection`` (None = base model) on ``n`` instances of ``task``."""
    pairs = task.make(seed, n, split=split)
    prompts = [task.prompt(q) for q, _ in pairs]
    outs = engine.generate(prompts, selections=[selection] * n, max_new_tokens=max_new_tokens, early_stop=True,
                           batch_size=batch_size)
    return sum(task.score(first_line(o.text), a) for o, (_, a) in zip(outs, pairs)) / n
