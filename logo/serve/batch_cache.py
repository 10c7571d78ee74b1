"""The running batch's KV cache as plain tensors: merge newcomers in, drop finished rows, trim padding.

A transformers ``DynamicCache`` holds per layer ``keys`` and ``values`` ``[B, heads, T, head_dim]``; rows are
left-padded (zeros, masked out by the attention mask). Positions are already rotated into the keys, so rows
of different lengths can sit side by side as long as the mask hides each row's padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class BatchCache:
    """A KV cache and its attention mask ``[B, T]`` (1 = a real token) for the rows of a batch."""

    cache: DynamicCache
    mask: torch.Tensor

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def states(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def merged(self, other: BatchCache) -> BatchCache:
        """This batch's rows followed by ``other``'s, the shorter one left-padded to the longer."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        layers = [
            (torch.cat([_left_pad(k1, length), _left_pad(k2, length)]),
             torch.cat([_left_pad(v1, length), _left_pad(v2, length)]))
            for (k1, v1), (k2, v2) in zip(self.states(), other.states())
        ]
        mask = torch.cat([_left_pad(self.mask, length), _left_pad(other.mask, length)])
        return BatchCache(DynamicCache(ddp_cache_data=layers), mask)

    def selected(self, keep: torch.Tensor) -> BatchCache:
        """Only the rows ``keep`` (indices), with the leading columns that no remaining row uses cut off."""
        mask = self.mask[keep]
        used = mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        layers = [(k[keep, :, start:], v[keep, :, start:]) for k, v in self.states()]
        return BatchCache(DynamicCache(ddp_cache_data=layers), mask[:, start:])

    def extended(self) -> torch.Tensor:
        """The mask for the next step: one more real token per row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], 1)
        return self.mask


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad the time axis (dim 2 of a 4-D cache tensor, dim 1 of a mask) on the left to ``length``."""
    dim = 2 if x.dim() == 4 else 1
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim)
