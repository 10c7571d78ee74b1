"""The mixture written out from its formula: the test oracle for every formulation in ``logo.mixture_ops``.

``y = W x + bias + sum_i w_i * scaling_i * B_i A_i x`` for each row with its own ``(indices, weights)``,
adapter by adapter and row by row, in fp32. Plain and obviously right, and slow: never the hot path.
"""

from __future__ import annotations

import torch


def mixture_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """fp32 output of a linear layer ``(weight [d_out, d_in], bias)`` under per-row LoRA mixtures.

    ``x``: ``[rows, T, d_in]`` or ``[rows, d_in]``; ``A [N, r, d_in]``, ``B [N, d_out, r]``, ``scaling [N]``;
    ``indices`` and ``weights``: ``[rows, k]`` (weight 0 = unused slot). Returns ``x``'s shape with ``d_out``;
    differentiable in ``x`` (the oracle for gradients too).
    """
    x = x.float()
    out = []
    for row in range(x.shape[0]):
        xr = x[row]
        y = xr @ weight.detach().float().T
        if bias is not None:
            y = y + bias.detach().float()
        for slot in range(indices.shape[1]):
            i = int(indices[row, slot])
            w = float(weights[row, slot])
            a, b = A[i].detach().float(), B[i].detach().float()
            y = y + w * float(scaling[i]) * ((xr @ a.T) @ b.T)
        out.append(y)
    return torch.stack(out)
