"""What a request asks for, checked before it is queued: its mixture, its settings, its limits.

Every refusal is an :class:`ApiError` that names the field (``param``) and what to do; the API turns it
into OpenAI's error body.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedTokenizerBase

from logo.errors import LogoError
from logo.generation import SEED_LIMIT, GenerationSettings
from logo.library import AdapterLibrary
from logo.router import Router, RouterConfig, Selection
from logo.serve.schemas import LogoOptions

MAX_STOP_STRINGS = 4  # as OpenAI
GREEDY_BELOW = 1e-5
"""A temperature below this is greedy (as 0 is): dividing logits by less overflows float32."""
MAX_ADAPTER_WEIGHT = 10.0
"""The largest weight ``logo.adapters`` may give one adapter (weights scale its update; far beyond 1 is noise)."""
MAX_CHARS_PER_TOKEN = 16
"""A prompt longer than this many characters per token of ``--max-prompt-tokens`` is refused before it is
tokenized (tokenizing runs on the event loop); tokens average about 4 characters, so no real prompt is."""


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}


class RouterOverrides:
    """The routers that requests' ``logo.k`` / ``logo.strategy`` ask for, each checked once (built, and its
    calibration statistics looked up) so that one the worker could not route with is refused before it is
    queued."""

    def __init__(self, model: torch.nn.Module, library: AdapterLibrary) -> None:
        self.model, self.library = model, library
        self._problems: dict[str, str | None] = {}

    def check(self, config: RouterConfig, param: str) -> None:
        key = repr(config)
        if key not in self._problems:
            self._problems[key] = self._problem(config)
        if self._problems[key] is not None:
            raise ApiError(400, f"{param}: this server cannot route with it ({self._problems[key]}); drop {param} "
                           "to use the server's router", param)

    def _problem(self, config: RouterConfig) -> str | None:
        try:
            Router(self.model, self.library, config).check_statistics()
        except LogoError as err:
            return str(err)
        return None


@dataclass
class Catalog:
    """The models a request may name, the server's limits, and the check of router overrides."""

    routed_id: str
    base_id: str
    adapters: list[str]
    router: RouterConfig
    max_prompt_tokens: int
    max_tokens_limit: int
    max_queue: int
    overrides: RouterOverrides
    context_tokens: int | None = None
    """The model's context (``max_position_embeddings``): a prompt and its new tokens must fit (None: unknown)."""

    @property
    def model_ids(self) -> list[str]:
        return [self.routed_id, self.base_id, *self.adapters]


def choose_mixture(model: str | None, options: LogoOptions | None,
                   catalog: Catalog) -> tuple[Selection | None, RouterConfig | None]:
    """``(selection, None)`` for a fixed mixture (empty: the base model) or ``(None, router)`` to route
    (router None: the server's own)."""
    options = options or LogoOptions()
    routed = model is None or model == catalog.routed_id
    overrides = options.k is not None or options.strategy is not None
    if options.adapters is not None or options.base:
        if options.adapters is not None and options.base:
            raise ApiError(400, "logo.base and logo.adapters ask for different mixtures; give one", "logo")
        if overrides:
            raise ApiError(400, "logo.k and logo.strategy apply only when LoGo routes; drop them or "
                           "logo.adapters / logo.base", "logo")
        if model == catalog.base_id and options.adapters is not None:
            raise ApiError(400, f"model {model!r} is the base model, which takes no adapters; for the mixture in "
                           f"logo.adapters set model to {catalog.routed_id!r} or leave it unset (or name one adapter "
                           "as the model; GET /v1/models lists them)", "model")
        if not routed and model != catalog.base_id:
            raise ApiError(400, f"model {model!r} names one adapter but logo asks for another mixture; set model "
                           f"to {catalog.routed_id!r} or leave it unset", "model")
        return (Selection([], []) if options.base else explicit_mixture(options.adapters, catalog.adapters)), None
    if routed:
        if not overrides:
            return None, None
        config = catalog.router
        k = config.k if options.k is None else options.k
        if k > len(catalog.adapters):
            raise ApiError(400, f"logo.k={k} but the library holds {len(catalog.adapters)} adapters; choose 1 to "
                           f"{len(catalog.adapters)}", "logo.k")
        param = "logo.strategy" if options.strategy is not None else "logo.k"
        try:
            router = replace(config, k=k, strategy=options.strategy or config.strategy)
        except LogoError as err:
            raise ApiError(400, f"{param}: {err}", param) from None
        catalog.overrides.check(router, param)
        return None, router
    if overrides:
        raise ApiError(400, f"logo.k and logo.strategy apply only when LoGo routes (model {catalog.routed_id!r} "
                       f"or unset), not to model {model!r}", "logo")
    if model == catalog.base_id:
        return Selection([], []), None
    if model in catalog.adapters:
        return Selection([catalog.adapters.index(model)], [1.0]), None
    # 404, as OpenAI answers an unknown model (its clients raise NotFoundError)
    raise ApiError(404, f"unknown model {model!r}: use {catalog.routed_id!r} (LoGo routes), {catalog.base_id!r} "
                   f"(the base model) or an adapter's name (GET /v1/models lists them)", "model", "model_not_found")


def explicit_mixture(weights: dict[str, float], names: list[str]) -> Selection:
    if not weights:
        raise ApiError(400, "logo.adapters is empty; give {adapter name: weight, ...}", "logo.adapters")
    unknown = [n for n in weights if n not in names]
    if unknown:
        raise ApiError(400, f"unknown adapter(s) {unknown} in logo.adapters; GET /v1/adapters lists the "
                       f"{len(names)} adapters", "logo.adapters", "adapter_not_found")
    bad = {n: w for n, w in weights.items() if not (math.isfinite(w) and 0 < w <= MAX_ADAPTER_WEIGHT)}
    if bad:
        raise ApiError(400, f"logo.adapters weights must be above 0 and at most {MAX_ADAPTER_WEIGHT:g}, got {bad}",
                       "logo.adapters")
    return Selection([names.index(n) for n in weights], [float(w) for w in weights.values()])


def settings_for(max_tokens: int | None, default_max_tokens: int, temperature: float, top_p: float,
                 seed: int | None, n: int, catalog: Catalog, param: str = "max_tokens") -> GenerationSettings:
    """Generation settings (a temperature below :data:`GREEDY_BELOW`, 0 included, is greedy), checked against
    the server's ``--max-tokens-limit``."""
    if n != 1:
        raise ApiError(400, f"n={n}: this server returns one choice per prompt; use n=1 (send a list of prompts "
                       "for several)", "n")
    limit = catalog.max_tokens_limit
    tokens = min(default_max_tokens, limit) if max_tokens is None else max_tokens
    if tokens > limit:
        raise ApiError(400, f"{param}={tokens} is over this server's limit of {limit} (--max-tokens-limit); "
                       f"ask for at most {limit}", param, "max_tokens_over_limit")
    sample = temperature >= GREEDY_BELOW
    if seed is not None:
        if not -SEED_LIMIT <= seed < SEED_LIMIT:
            raise ApiError(400, f"seed={seed} is outside int64; give a whole number from -2**63 to 2**63 - 1", "seed")
    try:
        return GenerationSettings(max_new_tokens=tokens, do_sample=sample, temperature=temperature if sample else 1.0,
                                  top_p=top_p, seed=seed)
    except LogoError as err:
        raise ApiError(400, str(err)) from None


def check_logprobs(logprobs: bool | int | None, top_logprobs: int | None) -> None:
    """Refuse a request for log probabilities (this server returns none); unset, ``false`` and
    ``top_logprobs: 0`` are accepted."""
    if logprobs is not None and logprobs is not False:  # completions' 0 asks for the chosen tokens' ones
        raise ApiError(400, f"logprobs={json.dumps(logprobs)}: this server returns no log probabilities; drop logprobs "
                       "or set it to null (chat: false)", "logprobs")
    if top_logprobs is not None and top_logprobs != 0:
        raise ApiError(400, f"top_logprobs={top_logprobs}: this server returns no log probabilities; drop "
                       "top_logprobs", "top_logprobs")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS}", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop strings must not be empty", "stop")
    return stops


def prompt_lengths(tokenizer: PreTrainedTokenizerBase, prompts: list[str], catalog: Catalog,
                   param: str = "prompt", names: list[str] | None = None) -> list[int]:
    """Each prompt's token count (as the engine tokenizes it); an empty, over-long or not encodable prompt, or
    more prompts than the queue holds, is refused. ``names``: what the errors call each prompt (``param i``).
    Prompts are tokenized one at a time, so a request is refused at its first prompt over the limit (tokenizing a
    whole request of long prompts takes seconds; the server runs this off its event loop)."""
    if not prompts:
        raise ApiError(400, f"{param} is empty; give at least one prompt", param)
    if len(prompts) > catalog.max_queue:
        raise ApiError(400, f"{param} has {len(prompts)} prompts, more than this server queues ({catalog.max_queue}, "
                       f"--max-queue); send at most {catalog.max_queue} per request", param, "too_many_prompts")
    names = names or [f"{param} {i}" for i in range(len(prompts))]
    limit = catalog.max_prompt_tokens
    chars = MAX_CHARS_PER_TOKEN * limit
    for name, prompt in zip(names, prompts):
        if not prompt.strip():
            raise ApiError(400, f"{name} is empty; give some text to continue", param)
        if len(prompt) > chars:
            raise ApiError(400, f"{name} has {len(prompt)} characters, over this server's limit of {chars} "
                           f"({MAX_CHARS_PER_TOKEN} per token of --max-prompt-tokens {limit}); shorten it", param,
                           "prompt_too_long")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ApiError(400, f"{name} is not valid Unicode (a lone surrogate at character {err.start}); "
                           "send UTF-8 text", param) from None
    lengths = []
    for name, prompt in zip(names, prompts):
        lengths.append(length := len(tokenizer(prompt, add_special_tokens=True)["input_ids"]))
        if length > limit:
            raise ApiError(400, f"{name} has {length} tokens, over this server's limit of {limit} "
                           "(--max-prompt-tokens); shorten it", param, "prompt_too_long")
    return lengths


def context_tokens(model: torch.nn.Module) -> int | None:
    """The model's context in tokens (its config's ``max_position_embeddings``), None where it does not say."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def fit_context(settings: GenerationSettings, lengths: list[int], catalog: Catalog, asked: bool,
                param: str = "max_tokens", names: list[str] | None = None) -> GenerationSettings:
    """``settings`` whose new tokens fit the model's context after the longest prompt: a ``max_tokens`` the client
    ``asked`` for that does not fit is refused (400, OpenAI's ``context_length_exceeded``); the server's default
    is shortened to the room left."""
    context = catalog.context_tokens
    if context is None:
        return settings
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    room = context - lengths[longest]
    name = (names or [f"prompt {i}" for i in range(len(lengths))])[longest]
    if room < 1:
        raise ApiError(400, f"{name} has {lengths[longest]} tokens, which fill this model's context of {context} "
                       "tokens and leave no room for an answer; shorten it", param, "context_length_exceeded")
    if settings.max_new_tokens <= room:
        return settings
    if asked:
        raise ApiError(400, f"{param}={settings.max_new_tokens} does not fit: {name} has {lengths[longest]} tokens "
                       f"and this model's context is {context}; ask for at most {room}", param,
                       "context_length_exceeded")
    return replace(settings, max_new_tokens=room)
