"""Accuracy on held-out instances of a task: through the LoGo engine (fixed mixture) or plain PEFT.

Both paths generate greedily with left padding, stop at the first newline and score the first line of
the output with the task's scorer. The builder uses the engine (the same code path as the demo);
:func:`peft_accuracy` is the independent reference (PEFT's own LoRA layers).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logo.engine import LoGoEngine
from logo.generation import first_line
from logo.router import Selection
from logo.train.tasks import Task


def accuracy(task: Task, pairs: list[tuple[str, str]], predictions: list[str]) -> float:
    """Share of ``(prompt, answer)`` pairs whose prediction the task scores right."""
    return sum(task.score(p, a) for p, (_, a) in zip(predictions, pairs)) / len(pairs)


def task_accuracy(engine: LoGoEngine, task: Task, selection: Selection | None, pairs: list[tuple[str, str]],
                  batch_size: int = 32, max_new_tokens: int = 24) -> float:
    """Greedy accuracy of ``selection`` (None = base model) on ``(prompt, answer)`` pairs, e.g.
    ``task.examples(seed, n, split="eval")`` (held-out instances in that split's templates)."""
    outs = engine.generate([prompt for prompt, _ in pairs], selections=[selection] * len(pairs),
                           max_new_tokens=max_new_tokens, early_stop=True, batch_size=batch_size)
    return accuracy(task, pairs, [first_line(o.text) for o in outs])


@torch.no_grad()
def peft_predictions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    adapter_dir: Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 24,
) -> list[str]:
    """First lines of greedy continuations with one PEFT adapter (None = the base model); ``model`` is restored."""
    from peft import PeftModel

    runner = PeftModel.from_pretrained(model, str(adapter_dir)) if adapter_dir is not None else model
    runner.eval()
    newline_id = tokenizer.encode("\n", add_special_tokens=False)[0]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            generated = runner.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                        eos_token_id=[newline_id, tokenizer.eos_token_id], pad_token_id=pad_id)
            texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            out += [first_line(t) for t in texts]
    finally:
        if adapter_dir is not None:
            runner.unload()
    return out


def peft_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, adapter_dir: Path | None,
                  pairs: list[tuple[str, str]], batch_size: int = 16) -> float:
    """Greedy accuracy of one PEFT adapter (None = the base model) on ``(prompt, answer)`` pairs."""
    return accuracy(task, pairs, peft_predictions(model, tokenizer, [p for p, _ in pairs], adapter_dir, batch_size))
