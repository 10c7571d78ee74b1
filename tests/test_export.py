"""`logo export`: a mixture written as one PEFT adapter gives the engine's logits (exact), or a rank-R
approximation whose error falls as R grows; mixed ranks, rsLoRA and mixed target sets; a prompt's mixture is
the one `logo route` selects (the library's fitted router unless --router says otherwise)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.export import average_mixture, export, export_mixture, parse_mixture
from logo.library import AdapterLibrary
from logo.router import RouterConfig, Selection
from logo.router_file import FILE_NAME
from tests.helpers import MIXED_SPECS, make_tiny_model
from tests.test_fit import fitted_file
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


def test_rank_above_the_exact_rank_is_refused(engine, tmp_path):
    for mixture, exact in (({"a_r4": 1.0}, 4), (MIXTURE, 25)):  # a_r4: rank 4 on q_proj and v_proj
        with pytest.raises(LogoError, match=rf"--rank {exact + 1} is above this mixture's exact rank {exact}\b"):
            export_mixture(engine.library, mixture, tmp_path / "big", rank=exact + 1)
        assert not (tmp_path / "big").exists()
    assert export_mixture(engine.library, {"a_r4": 1.0}, tmp_path / "r4", rank=4).rank == 4


def test_mixture_parsing_and_averaging(engine):
    assert parse_mixture("a_r4=0.5, b_r8=0.25,a_r4=0.25", engine.library.names) == {"a_r4": 0.75, "b_r8": 0.25}
    for text, message in (("a_r4", "not NAME=WEIGHT"), ("a_r4=x", "not a number"), ("zz=1", "no adapter named 'zz'"),
                          ("a_r4=0", "non-zero weight"), ("a_r4=inf", "finite"), ("a_r4=nan", "finite")):
        with pytest.raises(LogoError, match=message):
            parse_mixture(text, engine.library.names)
    assert average_mixture([{"a": 0.75, "b": 0.25}, {"a": 0.5, "c": 0.5}]) == {"a": 0.625, "c": 0.25, "b": 0.125}
    assert average_mixture([{"a": 1.0}, {}]) == {"a": 0.5}  # a prompt the router abstained on: weight 0
    with pytest.raises(LogoError, match="abstained on every prompt.*--abstain none"):
        average_mixture([{}, {}])


def test_export_routes_a_prompt_as_logo_route_does(tiny_library, tiny_model_dir, tmp_path, capsys):
    from logo.cli_core import route

    model, source = tiny_library("llama")
    root = shutil.copytree(source, tmp_path / "lib")
    lib = AdapterLibrary.load(root, model)
    fitted = RouterConfig(k=2, calibration="zscore", statistics="fit", weighting="softmax", layers=(-1, -2))
    fitted_file(model, lib, fitted).save(root / FILE_NAME)
    common = {"base_model": str(tiny_model_dir("llama")), "adapters": [str(root)], "device": "cpu"}
    prompt = "Sort: zeta alpha\nA:"

    def routed(**flags):
        capsys.readouterr()
        route(prompt=[prompt], json_out=True, **common, **flags)
        (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
        return {sel["name"]: sel["weight"] for sel in json.loads(line)["selected"]}

    def exported(name, **flags):
        export(output=tmp_path / name, prompt=prompt, exact=True, **common, **flags)
        return json.loads((tmp_path / name / "logo_export.json").read_text())["mixture"]

    for name, flags in (("fitted", {}), ("official_k3", {"router": "official", "n_selected_modules": 3}),
                        ("fitted_k1", {"n_selected_modules": 1})):
        ours, theirs = exported(name, **flags), routed(**flags)
        assert list(ours) == list(theirs) and list(ours.values()) == pytest.approx(list(theirs.values())), name
    assert len(ours) == 1 and len(exported("fitted_again")) == 2  # the fitted router's k, not the official 20
    fitted_file(model, lib, RouterConfig(k=2, abstain="top", abstain_below=1e9)).save(root / FILE_NAME)
    assert routed() == {}
    with pytest.raises(LogoError, match="abstained on the prompt.*--abstain none"):
        exported("abstained")
    assert not (tmp_path / "abstained").exists()
    assert exported("not_abstained", abstain="none") == routed(abstain="none") != {}


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
                          (["--mixture", "a_r4=1", "--rank", "5", "--output", str(tmp_path / "x")],
                           "--rank 5 is above this mixture's exact rank 4"),
                          (["--mixture", "a_r4=1", "-k", "2", "--exact", "--output", str(tmp_path / "x")],
                           "--mixture gives the mixture itself"),
                          (["--mixture", "a_r4=1", "--exact", "--output", str(tmp_path / "one")], "not empty")):
        res = logo(*args)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("how", ["file size limit", "full disk"])
def test_a_failed_write_is_one_line_and_leaves_no_folder(engine, tmp_path, monkeypatch, how):
    """`ulimit -f` (safetensors' SafetensorError: File too large) or a full disk (OSError) while writing: a one-line
    error naming --output, and no half adapter folder, nor the parent folders made for it (a rerun would refuse a
    half folder as not empty)."""
    import errno

    out = tmp_path / "a" / "b" / "out"
    if how == "full disk":
        import logo.export as export_module

        def full(tensors, path, metadata=None):
            path.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(export_module, "save_safetensors", full)
        message = "No space left on device"
        with pytest.raises(LogoError, match=rf"cannot write --output {out}: {message}; nothing was written") as err:
            export_mixture(engine.library, MIXTURE, out)
    else:
        resource = pytest.importorskip("resource")
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
        try:
            with pytest.raises(LogoError, match=rf"cannot write --output {out}: .*File too large.*nothing was "
                                                "written") as err:
                export_mixture(engine.library, MIXTURE, out)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert export_mixture(engine.library, MIXTURE, out).rank == 25  # the rerun (space freed) writes it


def test_input_mistakes_fail_before_the_model_loads(tiny_library, tiny_model_dir, tmp_path, monkeypatch):
    """A bad --rank or --mixture (syntax, number, adapter name) is refused from the adapters' names alone: the model
    is never built, and no --output folder (or parent) is made."""
    from logo.spec import EngineSpec

    def build(self, progress=False):
        raise AssertionError("the model was built")

    monkeypatch.setattr(EngineSpec, "build", build)
    _, root = tiny_library("llama")
    out = tmp_path / "new" / "out"
    common = {"output": out, "base_model": str(tiny_model_dir("llama")), "adapters": [str(root)]}
    for flags, message in (({"mixture": "zz=1", "exact": True}, "no adapter named 'zz'"),
                           ({"mixture": "a_r4", "exact": True}, "not NAME=WEIGHT"),
                           ({"mixture": "a_r4=x", "exact": True}, "not a number"),
                           ({"mixture": "a_r4=inf", "exact": True}, "finite"),
                           ({"mixture": "a_r4=1", "rank": 0}, "--rank must be at least 1, got 0"),
                           ({"prompt": "Q: hi\nA:", "rank": -2}, "--rank must be at least 1, got -2")):
        with pytest.raises(LogoError, match=message):
            export(**common, **flags)
    with pytest.raises(AssertionError, match="the model was built"):  # a good mixture gets as far as the model
        export(**common, mixture="a_r4=1", exact=True)
    assert list(tmp_path.iterdir()) == []


def test_the_adapter_names_a_base_model_peft_loads(tiny_library, tiny_model_dir, tmp_path, monkeypatch):
    """base_model_name_or_path is what AutoPeftModelForCausalLM loads: a local model folder's absolute path (given
    relative to here), a preset's hub id (the embedded model's: SmolLM2-135M-Instruct), a hub id as given; the
    folder and files get the modes plain writes get under the umask (safetensors alone writes 0600)."""
    import os
    import stat

    from peft import AutoPeftModelForCausalLM

    from logo.export import peft_base_model

    _, root = tiny_library("llama")
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    old_mask = os.umask(0o027)
    try:
        export(output=tmp_path / "out", base_model="models/tiny", adapters=[str(root)],
               mixture="a_r4=0.5,b_r8=0.5", exact=True)
    finally:
        os.umask(old_mask)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path.resolve() / "models" / "tiny")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()} == {0o640}
    monkeypatch.chdir(tmp_path / "out")  # the path holds from anywhere
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits,
                                   _peft_logits(tmp_path / "out", ids, torch.ones_like(ids)))
    assert peft_base_model("Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert peft_base_model("qwen2.5-7b") == "Qwen/Qwen2.5-7B"
    assert peft_base_model("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert peft_base_model("some-org/some-model") == "some-org/some-model"
