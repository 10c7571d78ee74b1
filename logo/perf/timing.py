"""Wall-clock timing on CPU or GPU, and per-token clocks inside ``generate``.

Decode speed is measured inside one ``generate`` call: a stopping criterion that never stops
timestamps every generated token, so time to first token (prefill, and routing when the setup
routes) and the ``T - 1`` steady-state decode steps come from the same run and prefill never leaks
into tokens/s. Tokens/s is ``B / median(step time)``: on a shared machine the median step ignores
the steps during which another process took the CPU; the mean over all steps is kept as well.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes, GPU work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class StepClock(StoppingCriteria):
    """Records the time at which each new token exists; never stops generation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def tick(self, *_args) -> None:
        """Timestamp a new token (also usable as a ``StaticDecoder`` ``on_token`` callback)."""
        sync(self.device)
        self.times.append(time.perf_counter())

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.tick()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class GenerationTiming:
    """One timed ``generate``: time to first token and the duration of every later decode step."""

    batch: int
    ttft_s: float
    steps_s: list[float]

    @property
    def decode_tok_s(self) -> float:
        """Steady-state tokens/s over the batch, from the median decode step."""
        return self.batch / max(statistics.median(self.steps_s), 1e-9)

    @property
    def mean_decode_tok_s(self) -> float:
        """Tokens/s over all decode steps (first to last token)."""
        return self.batch * len(self.steps_s) / max(sum(self.steps_s), 1e-9)


def _time_decode(input_ids: torch.Tensor, new_tokens: int, setup: Callable[[], object] | None,
                 decode: Callable[[StepClock], object], what: str) -> GenerationTiming:
    """Time ``decode(clock)``, which must make exactly ``new_tokens`` tokens and tick ``clock`` after each."""
    if new_tokens < 2:
        raise ValueError("decode speed needs at least 2 new tokens")
    device = input_ids.device
    clock = StepClock(device)
    sync(device)
    start = time.perf_counter()
    if setup is not None:
        setup()
    decode(clock)
    if len(clock.times) != new_tokens:
        raise RuntimeError(f"{what} produced {len(clock.times)} tokens instead of {new_tokens}")
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return GenerationTiming(input_ids.shape[0], clock.times[0] - start, steps)


@torch.no_grad()
def time_generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int,
                  setup: Callable[[], object] | None = None) -> GenerationTiming:
    """Greedy-generate exactly ``new_tokens`` tokens per row (``setup()`` runs inside the TTFT clock)."""
    return _time_decode(input_ids, new_tokens, setup, lambda clock: model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock])), "generate")


@torch.no_grad()
def time_static(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int,
                setup: Callable[[], object] | None = None) -> GenerationTiming:
    """As :func:`time_generate`, for a :class:`logo.static_decode.StaticDecoder` (no stop tokens)."""
    return _time_decode(input_ids, new_tokens, setup, lambda clock: decoder.generate(
        input_ids, attention_mask, new_tokens, on_token=clock.tick), "the static decoder")
