"""One ``torch.inference_mode`` call must not break the engine for later plain calls (nor the reverse).

Buffers that outlive a call (the mixture workspace, merged weights, the static path's fixed factor buffers) are
written in place by later calls; made inside inference mode they would be inference tensors, which no later call
outside inference mode may write. The reference is a fresh engine's output, computed with no inference mode.
"""

from __future__ import annotations

import pytest
import torch

from logo.engine import LoGoEngine
from logo.library import AdapterLibrary
from logo.mixture_ops import Workspace
from logo.router import RouterConfig, Selection

PROMPTS = ["Evaluate the result.\n\nQ: not ( True ) and ( True ) is\nA:", "Q: hi\nA:"]
PER_ROW = [Selection([1], [1.0]), Selection([2, 4], [0.6, 0.4])]  # one mixture per row: row factors, the kernel
SHARED = [Selection([0, 5], [0.7, 0.3])] * 2  # one mixture for the batch: union factors, then merged weights
ORDERS = [(True, False, True), (False, True, False)]


def _texts(engine: LoGoEngine, selections: list[Selection]) -> list[str]:
    return [g.text for g in engine.generate(PROMPTS, selections=selections, max_new_tokens=8)]


def _engine(tiny_library, tokenizer, arch: str, decode: str = "eager") -> LoGoEngine:
    model, root = tiny_library(arch)
    return LoGoEngine(model, tokenizer, AdapterLibrary.load(root, model), RouterConfig(k=2), decode=decode)


def _fresh_texts(tiny_library, tokenizer, arch: str, selections: list[Selection]) -> list[str]:
    fresh = _engine(tiny_library, tokenizer, arch)
    try:
        return _texts(fresh, selections)
    finally:
        fresh.close()


@pytest.mark.parametrize("order", ORDERS, ids=["inference-first", "plain-first"])
def test_eager_engine_survives_switching_inference_mode(tiny_library, tokenizer, arch, order):
    want = {name: _fresh_texts(tiny_library, tokenizer, arch, sels)
            for name, sels in (("per-row", PER_ROW), ("shared", SHARED))}
    engine = _engine(tiny_library, tokenizer, arch)
    try:
        for inference in order:
            for name, selections in (("per-row", PER_ROW), ("shared", SHARED)):
                with torch.inference_mode(inference):
                    assert _texts(engine, selections) == want[name], (name, inference)
        merged = [key for key in engine.mixer.workspace.buffers if key[-1] == "merged"]
        assert merged, "the shared mixture was never merged: the merged weights went untested"
        assert not any(buf.is_inference() for buf in engine.mixer.workspace.buffers.values())
    finally:
        engine.close()


def test_workspace_buffers_taken_in_inference_mode_are_writable_outside_it():
    like = torch.zeros(3)
    workspace = Workspace()
    with torch.inference_mode():
        first = workspace.take(("a",), (2, 3), like)
        first.copy_(torch.arange(6.0).view(2, 3))
    assert not first.is_inference()
    grown = workspace.take(("a",), (4, 3), like, keep=6)  # grows outside inference mode, keeping the six values
    grown[2:] = 1.0
    assert torch.equal(grown[:2].reshape(-1), torch.arange(6.0))


@pytest.mark.parametrize("order", ORDERS, ids=["inference-first", "plain-first"])
def test_static_mixture_survives_switching_inference_mode(tiny_library, tokenizer, order):
    eager = _engine(tiny_library, tokenizer, "llama")
    static = _engine(tiny_library, tokenizer, "llama", decode="static")
    try:
        ids, mask = eager.encode(PROMPTS)
        with eager.mixture(PER_ROW), torch.no_grad():
            want = eager.model(input_ids=ids, attention_mask=mask).logits
        for inference in order:
            with torch.inference_mode(inference), static.mixture(PER_ROW):
                got = static.model(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        buffers = [t for slot in static.mixer.slots.values() for pair in slot.buffers.values() for t in pair]
        assert buffers and not any(t.is_inference() for t in buffers)
    finally:
        eager.close()
        static.close()


@pytest.mark.parametrize("order", ORDERS, ids=["inference-first", "plain-first"])
def test_static_engine_survives_switching_inference_mode(tiny_library, tokenizer, order):
    want = _fresh_texts(tiny_library, tokenizer, "llama", PER_ROW)
    static = _engine(tiny_library, tokenizer, "llama", decode="static")
    try:
        for inference in order:
            with torch.inference_mode(inference):
                assert _texts(static, PER_ROW) == want, inference
    finally:
        static.close()
