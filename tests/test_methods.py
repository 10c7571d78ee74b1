"""The method registry: every name resolves to one object; unknown names list the known ones."""

from __future__ import annotations

import random

import pytest

from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.library import AdapterLibrary
from logo.methods import Arrow, Base, Fitted, Fixed, LoGo, Random, Uniform, get_method, method_names
from logo.router import RouterConfig


def test_names_resolve_to_registered_objects():
    assert method_names() == ["logo", "fitted", "base", "uniform", "random", "fixed:NAME", "arrow"]
    assert isinstance(get_method("fitted"), Fitted) and get_method("fitted").abstain
    assert isinstance(get_method("logo"), LoGo) and get_method("logo").router is None
    assert isinstance(get_method("base"), Base) and isinstance(get_method("uniform"), Uniform)
    assert get_method("random", k=4) == Random(4) and get_method("arrow", k=2) == Arrow(2)
    assert get_method("fixed:word_sorting") == Fixed("word_sorting")
    assert get_method("arrow").takes_over_model and not get_method("logo").takes_over_model


def test_the_cli_help_lists_the_registry():
    from logo.eval.cli import METHOD_HELP

    assert METHOD_HELP == " | ".join(method_names())


@pytest.mark.parametrize("spec, message", [
    ("unifrom", "unknown method 'unifrom'; did you mean 'uniform'? known methods: logo, fitted, base, uniform, "
                "random, fixed:NAME, arrow"),
    ("best", "unknown method 'best'; known methods:"),
    ("fixed", "write it as fixed:NAME"),
    ("fixed:", "write it as fixed:NAME"),
    ("base:x", "takes no ':' argument"),
])
def test_unknown_or_misspelled_methods(spec, message):
    with pytest.raises(LogoError) as err:
        get_method(spec)
    assert message in str(err.value)


def test_selections_follow_their_definitions(tiny_library, tokenizer):
    model, root = tiny_library("llama")
    engine = LoGoEngine(model, tokenizer, AdapterLibrary.load(root, model), RouterConfig(k=2))
    prompts, indices = ["Q: a\nA:", "Q: bb\nA:"], [7, 8]
    n = len(engine.library)
    try:
        assert Base().select(engine, prompts, indices, 0) == [None, None]
        assert all(s.weights == [1 / n] * n for s in Uniform().select(engine, prompts, indices, 0))
        picks = Random(3).select(engine, prompts, indices, seed=5)
        for index, pick in zip(indices, picks):
            assert pick.indices == sorted(random.Random(5 * 1_000_003 + index).sample(range(n), 3))
        assert Fixed("b_r8").select(engine, prompts, indices, 0)[0].indices == [engine.library.index("b_r8")]
        with pytest.raises(LogoError, match="no adapter of that name"):
            Fixed("nope").select(engine, prompts, indices, 0)
        with pytest.raises(LogoError, match="choose 1 <= k <= 6"):
            Random(7).select(engine, prompts, indices, 0)
        routed = LoGo(RouterConfig(k=3)).select(engine, prompts, indices, 0)
        assert [r.indices for r in routed] == [r.indices for r in engine.with_router(RouterConfig(k=3)).route(prompts)]
    finally:
        engine.close()


def test_arrow_checks_k_against_the_library_before_any_model_or_takeover(tiny_library, tokenizer):
    """Arrow's k is checked like random's: before any model loads (`logo run --method base,arrow` refuses before
    running base), and again before Arrow takes the engine's model over, so a refusal leaves the engine usable."""
    from logo.generation import GenerationSettings

    model, root = tiny_library("llama")
    library = AdapterLibrary.load(root, model)
    with pytest.raises(LogoError, match=r"k=7 adapters requested but the library holds 6; choose 1 <= k <= 6"):
        get_method("arrow", k=7).check_library(library.names, library.paths)
    get_method("arrow", k=6).check_library(library.names, library.paths)
    engine = LoGoEngine(model, tokenizer, library, RouterConfig(k=2))
    try:
        with pytest.raises(LogoError, match="choose 1 <= k <= 6"):
            Arrow(7).generate(engine, ["Q: a\nA:"], [0], 0, GenerationSettings(max_new_tokens=1))
        assert len(engine.route(["Q: a\nA:"])) == 1  # not taken over
    finally:
        engine.close()
