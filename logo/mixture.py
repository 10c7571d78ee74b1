"""Per-row weighted LoRA mixtures inside the model.

Every target linear layer computes ``W x + sum_i w_i * scaling_i * B_i A_i x`` where each row of the
batch has its own selection ``(indices, weights)``. When a batch is set, the selected factors are
gathered once from the stacked library and folded into one rank-``k*r`` pair per module and row:
``A_row = [A_i1; ...; A_ik]`` and ``B_row = [c_1 B_i1, ..., c_k B_ik]`` with ``c = w * scaling``.
Each forward then adds ``(x A_row^T) B_row^T``: two batched matmuls per module, no Python loop over
adapters or rows. When every row shares one mixture (batch of one, or a shared baseline) the factors
are 2-D and plain matmuls are used. No base weight is ever modified.

The mixture is attached with forward hooks, so the model keeps its structure and state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from logo.library import AdapterLibrary


class Mixture:
    """Forward hooks adding the current batch's per-row LoRA mixture to every target module."""

    def __init__(self, model: nn.Module, library: AdapterLibrary) -> None:
        self.library = library
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        modules = dict(model.named_modules())
        self._handles = [
            modules[name].register_forward_hook(self._hook(name)) for name in library.stacks
        ]

    def _hook(self, name: str):
        def add_mixture(_module, args, output):
            factors = self.factors.get(name)
            if factors is None:
                return output
            a, b = factors
            x = args[0]
            if a.dim() == 2:  # one mixture for all rows
                return output + (x @ a) @ b
            rows = a.shape[0]
            if x.shape[0] != rows:  # e.g. num_return_sequences: rows were repeated by generate
                repeat = x.shape[0] // rows
                a, b = a.repeat_interleave(repeat, 0), b.repeat_interleave(repeat, 0)
            if x.dim() == 2:
                return output + torch.bmm(torch.bmm(x[:, None], a), b)[:, 0]
            return torch.baddbmm(output, torch.bmm(x, a), b)

        return add_mixture

    @property
    def active(self) -> bool:
        return bool(self.factors)

    def clear(self) -> None:
        """Back to the base model."""
        self.factors = {}

    @torch.no_grad()
    def set(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """Set per-row mixtures: ``indices [B, k]`` (long) and ``weights [B, k]``; weight 0 = unused slot.

        A row whose weights are all zero runs the base model.
        """
        if indices.dim() != 2 or indices.shape != weights.shape:
            raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must both be [B, k]")
        self.factors = {}
        if indices.numel() == 0 or not bool((weights != 0).any()):
            return
        shared = indices.shape[0] == 1 or (
            bool((indices == indices[:1]).all()) and bool((weights == weights[:1]).all())
        )
        if shared:
            indices, weights = indices[:1], weights[:1]
        for name, stack in self.library.stacks.items():
            idx = indices.to(stack.A.device)
            coeff = weights.to(stack.A.device, torch.float32) * stack.scaling[idx]  # [B, k]
            if not bool((coeff != 0).any()):
                continue  # no selected adapter touches this module
            rows, k = idx.shape
            r = stack.A.shape[1]
            a = stack.A[idx].reshape(rows, k * r, -1).transpose(1, 2)  # [B, d_in, k*r]
            b = (stack.B[idx].float() * coeff[:, :, None, None]).to(stack.B.dtype)  # [B, k, d_out, r]
            b = b.permute(0, 1, 3, 2).reshape(rows, k * r, -1)  # [B, k*r, d_out]
            if shared:
                self.factors[name] = (a[0].contiguous(), b[0].contiguous())
            else:
                self.factors[name] = (a.contiguous(), b.contiguous())

    def remove(self) -> None:
        """Detach from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.factors = {}
