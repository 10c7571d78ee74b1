"""The static-cache and compiled decode paths against transformers' ``generate`` (the eager engine)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch._dynamo.config as dynamo_config

import logo.static_decode
from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.library import AdapterLibrary
from logo.mixture import StaticMixture
from logo.router import RouterConfig, Selection
from logo.static_decode import RECOMPILE_LIMIT, StaticDecoder, _recompile_limit
from tests.helpers import make_tiny_model
from tests.test_mixture import PROMPTS


def _engines(tiny_library, tokenizer, arch, paths=("eager", "static")):
    model, root = tiny_library(arch)
    library = AdapterLibrary.load(root, model)
    return [LoGoEngine(model, tokenizer, library, RouterConfig(k=3), decode=p) for p in paths]


def _texts(generations):
    return [g.text for g in generations]


def test_static_decoder_matches_generate_on_the_base_model(tokenizer):
    model = make_tiny_model("qwen2", layers=2)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # left padding: rows differ in length
    ref = model.generate(**batch, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    decoder = StaticDecoder(model, min_cache_len=8)
    assert [decoder.cache_len(n) for n in (1, 8, 9, 64, 65)] == [8, 8, 16, 64, 128]
    for _ in range(2):  # the second call reuses (resets) the cache
        out = decoder.generate(batch.input_ids, batch.attention_mask, 20)
        assert torch.equal(out, ref[:, batch.input_ids.shape[1]:])


def test_static_engine_equals_eager_engine_with_routing_base_row_and_early_stop(tiny_library, tokenizer, arch):
    eager, static = _engines(tiny_library, tokenizer, arch)
    try:
        routes = eager.route(PROMPTS)
        selections = [routes[0], None, routes[2], Selection([4, 1], [0.7, 0.3])]  # row 1 = base model
        for kwargs in ({"selections": selections}, {}):  # fixed mixtures, then LoGo routing per row
            for early_stop in (False, True):
                want = eager.generate(PROMPTS, max_new_tokens=24, batch_size=4, early_stop=early_stop, **kwargs)
                got = static.generate(PROMPTS, max_new_tokens=24, batch_size=4, early_stop=early_stop, **kwargs)
                assert _texts(got) == _texts(want)
                assert [g.selection.indices for g in got] == [g.selection.indices for g in want]
        assert any("\n" not in t and len(t) < 24 for t in _texts(want))  # early stop took effect somewhere
        # the hooks are switched off outside generate: the model is the base model again
        ids, mask = static.encode(PROMPTS[:1])
        with torch.no_grad():
            assert torch.equal(static.model(input_ids=ids, attention_mask=mask).logits,
                               eager.model(input_ids=ids, attention_mask=mask).logits)
    finally:
        eager.close()
        static.close()


def test_the_models_own_generation_defaults_do_not_split_the_paths(tiny_library, tokenizer):
    """A model whose generation_config carries its own processors (repetition penalty, n-gram ban, top-k, as
    Qwen2.5-Instruct's does) still gives the eager path the static path's greedy tokens: neither applies them."""
    eager, static = _engines(tiny_library, tokenizer, "llama")
    own = eager.model.generation_config
    own.repetition_penalty, own.no_repeat_ngram_size, own.top_k = 1.3, 2, 5
    try:
        selections = [Selection([1], [1.0]), None, Selection([4, 1], [0.7, 0.3]), Selection([2], [1.0])]
        want = static.generate(PROMPTS, max_new_tokens=16, batch_size=4, selections=selections)
        got = eager.generate(PROMPTS, max_new_tokens=16, batch_size=4, selections=selections)
        assert _texts(got) == _texts(want)
        # the penalty would have changed them: the model's generate with its own config gives other tokens
        ids, mask = eager.encode(PROMPTS)
        penalised = eager.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16,
                                         do_sample=False, pad_token_id=eager.pad_id())
        plain = eager.generate(PROMPTS, max_new_tokens=16, batch_size=4, selections=[None] * 4, early_stop=False)
        assert [tokenizer.decode(r[ids.shape[1]:]) for r in penalised] != _texts(plain)
    finally:
        eager.close()
        static.close()


def test_static_mixture_logits_equal_eager_mixture(tiny_library, tokenizer):
    eager, static = _engines(tiny_library, tokenizer, "llama")
    try:
        ids, mask = eager.encode(PROMPTS)
        sels = [Selection([0, 3, 5], [0.5, 0.3, 0.2]), Selection([], []), Selection([2], [1.0]),
                Selection([1, 4], [0.6, 0.4])]
        outs = []
        for engine in (eager, static):
            with engine.mixture(sels), torch.no_grad():
                outs.append(engine.model(input_ids=ids, attention_mask=mask).logits)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        # a smaller k after a larger one leaves no stale factors in the fixed buffers
        small = []
        for engine in (static, eager):
            with engine.mixture([Selection([2], [1.0])] * 4), torch.no_grad():
                small.append(engine.model(input_ids=ids, attention_mask=mask).logits)
        torch.testing.assert_close(small[0], small[1], rtol=1e-5, atol=1e-5)
    finally:
        eager.close()
        static.close()


def test_static_sampling_is_seeded(tiny_library, tokenizer):
    (static,) = _engines(tiny_library, tokenizer, "llama", paths=("static",))
    try:
        a = static.generate(PROMPTS, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=5,
                            batch_size=4)
        b = static.generate(PROMPTS, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=5,
                            batch_size=4)
        c = static.generate(PROMPTS, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=6,
                            batch_size=4)
        assert _texts(a) == _texts(b)
        assert _texts(a) != _texts(c)
    finally:
        static.close()


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_a_seeded_call_leaves_the_global_rng_alone(tiny_library, tokenizer, decode):
    (engine,) = _engines(tiny_library, tokenizer, "llama", paths=(decode,))
    try:
        before = torch.get_rng_state()
        engine.generate(PROMPTS[:2], max_new_tokens=4, do_sample=True, seed=5, batch_size=2)
        assert torch.equal(torch.get_rng_state(), before)
    finally:
        engine.close()


def test_compiled_engine_equals_eager_engine(tiny_library, tokenizer):
    """One compile of the decode step on a tiny model (about half a minute on 2 CPU cores)."""
    eager, compiled = _engines(tiny_library, tokenizer, "qwen2", paths=("eager", "compiled"))
    try:
        selections = [Selection([0, 3, 5], [0.5, 0.3, 0.2]), None, Selection([2], [1.0]), Selection([1, 4], [0.6, 0.4])]
        for _ in range(2):  # the second run replays the compiled step with a new mixture in the same buffers
            want = eager.generate(PROMPTS, max_new_tokens=12, batch_size=4, selections=selections)
            got = compiled.generate(PROMPTS, max_new_tokens=12, batch_size=4, selections=selections)
            assert _texts(got) == _texts(want)
            selections = selections[1:] + selections[:1]
    finally:
        eager.close()
        compiled.close()


def test_bad_decode_path_and_shapes_are_named(tiny_library, tokenizer):
    model, root = tiny_library("llama")
    library = AdapterLibrary.load(root, model)
    with pytest.raises(LogoError, match="unknown decode path 'fast'"):
        LoGoEngine(model, tokenizer, library, decode="fast")
    decoder = StaticDecoder(model)
    with pytest.raises(LogoError, match="must both be"):
        decoder.generate(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), 4)
    mixture = StaticMixture(model, library)
    try:
        with pytest.raises(ValueError, match="must both be"):
            mixture.set(torch.zeros(2, dtype=torch.long), torch.zeros(2))
    finally:
        mixture.remove()
    static = LoGoEngine(model, tokenizer, library, RouterConfig(k=2), decode="static")
    try:
        for change in (lambda: static.add_mixture_rows([Selection([0], [1.0])]), lambda: static.keep_mixture_rows([0]),
                       lambda: static.mixture_rows_from(0).__enter__()):
            with pytest.raises(LogoError, match="only the eager decode path does; build the engine with "
                                                "decode='eager' \\(it has decode='static'\\)"):
                change()
    finally:
        static.close()


class _OldDynamoConfig:
    """torch < 2.7's dynamo config: the recompile cap is named ``cache_size_limit`` (no ``recompile_limit``)."""

    def __init__(self, limit: int) -> None:
        self.cache_size_limit = limit
        self.patched: dict[str, int] = {}

    def patch(self, **changes: int):
        self.patched = changes
        return nullcontext()


@pytest.mark.parametrize("limit", [8, 500])
def test_recompile_limit_uses_the_old_name_on_old_torch(monkeypatch, limit):
    old = _OldDynamoConfig(limit)
    monkeypatch.setattr(logo.static_decode, "dynamo_config", old)
    with _recompile_limit():
        pass
    assert old.patched == {"cache_size_limit": max(limit, RECOMPILE_LIMIT)}


def test_recompile_limit_is_raised_only_around_the_step():
    before = dynamo_config.recompile_limit
    with _recompile_limit():
        assert dynamo_config.recompile_limit == max(before, RECOMPILE_LIMIT)
    assert dynamo_config.recompile_limit == before
