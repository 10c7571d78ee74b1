"""Fitted routers: z-score calibration and pooled signals against the formula, abstain to base, router files
that do not match their library, and the fit itself (on a tiny random model)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.fit import Example, check_examples, examples_from_jsonl, fit_router
from logo.library import AdapterLibrary
from logo.methods import Fitted
from logo.router import Router, RouterConfig
from logo.router_file import FILE_NAME, RouterFile, library_router_file, model_fingerprint
from logo.train.manifest_examples import examples_from_manifest
from tests.helpers import make_tiny_model
from tests.test_router import reference_scores

PROMPTS = ["Q: What is 3 + 4?\nA:", "Sort: zeta alpha\nA:", "x", "Name a colour.", "2 4 6 8", "hello there"]


@pytest.fixture
def lib_copy(tiny_library, tmp_path):
    model, root = tiny_library("llama")
    shutil.copytree(root, tmp_path / "lib")
    return model, tmp_path / "lib"


def test_zscore_calibration_is_the_formula_written_out(lib_copy, tokenizer):
    model, root = lib_copy
    lib = AdapterLibrary.load(root, model)
    engine = LoGoEngine(model, tokenizer, lib, RouterConfig(k=1, calibration="zscore", layer=-2, post_norm=True))
    engine.calibrate(PROMPTS, batch_size=4)
    raw = torch.tensor([reference_scores(model, root, lib.names, tokenizer, p, "norm", layer=-2, post_norm=True)
                        for p in PROMPTS], dtype=torch.float64)
    mean = raw.mean(0)
    std = ((raw - mean) ** 2).mean(0).sqrt()  # population standard deviation over the calibration prompts
    for prompt, row in zip(PROMPTS[:3], raw[:3]):
        route = engine.route([prompt])[0]
        z = (row - mean) / std
        assert route.indices == [int(z.argmax())]
        assert route.scores[0] == pytest.approx(float(z.max()), rel=1e-3, abs=1e-4)
    engine.close()


def test_pooled_signal_sums_the_z_scores_of_every_layer_and_module(lib_copy, tokenizer):
    model, root = lib_copy
    lib = AdapterLibrary.load(root, model)
    config = RouterConfig(k=1, calibration="zscore", layers=(0, 1, 2), modules=("q_proj",))
    engine = LoGoEngine(model, tokenizer, lib, config)
    engine.calibrate(PROMPTS, batch_size=4)
    total = 0
    for layer in (0, 1, 2):
        raw = torch.tensor([reference_scores(model, root, lib.names, tokenizer, p, "norm", layer=layer)
                            for p in PROMPTS], dtype=torch.float64)
        total = total + (raw - raw.mean(0)) / ((raw - raw.mean(0)) ** 2).mean(0).sqrt()
    routes = engine.route(PROMPTS)
    assert [r.indices[0] for r in routes] == total.argmax(1).tolist()
    assert [r.scores[0] for r in routes] == pytest.approx(total.max(1).values.tolist(), rel=1e-3, abs=1e-4)
    engine.close()


def test_abstain_runs_the_base_model(lib_copy, tokenizer):
    model, root = lib_copy
    lib = AdapterLibrary.load(root, model)
    always = LoGoEngine(model, tokenizer, lib, RouterConfig(k=2, abstain="top", abstain_below=1e9))
    never = always.with_router(RouterConfig(k=2, abstain="margin", abstain_below=0.0))
    out = always.generate(PROMPTS[:3], max_new_tokens=5, batch_size=3)
    base = always.generate(PROMPTS[:3], selections=[None] * 3, max_new_tokens=5, batch_size=3)
    routed = never.generate(PROMPTS[:3], max_new_tokens=5, batch_size=3)
    for o, b, r in zip(out, base, routed):
        assert o.route.abstained and o.route.indices == [] and o.text == b.text
        assert not r.route.abstained and len(r.route.indices) == 2
    assert [o.text for o in routed] != [b.text for b in base], "the adapters should change something"
    always.close()


def fitted(model, tokenizer, root, examples, abstain_from="routing") -> RouterFile:
    lib = AdapterLibrary.load(root, model)
    engine = LoGoEngine(model, tokenizer, lib, RouterConfig(k=1))
    try:
        return fit_router(engine, examples, base_model="tiny", batch_size=8, abstain_from=abstain_from)
    finally:
        engine.close()


def test_fit_writes_a_router_file_that_routes_as_fitted(lib_copy, tokenizer):
    model, root = lib_copy
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = [Example(f"{name} example {i}: " + "abc " * (j + i), name) for j, name in enumerate(names)
                for i in range(3)] + [Example("no adapter for this one", None), Example("nor this", None)]
    file = fitted(model, tokenizer, root, examples)
    assert file.adapters == names and file.fit["n_seen"] == 3 * len(names) and file.fit["n_unseen"] == 2
    assert file.config.abstain in ("top", "margin") and 0 <= file.fit["precision_at_1"] <= 1
    assert file.config.abstain_below == file.fit["abstain"]["threshold"], "stored as fitted (no rounding after)"
    path = file.save(root / FILE_NAME)
    assert library_router_file([root / n for n in names]) == path
    loaded = RouterFile.load(path)
    lib = AdapterLibrary.load(root, model)
    loaded.check(lib.names, model, lib.modules)
    engine = LoGoEngine(model, tokenizer, lib, loaded.apply(lib))
    routes = engine.route([x.prompt for x in examples], batch_size=8)
    scores = torch.tensor([r.scores[0] if r.scores else float("nan") for r in routes])
    assert len(routes) == len(examples) and all(r.abstained == (not r.indices) for r in routes)
    assert torch.isfinite(scores[[not r.abstained for r in routes]]).all()
    engine.close()


def test_fit_names_an_adapter_with_too_few_prompts(lib_copy, tokenizer):
    model, root = lib_copy
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = [Example(f"p{i}", n) for n in names for i in range(2)]
    with pytest.raises(LogoError, match=r"at least 2 example prompts per adapter; too few for: b_r8 \(1\)"):
        check_examples([x for x in examples if x != Example("p1", "b_r8")], names)
    with pytest.raises(LogoError, match=r"adapter\(s\) \['zz'\]"):
        check_examples(examples + [Example("p", "zz")], names)


def test_router_file_mismatches_are_one_line_errors(lib_copy, tokenizer, tmp_path):
    model, root = lib_copy
    lib = AdapterLibrary.load(root, model)
    file = RouterFile(RouterConfig(k=1), list(lib.names), model_fingerprint(model), {})
    file.check(lib.names, model, lib.modules)
    with pytest.raises(LogoError, match=r"adapter\(s\) \['a_r4'\] that the library does not have"):
        file.check(lib.names[1:], model, lib.modules)
    with pytest.raises(LogoError, match=r"does not know the library's adapter\(s\) \['zz'\]"):
        file.check(lib.names + ["zz"], model, lib.modules)
    other_module = RouterFile(RouterConfig(k=1, module="gate_proj"), list(lib.names), file.model, {})
    with pytest.raises(LogoError, match=r"signal module\(s\) \['gate_proj'\], which no adapter"):
        other_module.check(lib.names, model, lib.modules)
    with pytest.raises(LogoError, match="another base model .*num_hidden_layers 3 \\(file\\) vs 4 \\(model\\)"):
        file.check(lib.names, make_tiny_model("llama", layers=4), lib.modules)
    (tmp_path / "bad.json").write_text(json.dumps({**file.to_dict(), "router": {"k": 1, "layr": 2}}))
    with pytest.raises(LogoError, match=r"unknown field\(s\) \['layr'\]"):
        RouterFile.load(tmp_path / "bad.json")
    with pytest.raises(LogoError, match="does not exist"):
        RouterFile.load(tmp_path / "none.json")


def test_examples_from_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n\n{"prompt": "y", "adapter": "b"}\n')
    (tmp_path / "none.jsonl").write_text('{"prompt": "z"}\n')
    assert examples_from_jsonl(tmp_path) == [Example("x", "a"), Example("y", "b"), Example("z", None)]
    (tmp_path / "c.jsonl").write_text("not json\n")
    with pytest.raises(LogoError, match="c.jsonl:1 is not JSON"):
        examples_from_jsonl(tmp_path)
    with pytest.raises(LogoError, match="no \\*.jsonl files"):
        examples_from_jsonl(tmp_path / "nowhere")
    for text, message in [(b"\xff\xfe not utf-8\n", "is not UTF-8"), (b'{"prompt": "  "}\n', "c.jsonl:1 has an empty"),
                          (b'{"prompt": "x", "adapter": ["a"]}\n', '"adapter" must be')]:
        (tmp_path / "c.jsonl").write_bytes(text)
        with pytest.raises(LogoError, match=message):
            examples_from_jsonl(tmp_path)


@pytest.mark.parametrize("manifest, message", [
    ("[]", "is not a manifest"), ('{"adapters": {"a": 1}}', "is not a manifest"),
    ('{"adapters": [{"templates": []}]}', 'without a "name"'), ("\u00ff", "cannot read")])
def test_a_malformed_manifest_is_one_line_error(tmp_path, manifest, message):
    (tmp_path / "manifest.json").write_text(manifest, encoding="latin-1" if message == "cannot read" else "utf-8")
    with pytest.raises(LogoError, match=message):
        examples_from_manifest(tmp_path / "manifest.json")


def fitted_file(model, lib, config: RouterConfig) -> RouterFile:
    stats = {s.key: {"values": [1.0] * len(lib), "std": [2.0] * len(lib)} for s in Router(model, lib, config).signals}
    return RouterFile(config, list(lib.names), model_fingerprint(model), stats, "tiny")


def test_engine_spec_uses_the_library_router_file_unless_told_otherwise(lib_copy, tiny_model_dir):
    from logo.spec import EngineSpec

    model, root = lib_copy
    lib = AdapterLibrary.load(root, model)
    config = RouterConfig(k=2, calibration="zscore", statistics="fit", weighting="softmax", layers=(-1, -2),
                          abstain="margin", abstain_below=0.1)
    fitted_file(model, lib, config).save(root / FILE_NAME)
    model_dir = str(tiny_model_dir("llama"))
    engine = EngineSpec(model_dir, str(root), device="cpu").build()
    assert engine.router.config == config and engine.route(["hello"])[0].all_scores
    engine.close()
    engine = EngineSpec(model_dir, str(root), device="cpu", router_overrides={"k": 1}).build()
    assert engine.router.config == replace(config, k=1)
    engine.close()
    assert EngineSpec(model_dir, str(root), router_file="official", fit_k=True).resolved()[1] == RouterConfig(k=6)
    signal = EngineSpec(model_dir, str(root), router_overrides={"layer": -3}).resolved()[1]
    assert signal.layer == -3 and signal.statistics == "default", "another signal: the fit's statistics do not apply"
    assert EngineSpec(model_dir, str(root), RouterConfig(k=3)).resolved()[1] == RouterConfig(k=3)
    wrong = fitted_file(model, lib, RouterConfig(k=1))
    wrong.adapters = [n for n in wrong.adapters if n != "b_r8"] + ["zz"]
    wrong.save(root / FILE_NAME)
    with pytest.raises(LogoError, match=r"router file .*logo_router.json was fitted with adapter\(s\) \['zz'\]"):
        EngineSpec(model_dir, str(root), device="cpu").build()
    with pytest.raises(LogoError, match="--router nope: no such router file"):
        EngineSpec(model_dir, str(root), router_file="nope").resolved()


def test_route_record_of_an_abstained_prompt(capsys):
    from logo.cli_core import print_records, route_record
    from logo.router import Route

    record = route_record("p", Route([], [], all_scores=[0.1, 0.2], abstained=True), ["a", "b"])
    print_records([record], json_out=False)
    assert "abstained" in capsys.readouterr().out  # the table view says so, not just an empty table
    assert record["abstained"] is True and record["selected"] == [] and record["scores"] == {"a": 0.1, "b": 0.2}


def test_fitted_method_uses_the_library_router_file(lib_copy, tokenizer):
    from logo.methods import get_method

    model, root = lib_copy
    lib = AdapterLibrary.load(root, model)
    engine = LoGoEngine(model, tokenizer, lib, RouterConfig(k=1))
    with pytest.raises(LogoError, match="no fitted router"):
        get_method("fitted").select(engine, ["x"], [0], 0)
    config = RouterConfig(k=1, calibration="zscore", statistics="fit", abstain="top", abstain_below=1e9)
    fitted_file(model, lib, config).save(root / FILE_NAME)
    assert get_method("fitted").engine(engine).router.config == config
    assert get_method("fitted").select(engine, ["x", "y"], [0, 1], 0)[0].abstained
    assert Fitted(abstain=False).engine(engine).router.config.abstain == "none"
    engine.close()


def test_abstain_threshold_counts_every_example_prompt():
    from logo.fit import choose_abstain

    # 4 seen prompts (confident, right), 1 seen prompt (unsure, wrong), 2 unseen prompts (unsure)
    scores = torch.tensor([[5.0, 0.0], [0.0, 6.0], [4.0, 1.0], [1.0, 5.0], [1.0, 1.2], [1.1, 1.0], [1.0, 1.3]])
    targets = torch.tensor([0, 1, 0, 1, 0, -1, -1])
    seen = torch.tensor([True, True, True, True, True, False, False])
    best = choose_abstain([(None, lambda rows: scores)], scores.argmax(1) == targets, seen)
    assert best["rule"] == "top" and 1.3 < best["threshold"] < 4.0  # the wrong seen prompt and both unseen abstain
    assert best["prompts_right"] == 6 and best["unseen_abstained"] == 1.0 and best["seen_abstained"] == 0.2


def test_abstain_on_its_own_signal_is_the_formula_written_out(lib_copy, tokenizer):
    """The abstain rule reads another signal than the routing one: mean-calibrated raw norms at layer -2."""
    from logo.router import AbstainSignal

    model, root = lib_copy
    lib = AdapterLibrary.load(root, model)
    own = AbstainSignal(layer=-2, module="q_proj", post_norm=False, position="last", strategy="norm",
                        calibration="mean")
    raw = torch.tensor([reference_scores(model, root, lib.names, tokenizer, p, "norm", layer=-2) for p in PROMPTS],
                       dtype=torch.float64)
    lib.calibration[own.key(3)] = {"values": raw.mean(0).tolist(), "std": [1.0] * len(lib)}
    conf = (raw / raw.mean(0)).max(1).values
    threshold = float(conf.median())
    config = RouterConfig(k=1, abstain="top", abstain_below=threshold, abstain_signal=own)
    engine = LoGoEngine(model, tokenizer, lib, config)
    assert own.key(3).endswith("|statistics=fit") and engine.router.abstain_signal.point.layer == 1
    routes = engine.route(PROMPTS, batch_size=4)
    assert [r.abstained for r in routes] == (conf < threshold).tolist() and 0 < sum(conf < threshold) < len(PROMPTS)
    plain = engine.with_router(replace(config, abstain_signal=None, abstain="none")).route(PROMPTS, batch_size=4)
    for r, p in zip(routes, plain):
        assert r.abstained or r.indices == p.indices, "the abstain signal must not change the routing"
    with pytest.raises(LogoError, match="pass abstain_confidence"):
        engine.router.routes(raw.float())
    engine.close()
    assert RouterConfig.from_dict(config.to_dict()) == config
    with pytest.raises(LogoError, match=r"abstain_signal needs the fields .*unknown: \['layr'\]"):
        RouterConfig.from_dict({**config.to_dict(), "abstain_signal": {**config.to_dict()["abstain_signal"],
                                                                       "layr": 1}})
    foreign = RouterFile(replace(config, abstain_signal=replace(own, module="gate_proj")), list(lib.names),
                         model_fingerprint(model), {})
    with pytest.raises(LogoError, match=r"signal module\(s\) \['gate_proj'\], which no adapter"):
        foreign.check(lib.names, model, lib.modules)
    assert RouterFile(config, list(lib.names), {}, {}).without_abstain().abstain_signal is None


def test_best_threshold_is_the_brute_force_count():
    from logo.fit import best_threshold

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        conf = torch.randint(0, 6, (12,), generator=g).float()
        keep = torch.rand(12, generator=g) < 0.5
        drop = ~keep & (torch.rand(12, generator=g) < 0.6)
        right, threshold = best_threshold(conf, keep, drop)
        counts = [int((keep & (conf >= t)).sum() + (drop & (conf < t)).sum()) for t in torch.arange(-1, 7, 0.5)]
        assert right == max(counts)
        assert right == int((keep & (conf >= threshold)).sum() + (drop & (conf < threshold)).sum())


def test_abstain_takes_the_signal_that_tells_unseen_prompts_apart():
    from logo.fit import choose_abstain
    from logo.router import AbstainSignal

    # routing scores: confident everywhere (a near-neighbour unseen task looks like adapter 0); another signal
    # is low on the unseen prompts
    routing = torch.tensor([[5.0, 0.0], [0.0, 6.0], [4.0, 1.0], [5.0, 0.0], [5.5, 0.0]])
    other = torch.tensor([[3.0, 0.0], [0.0, 3.0], [2.5, 1.0], [0.5, 0.0], [0.2, 0.1]])
    targets = torch.tensor([0, 1, 0, -1, -1])
    seen = targets >= 0
    own = AbstainSignal(-3, "v_proj", False, "last", "norm", "mean")
    alone = choose_abstain([(None, lambda rows: routing)], routing.argmax(1) == targets, seen)
    assert alone["prompts_right"] == 3 and alone["unseen_abstained"] == 0.0
    best = choose_abstain([(None, lambda rows: routing), (own, lambda rows: other)], routing.argmax(1) == targets,
                          seen)
    assert best["signal"] == own and best["prompts_right"] == 5 and best["seen_abstained"] == 0.0
    assert 0.5 < best["threshold"] < 2.5 and best["rule"] == "top"


def test_abstain_is_judged_on_templates_it_was_not_fitted_on():
    """In-sample, signal P separates every unseen prompt; but its threshold from one template half misses the other
    half's unseen prompts. Q loses one seen prompt in-sample, yet carries over from template to template."""
    from logo.fit import choose_abstain, template_folds
    from logo.router import AbstainSignal

    examples = [Example(f"s{i}", "a", f"a#{i % 2}") for i in range(8)]
    examples += [Example(f"u{i}", None, f"u#{i % 2}") for i in range(4)]
    folds = template_folds(examples)
    assert folds.tolist() == [0, 1] * 6
    assert template_folds(examples[:-1] + [Example("u", None)]) is None, "a prompt without a template: no folds"
    assert template_folds([x for x in examples if x.template != "u#1"]) is None, "one unseen template: no folds"
    seen = torch.tensor([x.adapter is not None for x in examples])
    p_conf = torch.tensor([5.0] * 8 + [1.0, 4.0, 1.0, 4.0])  # unseen template u#1 sits just below the seen ones
    q_conf = torch.tensor([5.0] * 7 + [1.5] + [2.0] * 4)  # one seen prompt (template a#1) is unsure
    p, q = (AbstainSignal(-1, "q_proj", False, "last", "norm", c) for c in ("none", "mean"))
    options = [(p, lambda rows: torch.stack([p_conf, torch.zeros(12)], 1)),
               (q, lambda rows: torch.stack([q_conf, torch.zeros(12)], 1))]
    correct = seen.clone()
    in_sample = choose_abstain(options, correct, seen)
    assert in_sample["signal"] == p and in_sample["prompts_right"] == 12
    judged = choose_abstain(options, correct, seen, folds)
    assert judged["signal"] == q and judged["prompts_right_on_other_templates"] == 11
    assert judged["prompts_right"] == 11 and 2.0 < judged["threshold"] < 5.0


def test_fit_with_an_abstain_signal_of_its_own_round_trips(lib_copy, tokenizer):
    model, root = lib_copy
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = [Example(f"{name} example {i}: " + "abc " * (j + i), name, f"{name}#{i % 2}")
                for j, name in enumerate(names) for i in range(4)]
    examples += [Example(f"no adapter for this one {i}" + "!" * i, None, f"none#{i % 2}") for i in range(4)]
    file = fitted(model, tokenizer, root, examples, abstain_from="any")
    fit = file.fit["abstain"]
    assert 0 <= fit["prompts_right_on_other_templates"] <= len(examples) and 0 <= fit["prompts_right"] <= len(examples)
    own = file.config.abstain_signal
    if own is not None:  # statistics for a calibrated abstain signal travel with the file
        assert own.calibration == "none" or own.key(3) in file.statistics
    path = file.save(root / FILE_NAME)
    loaded = RouterFile.load(path)
    assert loaded.config == file.config
    lib = AdapterLibrary.load(root, model)
    engine = LoGoEngine(model, tokenizer, lib, loaded.apply(lib))
    routes = engine.route([x.prompt for x in examples], batch_size=8)
    assert len(routes) == len(examples) and all(r.abstained == (not r.indices) for r in routes)
    engine.close()
    with pytest.raises(LogoError, match="unknown abstain signal source 'all'"):
        fitted(model, tokenizer, root, examples, abstain_from="all")


def test_best_threshold_reproduces_its_decisions_in_the_scores_dtype():
    """The router compares float32 confidences with the stored threshold in float32: a float64 midpoint of two
    neighbouring floats rounds to the lower one (which then routes instead of abstaining), and so may a midpoint
    rounded to 6 decimals (1.0000001 and 1.0000003 -> 1.0)."""
    from logo.fit import best_threshold

    one = torch.tensor(1.0)
    pairs = [(one, torch.nextafter(one, torch.tensor(2.0))), (torch.tensor(1.0000001), torch.tensor(1.0000003)),
             (torch.tensor(-1.6612346), torch.tensor(-1.2)), (torch.tensor(2e-9), torch.tensor(3e-9))]
    for below, above in pairs:
        conf = torch.stack([below, above, above + 1])
        keep, drop = torch.tensor([False, True, True]), torch.tensor([True, False, False])
        right, threshold = best_threshold(conf, keep, drop)
        assert right == 3
        stored = RouterConfig.from_dict(json.loads(json.dumps(RouterConfig(k=1, abstain_below=threshold).to_dict())))
        assert (conf < stored.abstain_below).tolist() == [True, False, False], (below, above, threshold)
    keep = torch.tensor([False, True])
    assert best_threshold(torch.tensor([-1.5, 0.5]), keep, ~keep)[1] == -0.5  # as few decimals as exactness allows


def test_a_router_file_for_other_adapters_is_refused_before_any_model_loads(lib_copy, tmp_path):
    from logo.spec import EngineSpec

    model, root = lib_copy
    lib = AdapterLibrary.load(root, model)
    fitted_file(model, lib, RouterConfig(k=1)).save(root / FILE_NAME)
    subset = [str(root / "a_r4"), str(root / "b_r8")]  # two of the folder's six adapters: its file is not theirs
    with pytest.raises(LogoError, match=r"fitted with adapter\(s\) \['c_r2_rslora', .*--router official"):
        EngineSpec("org/not-loaded", subset).resolved()
    assert EngineSpec("org/not-loaded", subset, router_file="official", fit_k=True).resolved()[1] == RouterConfig(k=2)
    (tmp_path / "other").mkdir()
    shutil.copytree(root / "a_r4", tmp_path / "other" / "a_r4")
    with pytest.raises(LogoError, match=r"duplicate adapter name 'a_r4'"):
        EngineSpec("org/not-loaded", [str(root / "a_r4"), str(tmp_path / "other" / "a_r4")]).resolved()


def test_router_option_takes_a_folder_holding_a_router_file(lib_copy, tmp_path):
    from logo.spec import EngineSpec

    model, root = lib_copy
    lib = AdapterLibrary.load(root, model)
    config = RouterConfig(k=2, calibration="zscore", statistics="fit", weighting="softmax")
    (tmp_path / "routers").mkdir()
    fitted_file(model, lib, config).save(tmp_path / "routers" / FILE_NAME)
    assert EngineSpec("org/not-loaded", str(root), router_file=str(tmp_path / "routers")).resolved()[1] == config
    with pytest.raises(LogoError, match=f"--router {tmp_path} is a folder without a {FILE_NAME}"):
        EngineSpec("org/not-loaded", str(root), router_file=str(tmp_path)).resolved()


def test_library_folder_and_calibration_file_of_some_of_a_folders_adapters(lib_copy, monkeypatch, tmp_path):
    """Statistics of some of a folder's adapters go to the logo cache, not over the folder's own file; a router
    file's statistics stay in the router file."""
    from logo.calibration import FILE_NAME as CALIBRATION_FILE
    from logo.calibration import cache_file, library_folder, save_calibration

    monkeypatch.setenv("LOGO_CACHE", str(tmp_path / "cache"))
    model, root = lib_copy
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert library_folder([root / n for n in names]) == root.resolve()
    assert library_folder([root / n for n in names[:2]]) is None
    assert library_folder([root / names[0], tmp_path / "elsewhere" / names[1]]) is None
    whole = AdapterLibrary.load(root, model)
    whole.calibration = {"k": {"method": "mean", "values": [1.0] * 6, "std": [1.0] * 6},
                         "k|statistics=fit": {"method": "fit", "values": [1.0] * 6, "std": [1.0] * 6}}
    assert save_calibration(whole) == root / CALIBRATION_FILE
    assert list(json.loads((root / CALIBRATION_FILE).read_text())["entries"]) == ["k"]
    some = AdapterLibrary.load([root / n for n in names[:2]], model)
    some.calibration = {"k": {"method": "mean", "values": [2.0] * 2, "std": [1.0] * 2}}
    assert save_calibration(some) == cache_file(names[:2])
    assert json.loads((root / CALIBRATION_FILE).read_text())["adapters"] == names  # the folder's file is intact
    assert AdapterLibrary.load([root / n for n in names[:2]], model).calibration == some.calibration
    assert AdapterLibrary.load(root, model).calibration["k"]["values"] == [1.0] * 6
