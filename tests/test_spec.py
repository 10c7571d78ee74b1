"""EngineSpec and GenerationSettings: one validated description for every front end; typos fail in one line."""

from __future__ import annotations

import pytest
import torch

from logo.errors import LogoError
from logo.generation import GenerationSettings, check_prompts
from logo.router import RouterConfig
from logo.spec import EngineSpec


def test_presets_paths_and_hub_ids_are_accepted(tiny_model_dir):
    assert EngineSpec("llama-3.1-8b").adapter_spec().startswith("hub:archon159/LoGo-loras-collection/Llama-3.1-8B")
    assert EngineSpec(str(tiny_model_dir("llama")), adapters="x").base_model == str(tiny_model_dir("llama"))
    assert EngineSpec("some-org/some-model", adapters="x").device == "cpu"


@pytest.mark.parametrize("kwargs, message", [
    ({"base_model": "Llama-3.1-8"}, "unknown base model 'Llama-3.1-8' (did you mean 'Llama-3.1-8B'?)"),
    ({"base_model": "smolm2-135m"}, "did you mean 'smollm2-135m'?"),
    ({"device": "cuda"}, "has no CUDA device"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"decode": "fast"}, "unknown --decode 'fast'"),
    ({"router": {"k": 3}}, "router must be a RouterConfig"),
])
def test_bad_specs_are_one_line_errors(kwargs, message):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LogoError) as err:
        EngineSpec(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_k_is_checked_against_the_library_before_any_model_loads(tiny_library):
    _, root = tiny_library("llama")
    spec = EngineSpec("org/not-loaded", adapters=str(root), router=RouterConfig(k=7))
    with pytest.raises(LogoError, match="library holds 6"):
        spec.resolved()
    _, router = EngineSpec("org/not-loaded", adapters=str(root), router=RouterConfig(k=7), fit_k=True).resolved()
    assert router.k == 6
    with pytest.raises(LogoError, match="--adapters is required for 'org/not-loaded'"):
        EngineSpec("org/not-loaded").adapter_spec()


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": -3}, "max_new_tokens must be at least 1, got -3"),
    ({"max_new_tokens": 2.5}, "whole number"),
    ({"temperature": 0.0}, "temperature must be positive"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"seed": 2**70}, "seed must be a whole number from -2**63 to 2**63 - 1 (an int64)"),
    ({"seed": -(2**63) - 1}, "seed must be"),
])
def test_generation_settings_check_themselves(kwargs, message):
    with pytest.raises(LogoError) as err:
        GenerationSettings(**kwargs)
    assert message in str(err.value)


def test_prompts_are_checked():
    for prompts, message in (([], "no prompts"), (["ok", "  "], "prompt 1 is empty"), ("text", "list of strings"),
                             ([3], "prompt 0 is a int")):
        with pytest.raises(LogoError, match=message):
            check_prompts(prompts)
    with pytest.raises(LogoError, match="prompt 1 has 9 tokens, over the limit of 8"):
        check_prompts(["a", "b"], [3, 9], max_tokens=8)


@pytest.mark.parametrize("flags, expected", [
    # restating the fitted router's own values changes nothing: its statistics and abstain rule stay
    ({"calibration": "zscore"}, {}),
    ({"post_norm": True, "strategy": "entropy", "position": "mean", "module": "v_proj", "k": 2}, {}),
    # real changes: another calibration drops the abstain threshold fitted on the fit's scores; another signal
    # also reads the library's default statistics; one layer replaces the pooled ones
    ({"calibration": "mean"}, {"calibration": "mean", "abstain": "none"}),
    ({"module": "q_proj"}, {"module": "q_proj", "modules": None, "statistics": "default", "abstain": "none"}),
    ({"layer": -1}, {"layer": -1, "layers": None, "statistics": "default", "abstain": "none"}),
])
def test_a_flag_restating_the_fitted_router_changes_nothing(flags, expected):
    """The demo's fitted router (zscore, entropy, post-norm, mean, v_proj pooled over layers, abstain top): restating
    its calibration turned its abstain rule off, and restating its signal sent it to statistics nobody computed."""
    from dataclasses import replace

    spec = EngineSpec("smollm2-135m", "embedded:demo", router_overrides=flags)
    router, file = spec.router_choice(spec.entries())
    assert file is not None and file.config.abstain == "top" and file.config.modules == ("v_proj",)
    assert router == replace(file.config, **expected)
