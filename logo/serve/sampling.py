"""Per-row token choice for a batch whose rows each have their own settings, with no loop over rows.

Each row is greedy (temperature 0) or samples with its own temperature and top-p, after its own presence and
frequency penalties (OpenAI's: ``logit[j] - frequency * c[j] - presence * (c[j] > 0)``, where ``c[j]`` counts
the times the row has generated token ``j``). A sampling row draws its uniform number from a counter-based hash
of ``(seed, step)``, so a seeded request gives the same tokens whatever else shares its batch, and no generator
object per row is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for int64 ``x < 2**32``, split in 16-bit halves so int64 never overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection on 32-bit integers that scatters nearby inputs."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One number in [0, 1) per row from int64 ``seed`` and ``step`` (``[B]`` each), 24 bits of resolution.

    Every bit of the seed counts (its two 32-bit halves, the sign's included), and the step is mixed in before the
    halves are folded into one 32-bit state, so two distinct seeds coincide at a step only by chance (about 2**-32)
    and never along a whole sequence."""
    low = _mix32((seed & _MASK32) ^ _mul32(step & _MASK32, 0x9E3779B9))
    state = _mix32(_mix32(((seed >> 32) & _MASK32) ^ 0x6A09E667) ^ _mul32(low, 0x85EBCA6B))
    return (state >> 8).double() / float(1 << 24)


_CHOICE = 0x9E3779B97F4A7C15
"""Fibonacci hashing's 64-bit constant: prompt ``i`` of a seeded request draws with ``seed ^ (i * _CHOICE)``."""


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of a seeded request (None stays None): the request's own for the first, a
    distinct int64 for each other one, so a list of identical prompts gives distinct samples (as OpenAI's ``n``
    does), and each choice is the same whatever else shares the batch."""
    if seed is None or index == 0:
        return seed
    mixed = (seed ^ (index * _CHOICE)) & ((1 << 64) - 1)
    return mixed - (1 << 64) if mixed >= 1 << 63 else mixed


@dataclass(frozen=True)
class Penalties:
    """OpenAI's ``presence_penalty`` and ``frequency_penalty`` of one request (0: none; the API checks the
    range, -2 to 2)."""

    presence: float = 0.0
    frequency: float = 0.0


_FIELDS = ("greedy", "temperature", "top_p", "seed", "presence", "frequency")


@dataclass
class RowSettings:
    """The sampling settings of every row of the running batch, as tensors ``[B]``."""

    greedy: torch.Tensor  # bool
    temperature: torch.Tensor  # float32 (1.0 for greedy rows)
    top_p: torch.Tensor  # float32
    seed: torch.Tensor  # int64
    presence: torch.Tensor  # float32 (0: no penalty)
    frequency: torch.Tensor  # float32

    @property
    def penalized(self) -> bool:
        """Whether some row has a penalty (only then are generated tokens counted)."""
        return bool((self.presence != 0).any() or (self.frequency != 0).any())

    def select(self, keep: torch.Tensor) -> RowSettings:
        return RowSettings(*(getattr(self, f)[keep] for f in _FIELDS))

    @staticmethod
    def cat(parts: list[RowSettings]) -> RowSettings:
        return RowSettings(*(torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS))


def penalize(logits: torch.Tensor, counts: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """Each row's logits after its penalties: ``logits - frequency * counts - presence * (counts > 0)`` (fp32),
    ``counts [B, V]`` the times each row has generated each token."""
    counts = counts.to(device=logits.device, dtype=torch.float32)
    presence, frequency = rows.presence.to(logits.device), rows.frequency.to(logits.device)
    return logits.float() - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def count(counts: torch.Tensor, tokens: torch.Tensor) -> None:
    """Add one generated token per row (``tokens [B]``) to ``counts [B, V]`` in place."""
    counts.scatter_add_(1, tokens[:, None].to(counts.device), torch.ones_like(counts[:, :1]))


def choose(logits: torch.Tensor, rows: RowSettings, step: torch.Tensor,
           counts: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of every row ``[B]``: argmax for greedy rows; for the others a draw after temperature and
    top-p filtering (the smallest set of most likely tokens whose mass reaches ``top_p`` is kept). ``counts``
    (the rows' generated tokens so far, ``[B, V]``) given: after each row's penalties (:func:`penalize`)."""
    if counts is not None:
        logits = penalize(logits, counts, rows)
    greedy_tokens = logits.argmax(-1)
    if bool(rows.greedy.all()):
        return greedy_tokens
    scores = logits.float() / rows.temperature[:, None].to(logits.device)
    sorted_scores, order = scores.sort(-1, descending=True)
    probs = sorted_scores.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens more likely than each one
    probs = probs * (before < rows.top_p[:, None].to(probs.device))  # the most likely token is always kept
    cdf = probs.cumsum(-1)
    u = uniform(rows.seed, step).to(cdf.device)[:, None] * cdf[:, -1:].double()
    pick = torch.searchsorted(cdf.double(), u, right=True).clamp(max=cdf.shape[-1] - 1)
    sampled = order.gather(1, pick)[:, 0]
    return torch.where(rows.greedy.to(logits.device), greedy_tokens, sampled)
