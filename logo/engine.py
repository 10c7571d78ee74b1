"""The engine: batches prompts, routes each with LoGo, and generates with each row's own mixture."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from logo.calibration import default_prompts, divisors, save_calibration
from logo.errors import LogoError
from logo.library import AdapterLibrary
from logo.mixture import Mixture, StaticMixture
from logo.router import (
    Route,
    RouterConfig,
    Selection,
    decoder_layers,
    probe,
    score,
    select,
    signal_module_name,
)
from logo.static_decode import StaticDecoder

MAX_PROMPT_TOKENS = 2048  # as the official code
DECODE_PATHS = ("eager", "static", "compiled")
"""``eager``: transformers' ``generate``; ``static``: static KV cache; ``compiled``: static cache and a
compiled decode step (CUDA graphs on GPU). All three give the same greedy tokens (see logo.static_decode)."""


@dataclass
class Generation:
    """One prompt's result: the raw decoded continuation and the mixture that produced it."""

    prompt: str
    text: str
    route: Route | None
    selection: Selection


@dataclass
class Timings:
    """Seconds spent in the last call, by phase."""

    probe_s: float = 0.0
    generate_s: float = 0.0
    batches: int = 0
    extra: dict = field(default_factory=dict)


class NewlineStop(StoppingCriteria):
    """Stop each row once it emits the newline token (the official ``--generation_early_stop``)."""

    def __init__(self, newline_id: int) -> None:
        self.newline_id = newline_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return input_ids[:, -1] == self.newline_id


class LoGoEngine:
    """Route and generate with a base model and an adapter library."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        library: AdapterLibrary,
        router: RouterConfig | None = None,
        decode: str = "eager",
    ) -> None:
        if decode not in DECODE_PATHS:
            raise LogoError(f"unknown decode path {decode!r}; choose one of {', '.join(DECODE_PATHS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.library = library
        self.router = router or RouterConfig()
        if self.router.k > len(library):
            raise LogoError(
                f"k={self.router.k} adapters requested but the library holds {len(library)}; "
                f"choose --n-selected-modules between 1 and {len(library)}"
            )
        self.num_layers = len(decoder_layers(model))
        self.signal_module = signal_module_name(model, self.router)
        if self.signal_module not in library.stacks:
            raise LogoError(
                f"no adapter targets the signal module {self.signal_module}; pick --signal-module/--signal-layer "
                f"among the adapters' modules (e.g. {library.modules[:2]})"
            )
        self.decoder: StaticDecoder | None = None  # None: transformers generate
        if decode == "eager":
            self.mixture: Mixture | StaticMixture = Mixture(model, library)
        else:
            self.mixture = StaticMixture(model, library, k_cap=self.router.k)
            self.decoder = StaticDecoder(model, compile=decode == "compiled")
        self.device = next(model.parameters()).device
        self.timings = Timings()

    @classmethod
    def from_pretrained(
        cls,
        base_model: str,
        adapters: str | list[str] | None = None,
        router: RouterConfig | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        progress: bool = False,
        decode: str = "eager",
    ) -> LoGoEngine:
        """Load a base model (path, hub id or preset) and an adapter library (default: the preset's)."""
        from logo.models import load_base_model
        from logo.presets import get_preset

        device = device or default_device()
        if adapters is None or adapters == []:
            preset = get_preset(base_model)
            if preset is None or preset.default_adapters is None:
                raise LogoError(f"--adapters is required for {base_model!r} (it has no default adapter library)")
            adapters = preset.default_adapters
        model, tokenizer = load_base_model(base_model, device=device, dtype=dtype)
        library = AdapterLibrary.load(adapters, model, progress=progress)
        return cls(model, tokenizer, library, router, decode=decode)

    # ----------------------------------------------------------------- inputs
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize with left padding (as generation needs); truncated to 2048 tokens like the official code."""
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(
            prompts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_PROMPT_TOKENS
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def _batches(self, prompts: list[str], batch_size: int) -> list[list[int]]:
        """Indices grouped into batches of similar length (less padding); results keep input order."""
        if batch_size < 1:
            raise LogoError(f"batch size must be at least 1, got {batch_size}")
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    # ---------------------------------------------------------------- routing
    def raw_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw LoGo scores ``[B, N]`` from a clean probe (no adapter active, stops at the signal layer)."""
        with self.mixture.suspended():
            h = probe(self.model, input_ids, attention_mask, self.router)
        return score(h, self.library, self.signal_module, self.router.strategy)

    def route_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[Route]:
        raw = self.raw_scores(input_ids, attention_mask)
        div = divisors(self.library, self.router, self.signal_module, self.num_layers)
        calibrated = raw if div is None else raw / div.to(raw.device)
        top, idx, weights = select(calibrated, self.router.k, self.router.weighting, self.router.temperature)
        routes = []
        for row in range(raw.shape[0]):
            indices = idx[row].tolist()
            routes.append(
                Route(
                    indices=indices,
                    weights=weights[row].tolist(),
                    names=[self.library.names[i] for i in indices],
                    scores=top[row].tolist(),
                    all_scores=raw[row].tolist(),
                )
            )
        return routes

    def route(self, prompts: list[str], batch_size: int = 8, progress: bool = False) -> list[Route]:
        """LoGo selection for each prompt (indices, names, weights, and all raw scores)."""
        results: list[Route | None] = [None] * len(prompts)
        for batch in _progress(self._batches(prompts, batch_size), progress, "routing", len(prompts)):
            ids, mask = self.encode([prompts[i] for i in batch])
            for i, route in zip(batch, self.route_batch(ids, mask)):
                results[i] = route
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------- generation
    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int = 256,
        early_stop: bool = False,
        batch_size: int = 8,
        selections: list[Selection | None] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        progress: bool = False,
    ) -> list[Generation]:
        """Generate a continuation for every prompt.

        With ``selections=None`` each prompt is routed with LoGo; otherwise ``selections[i]`` is prompt
        i's fixed mixture (``None`` or empty indices = the base model).
        """
        if selections is not None and len(selections) != len(prompts):
            raise LogoError(f"{len(selections)} selections given for {len(prompts)} prompts")
        if seed is not None:
            torch.manual_seed(seed)
        config = self._generation_config(max_new_tokens, do_sample, temperature, top_p)
        newline_id = self.tokenizer.encode("\n", add_special_tokens=False)[0] if early_stop else None
        self.timings = Timings()
        results: list[Generation | None] = [None] * len(prompts)
        for batch in _progress(self._batches(prompts, batch_size), progress, "generating", len(prompts)):
            ids, mask = self.encode([prompts[i] for i in batch])
            start = time.perf_counter()
            if selections is None:
                routes: list[Route | None] = self.route_batch(ids, mask)
                chosen: list[Selection] = list(routes)  # type: ignore[arg-type]
            else:
                routes = [None] * len(batch)
                chosen = [selections[i] or Selection([], []) for i in batch]
            self.timings.probe_s += time.perf_counter() - start
            start = time.perf_counter()
            self._set_mixture(chosen)
            try:
                new_tokens = self._decode(ids, mask, config, newline_id)
            finally:
                self.mixture.clear()
            self.timings.generate_s += time.perf_counter() - start
            self.timings.batches += 1
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for row, i in enumerate(batch):
                results[i] = Generation(prompts[i], texts[row], routes[row], chosen[row])
        return results  # type: ignore[return-value]

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor, config, newline_id: int | None) -> torch.Tensor:
        """New tokens ``[B, T]`` under the current mixture, by the engine's decode path (stop at ``newline_id``)."""
        if self.decoder is None:
            stopping = None if newline_id is None else StoppingCriteriaList([NewlineStop(newline_id)])
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                      stopping_criteria=stopping)
            return out[:, ids.shape[1] :]
        eos = config.eos_token_id
        stops = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if newline_id is not None:
            stops.append(newline_id)
        pad = config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)
        return self.decoder.generate(ids, mask, config.max_new_tokens, stop_ids=stops, pad_id=pad,
                                     do_sample=bool(config.do_sample), temperature=config.temperature or 1.0,
                                     top_p=config.top_p or 1.0)

    def _set_mixture(self, selections: list[Selection]) -> None:
        n = len(self.library)
        k = max((len(s.indices) for s in selections), default=0)
        indices = torch.zeros(len(selections), k, dtype=torch.long)
        weights = torch.zeros(len(selections), k, dtype=torch.float32)
        for row, sel in enumerate(selections):
            if len(sel.indices) != len(sel.weights):
                raise LogoError(f"selection has {len(sel.indices)} indices but {len(sel.weights)} weights")
            bad = [i for i in sel.indices if not 0 <= i < n]
            if bad:
                raise LogoError(f"adapter indices {bad} out of range for a library of {n}")
            indices[row, : len(sel.indices)] = torch.tensor(sel.indices, dtype=torch.long)
            weights[row, : len(sel.weights)] = torch.tensor(sel.weights, dtype=torch.float32)
        self.mixture.set(indices.to(self.device), weights.to(self.device))

    def _generation_config(self, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float):
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = max_new_tokens
        config.max_length = None
        config.do_sample = do_sample
        config.pad_token_id = self.tokenizer.pad_token_id
        if do_sample:
            config.temperature, config.top_p, config.top_k = temperature, top_p, None
        else:
            config.temperature, config.top_p, config.top_k = None, None, None
        return config

    # ------------------------------------------------------------ calibration
    def calibrate(self, prompts: list[str] | None = None, batch_size: int = 8, source: str | None = None,
                  progress: bool = False) -> dict:
        """Compute and store ``mean`` calibration statistics for the current signal (label-free)."""
        if prompts is None:
            prompts, source = default_prompts(), source or "logo default calibration prompts"
        if not prompts:
            raise LogoError("no calibration prompts given")
        rows = []
        for batch in _progress(self._batches(prompts, batch_size), progress, "calibrating", len(prompts)):
            ids, mask = self.encode([prompts[i] for i in batch])
            rows.append(self.raw_scores(ids, mask))
        values = torch.cat(rows).mean(0)
        entry = {"method": "mean", "values": values.tolist(), "n_prompts": len(prompts), "source": source or "user"}
        self.library.calibration[self.router.signal_key(self.num_layers)] = entry
        return {**entry, "file": str(save_calibration(self.library))}

    def close(self) -> None:
        """Remove the mixture hooks; the model is the plain base model again."""
        self.mixture.remove()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _progress(batches: list[list[int]], enabled: bool, desc: str, total: int):
    if not enabled:
        yield from batches
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="prompt") as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))
