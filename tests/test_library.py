"""Adapter library: loading from every source, stacking, and clear errors for bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from logo.errors import AdapterError
from logo.library import AdapterLibrary, ModuleStack, widens_exactly
from tests.helpers import MIXED_SPECS, library_in_dtype, make_adapter, make_tiny_model


@pytest.fixture
def lib_copy(tiny_library, tmp_path):
    """A writable copy of the llama library (tests corrupt it)."""
    model, root = tiny_library("llama")
    dest = tmp_path / "lib"
    shutil.copytree(root, dest)
    return model, dest


def test_stacks_match_files_with_padding_and_scaling(tiny_library):
    model, root = tiny_library("llama")
    lib = AdapterLibrary.load(root, model)
    assert lib.names == sorted(s["name"] for s in MIXED_SPECS)
    module = "model.layers.1.self_attn.q_proj"
    stack = lib.stacks[module]
    assert stack.A.shape == (6, 8, 64) and stack.B.shape == (6, 64, 8)
    for i, name in enumerate(lib.names):
        spec = next(s for s in MIXED_SPECS if s["name"] == name)
        tensors = load_file(str(root / name / "adapter_model.safetensors"))
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        r = spec["r"]
        torch.testing.assert_close(stack.A[i, :r], a)
        torch.testing.assert_close(stack.B[i, :, :r], b)
        assert stack.A[i, r:].abs().sum() == 0 and stack.B[i, :, r:].abs().sum() == 0
        expected = spec["alpha"] / (math.sqrt(r) if spec.get("use_rslora") else r)
        assert stack.scaling[i].item() == pytest.approx(expected)
    # an adapter without v_proj contributes zero there, and the stack says which adapters train it
    v = lib.stacks["model.layers.0.self_attn.v_proj"]
    assert v.scaling[lib.index("d_qonly")] == 0 and v.A[lib.index("d_qonly")].abs().sum() == 0
    assert [lib.names[i] for i in range(len(lib)) if not v.present[i]] == ["d_qonly", "f_mlp"]
    assert bool(stack.present.all()) and v.in_features == 64
    assert lib.stacks["model.layers.0.mlp.down_proj"].in_features == 128
    assert "model.layers.0.mlp.up_proj" in lib.stacks and "model.layers.0.mlp.gate_proj" not in lib.stacks


def test_explicit_paths_and_bin_weights(tiny_library, tmp_path):
    model, root = tiny_library("llama")
    single = tmp_path / "binned"
    shutil.copytree(root / "a_r4", single)
    tensors = load_file(str(single / "adapter_model.safetensors"))
    (single / "adapter_model.safetensors").unlink()
    torch.save(tensors, single / "adapter_model.bin")
    lib = AdapterLibrary.load([str(single), str(root / "b_r8")], model)
    assert lib.names == ["binned", "b_r8"]
    torch.testing.assert_close(
        lib.stacks["model.layers.0.self_attn.q_proj"].A[0, :4],
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(tiny_library, dtype):
    model, root = tiny_library("llama")
    lib = AdapterLibrary.load(root, model, dtype=dtype)
    assert all(s.A.dtype == dtype and s.B.dtype == dtype for s in lib.stacks.values())


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_narrow_files_under_an_fp32_model_are_kept_compact_and_widen_to_the_same_values(tiny_library, tmp_path, stored):
    """bf16/fp16 files under an fp32 model: factors stored in the files' dtype (half the bytes), computed in fp32, and
    widened they are exactly the stacks a widened library holds; ``compact=False`` stores them widened."""
    model, root = tiny_library("llama")
    narrow = library_in_dtype(root, tmp_path / "narrow", stored)
    lib, wide = AdapterLibrary.load(narrow, model), AdapterLibrary.load(narrow, model, compact=False)
    for name, stack in lib.stacks.items():
        other = wide.stacks[name]
        assert (stack.A.dtype, stack.Bt.dtype, stack.dtype, stack.compact) == (stored, stored, torch.float32, True)
        assert (other.A.dtype, other.dtype, other.compact) == (torch.float32, torch.float32, False)
        assert torch.equal(stack.A.float(), other.A) and torch.equal(stack.Bt.float(), other.Bt)
        assert torch.equal(stack.scaling, other.scaling)
    assert lib.nbytes < 0.51 * wide.nbytes
    # the files' dtype under a model of that dtype, or files of mixed dtypes: stored in the compute dtype
    assert not any(s.compact for s in AdapterLibrary.load(narrow, model, dtype=stored).stacks.values())
    mixed = tmp_path / "mixed"
    shutil.copytree(narrow, mixed)
    shutil.copy(root / "a_r4" / "adapter_model.safetensors", mixed / "a_r4" / "adapter_model.safetensors")  # fp32
    q = AdapterLibrary.load(mixed, model).stacks["model.layers.0.self_attn.q_proj"]
    assert (q.A.dtype, q.compact) == (torch.float32, False)


def test_a_stack_refuses_a_storage_that_loses_values():
    assert widens_exactly(torch.bfloat16, torch.float32) and not widens_exactly(torch.float16, torch.bfloat16)
    assert not widens_exactly(torch.float32, torch.bfloat16) and widens_exactly(torch.float32, torch.float32)
    with pytest.raises(ValueError, match="do not widen exactly"):
        ModuleStack(torch.zeros(2, 1, 3), torch.zeros(2, 1, 3), torch.ones(2), torch.bfloat16)
    with pytest.raises(ValueError, match="do not widen exactly"):
        ModuleStack(torch.zeros(2, 1, 3, dtype=torch.float16), torch.zeros(2, 1, 3, dtype=torch.float16), torch.ones(2),
                    torch.bfloat16)


def hub_snapshot(tmp_path, monkeypatch, repo_id: str) -> Path:
    """The snapshot folder of hub repo ``repo_id`` in a local, offline huggingface_hub cache laid out like the hub's
    (the caller fills it); snapshot_download reads it without the network."""
    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / commit


def test_hub_spec_reads_a_hub_laid_out_cache_offline(tiny_library, tmp_path, monkeypatch):
    """hub:OWNER/REPO/PREFIX through huggingface_hub, against a local cache laid out like the hub's."""
    model, root = tiny_library("llama")
    snapshot = hub_snapshot(tmp_path, monkeypatch, "archon159/LoGo-loras-collection")
    for name in ["flanv2.task_a", "flanv2.task_b", "other.task_c"]:
        shutil.copytree(root / "a_r4", snapshot / "Tiny-loras-flanv2" / name)
    lib = AdapterLibrary.load("hub:archon159/LoGo-loras-collection/Tiny-loras-flanv2/flanv2.", model)
    assert lib.names == ["flanv2.task_a", "flanv2.task_b"]
    with pytest.raises(AdapterError, match="hub") as missing:
        AdapterLibrary.load("hub:archon159/missing-repo/x.", model)
    assert "\n" not in str(missing.value) and ".." not in str(missing.value)  # huggingface_hub's text, one line


def test_a_single_adapter_hub_repo_and_a_hub_folder_without_a_slash_load(tiny_library, tmp_path, monkeypatch):
    """hub:OWNER/REPO whose root is one adapter, and hub:OWNER/REPO/FOLDER (no trailing slash) naming a folder of
    adapters, load; a repo whose adapters are one folder deeper says which spec to write."""
    model, root = tiny_library("llama")
    single = hub_snapshot(tmp_path, monkeypatch, "me/single")
    shutil.copytree(root / "b_r8", single)
    assert AdapterLibrary.load("hub:me/single", model).names == ["single"]
    assert AdapterLibrary.load("hub:me/single/", model).names == ["single"]
    collection = hub_snapshot(tmp_path, monkeypatch, "me/collection")
    for name in ["task_a", "task_b"]:
        shutil.copytree(root / "a_r4", collection / "Tiny-loras" / name)
    shutil.copytree(root / "b_r8", collection / "Tiny-loras-old" / "task_c")
    for spec in ["hub:me/collection/Tiny-loras", "hub:me/collection/Tiny-loras/"]:
        assert AdapterLibrary.load(spec, model).names == ["task_a", "task_b"], spec
    assert AdapterLibrary.load("hub:me/collection/Tiny-loras/task_", model).names == ["task_a", "task_b"]
    assert AdapterLibrary.load("hub:me/collection/Tiny-loras/task_b/", model).names == ["task_b"]
    for spec, write in [("hub:me/collection", "hub:me/collection/Tiny-loras/"),
                        ("hub:me/collection/Tiny", "hub:me/collection/Tiny-loras/")]:
        with pytest.raises(AdapterError) as err:
            AdapterLibrary.load(spec, model)
        text = str(err.value)
        assert "\n" not in text and "Tiny-loras, a folder with no adapter_config.json" in text, text
        assert f"to load those, give {write}" in text and "me/collection" in text, text
    with pytest.raises(AdapterError, match="bad hub spec .* cannot be '..'"):
        AdapterLibrary.load("hub:me/collection/../single/", model)


def test_dot_names_the_adapter_after_the_folder(tiny_library, tmp_path, monkeypatch):
    model, root = tiny_library("llama")
    shutil.copytree(root / "a_r4", tmp_path / "lib" / "a_r4")
    shutil.copytree(root / "b_r8", tmp_path / "lib" / "b_r8")
    monkeypatch.chdir(tmp_path / "lib" / "a_r4")
    assert AdapterLibrary.load(".", model).names == ["a_r4"]
    assert AdapterLibrary.load(["../b_r8/.", "."], model).names == ["b_r8", "a_r4"]
    monkeypatch.chdir(tmp_path / "lib")
    assert AdapterLibrary.load(".", model).names == ["a_r4", "b_r8"]


def test_a_folder_of_adapters_nested_in_the_library_folder_is_an_error_naming_it(tiny_library, tmp_path):
    model, root = tiny_library("llama")
    lib = tmp_path / "lib"
    shutil.copytree(root / "a_r4", lib / "a_r4")
    shutil.copytree(root / "b_r8", lib / "archive" / "b_r8")
    (lib / "notes").mkdir()  # a folder holding no adapter anywhere is passed over
    with pytest.raises(AdapterError) as err:
        AdapterLibrary.load(lib, model)
    text = str(err.value)
    assert "\n" not in text and text == (
        f"the adapter folder {lib} holds archive, a folder with no adapter_config.json whose subfolders are adapters "
        f"(b_r8); adapters are read one level deep only: to load those, give --adapters {lib / 'archive'} (or move "
        f"them up into {lib})"), text
    shutil.rmtree(lib / "a_r4")  # all adapters one level too deep: the same error, not "no adapters"
    with pytest.raises(AdapterError, match="holds archive, a folder with no adapter_config.json"):
        AdapterLibrary.load(lib, model)
    assert AdapterLibrary.load(lib / "archive", model).names == ["b_r8"]


def test_embedded_unknown_library(tiny_library):
    model, _ = tiny_library("llama")
    with pytest.raises(AdapterError, match="unknown embedded library"):
        AdapterLibrary.load("embedded:nope", model)


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"use_dora": True}, "use_dora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='all'"),
    ],
)
def test_unsupported_configs_are_refused(lib_copy, change, message):
    model, root = lib_copy
    _edit_config(root / "b_r8", **change)
    with pytest.raises(AdapterError, match=message) as err:
        AdapterLibrary.load(root, model)
    assert "b_r8" in str(err.value)


def test_missing_and_corrupt_files(lib_copy):
    model, root = lib_copy
    (root / "a_r4" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match=r"a_r4.*corrupt"):
        AdapterLibrary.load(root, model)
    (root / "a_r4" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"a_r4.*no adapter_model.safetensors"):
        AdapterLibrary.load(root, model)
    (root / "b_r8" / "adapter_config.json").write_text("{broken")
    with pytest.raises(AdapterError, match="cannot parse"):
        AdapterLibrary.load([root / "b_r8"], model)


def test_shape_mismatch_names_module_and_shapes(tmp_path):
    small = make_tiny_model("llama")
    other = make_tiny_model("llama")
    make_adapter(small, tmp_path / "fits", seed=1)
    # an adapter trained for a model with another hidden size
    from transformers import AutoModelForCausalLM

    cfg = small.config.to_dict() | {"hidden_size": 32, "head_dim": 8}
    wide = AutoModelForCausalLM.from_config(type(small.config).from_dict(cfg))
    make_adapter(wide, tmp_path / "other_model", seed=2)
    with pytest.raises(AdapterError, match=r"other_model.*q_proj.*lora_A \(4, 32\).*\(64 -> 64\)"):
        AdapterLibrary.load(tmp_path, other)


def test_nan_weights_refused(lib_copy):
    model, root = lib_copy
    file = root / "a_r4" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(file))
    with pytest.raises(AdapterError, match="a_r4.*NaN or Inf"):
        AdapterLibrary.load(root, model)


def test_unknown_module_and_foreign_keys(lib_copy):
    model, root = lib_copy
    file = root / "a_r4" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight"] = torch.ones(64)
    save_file(tensors, str(file))
    with pytest.raises(AdapterError, match="not a LoRA A/B weight"):
        AdapterLibrary.load(root, model)


def test_duplicate_names_and_empty(tiny_library, tmp_path):
    model, root = tiny_library("llama")
    other = tmp_path / "x" / "a_r4"
    shutil.copytree(root / "a_r4", other)
    with pytest.raises(AdapterError, match="duplicate adapter name 'a_r4'"):
        AdapterLibrary.load([root / "a_r4", other], model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapters in"):
        AdapterLibrary.load(tmp_path / "empty", model)
    with pytest.raises(AdapterError, match="empty"):
        AdapterLibrary.from_entries([], model)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lora_alpha": "eight"}, r"lora_alpha='eight'; lora_alpha must be a number"),
        ({"lora_alpha": None}, r"lora_alpha=None; lora_alpha must be a number"),
        ({"use_rslora": "yes"}, r"use_rslora='yes'; use_rslora must be true or false"),
        ({"r": 0}, r"r=0; r \(the LoRA rank\) must be an integer >= 1"),
        ({"r": "8"}, r"r='8'; r \(the LoRA rank\) must be an integer >= 1"),
        ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\]=2.5; each value must be an integer >= 1"),
        ({"alpha_pattern": {"q_proj": "x"}}, r"alpha_pattern\['q_proj'\]='x'; each value must be a number"),
        ({"alpha_pattern": {"q_proj(": 4}}, r"alpha_pattern key 'q_proj\(', which is not a valid regular expression"),
        ({"target_modules": {"q_proj": 1}}, r"target_modules=.*must be a list of module names or a regex string"),
        ({"target_modules": "(q_proj"}, r"target_modules '\(q_proj', which is not a valid regular expression"),
    ],
)
def test_malformed_rank_and_alpha_fields_are_refused(lib_copy, change, message):
    model, root = lib_copy
    _edit_config(root / "b_r8", **change)
    with pytest.raises(AdapterError, match=rf"adapter 'b_r8' \(.*adapter_config.json\) has {message}"):
        AdapterLibrary.load(root, model)


def _edit_weights(path: Path, edit) -> None:
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    save_file({key: edit(key, t).contiguous() for key, t in tensors.items()}, str(file))


def test_rank_zero_weights_are_refused(lib_copy):
    model, root = lib_copy
    _edit_weights(root / "a_r4", lambda key, t: t[:0] if ".lora_A." in key else t[:, :0])
    with pytest.raises(AdapterError, match=r"adapter 'a_r4', module .*rank-0 LoRA weights.*the rank must be >= 1"):
        AdapterLibrary.load(root, model)


def test_a_and_b_of_different_ranks_are_not_called_another_model(lib_copy):
    model, root = lib_copy
    _edit_weights(root / "a_r4", lambda key, t: t[:2] if ".lora_A." in key else t)
    with pytest.raises(AdapterError, match=r"'a_r4', module .*lora_A of rank 2 \(2, 64\) but lora_B of rank 4 "
                       r"\(64, 4\); A and B must share one rank") as err:
        AdapterLibrary.load(root, model)
    assert "another model" not in str(err.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"r": 64}, r"'b_r8', module .*holds rank-8 weights but .*adapter_config.json declares rank 64"),
        ({"rank_pattern": {"v_proj": 2}}, r"'b_r8', module .*v_proj'.*holds rank-8 weights but .* declares rank 2"),
        ({"target_modules": ["o_proj"]}, r"'b_r8': .*q_proj', which .*adapter_config.json does not target "
                                         r"\(target_modules=\['o_proj'\]\)"),
        ({"target_modules": r".*\.v_proj"}, r"'b_r8': .*q_proj', which .* does not target"),
        ({"exclude_modules": ["q_proj"]}, r"'b_r8': .*q_proj', which .* does not target"),
        ({"layers_to_transform": [0]}, r"'b_r8': .*layers\.1\..*, which .* does not target"),
    ],
)
def test_a_config_that_does_not_describe_its_weights_is_refused(lib_copy, change, message):
    """PEFT itself fails on a rank that differs from r / rank_pattern, and ignores (with a warning) weights for modules
    the config does not target: logo refuses both."""
    model, root = lib_copy
    _edit_config(root / "b_r8", **change)
    with pytest.raises(AdapterError, match=message):
        AdapterLibrary.load(root, model)


@pytest.mark.parametrize(
    "change",
    [
        {"target_modules": r".*\.(q_proj|v_proj)"},
        {"target_modules": ["model.layers.0.self_attn.q_proj", "q_proj", "self_attn.v_proj"]},
        {"r": 2, "rank_pattern": {"q_proj": 8, r"layers\.\d\.self_attn\.v_proj": 8}, "alpha_pattern": {"v_proj": 4}},
        {"target_modules": None},
    ],
)
def test_peft_conventions_for_targets_and_patterns_are_accepted(lib_copy, change):
    model, root = lib_copy
    _edit_config(root / "b_r8", **change)
    lib = AdapterLibrary.load(root, model)
    i = lib.index("b_r8")
    assert lib.stacks["model.layers.0.self_attn.q_proj"].scaling[i].item() == pytest.approx(2.0)
    expected_v = 0.5 if "alpha_pattern" in change else 2.0
    assert lib.stacks["model.layers.2.self_attn.v_proj"].scaling[i].item() == pytest.approx(expected_v)


def test_integer_weights_are_refused(lib_copy):
    model, root = lib_copy
    _edit_weights(root / "a_r4", lambda key, t: (t * 100).to(torch.int8))
    with pytest.raises(AdapterError, match=r"adapter 'a_r4', module .*lora_A as torch.int8 and lora_B as torch.int8; "
                       "LoRA weights must be floating point"):
        AdapterLibrary.load(root, model)


def test_a_library_folder_with_weights_but_no_config_is_an_error(lib_copy):
    model, root = lib_copy
    (root / "c_r2_rslora" / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=rf"adapter folder {re.escape(str(root / 'c_r2_rslora'))} holds "
                       r"adapter_model.safetensors but no adapter_config.json"):
        AdapterLibrary.load(root, model)
    with pytest.raises(AdapterError, match="c_r2_rslora holds adapter_model.safetensors but no adapter_config.json"):
        AdapterLibrary.load([root / "a_r4", root / "c_r2_rslora"], model)
    # a folder with neither (notes, plots) is not an adapter and is still passed over
    (root / "c_r2_rslora" / "adapter_model.safetensors").unlink()
    assert "c_r2_rslora" not in AdapterLibrary.load(root, model).names
