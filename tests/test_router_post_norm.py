"""Post-norm routers score every signal module on that module's own input, or are refused at construction.

A post-norm probe reads the input of the first signal module in each layer. Modules that read the same input
(``q_proj``, ``k_proj``, ``v_proj``) may be pooled on it; a module that reads another input (``up_proj``: the state
after attention) must be refused, since its adapters would be scored on a vector it never sees.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.library import AdapterLibrary
from logo.router import AbstainSignal, Router, RouterConfig, Selection
from tests.helpers import make_tiny_model

PROMPTS = ["Q: What is 3 + 4?\nA:", "Sort: zeta alpha\nA:"]
QKV = ("q_proj", "k_proj", "v_proj")


@pytest.fixture
def setup(tiny_library, tokenizer, arch):
    model, root = tiny_library(arch)
    return model, root, AdapterLibrary.load(root, model), tokenizer


def test_post_norm_pool_of_modules_with_other_inputs_is_refused(setup):
    model, _, lib, tokenizer = setup
    with pytest.raises(LogoError) as err:
        Router(model, lib, RouterConfig(k=2, post_norm=True, modules=("q_proj", "up_proj")))
    text = str(err.value)
    assert "\n" not in text, text
    assert text.startswith("post-norm signal module model.layers.2.mlp.up_proj does not take the input of "
                           "model.layers.2.self_attn.q_proj"), text
    assert "pool modules that read the same input (e.g. q_proj, k_proj, v_proj), or drop post-norm" in text, text
    # up_proj first: its input is the probed vector, and q_proj is the module that would be scored on another's
    with pytest.raises(LogoError, match="self_attn.q_proj does not take the input of model.layers.2.mlp.up_proj"):
        LoGoEngine(model, tokenizer, lib, RouterConfig(k=2, post_norm=True, modules=("up_proj", "q_proj")))
    own = AbstainSignal(layer=-1, module="up_proj", post_norm=True, position="last", strategy="norm",
                        calibration="none")
    with pytest.raises(LogoError, match="the abstain signal's module model.layers.2.mlp.up_proj does not take the "
                       "input of model.layers.2.self_attn.q_proj, which its post-norm probe reads; fit the router"):
        Router(model, lib, RouterConfig(k=2, post_norm=True, abstain="top", abstain_signal=own))
    # the residual stream is every module's probed vector, whatever the module: no input to compare
    Router(model, lib, RouterConfig(k=2, modules=("q_proj", "up_proj")))
    Router(model, lib, RouterConfig(k=2, modules=("q_proj", "up_proj"), layers=(-1, -2)))


def _module_inputs(model, ids, mask, layer: int) -> dict[str, torch.Tensor]:
    """Each of q/k/v's input in ``layer`` at every row's last token, from pre-hooks on a full forward."""
    inputs: dict[str, torch.Tensor] = {}
    attention = model.model.layers[layer].self_attn
    handles = [getattr(attention, name).register_forward_pre_hook(
        lambda _m, args, name=name: inputs.__setitem__(name, args[0])) for name in QKV]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)  # last attended token, any padding side
    return {name: x[torch.arange(x.shape[0]), last] for name, x in inputs.items()}


def _norm_scores(root, names: list[str], key: str, h: torch.Tensor) -> torch.Tensor:
    """``||scaling B A h||`` per row and adapter, from the PEFT files (0 where an adapter lacks the module)."""
    columns = []
    for name in names:
        config = json.loads((root / name / "adapter_config.json").read_text())
        tensors = load_file(str(root / name / "adapter_model.safetensors"))
        if f"{key}.lora_A.weight" not in tensors:
            columns.append(torch.zeros(h.shape[0]))
            continue
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        r = a.shape[0]
        scaling = config["lora_alpha"] / (r**0.5 if config.get("use_rslora") else r)
        columns.append(((h @ a.T) @ b.T * scaling).norm(dim=-1))
    return torch.stack(columns, 1)


def test_post_norm_qkv_pool_scores_each_module_on_its_own_input(setup):
    model, root, lib, tokenizer = setup
    router = Router(model, lib, RouterConfig(k=2, post_norm=True, modules=QKV, layers=(-1, -2)))
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    got = router.signal_scores(router.probe_all(ids, mask))  # [B, S, N]: layer -1's q, k, v, then layer -2's
    n = model.config.num_hidden_layers
    want = []
    for layer in (n - 1, n - 2):
        inputs = _module_inputs(model, ids, mask, layer)
        want += [_norm_scores(root, lib.names, f"base_model.model.model.layers.{layer}.self_attn.{name}",
                              inputs[name]) for name in QKV]
    torch.testing.assert_close(got, torch.stack(want, 1), rtol=1e-5, atol=1e-6)


def test_a_post_norm_router_built_under_an_active_mixture_sees_the_base_layer(tiny_library, tokenizer, arch):
    """Construction runs the layer once per model (a fresh model here, so it does run): an engine's per-row
    mixture, whose hooks refuse a batch of another size, is suspended around it."""
    _, root = tiny_library(arch)
    model = make_tiny_model(arch)
    engine = LoGoEngine(model, tokenizer, AdapterLibrary.load(root, model), RouterConfig(k=2))
    try:
        with engine.mixture([Selection([1], [1.0]), Selection([2], [1.0]), Selection([3], [1.0])]):
            other = engine.with_router(RouterConfig(k=2, post_norm=True, modules=QKV))
            with pytest.raises(LogoError, match="mlp.up_proj does not take the input of"):
                engine.with_router(RouterConfig(k=2, post_norm=True, modules=("q_proj", "up_proj")))
        assert len(other.route(PROMPTS)) == 2
    finally:
        engine.close()
