"""The PEFT trainer on a tiny random model: answer-only loss mask, a loadable bf16 adapter and its record."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from logo.errors import LogoError
from logo.library import AdapterLibrary
from logo.train.tasks import get_task
from logo.train.trainer import TrainConfig, answer_loss, collate, encode_example, train_lora
from tests.helpers import make_tiny_model, make_tokenizer


def test_answer_only_loss_mask():
    tok = make_tokenizer()
    prompt = get_task("parity").prompt({"n": "7"})
    ids, labels = encode_example(tok, prompt, "odd")
    prompt_len = len(tok(prompt)["input_ids"])
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:] == tok(" odd\n", add_special_tokens=False)["input_ids"]
    batch = collate([(ids, labels), ([5, 6], [-100, 6])], pad_id=0)
    assert batch["input_ids"].shape == (2, len(ids))
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(ids) - 2)
    assert batch["labels"][1].tolist() == [-100, 6] + [-100] * (len(ids) - 2)


def test_answer_loss_counts_only_answer_tokens():
    """Changing a prompt token's label target can't matter; the loss equals CE over answer positions."""
    model, tok = make_tiny_model("llama"), make_tokenizer()
    examples = [encode_example(tok, "Q: ab\nAnswer:", "yes"), encode_example(tok, "Q: c\nAnswer:", "no")]
    batch = collate(examples, tok.pad_token_id)

    class Wrapped:  # what answer_loss needs of a PeftModel
        def get_base_model(self):
            return model

    with torch.no_grad():
        loss = answer_loss(Wrapped(), batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    assert keep.sum() == sum(len(tok(f" {a}\n", add_special_tokens=False)["input_ids"]) for a in ("yes", "no"))
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[keep])
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_training_writes_a_loadable_bf16_adapter_and_record(tmp_path):
    from peft import PeftModel

    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok = make_tokenizer()
    config = TrainConfig(rank=2, alpha=4, steps=3, batch_size=2, lr=1e-2)
    out = tmp_path / "parity"
    old_mask = os.umask(0o027)
    try:
        record = train_lora(model, tok, get_task("parity"), out, config, "tiny", progress=False)
    finally:
        os.umask(old_mask)
    assert len(record.loss_curve) == 3 and record.wall_time_s >= 0 and record.n_train_examples == 6
    # readable as the umask allows (group here), not 0600 as safetensors' save_file leaves a file
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640}
    saved = json.loads((out / "train_record.json").read_text())
    assert saved["task"] == "parity" and saved["config"]["steps"] == 3 and saved["config"]["seed"] == 0
    assert saved["data_source"] == json.loads(json.dumps(get_task("parity").describe()))
    assert saved["data_source"]["templates"]["train"] == list(get_task("parity").templates_for("train"))
    assert len(saved["loss_curve"]) == 3 and saved["cpu_threads"] >= 1
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "train_record.json"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert all(".q_proj." in k or ".v_proj." in k for k in tensors)
    for k, v in model.state_dict().items():  # the base model is handed back unchanged
        torch.testing.assert_close(v, before[k])
    lib = AdapterLibrary.load([out], model)
    assert lib.names == ["parity"] and lib.stacks["model.layers.0.self_attn.q_proj"].A.shape[1] == 2
    peft_model = PeftModel.from_pretrained(make_tiny_model("llama"), out)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in peft_model.named_parameters())


def test_training_is_reproducible(tmp_path):
    tok = make_tokenizer()
    config = TrainConfig(rank=2, alpha=4, steps=2, batch_size=2, lr=1e-2, seed=5)
    curves = [train_lora(make_tiny_model("llama"), tok, get_task("uppercase"), tmp_path / str(i), config, "tiny",
                         progress=False).loss_curve for i in range(2)]
    assert curves[0] == curves[1]


@pytest.mark.parametrize(("setting", "flag"), [
    ({"steps": 0}, "--steps"), ({"lr": -1.0}, "--lr"), ({"lr": 0.0}, "--lr"), ({"lr": float("nan")}, "--lr"),
    ({"alpha": -5.0}, "--alpha"), ({"alpha": 0.0}, "--alpha"), ({"alpha": float("inf")}, "--alpha"),
    ({"rank": 0}, "--rank"), ({"rank": 2.5}, "--rank"), ({"batch_size": 0}, "--batch-size"), ({"seed": -1}, "--seed"),
    ({"warmup": -1}, "warmup"),
])
def test_each_bad_setting_names_its_flag(setting, flag):
    with pytest.raises(LogoError, match=f"^{flag} must be .*got"):
        TrainConfig(**setting)


def test_unseen_task_is_refused_before_training(tmp_path):
    with pytest.raises(LogoError, match="'last_letter' is unseen.*give --task a seen task: uppercase"):
        train_lora(make_tiny_model("llama"), make_tokenizer(), get_task("last_letter"), tmp_path / "x",
                   TrainConfig(steps=1), "tiny", progress=False)
    assert not (tmp_path / "x").exists()


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(LogoError, match="no target modules"):
        TrainConfig(targets=())
    with pytest.raises(LogoError, match="not linear layers"):
        train_lora(make_tiny_model("llama"), make_tokenizer(), get_task("parity"), tmp_path / "x",
                   TrainConfig(targets=("qproj",), steps=1), "tiny", progress=False)


def test_a_save_cut_off_leaves_no_truncated_adapter(tmp_path, monkeypatch):
    """A save that dies half-way (here: the bf16 rewrite writes half its file, then the process is stopped) leaves
    no truncated adapter file where the adapter goes, and hands the base model back."""
    import safetensors.torch

    def half_then_stop(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"\0" * 10)  # a cut-off file
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_stop)
    model = make_tiny_model("llama")
    out = tmp_path / "parity"
    with pytest.raises(KeyboardInterrupt):
        train_lora(model, make_tokenizer(), get_task("parity"), out, TrainConfig(rank=2, alpha=4, steps=1,
                   batch_size=1, warmup=1), "tiny", progress=False)
    assert not out.exists() or not any(out.iterdir())
    assert not any("lora" in name for name, _ in model.named_modules())


def test_adapter_files_are_moved_in_record_first_weights_last_order(tmp_path, monkeypatch):
    """The train record is written first (the folder is then a recognisable trainer output) and the weights last (a
    folder with weights is complete); each file atomically."""
    import logo.train.trainer as trainer

    order = []
    real = trainer.write_atomic

    def recording(path, data, fsync=False):
        order.append(path)
        real(path, data, fsync)

    monkeypatch.setattr(trainer, "write_atomic", recording)
    out = tmp_path / "parity"
    train_lora(make_tiny_model("llama"), make_tokenizer(), get_task("parity"), out,
               TrainConfig(rank=2, alpha=4, steps=1, batch_size=1, warmup=1), "tiny", progress=False)
    assert [p.name for p in order if p.parent == out] == ["train_record.json", "adapter_config.json",
                                                          "adapter_model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "train_record.json"]
