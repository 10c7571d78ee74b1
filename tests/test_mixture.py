"""Mixture inference against independent references: PEFT with the same adapters, and batch invariance."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftMixedModel, PeftModel
from peft.tuners.lora.layer import LoraLayer

from logo import mixture_ops
from logo.engine import LoGoEngine
from logo.generation import GenerationSettings
from logo.library import AdapterLibrary
from logo.router import RouterConfig, Selection
from tests.helpers import MIXED_SPECS, library_in_dtype, make_tiny_model

PROMPTS = [
    "Evaluate the result.\n\nQ: not ( True ) and ( True ) is\nA:",
    "Q: hi\nA:",
    "Sort the following words alphabetically: pear apple fig\nA:",
    "Q: What is 12 + 7?\nA:",
]


def official_peft(arch: str, root, names: list[str], weights: list[float]):
    """The official LoGo generation path: PeftMixedModel, selected adapters active, scaling *= weight."""
    base = make_tiny_model(arch)
    model = PeftMixedModel.from_pretrained(base, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    model.set_adapter(names)
    multiplier = dict(zip(names, weights))
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.scaling = {k: v * multiplier.get(k, 1.0) for k, v in module.scaling.items()}
    return model.eval()


@pytest.fixture
def engine(tiny_library, tokenizer, arch):
    model, root = tiny_library(arch)
    library = AdapterLibrary.load(root, model)
    eng = LoGoEngine(model, tokenizer, library, RouterConfig(k=3))
    yield eng
    eng.close()


def _logits_under(engine: LoGoEngine, prompts: list[str], selections: list[Selection]) -> torch.Tensor:
    ids, mask = engine.encode(prompts)
    with engine.mixture(selections), torch.no_grad():
        return engine.model(input_ids=ids, attention_mask=mask).logits


def test_logits_match_official_peft_path(engine, tiny_library, tokenizer, arch):
    _, root = tiny_library(arch)
    for prompt in PROMPTS[:2]:
        route = engine.route([prompt])[0]
        ours = _logits_under(engine, [prompt], [route])
        peft_model = official_peft(arch, root, route.names, route.weights)
        ids = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            ref = peft_model(**ids).logits
        base = engine.model(**ids).logits
        assert (ref - base).abs().max() > 1e-2, "adapters must visibly change the logits for this test to bite"
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_all_adapters_with_mixed_ranks_and_targets_match_peft(tiny_library, tokenizer, arch):
    model, root = tiny_library(arch)
    library = AdapterLibrary.load(root, model)
    names = [s["name"] for s in MIXED_SPECS]
    weights = [0.3, 0.1, 0.2, 0.15, 0.15, 0.1]
    selection = Selection([library.index(n) for n in names], weights)
    engine = LoGoEngine(model, tokenizer, library, RouterConfig(k=1))
    try:
        ours = _logits_under(engine, [PROMPTS[0]], [selection])
    finally:
        engine.close()
    ref_model = official_peft(arch, root, names, weights)
    with torch.no_grad():
        ref = ref_model(**tokenizer([PROMPTS[0]], return_tensors="pt")).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_k1_equals_peft_single_adapter(engine, tiny_library, tokenizer, arch):
    model, root = tiny_library(arch)
    engine = engine.with_router(RouterConfig(k=1))
    prompt = PROMPTS[2]
    route = engine.route([prompt])[0]
    assert route.weights == [1.0]
    ours = _logits_under(engine, [prompt], [route])
    ref_model = PeftModel.from_pretrained(make_tiny_model(arch), root / route.names[0]).eval()
    with torch.no_grad():
        ref = ref_model(**tokenizer([prompt], return_tensors="pt")).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_greedy_generation_matches_official_peft(engine, tiny_library, tokenizer, arch):
    _, root = tiny_library(arch)
    prompt = PROMPTS[3]
    ours = engine.generate([prompt], max_new_tokens=12)[0]
    ref_model = official_peft(arch, root, ours.route.names, ours.route.weights)
    ids = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = ref_model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert ours.text == tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_merging_part_way_through_decoding_keeps_the_greedy_output(engine, monkeypatch):
    """A shared mixture merged after some decode steps (some modules, not others) decodes as one never merged."""
    merges = []
    merged_weight = mixture_ops.ModuleMixture.merged_weight
    monkeypatch.setattr(mixture_ops.ModuleMixture, "merged_weight",
                        lambda self, weight: merges.append(self.spent) or merged_weight(self, weight))
    route = engine.route([PROMPTS[3]])[0]
    monkeypatch.setattr(mixture_ops, "MERGE_COST", 1e9)  # never pays: the factors all the way
    never = engine.generate([PROMPTS[3]], selections=[route], max_new_tokens=16)[0]
    assert merges == []
    monkeypatch.setattr(mixture_ops, "MERGE_COST", 4.0)  # q_proj after about 6 decode steps, the MLP later
    part_way = engine.generate([PROMPTS[3]], selections=[route], max_new_tokens=16)[0]
    assert merges and min(merges) > 40, "merges must happen after the prefill, during decoding"
    monkeypatch.undo()
    at_once = engine.generate([PROMPTS[3]], selections=[route], max_new_tokens=16)[0]  # tiny layers: merged at once
    assert part_way.text == never.text == at_once.text


def test_batch_invariance_heterogeneous_mixtures(engine):
    alone = [engine.generate([p], max_new_tokens=10)[0] for p in PROMPTS]
    together = engine.generate(PROMPTS, max_new_tokens=10, batch_size=4)
    assert len({tuple(g.route.indices) for g in together}) > 1, "rows must carry different mixtures"
    for a, b in zip(alone, together):
        assert a.text == b.text
        assert a.route.indices == b.route.indices
        assert a.route.all_scores == pytest.approx(b.route.all_scores, rel=1e-4, abs=1e-5)


def test_batch_logits_match_rows_alone_including_base_row(engine):
    routes = engine.route(PROMPTS)
    selections = [routes[0], Selection([], []), routes[2], Selection([1], [0.5])]
    together = _logits_under(engine, PROMPTS, selections)
    ids, mask = engine.encode(PROMPTS)
    for row, (prompt, sel) in enumerate(zip(PROMPTS, selections)):
        alone = _logits_under(engine, [prompt], [sel])[0]
        n = alone.shape[0]
        torch.testing.assert_close(together[row, -n:], alone, atol=1e-4, rtol=1e-4)
    base = engine.model(input_ids=ids[1:2], attention_mask=mask[1:2]).logits
    torch.testing.assert_close(together[1], base[0], atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded_and_uses_the_mixture(engine, tiny_library, tokenizer, arch):
    a = engine.generate(PROMPTS[:2], max_new_tokens=8, do_sample=True, seed=3, batch_size=2)
    b = engine.generate(PROMPTS[:2], max_new_tokens=8, do_sample=True, seed=3, batch_size=2)
    assert [g.text for g in a] == [g.text for g in b]
    base = engine.generate(PROMPTS[:2], max_new_tokens=8, do_sample=True, seed=3, batch_size=2,
                           selections=[None, None])
    assert [g.text for g in a] != [g.text for g in base], "the same seed without the mixture must sample otherwise"
    # the formula, independently: the official PEFT path sampled from the same seed gives the same tokens
    _, root = tiny_library(arch)
    ours = engine.generate(PROMPTS[:1], max_new_tokens=8, do_sample=True, seed=3)[0]
    peft_model = official_peft(arch, root, ours.route.names, ours.route.weights)
    ids = tokenizer(PROMPTS[:1], return_tensors="pt")
    config = copy.deepcopy(engine.model.generation_config)  # plain sampling: no top-k, no top-p
    # top_k 0: no top-k cut (None would be filled with transformers' default 50)
    config.do_sample, config.temperature, config.top_p, config.top_k = True, 1.0, 1.0, 0
    config.max_new_tokens, config.max_length, config.pad_token_id = 8, None, tokenizer.pad_token_id
    torch.manual_seed(3)
    with torch.no_grad():
        out = peft_model.generate(**ids, generation_config=config)
    assert ours.text == tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_early_stop_at_newline(engine):
    out = engine.generate(PROMPTS, max_new_tokens=40, early_stop=True, batch_size=4)
    full = engine.generate(PROMPTS, max_new_tokens=40, batch_size=4)
    for stopped, whole in zip(out, full):
        assert whole.text.startswith(stopped.text)
        if "\n" in whole.text:
            assert stopped.text == whole.text[: whole.text.index("\n") + 1]
    # A random tiny model rarely emits a newline, so the stop is also checked on a token it does emit: each row
    # must end right after that token's first occurrence and be padded after it, under its own mixture.
    ids, mask = engine.encode(PROMPTS)
    with engine.mixture(engine.route(PROMPTS)):
        tokens = engine.decode(ids, mask, GenerationSettings(40))
        stop = int(tokens[0, 2])
        engine.newline_id = stop
        cut = engine.decode(ids, mask, GenerationSettings(40, early_stop=True))
    for whole, row in zip(tokens.tolist(), cut.tolist()):
        n = whole.index(stop) + 1 if stop in whole else len(whole)
        assert row[:n] == whole[:n]
        assert all(t == engine.pad_id() for t in row[n:])


def test_bf16_library_matches_fp32_within_bf16_precision(tiny_library, tokenizer):
    """The same mixture in bf16 (model and stacked factors) against fp32: logits agree to bf16 precision."""
    model, root = tiny_library("llama")
    model_bf16 = make_tiny_model("llama").to(torch.bfloat16)
    library = AdapterLibrary.load(root, model_bf16)
    assert library.stacks["model.layers.0.self_attn.q_proj"].A.dtype == torch.bfloat16
    engines = [LoGoEngine(model_bf16, tokenizer, library, RouterConfig(k=2)),
               LoGoEngine(model, tokenizer, AdapterLibrary.load(root, model), RouterConfig(k=2))]
    try:
        routes = engines[1].route(PROMPTS[:2])
        half, full = (_logits_under(e, PROMPTS[:2], routes).float() for e in engines)
        base = engines[1].model(*engines[1].encode(PROMPTS[:2])).logits
        out = engines[0].generate(PROMPTS[:2], max_new_tokens=4, batch_size=2)
    finally:
        for e in engines:
            e.close()
    assert all(len(g.route.indices) == 2 for g in out)
    assert (full - base).abs().max() > 0.05, "the mixture must change the logits for the comparison to bite"
    error = (half - full).norm() / full.norm()
    assert error < 2e-2, f"bf16 relative error {error:.3g} over the stated 2e-2"


def test_a_compact_library_routes_and_generates_what_its_widened_copy_does(tiny_library, tokenizer, tmp_path):
    """bf16 adapter files under the fp32 model, stored compact (bf16) or widened (fp32): the same routes, the same
    logits bit for bit (prefill) and the same generated tokens (a batch of distinct mixtures: decoding's kernel)."""
    model, root = tiny_library("llama")
    narrow = library_in_dtype(root, tmp_path / "bf16", torch.bfloat16)
    engines = [LoGoEngine(model, tokenizer, AdapterLibrary.load(narrow, model, compact=compact), RouterConfig(k=3))
               for compact in (True, False)]
    try:
        assert engines[0].library.nbytes < 0.51 * engines[1].library.nbytes
        routes = [e.route(PROMPTS) for e in engines]
        assert [(r.indices, r.weights) for r in routes[0]] == [(r.indices, r.weights) for r in routes[1]]
        assert len({tuple(r.indices) for r in routes[0]}) > 1, "distinct mixtures per row"
        logits = [_logits_under(e, PROMPTS, routes[0]) for e in engines]
        outs = [e.generate(PROMPTS, selections=routes[0], max_new_tokens=8, batch_size=4) for e in engines]
    finally:
        for e in engines:
            e.close()
    assert torch.equal(logits[0], logits[1])
    assert [o.text for o in outs[0]] == [o.text for o in outs[1]]


@pytest.mark.parametrize("added", ["base_rows", "base_and_adapter_row"])
def test_prefilling_added_rows_alone_that_leave_modules_unused(engine, added):
    """A server's batch: rows join running adapter rows and are prefilled alone (``mixture_rows_from``). Where none
    of the new rows uses a module (base rows use none), that module runs as the base model for them: it used to build
    an empty mixture there and fail to reshape it (the server then admitted such rows one by one)."""
    selections = [None, None] if added == "base_rows" else [None, Selection([2], [1.0])]
    engine.set_mixture([Selection([0], [1.0]), Selection([1], [1.0])])
    engine.add_mixture_rows(selections)
    ids, mask = engine.encode(PROMPTS[2:4])
    try:
        with engine.mixture_rows_from(2), torch.no_grad():
            got = engine.model(input_ids=ids, attention_mask=mask).logits
    finally:
        engine.clear_mixture()
    want = _logits_under(engine, PROMPTS[2:4], selections)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
