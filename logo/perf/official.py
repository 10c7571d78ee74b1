"""The official LoGo generation path, for comparison: PEFT with the selected adapters active together.

As the official code does, the k selected adapters are attached with ``PeftMixedModel``, activated
with ``set_adapter(list)`` and each one's ``scaling`` is multiplied by its mixture weight. PEFT
injects its LoRA layers into the base model in place; this class can swap them out and back in,
so the same base model serves the other variants between official runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

OFFICIAL_BATCHES = (1,)
"""The batch sizes the bench times the official path at (the official protocol runs at batch 1)."""


class OfficialPeft:
    """PEFT's mixed LoRA model over ``model``, swappable in and out of the module tree."""

    def __init__(self, model: nn.Module, paths: list[Path], weights: list[float]) -> None:
        from peft import PeftMixedModel
        from peft.tuners.lora.layer import LoraLayer

        names = [f"sel{i}_{p.name}" for i, p in enumerate(paths)]
        start = time.perf_counter()
        peft_model = PeftMixedModel.from_pretrained(model, paths[0], adapter_name=names[0])
        for name, path in zip(names[1:], paths[1:]):
            peft_model.load_adapter(path, adapter_name=name)
        peft_model.set_adapter(names)
        multiplier = dict(zip(names, weights))
        self.swaps: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # parent, attribute, LoRA layer, base
        for parent in list(model.modules()):
            for attr, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    child.scaling = {a: s * multiplier.get(a, 1.0) for a, s in child.scaling.items()}
                    self.swaps.append((parent, attr, child, child.get_base_layer()))
        self.attach_s = time.perf_counter() - start
        self.model = peft_model.eval()
        self.deactivate()

    def activate(self) -> None:
        """Put PEFT's LoRA layers in place: the model now runs the official path."""
        for parent, attr, lora, _ in self.swaps:
            setattr(parent, attr, lora)

    def deactivate(self) -> None:
        """Put the plain base layers back: the model is the base model again."""
        for parent, attr, _, base in self.swaps:
            setattr(parent, attr, base)
