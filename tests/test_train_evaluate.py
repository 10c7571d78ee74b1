"""Held-out accuracy: the plain-PEFT reference path agrees with the LoGo engine's fixed-mixture path."""

from __future__ import annotations

import torch

from logo.engine import LoGoEngine
from logo.library import AdapterLibrary
from logo.router import RouterConfig, Selection
from logo.train.evaluate import first_line, peft_accuracy, peft_predictions, task_accuracy
from logo.train.tasks import get_task
from logo.train.trainer import TrainConfig, train_lora
from tests.helpers import make_tiny_model, make_tokenizer


def test_first_line():
    assert first_line("\n  yes\nno") == "yes" and first_line("") == ""


def test_peft_and_engine_predictions_agree(tmp_path):
    model, tok = make_tiny_model("llama"), make_tokenizer()
    task = get_task("parity")
    train_lora(model, tok, task, tmp_path / "parity", TrainConfig(rank=2, alpha=8, steps=3, batch_size=4, lr=5e-2),
               "tiny", progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = [prompt for prompt, _ in task.examples(0, 6, "eval")]
    via_peft = {a: peft_predictions(model, tok, prompts, a, batch_size=4, max_new_tokens=6)
                for a in (None, tmp_path / "parity")}
    for k, v in model.state_dict().items():  # PEFT's layers are unloaded again
        torch.testing.assert_close(v, before[k])
    engine = LoGoEngine(model, tok, AdapterLibrary.load([tmp_path / "parity"], model), RouterConfig(k=1))
    try:
        for sel, adapter in ((None, None), (Selection([0], [1.0]), tmp_path / "parity")):
            outs = engine.generate(prompts, selections=[sel] * len(prompts), max_new_tokens=6, early_stop=True,
                                   batch_size=4)
            assert [first_line(o.text) for o in outs] == via_peft[adapter]
        pairs = task.examples(0, 6, split="eval")
        for sel, adapter in ((None, None), (Selection([0], [1.0]), tmp_path / "parity")):  # two independent paths
            assert peft_accuracy(model, tok, task, adapter, pairs) == task_accuracy(engine, task, sel, pairs)
    finally:
        engine.close()
    assert via_peft[None] != via_peft[tmp_path / "parity"], "the adapter should change something"
