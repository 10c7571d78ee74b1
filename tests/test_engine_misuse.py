"""The engine used wrongly from Python: every mistake is one LogoError that says what to do, and nothing is left
half-done (a closed engine, a nested mixture, malformed selections, a batch that does not match its mixture)."""

from __future__ import annotations

import math

import pytest
import torch

from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.generation import GenerationSettings
from logo.library import AdapterLibrary
from logo.methods import get_method
from logo.router import RouterConfig, Selection
from tests.helpers import make_library, make_tiny_model

PROMPTS = ["alpha beta", "gamma delta epsilon", "zeta"]


@pytest.fixture
def engine(tiny_library, tokenizer):
    model, root = tiny_library("llama")
    eng = LoGoEngine(model, tokenizer, AdapterLibrary.load(root, model), RouterConfig(k=2))
    yield eng
    eng.close()


def base_logits(engine) -> torch.Tensor:
    ids, mask = engine.encode(PROMPTS)
    with torch.no_grad():
        return engine.model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_a_closed_engine_refuses_to_run(engine, decode):
    """A static engine's hooks are gone for good once closed: it used to generate with the base model while
    reporting the selection; now it, and the engines with_router made from it, say so."""
    target = engine if decode == "eager" else engine.with_decode("static")
    other = target.with_router(RouterConfig(k=1))
    target.close()
    for eng in (target, other):
        with pytest.raises(LogoError, match="can no longer be used: it was closed"):
            eng.generate(PROMPTS[:1], max_new_tokens=2, selections=[Selection([0], [1.0])])
        with pytest.raises(LogoError, match="can no longer be used"):
            eng.route(PROMPTS[:1])


def test_arrow_closes_the_engine_whose_model_it_takes_over(tokenizer, tmp_path):
    model = make_tiny_model("llama")  # Arrow changes the model for good: not the shared one
    root = tmp_path / "lib"
    make_library(model, root, [{"name": f"t{i}", "r": 4, "alpha": 8} for i in range(3)])
    engine = LoGoEngine(model, tokenizer, AdapterLibrary.load(root, model), RouterConfig(k=2))
    get_method("arrow").generate(engine, PROMPTS[:1], [0], 0, GenerationSettings(max_new_tokens=2))
    with pytest.raises(LogoError, match="the arrow method took over its model"):
        engine.generate(PROMPTS[:1], max_new_tokens=2)


def test_mixtures_do_not_nest(engine):
    """Leaving an inner block (or generate) inside ``with engine.mixture`` cleared the outer mixture silently."""
    before = base_logits(engine)
    rows = [Selection([0], [1.0]), Selection([1], [1.0]), None]
    with engine.mixture(rows):
        mixed = base_logits(engine)
        with pytest.raises(LogoError, match="a mixture is already set"):
            engine.generate(PROMPTS, max_new_tokens=2)
        with pytest.raises(LogoError, match="a mixture is already set"):
            with engine.mixture(rows):
                pass
        torch.testing.assert_close(base_logits(engine), mixed, atol=0, rtol=0)  # the outer mixture holds
    assert not torch.equal(mixed, before)
    torch.testing.assert_close(base_logits(engine), before, atol=0, rtol=0)


@pytest.mark.parametrize("selection, message", [
    (Selection([0], [math.nan]), "weights must be finite numbers"),
    (Selection([0], [math.inf]), "weights must be finite numbers"),
    (Selection([True], [1.0]), "whole numbers"),
    (Selection([0.5], [1.0]), "whole numbers"),
    (Selection(["a_r4"], [1.0]), "whole numbers"),
    ((0, 1.0), "is a tuple, not a Selection"),
    (Selection([0, 1], [1.0]), "2 indices but 1 weights"),
    (Selection([99], [1.0]), r"indices \[99\] out of range"),
])
def test_malformed_selections_are_one_clear_error(engine, selection, message):
    with pytest.raises(LogoError, match=message):
        engine.generate(PROMPTS[:1], max_new_tokens=2, selections=[selection])
    with pytest.raises(LogoError, match=message):
        engine.set_mixture([selection])
    assert not engine.mixture_active


def test_selections_must_be_a_list(engine):
    with pytest.raises(LogoError, match="selections must be a list"):
        engine.generate(PROMPTS[:1], max_new_tokens=2, selections=Selection([0], [1.0]))


def test_a_batch_that_does_not_match_its_mixture(engine):
    ids, mask = engine.encode(PROMPTS)
    with engine.mixture([Selection([0], [1.0]), Selection([1], [1.0])]):
        with pytest.raises(LogoError, match="the mixture has 2 rows but the batch has 3"):
            engine.model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("fields, message", [
    ({"k": 2.5}, "field 'k' must be an integer"), ({"k": True}, "field 'k' must be an integer"),
    ({"layer": "a"}, "field 'layer' must be an integer"), ({"temperature": math.nan}, "finite number"),
    ({"abstain_below": math.nan}, "finite number")])
def test_router_config_checks_its_own_types(fields, message):
    with pytest.raises(LogoError, match=message):
        RouterConfig(**fields)


def test_other_bad_calls(engine):
    with pytest.raises(LogoError, match="with_router takes a RouterConfig"):
        engine.with_router({"k": 2})
    with pytest.raises(LogoError, match="no prompts given"):
        engine.encode([])
    with pytest.raises(LogoError, match="batch size must be a whole number"):
        engine.route(PROMPTS, batch_size=2.5)
    with pytest.raises(LogoError, match="settings must be a GenerationSettings"):
        get_method("uniform").generate(engine, PROMPTS[:1], [0], 0, None)
