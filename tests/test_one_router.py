"""One router for every user: the engine, the demo's methods and the signal study route alike, on padded
batches, on Llama- and Qwen-shaped models, and equal to the formula written out on each prompt alone."""

from __future__ import annotations

import shutil

import pytest
import torch

from logo.calibration import weight_norms
from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.experiments.signal_study import run_study
from logo.library import AdapterLibrary
from logo.methods import LoGo
from logo.router import Router, RouterConfig, SignalPoint, router_overrides
from logo.router_file import FILE_NAME, RouterFile, model_fingerprint
from logo.spec import EngineSpec
from tests.test_router import PROMPTS, reference_scores

OPTIONS = [{}, {"layer": 1, "post_norm": True}, {"layer": -2, "position": "mean"}]
MORE_PROMPTS = [*PROMPTS, "A much longer prompt that makes the others padded:\nA:", "Q: 5 * 6 =\nA:"]


@pytest.fixture
def engine(tiny_library, tokenizer, arch):
    model, root = tiny_library(arch)
    eng = LoGoEngine(model, tokenizer, AdapterLibrary.load(root, model), RouterConfig(k=1))
    yield eng
    eng.close()


def test_signals_in_one_pass_equal_hidden_states_of_each_prompt_alone(engine, tokenizer):
    points = [SignalPoint(layer, post, pos) for layer in (0, 1, 2) for post in (False, True)
              for pos in ("last", "mean")]
    found = engine.signals(MORE_PROMPTS, points, batch_size=4)  # padded batches, sorted by length
    layers = engine.model.model.layers
    for i, prompt in enumerate(MORE_PROMPTS):
        ids = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            hidden = engine.model(**ids, output_hidden_states=True).hidden_states
        for point in points:
            h = hidden[point.layer][0]
            if point.post_norm:
                h = layers[point.layer].input_layernorm(h)
            expected = h[-1] if point.position == "last" else h.mean(0)
            torch.testing.assert_close(found[point][i], expected.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("options", OPTIONS)
def test_engine_demo_method_and_signal_study_route_alike(engine, tiny_library, tokenizer, arch, options):
    _, root = tiny_library(arch)
    config = RouterConfig(k=1, **options)
    routed = engine.with_router(config).route(MORE_PROMPTS, batch_size=3)
    by_method = LoGo(config).select(engine, MORE_PROMPTS, range(len(MORE_PROMPTS)), seed=0)
    top1 = [r.indices[0] for r in routed]
    assert [s.indices for s in by_method] == [r.indices for r in routed]
    for prompt, route in zip(MORE_PROMPTS, routed):
        ref = reference_scores(engine.model, root, engine.library.names, tokenizer, prompt, "norm", **options)
        assert route.all_scores == pytest.approx(ref, rel=1e-4, abs=1e-5)
    # the study scores every option from one multi-point probe; with the routed top-1 as "targets", the option
    # that equals this router must score precision 1.0
    rows = run_study(engine, MORE_PROMPTS, top1, MORE_PROMPTS[:2], [config.layer], batch_size=2)
    point = engine.with_router(config).router.point
    row = next(r for r in rows if (r.layer, r.post_norm, r.position, r.strategy, r.calibration) ==
               (point.layer, point.post_norm, point.position, "norm", "none"))
    assert row.precision_at_1 == 1.0


def test_with_router_gives_a_consistent_engine_and_router_is_read_only(engine, tokenizer):
    fresh = engine.with_router(RouterConfig(k=1, layer=-2, post_norm=True, calibration="mean"))
    assert fresh.router.signal_module == "model.layers.1.self_attn.q_proj"
    assert engine.router.signal_module == "model.layers.2.self_attn.q_proj"  # the original is untouched
    fresh.calibrate(MORE_PROMPTS, save=False)
    route = fresh.route(PROMPTS[:1])[0]
    h = fresh.signals(PROMPTS[:1], [fresh.router.point])[fresh.router.point]
    raw = fresh.router.raw_scores(h)[0]
    means = torch.tensor(engine.library.calibration[fresh.router.signal_key]["values"])
    assert route.indices == [int((raw / means).argmax())]
    with pytest.raises(LogoError, match="with_router"):
        engine.router = RouterConfig(k=1, layer=-2)


def test_signal_flags_replace_a_fitted_routers_pooled_signal(tiny_library, tiny_model_dir, tokenizer, tmp_path):
    """--signal-layer/--signal-module over a fitted router that pools layers (as the embedded library's does):
    the flag's signal is the one read, so it is checked and used, not silently ignored."""
    model, root = tiny_library("llama")
    shutil.copytree(root, tmp_path / "lib")
    lib = AdapterLibrary.load(tmp_path / "lib", model)
    pooled = RouterConfig(k=2, layer=-2, layers=(-2, -1), module="v_proj", modules=("v_proj",), calibration="zscore",
                          statistics="fit", weighting="softmax", abstain="top", abstain_below=-1.5)
    stats = {s.key: {"values": [1.0] * len(lib), "std": [2.0] * len(lib)} for s in Router(model, lib, pooled).signals}
    RouterFile(pooled, list(lib.names), model_fingerprint(model), stats, "tiny").save(tmp_path / "lib" / FILE_NAME)

    def spec(**flags) -> EngineSpec:  # as the CLI makes it
        return EngineSpec(str(tiny_model_dir("llama")), str(tmp_path / "lib"), device="cpu",
                          router_overrides=router_overrides(**flags))

    with pytest.raises(LogoError, match="signal layer 100 is out of range"):
        spec(k=2, calibration="none", layer=100).build()
    with pytest.raises(LogoError, match="no adapter targets the signal module .*gate_proj"):
        spec(calibration="none", module="gate_proj").build()
    engine = spec(k=2, calibration="none", layer=-3).build()
    try:
        assert engine.router.config.signal_layers == (-3,)
        assert [s.module for s in engine.router.signals] == ["model.layers.0.self_attn.v_proj"]
        route = engine.route(PROMPTS[:1])[0]
        ref = reference_scores(model, root, lib.names, tokenizer, PROMPTS[0], "norm", layer=-3, module="v_proj")
        assert route.all_scores == pytest.approx(ref, rel=1e-4, abs=1e-5)
    finally:
        engine.close()
    router = spec(calibration="none", module="q_proj").resolved()[1]
    assert router.signal_layers == (-2, -1) and router.signal_modules == ("q_proj",)
    assert router.abstain == "none"  # the fit's threshold was for the fit's signal's scores
    assert spec(calibration="none", module="q_proj", abstain="top", abstain_below=0.5).resolved()[1].abstain == "top"
    assert spec(k=1).resolved()[1].abstain == "top"  # the fit's signal: its rule stays
    assert spec(calibration="mean").resolved()[1].abstain == "none"  # other scores: the threshold does not apply
    assert spec(abstain="top").resolved()[1].abstain_below == -1.5  # the fit's rule, named again: its threshold
    new_threshold = spec(calibration="mean", abstain_below=0.25).resolved()[1]  # other scores, a threshold given
    assert (new_threshold.abstain, new_threshold.abstain_below) == ("top", 0.25)
    for flags, message in [({"abstain": "top", "calibration": "mean"}, "--abstain top needs its threshold"),
                           ({"abstain": "margin"}, "--abstain margin needs its threshold"),
                           ({"abstain": "none", "abstain_below": 1.0}, "this router does not abstain")]:
        with pytest.raises(LogoError, match=message):
            spec(**flags).resolved()
    with pytest.raises(LogoError, match="this router does not abstain"):  # the official router abstains on nothing
        EngineSpec(str(tiny_model_dir("llama")), str(tmp_path / "lib"), router_file="official",
                   router_overrides=router_overrides(abstain_below=0.3)).resolved()
    # calibration statistics are per signal: the fit's cover the pooled signals, not the flag's single one
    engine = spec(layer=-1).build()
    try:
        # named as --signal-layer counts layers, whether routing finds them missing or the CLI's check before it
        for call in (lambda: engine.route(PROMPTS[:1]), engine.check_statistics):
            with pytest.raises(LogoError, match=r"no 'zscore' calibration statistics for signal at layer -1 \(= 2; "
                               r"norm\|module=v_proj"):
                call()
    finally:
        engine.close()


def test_engine_scores_are_the_routers_scores_of_probed_signals(engine, tokenizer):
    """``engine.scores``: one probe at many points, scored by any router (one signal or pooled) as it routes."""
    single = engine.with_router(RouterConfig(k=1, layer=-2, post_norm=True))
    pooled = engine.with_router(RouterConfig(k=1, layers=(-2, -1)))
    points = list(dict.fromkeys(single.router.points + pooled.router.points))
    found = engine.signals(MORE_PROMPTS, points, batch_size=3)
    raw = single.scores(found)
    assert raw.shape == (len(MORE_PROMPTS), len(engine.library))
    torch.testing.assert_close(raw, single.router.raw_scores(found[single.router.point]))
    routed = torch.tensor([r.all_scores for r in single.route(MORE_PROMPTS)])
    torch.testing.assert_close(routed, raw, rtol=1e-4, atol=1e-5)
    both = pooled.scores(found)
    assert both.shape == (len(MORE_PROMPTS), 2, len(engine.library))
    torch.testing.assert_close(both, pooled.router.signal_scores(found))
    torch.testing.assert_close(single.weight_norms(), weight_norms(engine.library, single.router.signal_module))
    with pytest.raises(LogoError, match="no signal vectors at .*engine.signals"):
        single.scores({pooled.router.point: found[pooled.router.point]})


def test_signal_study_numbers_equal_the_routers_formula(engine):
    """The study scores through the engine (one way in) and gets what a Router of each option, built directly,
    gets: precision@1 of raw, mean-calibrated and weight-norm-calibrated scores."""
    import inspect

    import logo.experiments.signal_study as study
    import logo.train.library_builder as builder

    source = inspect.getsource(study)
    assert "Router(" not in source and "weight_norms(engine.library" not in source
    assert "LoGoEngine(" not in inspect.getsource(builder) and "AdapterLibrary" not in inspect.getsource(builder)
    targets = [i % len(engine.library) for i in range(len(MORE_PROMPTS))]
    rows = run_study(engine, MORE_PROMPTS, targets, PROMPTS, [-1, 1], batch_size=2)
    points = [SignalPoint(layer, post, pos) for layer in sorted({-1 % engine.num_layers, 1}) for post in (False, True)
              for pos in ("last", "mean")]
    found = engine.signals(MORE_PROMPTS, points, 2)
    calib = engine.signals(PROMPTS, points, 2)
    expected = []
    for point in points:
        for strategy in ("norm", "entropy"):
            router = Router(engine.model, engine.library, RouterConfig(
                strategy=strategy, k=1, layer=point.layer, post_norm=point.post_norm, position=point.position))
            raw = router.raw_scores(found[point])
            for div in (None, router.mean_statistics(calib[point]), weight_norms(engine.library, router.signal_module)):
                scores = raw if div is None else raw / div.clamp(min=1e-12)
                expected.append(sum(int(t) == g for t, g in zip(scores.argmax(1), targets)) / len(targets))
    assert [r.precision_at_1 for r in rows] == expected
