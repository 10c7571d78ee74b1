"""Fitting routers to libraries that do not train the official signal module (q_proj, last layer), post-norm
signals read from each module's own input, the margin abstain rule's "never abstain" threshold, and malformed
calibration files."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from logo.errors import LogoError
from logo.fit import Example, SignalTable, abstain_options, choose_abstain, fit_router
from logo.library import AdapterLibrary
from logo.router import Router, RouterConfig
from logo.router_file import FILE_NAME, RouterFile
from tests.helpers import make_library, make_tiny_model

NAMES = ("a0", "a1", "a2")
PROMPTS = {name: [f"{name} example {j}: " + "xyz"[i] * (j + 2) for j in range(3)] for i, name in enumerate(NAMES)}
NONE_PROMPTS = ["no adapter for this one", "nor this"]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def library(model, root: Path, targets: tuple[str, ...]) -> Path:
    """Three adapters training only ``targets`` (in every layer), saved by PEFT."""
    make_library(model, root, [{"name": name, "targets": targets} for name in NAMES])
    return root


def examples() -> list[Example]:
    return [Example(p, name) for name, prompts in PROMPTS.items() for p in prompts] + \
        [Example(p, None) for p in NONE_PROMPTS]


def module_inputs(model, prompt: str, tokenizer, module: str) -> list[torch.Tensor]:
    """The input ``[T, d]`` of ``module`` (a short name) in every decoder layer, from a plain forward pass with
    hooks (not the probe the fit uses)."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        target = next(m for name, m in layer.named_modules() if name.endswith(module))
        handles.append(target.register_forward_pre_hook(lambda _m, args, i=i: captured.__setitem__(i, args[0][0])))
    try:
        with torch.no_grad():
            model(**tokenizer([prompt], return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in range(len(model.model.layers))]


def own_input_norm_scores(model, root: Path, tokenizer, prompt: str, layer: int, module: str,
                          position: str) -> list[float]:
    """``||B A h|| * scaling`` per adapter, ``h`` the module's own input (last token or mean), from the PEFT files."""
    hidden = module_inputs(model, prompt, tokenizer, module)[layer]
    h = hidden[-1] if position == "last" else hidden.mean(0)
    where = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    key = f"base_model.model.model.layers.{layer}.{where}.{module}"
    out = []
    for name in NAMES:
        config = json.loads((root / name / "adapter_config.json").read_text())
        tensors = load_file(str(root / name / "adapter_model.safetensors"))
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        out.append(((h @ a.T) @ b.T * config["lora_alpha"] / a.shape[0]).norm().item())
    return out


@pytest.mark.parametrize("targets", [("v_proj",), ("up_proj", "gate_proj")])
def test_fit_router_cli_fits_a_library_without_q_proj_and_route_loads_it(model, tiny_model_dir, tmp_path, targets,
                                                                          capsys):
    """The fit's engine used to be built on the official router (q_proj, last layer), which such a library refuses."""
    from logo.cli_core import route
    from logo.fit_cli import fit_router_command

    model_dir = tiny_model_dir("llama")
    root = library(model, tmp_path / "lib", targets)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name, lines in [*PROMPTS.items(), ("none", NONE_PROMPTS)]:
        (prompts / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    fit_router_command(base_model=str(model_dir), adapters=[str(root)], prompts_dir=prompts, device="cpu",
                       batch_size=4)
    assert "(official signal n/a)" in capsys.readouterr().out
    fitted = RouterFile.load(root / FILE_NAME)
    assert set(fitted.config.signal_modules) <= set(targets)
    route(prompt=list(PROMPTS["a1"]), base_model=str(model_dir), adapters=[str(root)], device="cpu", json_out=True)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(records) == 3 and all(set(r["scores"]) == set(NAMES) for r in records)
    assert all(math.isfinite(s["score"]) for r in records for s in r["selected"])


@pytest.mark.parametrize("targets, chosen", [
    (("v_proj",), ("v_proj", -1)), (("up_proj", "gate_proj"), ("gate_proj", -1)),
    (("down_proj", "up_proj"), ("up_proj", -1)), (("k_proj", "up_proj"), ("k_proj", -1)),
])
def test_probe_config_is_a_trained_module_whose_input_is_the_hidden_state(model, tmp_path, targets, chosen):
    """q_proj, k_proj, v_proj first, else the first module (by name) whose input is the hidden state; last layer."""
    from logo.fit import probe_config

    lib = AdapterLibrary.load(library(model, tmp_path / "lib", targets), model)
    config = probe_config(model, lib)
    assert (config.module, config.layer) == chosen
    Router(model, lib, config)  # a router the library can route with


@pytest.mark.parametrize("targets, engine_module, modules", [
    (("v_proj", "up_proj"), "up_proj", ["v_proj"]),
    (("o_proj", "up_proj"), "up_proj", ["o_proj", "up_proj"]),
    (("down_proj", "up_proj"), "up_proj", ["up_proj"]),
])
def test_fit_scores_post_norm_signals_on_each_modules_own_input(model, tokenizer, tmp_path, targets, engine_module,
                                                                modules):
    """Whatever module the engine's router reads, every post-norm signal of the table is the score of its module's
    own input (as the fitted router reads it), and no module is fed a vector of another width (down_proj)."""
    from logo.engine import LoGoEngine

    root = library(model, tmp_path / "lib", targets)
    lib = AdapterLibrary.load(root, model)
    engine = LoGoEngine(model, tokenizer, lib, RouterConfig(k=1, module=engine_module))
    prompts = [x.prompt for x in examples()]
    table = SignalTable(engine, prompts, batch_size=4)
    assert table.modules == modules
    for (layer, module, post_norm, position, strategy), raw in table.raw.items():
        if post_norm and strategy == "norm" and layer in (0, 2):
            expected = torch.tensor([own_input_norm_scores(model, root, tokenizer, p, layer, module, position)
                                     for p in prompts])
            torch.testing.assert_close(raw.float(), expected, rtol=1e-4, atol=1e-5)
    for candidate in table.candidates():  # every candidate is a router the library accepts
        if len(candidate.modules) > 1 and candidate.post_norm:
            Router(model, lib, candidate.config(table.num_layers))
    routing = next(c for c in table.candidates() if c.modules == (modules[-1],) and not c.post_norm)
    for signal, _ in abstain_options(table, routing, "any")[1:]:
        Router(model, lib, replace(routing.config(table.num_layers), abstain="top", abstain_below=0.5,
                                   abstain_signal=signal))
    fitted = fit_router(engine, examples(), batch_size=4, abstain_from="any")
    Router(model, lib, fitted.config)
    engine.close()


def test_a_margin_rule_that_never_abstains_has_a_threshold_a_router_takes():
    """Judged on other templates, the margin rule wins (2 prompts right against 1), yet on every example prompt its
    best cut is "never abstain", below the smallest margin (0.1): 0.1 - 1 was stored, a negative margin no router
    takes. Margins are never negative, so 0 never abstains as well."""
    margins = torch.tensor([0.1, 0.4, 0.9, 0.8, 0.3, 0.5, 0.4, 0.6])
    seen = torch.tensor([True, False, True, True, True, False, True, False])
    scores = torch.stack([torch.full((8,), 2.0), 2.0 - margins], 1)  # top constant: no threshold on it helps
    folds = torch.tensor([0, 1] * 4)
    found = choose_abstain([(None, lambda rows: scores)], torch.ones(8, dtype=torch.bool), seen, folds)
    assert found["rule"] == "margin" and found["prompts_right_on_other_templates"] == 2
    assert found["threshold"] == 0.0 and found["unseen_abstained"] == 0.0 and found["prompts_right"] == 5
    config = RouterConfig(k=1, abstain="margin", abstain_below=found["threshold"])
    assert config.abstain_below == 0.0


def write_calibration(root: Path, entry) -> Path:
    path = root / "logo_calibration.json"
    path.write_text(json.dumps({"version": 1, "adapters": list(NAMES), "entries": {"sig|layer=2": entry}}))
    return path


@pytest.mark.parametrize("entry, message", [
    (5, "must be an object"),
    ([1, 2], "must be an object"),
    ({"std": [1, 1, 1]}, "lacks \"values\""),
    ({"values": 5}, "'values' must be an array of 3 finite numbers"),
    ({"values": [1, 2, 3, 4, 5, "x"]}, "'values' must be an array of 3 finite numbers"),
    ({"values": [1, 2]}, "'values' must be an array of 3 finite numbers"),
    ({"values": [float("nan"), 1, 2]}, "'values' must be an array of 3 finite numbers"),
    ({"values": [1, 2, True]}, "'values' must be an array of 3 finite numbers"),
    ({"values": [1, 2, 3], "std": [1, float("inf"), 1]}, "'std' must be an array of 3 finite numbers"),
    ({"values": [1, 2, 3], "std": [1, -1, 1]}, "negative standard deviation"),
])
def test_a_malformed_calibration_entry_is_a_one_line_error_naming_file_and_entry(model, tmp_path, entry, message):
    root = library(model, tmp_path / "lib", ("q_proj",))
    path = write_calibration(root, entry)
    with pytest.raises(LogoError, match=message) as err:
        AdapterLibrary.load(root, model)
    assert str(path) in str(err.value) and "'sig|layer=2'" in str(err.value) and "\n" not in str(err.value)


def test_a_well_formed_calibration_entry_loads(model, tmp_path):
    root = library(model, tmp_path / "lib", ("q_proj",))
    entry = {"method": "mean", "values": [1, 2.5, 3], "std": [0, 1, 2], "n_prompts": 4, "source": "user"}
    write_calibration(root, entry)
    assert AdapterLibrary.load(root, model).calibration == {"sig|layer=2": entry}


def test_the_summary_prints_an_official_precision_of_zero_as_zero():
    from logo.fit_cli import official_precision

    assert official_precision(0.0) == "0.000" and official_precision(0.5) == "0.500"
    assert official_precision(None) == "n/a"


def test_the_fit_ranks_an_adapter_without_the_signal_modules_last_as_the_router_does(model, tokenizer, tmp_path):
    """a2 trains only the MLP, so no fit signal (q_proj, v_proj) has evidence for it: under every candidate it ranks
    below a0 and a1 (a z-score of 0 would outrank their negative ones), and the precision@1 the fit reports is the
    one its router gets on the same prompts."""
    from logo.engine import LoGoEngine

    specs = [{"name": "a0", "targets": ("q_proj", "v_proj")}, {"name": "a1", "targets": ("q_proj", "v_proj")},
             {"name": "a2", "targets": ("up_proj",)}]
    make_library(model, tmp_path / "lib", specs)
    lib = AdapterLibrary.load(tmp_path / "lib", model)
    engine = LoGoEngine(model, tokenizer, lib, RouterConfig(k=1))
    table = SignalTable(engine, [x.prompt for x in examples()], 4)
    for candidate in table.candidates():
        assert table.eligible(candidate.layers, candidate.modules).tolist() == [True, True, False]
        scores = table.ranked(candidate)
        assert torch.isinf(scores[:, 2]).all() and torch.isfinite(scores[:, :2]).all(), candidate
    fitted = fit_router(engine, examples(), batch_size=4, abstain=False)
    engine.close()
    seen = [x for x in examples() if x.adapter is not None]
    routed = LoGoEngine(model, tokenizer, lib, fitted.apply(lib))
    try:
        routes = routed.route([x.prompt for x in seen], batch_size=4)
    finally:
        routed.close()
    assert all(r.indices[0] != 2 for r in routes)
    right = sum(r.names[0] == x.adapter for r, x in zip(routes, seen)) / len(seen)
    assert fitted.fit["precision_at_1"] == pytest.approx(right)
