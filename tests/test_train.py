"""Task generators, the PEFT trainer on a tiny model, and the committed demo library's manifest."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from logo.adapter_source import EMBEDDED_LIBRARIES
from logo.errors import LogoError
from logo.library import AdapterLibrary
from logo.train.library_builder import sha256
from logo.train.tasks import TASKS, get_task, normalize, seen_tasks, unseen_tasks
from logo.train.trainer import TrainConfig, collate, encode_example, train_lora
from logo.train.words import word_pool
from tests.helpers import make_tiny_model, make_tokenizer


def test_tasks_are_deterministic_and_splits_do_not_overlap():
    assert len(seen_tasks()) >= 8 and len(unseen_tasks()) >= 2
    for task in TASKS.values():
        assert task.make(3, 5, "train") == task.make(3, 5, "train")
        train = set(task.make(0, 200, "train"))
        held_out = task.make(0, 30, "eval")
        assert task.make(0, 30, "eval") != task.make(0, 30, "valid")
        if task.source == "logo" and task.generator in ("uppercase", "first_letter", "sort_words", "repeat_word"):
            assert not train & set(held_out), f"{task.name}: an eval instance was a training instance"
    pools = [set(word_pool(s)) for s in ("train", "valid", "eval")]
    assert not (pools[0] & pools[1] or pools[0] & pools[2] or pools[1] & pools[2])
    with pytest.raises(LogoError, match="unknown task"):
        get_task("nope")


def test_generators_give_right_answers():
    q, a = get_task("uppercase").make(1, 1)[0]
    assert a == q.rsplit(": ", 1)[1].upper()
    q, a = get_task("sort_words").make(1, 1)[0]
    assert a.split() == sorted(q.rsplit(": ", 1)[1].split())
    q, a = get_task("max_number").make(1, 1)[0]
    assert int(a) == max(int(x) for x in q.split(": ")[1].rstrip("?").split(", "))
    assert get_task("parity").score(" Odd.", "odd") == 1.0
    assert normalize(' "Paris". ') == "paris"


def test_answer_only_loss_mask():
    tok = make_tokenizer()
    ids, labels = encode_example(tok, "Q: hi\nAnswer:", "yes")
    prompt_len = len(tok("Q: hi\nAnswer:")["input_ids"])
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] == tok(" yes\n", add_special_tokens=False)["input_ids"]
    batch = collate([(ids, labels), ([5, 6], [-100, 6])], pad_id=0)
    assert batch["input_ids"].shape == (2, len(ids))
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(ids) - 2)
    assert (batch["labels"][1, 2:] == -100).all()


def test_training_writes_a_loadable_bf16_adapter_and_record(tmp_path):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok = make_tokenizer()
    config = TrainConfig(rank=2, alpha=4, steps=3, batch_size=2, lr=1e-2)
    record = train_lora(model, tok, get_task("parity"), tmp_path / "parity", config, "tiny", progress=False)
    assert len(record.loss_curve) == 3 and record.wall_time_s >= 0
    saved = json.loads((tmp_path / "parity" / "train_record.json").read_text())
    assert saved["task"] == "parity" and saved["config"]["steps"] == 3 and saved["data_source"]["source"] == "logo"
    tensors = load_file(str(tmp_path / "parity" / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    for k, v in model.state_dict().items():  # the base model is handed back unchanged
        torch.testing.assert_close(v, before[k])
    lib = AdapterLibrary.load([tmp_path / "parity"], model)
    assert lib.names == ["parity"] and lib.stacks["model.layers.0.self_attn.q_proj"].A.shape[1] == 2


demo = EMBEDDED_LIBRARIES["demo"]
needs_demo = pytest.mark.skipif(not (demo / "manifest.json").is_file(), reason="demo library not built")


@needs_demo
def test_committed_demo_library_matches_its_manifest():
    manifest = json.loads((demo / "manifest.json").read_text())
    assert len(manifest["adapters"]) >= 8 and len(manifest["unseen_tasks"]) >= 2
    for entry in manifest["adapters"]:
        file = demo / entry["name"] / "adapter_model.safetensors"
        assert sha256(file) == entry["sha256"], f"{file} changed since the manifest was written"
        assert entry["own_accuracy"] > entry["base_accuracy"], f"{entry['name']} does not beat the base model"
        assert {"task", "prompt_template", "seed", "steps", "wall_time_s", "n_eval"} <= set(entry)
        assert get_task(entry["name"]).seen
    total = sum(f.stat().st_size for f in demo.rglob("*") if f.is_file())
    assert total < 30 * 2**20, "keep the committed library small"
