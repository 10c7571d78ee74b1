"""`logo export`: a mixture written as one PEFT adapter gives the engine's logits (exact), or a rank-R
approximation whose error falls as R grows; mixed ranks, rsLoRA and mixed target sets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.export import average_mixture, export_mixture, parse_mixture
from logo.library import AdapterLibrary
from logo.router import RouterConfig, Selection
from tests.helpers import MIXED_SPECS, make_tiny_model
from tests.test_mixture import PROMPTS

MIXTURE = {"a_r4": 0.3, "b_r8": 0.1, "c_r2_rslora": 0.2, "d_qonly": 0.15, "e_allattn": 0.15, "f_mlp": 0.1}


@pytest.fixture
def engine(tiny_library, tokenizer):
    model, root = tiny_library("llama")
    eng = LoGoEngine(model, tokenizer, AdapterLibrary.load(root, model), RouterConfig(k=2))
    yield eng
    eng.close()


def _engine_logits(engine, mixture):
    ids, mask = engine.encode(PROMPTS[:2])
    selection = Selection([engine.library.index(n) for n in mixture], list(mixture.values()))
    with engine.mixture([selection] * 2), torch.no_grad():
        return engine.model(input_ids=ids, attention_mask=mask).logits, ids, mask


def _peft_logits(directory, ids, mask):
    model = PeftModel.from_pretrained(make_tiny_model("llama"), str(directory)).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_exact_export_gives_the_engines_logits(engine, tmp_path):
    result = export_mixture(engine.library, MIXTURE, tmp_path / "mix")
    assert result.exact and result.rank == sum(s["r"] for s in MIXED_SPECS)  # 4+8+2+4+4+3 on q_proj
    ours, ids, mask = _engine_logits(engine, MIXTURE)
    base = engine.model(input_ids=ids, attention_mask=mask).logits
    theirs = _peft_logits(tmp_path / "mix", ids, mask)
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == result.rank
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}


def test_rank_compression_error_falls_with_rank_and_matches_the_svd(engine, tmp_path):
    errors = []
    for rank in (1, 4, 12, 25):
        errors.append(export_mixture(engine.library, MIXTURE, tmp_path / f"r{rank}", rank=rank).max_error)
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.1 and errors[-1] < 1e-6
    module = "model.layers.1.self_attn.q_proj"  # the error is the SVD's, computed from the dense delta
    stack, names = engine.library.stacks[module], list(MIXTURE)
    delta = sum(MIXTURE[n] * stack.scaling[engine.library.index(n)] * stack.B[engine.library.index(n)].double()
                @ stack.A[engine.library.index(n)].double() for n in names)
    s = torch.linalg.svdvals(delta)
    record = json.loads((tmp_path / "r4" / "logo_export.json").read_text())
    assert record["relative_error"][module] == pytest.approx((s[4:].square().sum() / s.square().sum()).sqrt().item(),
                                                             rel=1e-6)
    ours, ids, mask = _engine_logits(engine, MIXTURE)
    torch.testing.assert_close(_peft_logits(tmp_path / "r25", ids, mask), ours, atol=1e-4, rtol=1e-4)


def test_mixture_parsing_and_averaging(engine):
    assert parse_mixture("a_r4=0.5, b_r8=0.25,a_r4=0.25", engine.library) == {"a_r4": 0.75, "b_r8": 0.25}
    for text, message in (("a_r4", "not NAME=WEIGHT"), ("a_r4=x", "not a number"), ("zz=1", "no adapter named 'zz'"),
                          ("a_r4=0", "non-zero weight")):
        with pytest.raises(LogoError, match=message):
            parse_mixture(text, engine.library)
    assert average_mixture([{"a": 0.75, "b": 0.25}, {"a": 0.5, "c": 0.5}]) == {"a": 0.625, "c": 0.25, "b": 0.125}


def test_export_command(tiny_model_dir, tiny_library, tmp_path):
    _, root = tiny_library("llama")

    def logo(*args):
        return subprocess.run([sys.executable, "-m", "logo.cli", "export", "-m", str(tiny_model_dir("llama")), "-a",
                               str(root), *args], capture_output=True, text=True, timeout=300)

    res = logo("--prompt", "Q: hi\\nA:", "-k", "2", "--exact", "--output", str(tmp_path / "one"))
    assert res.returncode == 0, res.stderr
    record = json.loads((tmp_path / "one" / "logo_export.json").read_text())
    assert len(record["mixture"]) == 2 and sum(record["mixture"].values()) == pytest.approx(1.0)
    for args, message in ((["--exact", "--output", str(tmp_path / "x")], "exactly one of --prompt"),
                          (["--mixture", "a_r4=1", "--output", str(tmp_path / "x")], "exactly one of --exact"),
                          (["--mixture", "a_r4=1", "--rank", "0", "--output", str(tmp_path / "x")], "at least 1"),
                          (["--mixture", "a_r4=1", "--exact", "--output", str(tmp_path / "one")], "not empty")):
        res = logo(*args)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
