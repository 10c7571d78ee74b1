"""Router: scores against the formula written out independently, clean and early-stopping probes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from logo.calibration import weight_norms
from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.library import AdapterLibrary
from logo.router import RouterConfig, Selection, score, select
from logo.router_file import RouterFile

PROMPTS = ["Q: What is 3 + 4?\nA:", "Sort: zeta alpha\nA:", "x"]


def reference_scores(model, root, names, tokenizer, prompt, strategy, layer=-1, module="q_proj",
                     post_norm=False, position="last"):
    """The official computation, spelled out: hidden_states[L-1] of a full forward, adapter by adapter."""
    ids = tokenizer([prompt], return_tensors="pt")
    n_layers = model.config.num_hidden_layers
    layer_idx = layer % n_layers
    with torch.no_grad():
        out = model(**ids, output_hidden_states=True)
        hidden = out.hidden_states[layer_idx][0]  # residual stream entering the layer
        if post_norm:
            hidden = model.model.layers[layer_idx].input_layernorm(hidden)
    h = hidden[-1] if position == "last" else hidden.mean(0)
    key = f"base_model.model.model.layers.{layer_idx}.self_attn.{module}"
    scores = []
    for name in names:
        cfg = __import__("json").loads((root / name / "adapter_config.json").read_text())
        tensors = load_file(str(root / name / "adapter_model.safetensors"))
        if f"{key}.lora_A.weight" not in tensors:
            scores.append(0.0)  # no output at the signal module: no evidence for the adapter, whatever the strategy
            continue
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        r = a.shape[0]
        scaling = cfg["lora_alpha"] / (r**0.5 if cfg.get("use_rslora") else r)
        o = (h @ a.T) @ b.T * scaling
        if strategy == "norm":
            scores.append(torch.sqrt((o**2).sum()).item())
        else:
            p = torch.softmax(o, -1)
            scores.append(1 / (-(p * torch.log(p + 1e-8)).sum().item() + 1e-6))
    return scores


@pytest.fixture
def setup(tiny_library, tokenizer, arch):
    model, root = tiny_library(arch)
    return model, root, AdapterLibrary.load(root, model), tokenizer


@pytest.mark.parametrize("strategy", ["norm", "entropy"])
@pytest.mark.parametrize(
    "options",
    [{}, {"layer": 1}, {"post_norm": True}, {"position": "mean"}, {"layer": -2, "module": "v_proj"}],
)
def test_scores_equal_formula(setup, strategy, options):
    model, root, lib, tokenizer = setup
    engine = LoGoEngine(model, tokenizer, lib, RouterConfig(strategy=strategy, k=2, **options))
    try:
        routes = engine.route(PROMPTS, batch_size=3)  # batched, different lengths, left padding
    finally:
        engine.close()
    for prompt, route in zip(PROMPTS, routes):
        ref = reference_scores(model, root, lib.names, tokenizer, prompt, strategy, **options)
        assert route.all_scores == pytest.approx(ref, rel=1e-4, abs=1e-5)
        order = sorted(range(len(ref)), key=lambda i: -ref[i])[:2]
        assert route.indices == order
        top = [ref[i] for i in order]
        assert route.weights == pytest.approx([s / sum(top) for s in top], rel=1e-4)
        assert route.names == [lib.names[i] for i in order]


def test_probe_is_clean_even_with_a_mixture_active(setup):
    model, _, lib, tokenizer = setup
    engine = LoGoEngine(model, tokenizer, lib, RouterConfig(k=2))
    try:
        clean = engine.route(PROMPTS[:1])[0]
        engine.set_mixture([Selection([0, 1], [0.5, 0.5])])  # what the official code leaks into its probe
        dirty_ids, dirty_mask = engine.encode(PROMPTS[:1])
        leaked = engine.route_batch(dirty_ids, dirty_mask)[0]
        assert engine.mixture_active, "the probe must restore the mixture it suspended"
    finally:
        engine.close()
    assert leaked.all_scores == pytest.approx(clean.all_scores, rel=1e-6)


def test_probe_stops_at_the_signal_layer(setup):
    model, _, lib, tokenizer = setup
    calls = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, layer in enumerate(model.model.layers)]
    hooks.append(model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")))
    engine = LoGoEngine(model, tokenizer, lib, RouterConfig(k=1, layer=1))
    try:
        engine.route(PROMPTS[:1])
    finally:
        engine.close()
        for h in hooks:
            h.remove()
    assert calls == [0], f"only layers before the signal layer may run, ran {calls}"


def test_select_weighting_options():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    top, idx, w = select(scores, 2)
    assert idx.tolist() == [[1, 3]] and w[0].tolist() == pytest.approx([4 / 7, 3 / 7])
    _, _, w = select(scores, 2, "softmax", temperature=0.5)
    e = torch.exp(torch.tensor([8.0, 6.0]))
    assert w[0].tolist() == pytest.approx((e / e.sum()).tolist())
    with pytest.raises(LogoError, match="1 <= k <= 4"):
        select(scores, 5)


def test_normalize_weights_of_zero_scores_are_equal_not_nan():
    """w_i = s_i / sum s_j is undefined where the top-k scores sum to 0: the selected adapters weigh 1/k each."""
    scores = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    top, idx, w = select(scores, 2)
    assert not torch.isnan(w).any()
    assert w[0].tolist() == [0.5, 0.5] and w[2].tolist() == [0.5, 0.5]
    assert idx[1, 0].item() == 1 and w[1].tolist() == [1.0, 0.0]  # a non-zero sum is the usual ratio
    assert select(torch.zeros(1, 4), 4)[2][0].tolist() == [0.25] * 4


def test_adapters_without_the_signal_module_score_zero_under_every_strategy(setup):
    """d_qonly and f_mlp train no v_proj: zero-padded factors, no output there. Entropy must not score that zero
    vector 1/log(d) (a positive score that can select them over adapters that do answer)."""
    model, _, lib, tokenizer = setup
    lacking = [lib.index("d_qonly"), lib.index("f_mlp")]
    for strategy in ("norm", "entropy"):
        engine = LoGoEngine(model, tokenizer, lib, RouterConfig(strategy=strategy, k=len(lib), module="v_proj"))
        try:
            routes = engine.route(PROMPTS, batch_size=3)
        finally:
            engine.close()
        for route in routes:
            assert [route.all_scores[i] for i in lacking] == [0.0, 0.0], (strategy, route.all_scores)
            assert all(route.all_scores[i] > 0 for i in range(len(lib)) if i not in lacking)
            assert sorted(route.indices[-2:]) == sorted(lacking) and route.weights[-2:] == [0.0, 0.0]


@pytest.mark.parametrize("abstain", ["top", "margin"])
def test_adapters_without_the_signal_module_rank_last_under_zscore(setup, abstain):
    """A z-score is negative below an adapter's mean, so the 0 of an adapter that trains no signal module (no
    evidence) would outrank every adapter below its mean. They rank last, and the abstain rule's confidence reads
    only the adapters that answer: the formula written out from the calibrated scores."""
    model, _, lib, tokenizer = setup
    lacking = [lib.index("d_qonly"), lib.index("f_mlp")]
    config = RouterConfig(k=len(lib), module="v_proj", calibration="zscore", weighting="softmax", abstain=abstain,
                          abstain_below=-1e9 if abstain == "top" else 0.0)
    engine = LoGoEngine(model, tokenizer, lib, config)
    try:
        engine.calibrate(PROMPTS + ["Name a colour.", "Reverse: a b c\nA:"], save=False)
        assert engine.router.eligible.tolist() == [i not in lacking for i in range(len(lib))]
        ids, mask = engine.encode(PROMPTS)
        raw = engine.router.raw_scores(engine.router.probe(ids, mask))
        scores = engine.router.calibrated(raw)
        routes = engine.route(PROMPTS, batch_size=3)
    finally:
        engine.close()
    answering = [i for i in range(len(lib)) if i not in lacking]
    assert any(scores[row, i] < 0 for row in range(len(PROMPTS)) for i in answering)  # the case that matters
    for row, route in enumerate(routes):
        assert sorted(route.indices[-2:]) == sorted(lacking), route.indices
        assert route.indices[:-2] == sorted(answering, key=lambda i: -scores[row, i].item())
        assert route.scores == pytest.approx([scores[row, i].item() for i in route.indices])
        assert route.weights == pytest.approx(torch.softmax(scores[row, route.indices[:-2]], 0).tolist() + [0, 0])
    for prompt in PROMPTS:
        engine = LoGoEngine(model, tokenizer, lib, config)
        try:
            one = engine.router.calibrated(engine.router.raw_scores(engine.router.probe(*engine.encode([prompt]))))
            top = one[0, answering].topk(2).values
            value = (top[0] if abstain == "top" else top[0] - top[1]).item()
            engine = engine.with_router(replace(config, abstain_below=value + 1e-4))
            assert engine.route([prompt])[0].abstained
            below = value - 1e-4 if abstain == "top" else max(0.0, value - 1e-4)
            engine = engine.with_router(replace(config, abstain_below=below))
            assert not engine.route([prompt])[0].abstained
        finally:
            engine.close()


def test_a_signal_module_whose_input_is_not_the_hidden_state_is_a_one_line_error(setup):
    """down_proj takes the MLP's inner width (128), not the hidden size (64): the probed hidden state cannot be fed
    to its adapters. Construction says so (not an einsum traceback at the first prompt)."""
    model, _, lib, tokenizer = setup
    with pytest.raises(LogoError) as err:
        LoGoEngine(model, tokenizer, lib, RouterConfig(k=1, module="down_proj"))
    text = str(err.value)
    assert "\n" not in text, text
    assert text.startswith("signal module 'down_proj' (model.layers.2.mlp.down_proj) takes inputs of width 128, not "
                           "the model's hidden size 64"), text
    assert "choose a --signal-module whose input is the hidden state (q_proj, k_proj, v_proj, o_proj, up_proj in " \
           "this library), or read down_proj's own input with --post-norm" in text, text
    # post-norm reads down_proj's own input, which fits its adapters
    engine = LoGoEngine(model, tokenizer, lib, RouterConfig(k=1, module="down_proj", post_norm=True))
    try:
        assert engine.route(PROMPTS[:1])[0].names == ["f_mlp"]
    finally:
        engine.close()
    with pytest.raises(LogoError, match=r"post-norm signal modules must share their input, but "
                       r"model.layers.2.self_attn.q_proj takes inputs of width 64 and model.layers.2.mlp.down_proj "
                       r"of width 128"):
        LoGoEngine(model, tokenizer, lib, RouterConfig(k=1, modules=("q_proj", "down_proj"), post_norm=True))
    own = {"layer": -1, "module": "down_proj", "post_norm": False, "position": "last", "strategy": "norm",
           "calibration": "none"}
    with pytest.raises(LogoError, match="the abstain signal's module model.layers.2.mlp.down_proj takes inputs of "
                       "width 128, not the model's hidden size 64.*fit the router again"):
        LoGoEngine(model, tokenizer, lib, RouterConfig(k=1, abstain="top", abstain_signal=own))
    h = torch.zeros(1, 64)
    with pytest.raises(LogoError, match="signal vectors of width 64 cannot be fed to the adapters of "
                       "model.layers.2.mlp.down_proj, whose input width is 128"):
        score(h, lib, "model.layers.2.mlp.down_proj", "norm")


def test_bad_router_options(setup):
    model, _, lib, tokenizer = setup
    for kwargs, msg in [({"k": 0}, "at least 1"), ({"strategy": "max"}, "selection strategy"),
                        ({"position": "first"}, "token position"), ({"calibration": "zz"}, "calibration")]:
        with pytest.raises(LogoError, match=msg):
            RouterConfig(**kwargs)
    with pytest.raises(LogoError, match="library holds 6"):
        LoGoEngine(model, tokenizer, lib, RouterConfig(k=7))
    with pytest.raises(LogoError, match="out of range"):
        LoGoEngine(model, tokenizer, lib, RouterConfig(k=1, layer=5))
    with pytest.raises(LogoError, match="no adapter targets"):
        LoGoEngine(model, tokenizer, lib, RouterConfig(k=1, module="gate_proj"))


def test_weight_norm_calibration_equals_frobenius(setup):
    _, _, lib, _ = setup
    module = "model.layers.2.self_attn.q_proj"
    stack = lib.stacks[module]
    expected = torch.stack(
        [torch.linalg.matrix_norm(stack.B[i] @ stack.A[i]) * stack.scaling[i] for i in range(len(lib))]
    )
    torch.testing.assert_close(weight_norms(lib, module), expected, rtol=1e-4, atol=1e-6)


def test_mean_calibration_divides_raw_scores_and_is_stored(tiny_library, tokenizer, tmp_path):
    import shutil

    model, root = tiny_library("llama")
    shutil.copytree(root, tmp_path / "lib")
    lib = AdapterLibrary.load(tmp_path / "lib", model)
    engine = LoGoEngine(model, tokenizer, lib, RouterConfig(k=2, calibration="mean"))
    with pytest.raises(LogoError, match="logo calibrate"):
        engine.route(PROMPTS[:1])
    with pytest.raises(LogoError, match="no 'mean' calibration statistics"):
        engine.router.check_statistics()  # the same check without a prompt (a server's, before it queues)
    entry = engine.calibrate(PROMPTS, batch_size=2)
    engine.router.check_statistics()
    assert entry["file"] == str(tmp_path / "lib" / "logo_calibration.json")
    raw = engine.router.config
    means = torch.tensor(entry["values"])
    route = engine.route(PROMPTS[:1])[0]
    calibrated = torch.tensor(route.all_scores) / means
    assert route.indices == torch.topk(calibrated, 2).indices.tolist()
    assert route.scores == pytest.approx(torch.topk(calibrated, 2).values.tolist(), rel=1e-5)
    engine.close()
    reloaded = AdapterLibrary.load(tmp_path / "lib", model)
    assert reloaded.calibration[raw.signal_key(3)]["values"] == pytest.approx(entry["values"])


def router_file_data(**router) -> dict:
    """A well-formed router file's contents for two adapters, with ``router`` fields changed (None: removed)."""
    config = RouterConfig(k=1, calibration="zscore", statistics="fit", layers=(-2, -1)).to_dict()
    config.update(router)
    config = {name: value for name, value in config.items() if name not in router or router[name] is not None}
    stats = {"norm|layer=2|module=q_proj": {"method": "fit", "values": [1.0, 2.0], "std": [0.5, 0.5]}}
    return {"version": 1, "base_model": "tiny", "model": {"model_type": "llama"}, "adapters": ["a", "b"],
            "router": config, "statistics": stats, "fit": {}}


ABSENT = object()


@pytest.mark.parametrize("change, field, message", [
    ({"router": router_file_data(k="2")["router"]}, "'k'", "must be an integer, got a string '2'"),
    ({"router": router_file_data(k=True)["router"]}, "'k'", "must be an integer, got a boolean"),
    ({"router": {**router_file_data()["router"], "temperature": None}}, "'temperature'", "must be a finite number"),
    ({"router": router_file_data(temperature=float("nan"))["router"]}, "'temperature'", "must be a finite number"),
    ({"router": router_file_data(layers="abc")["router"]}, "'layers'", "null or an array of integers"),
    ({"router": router_file_data(layers=[1.5])["router"]}, "'layers'", "null or an array of integers"),
    ({"router": router_file_data(modules=[1])["router"]}, "'modules'", "null or an array of strings"),
    ({"router": router_file_data(post_norm="yes")["router"]}, "'post_norm'", "true or false"),
    ({"router": router_file_data(abstain_signal=[1])["router"]}, "'abstain_signal'", "null or an object"),
    ({"router": router_file_data(abstain="top", abstain_signal={"layer": "-1", "module": "q_proj", "post_norm": False,
                                                                 "position": "last", "strategy": "norm",
                                                                 "calibration": "zscore"})["router"]},
     "'abstain_signal.layer'", "must be an integer"),
    ({"router": router_file_data(k=None)["router"]}, "'router'", "lacks the field 'k'"),
    ({"router": router_file_data(k=0)["router"]}, "'router'", "at least 1"),
    ({"router": "chain_sum"}, "'router'", "must be a JSON object"),
    ({"model": None}, "'model'", "must be an object, got null"),
    ({"adapters": "chain_sum"}, "'adapters'", "must be an array of adapter names"),
    ({"base_model": 3}, "'base_model'", "must be a string"),
    ({"statistics": {"norm|layer=2": "x"}}, "'norm|layer=2'", "must be an object, got a string"),
    ({"statistics": {"norm|layer=2": {"values": [1.0, 2.0]}}}, "'norm|layer=2'", "lacks 'std'"),
    ({"statistics": {"norm|layer=2": {"values": ["1", 2.0], "std": [1.0, 1.0]}}}, "'values'", "array of numbers"),
    ({"statistics": ABSENT}, "lacks statistics", ""),
])
def test_a_router_file_with_a_wrongly_typed_field_is_a_one_line_error(tmp_path, change, field, message):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(router_file_data()))
    assert RouterFile.load(good).config.layers == (-2, -1)
    data = {**router_file_data(), **change}
    data = {name: value for name, value in data.items() if value is not ABSENT}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(LogoError) as err:
        RouterFile.load(bad)
    text = str(err.value)
    assert "\n" not in text and str(bad) in text and field in text and message in text, text
    assert text.endswith("fit the router again with `logo fit-router`"), text


@pytest.mark.parametrize("text", ["[]", '{"adapters": [], "entries": []}', "\udcff"])
def test_a_malformed_calibration_file_is_one_line_error(tiny_library, tmp_path, text):
    import shutil

    from logo.calibration import FILE_NAME

    model, root = tiny_library("llama")
    shutil.copytree(root, tmp_path / "lib")
    (tmp_path / "lib" / FILE_NAME).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(LogoError, match="calibration file .* recalibrate"):
        AdapterLibrary.load(tmp_path / "lib", model)

