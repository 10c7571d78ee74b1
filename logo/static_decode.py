"""The fast generation path: a static KV cache and a one-token decode step that can be compiled.

In the spirit of gpt-fast: every buffer the decode step touches has a fixed shape and address (the
KV cache, the attention-mask buffer, the mixture factors of :class:`logo.mixture.StaticMixture`), so
``torch.compile`` traces the step once per batch size and cache length, and on CUDA its
``reduce-overhead`` mode replays the step as one CUDA graph instead of hundreds of kernel launches.

The prompt is prefilled eagerly (its length varies); then the step runs once per new token. Caches are
kept per ``(batch, length)`` and reset between calls, so repeated calls neither reallocate nor recompile;
lengths are rounded up to a power of two (at least ``min_cache_len``): a few graphs cover every prompt
length, and attention never spans more than twice the tokens it needs (on CPU the compiled step's cost
grows with the cache length: ``BENCHMARKS.md``). Greedy decoding is token-for-token the same as
``transformers``' ``generate`` (left padding, early stop, finished rows padded); sampling uses
temperature and nucleus (top-p) filtering, drawn from the ``torch.Generator`` passed in (a seeded one makes it
reproducible; the process-wide RNG is used only when none is given). The compiler's recompile limit is raised
only around the compiled step's calls, never process-wide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch._dynamo.config as dynamo_config
from torch import nn
from transformers import StaticCache

from logo.errors import LogoError
from logo.models import cache_keyword

RECOMPILE_LIMIT = 128  # one graph per (batch, cache length, mixture on/off)


class StaticDecoder:
    """Generate with a static KV cache; ``compile=True`` compiles the decode step (CUDA graphs on GPU)."""

    def __init__(self, model: nn.Module, compile: bool = False, min_cache_len: int = 64) -> None:
        if min_cache_len < 1:
            raise LogoError(f"min_cache_len must be at least 1 token, got {min_cache_len}")
        self.model = model
        self._cache_kw = cache_keyword(model)
        self.min_cache_len = min_cache_len
        self.device = next(model.parameters()).device
        self.cuda_graphs = compile and self.device.type == "cuda"
        self._caches: dict[tuple[int, int], StaticCache] = {}
        self._step: Callable[..., torch.Tensor] = self._forward_step
        if compile:
            mode = "reduce-overhead" if self.cuda_graphs else None
            self._step = torch.compile(self._forward_step, mode=mode, fullgraph=True, dynamic=False)

    def _forward_step(self, token: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                      cache_position: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        out = self.model(input_ids=token, attention_mask=mask, position_ids=position_ids, **{self._cache_kw: cache},
                         cache_position=cache_position, use_cache=True)
        return out.logits[:, -1, :]

    def cache_len(self, length: int) -> int:
        """The cache length used for ``length`` tokens: the next power of two, at least ``min_cache_len``."""
        return max(self.min_cache_len, 1 << math.ceil(math.log2(max(length, 1))))

    def cache(self, batch: int, size: int) -> StaticCache:
        """A reset static cache for ``batch`` rows and ``size`` tokens (made on first use, then reused)."""
        key = (batch, size)
        cache = self._caches.get(key)
        # one first filled inside torch.inference_mode holds inference tensors, which nothing outside it may write:
        # a plain call replaces it (once: the new one's tensors are plain, and serve both modes)
        if cache is None or (not torch.is_inference_mode_enabled() and _holds_inference_tensors(cache)):
            with torch.inference_mode(False):  # the counter is made now; keys and values by the first prefill
                cache = StaticCache(config=self.model.config, max_cache_len=size)
            self._caches[key] = cache
        else:
            cache.reset()
        return cache

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        *,
        stop_ids: Iterable[int] = (),
        pad_id: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        on_token: Callable[[torch.Tensor], object] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """New tokens ``[B, T]`` for left-padded prompts; a row stops after a token in ``stop_ids``.

        ``T <= max_new_tokens`` (all rows stopped earlier); tokens after a row's stop are ``pad_id``.
        ``on_token(tokens)`` is called after each step with that step's ``[B]`` tokens (timing, streaming).
        """
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise LogoError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                            f"{tuple(attention_mask.shape)} must both be [batch, length]")
        if max_new_tokens < 1:
            raise LogoError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise LogoError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        batch, prompt_len = input_ids.shape
        size = self.cache_len(prompt_len + max_new_tokens)
        cache = self.cache(batch, size)
        mask = torch.zeros(batch, size, dtype=torch.long, device=self.device)
        mask[:, :prompt_len] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)

        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **{self._cache_kw: cache},
                            cache_position=torch.arange(prompt_len, device=self.device), use_cache=True,
                            logits_to_keep=1).logits[:, -1, :]
        position = positions[:, -1:].clone()
        tokens: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            token = _choose(logits, do_sample, temperature, top_p, generator)
            if stops.numel():
                token = token.masked_fill(finished, pad_id)
                finished |= torch.isin(token, stops)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if step == max_new_tokens - 1 or (stops.numel() and bool(finished.all())):
                break
            at = prompt_len + step
            mask[:, at] = 1
            position += 1
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with _recompile_limit():
                logits = self._step(token[:, None], position, mask, torch.tensor([at], device=self.device), cache)
            if self.cuda_graphs:
                logits = logits.clone()  # the graph's output buffer is overwritten by the next replay
        return torch.stack(tokens, 1)


def _holds_inference_tensors(cache: StaticCache) -> bool:
    """Whether ``cache`` was made or filled inside ``torch.inference_mode`` (its tensors are inference tensors)."""
    return any(isinstance(t, torch.Tensor) and t.is_inference() for layer in cache.layers for t in vars(layer).values())


def _recompile_limit_name() -> str:
    """The dynamo setting that caps recompiles: ``recompile_limit`` from torch 2.7, ``cache_size_limit`` before
    (the same setting, renamed; pyproject allows torch 2.4)."""
    return "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"


def _recompile_limit():
    """Room for one graph per (batch, cache length, mixture on/off), for the duration of a step call only."""
    name = _recompile_limit_name()
    limit = max(getattr(dynamo_config, name), RECOMPILE_LIMIT)
    return dynamo_config.patch(**{name: limit})


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy argmax, or a sample after temperature and top-p filtering (as ``transformers`` filters)."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_p < 1.0:
        sorted_scores, order = scores.sort(-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
