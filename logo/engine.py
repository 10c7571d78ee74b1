"""The engine: batches prompts, routes each with LoGo, and generates with each row's own mixture.

This is the one way in for every front end (CLI, evaluation, lm-eval, experiments, server):

- routing: :meth:`LoGoEngine.route` (prompts) and :meth:`LoGoEngine.route_batch` (token ids), or the
  signal vectors themselves at any layers and positions with :meth:`LoGoEngine.signals`, and the router's
  scores of them with :meth:`LoGoEngine.scores` (and :meth:`LoGoEngine.weight_norms`);
- mixtures: ``with engine.mixture(selections): ...`` (or :meth:`set_mixture` / :meth:`clear_mixture`);
- generation: :meth:`LoGoEngine.generate`; batching: :meth:`LoGoEngine.batches`;
- another router or decode path on the same model and library: :meth:`with_router` and
  :meth:`with_decode` return a new, consistent engine and never edit one in place.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from logo import library_decode
from logo.calibration import default_prompts, save_calibration, weight_norms
from logo.errors import LogoError
from logo.generation import MAX_PROMPT_TOKENS, GenerationSettings, check_decode, check_prompts
from logo.library import AdapterLibrary
from logo.mixture import Mixture, StaticMixture
from logo.router import Route, Router, RouterConfig, Selection, SignalPoint, probe_points
from logo.static_decode import StaticDecoder


@dataclass
class Generation:
    """One prompt's result: the raw decoded continuation and the mixture that produced it."""

    prompt: str
    text: str
    route: Route | None
    """The routing decision, when LoGo chose the mixture (or a :class:`Route` was passed as the selection)."""
    selection: Selection


@dataclass
class Timings:
    """Seconds spent in the last call, by phase."""

    probe_s: float = 0.0
    generate_s: float = 0.0
    batches: int = 0


class NewlineStop(StoppingCriteria):
    """Stop each row once it emits the newline token (the official ``--generation_early_stop``)."""

    def __init__(self, newline_id: int) -> None:
        self.newline_id = newline_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return input_ids[:, -1] == self.newline_id


def newline_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of the token the tokenizer makes of a lone newline (the early stop)."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    if not ids:
        raise LogoError("the tokenizer makes no token of a newline, so --generation-early-stop cannot work")
    return ids[0]


class LoGoEngine:
    """Route and generate with a base model and an adapter library.

    Not thread-safe: the mixture is state on the shared model, so one thread at a time may use an engine and
    the engines :meth:`with_router` makes from it (``logo serve`` gives the model to one worker thread).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        library: AdapterLibrary,
        router: RouterConfig | None = None,
        decode: str = "eager",
    ) -> None:
        check_decode(decode)
        self.model = model
        self.tokenizer = tokenizer
        self.library = library
        self._router = Router(model, library, router)
        self.decode_path = decode
        self.decoder: StaticDecoder | None = None  # None: transformers generate
        if decode == "eager":
            self._mixer: Mixture | StaticMixture = Mixture(model, library)
        else:
            self._mixer = StaticMixture(model, library, k_cap=self._router.config.k)
            self.decoder = StaticDecoder(model, compile=decode == "compiled")
        self.device = next(model.parameters()).device
        self.newline_id = newline_token(tokenizer) if tokenizer is not None else None
        self.timings = Timings()
        self._state = _EngineState()  # shared with the engines with_router makes (same model, same hooks)

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
        """Load a base model (path, hub id or preset) and an adapter library (default: the preset's); with no
        ``router``, the library's fitted router if it has one (``logo_router.json``), else the official one."""
        from logo.spec import EngineSpec  # the spec builds engines, so it sits above this module

        return EngineSpec(base_model, adapters, router, device, dtype, decode).build(progress)

    # ----------------------------------------------------------------- views
    @property
    def router(self) -> Router:
        """The router (config, library, model). Read-only: :meth:`with_router` gives an engine with another."""
        return self._router

    @router.setter
    def router(self, _value) -> None:
        raise LogoError("engine.router cannot be replaced in place (the signal module and calibration depend on "
                        "it); use engine.with_router(config), which returns a consistent engine")

    @property
    def mixer(self) -> Mixture | StaticMixture:
        """The mixture hooks on the model (what :meth:`set_mixture` sets): to inspect, e.g. ``merged_modules``."""
        return self._mixer

    def with_router(self, config: RouterConfig) -> LoGoEngine:
        """An engine with another router on the same model, library, mixture hooks and decoder."""
        self._check_open()
        if not isinstance(config, RouterConfig):
            raise LogoError(f"with_router takes a RouterConfig, got {type(config).__name__}; e.g. "
                            "RouterConfig(**fields) or RouterConfig.from_dict(data)")
        other = copy.copy(self)
        with self._mixer.suspended():  # the router's checks may run the base model (one row), whatever mixture is set
            other._router = Router(self.model, self.library, config)
        other.timings = Timings()
        return other

    def with_decode(self, decode: str) -> LoGoEngine:
        """An engine with another decode path (its own mixture hooks) on the same model, library and router."""
        self._check_open()
        return LoGoEngine(self.model, self.tokenizer, self.library, self._router.config, decode=decode)

    def prepare_decode(self) -> str:
        """Build now what decoding will need (the library-decode kernel, for fp32 on CPU) rather than during the
        first generation; one line saying what decoding will use."""
        stack = next(iter(self.library.stacks.values()), None)
        if stack is None:
            return "library-decode kernel: not used (no adapter)"
        return library_decode.status(stack.A.device, stack.dtype)

    @property
    def num_layers(self) -> int:
        return self._router.num_layers

    # ----------------------------------------------------------------- inputs
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize with left padding (as generation needs); a prompt over 2048 tokens is refused."""
        check_prompts(prompts)
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        check_prompts(prompts, batch["attention_mask"].sum(1).tolist(), MAX_PROMPT_TOKENS)
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def batches(self, prompts: list[str], batch_size: int) -> list[list[int]]:
        """Prompt indices grouped into batches of similar length (less padding); callers keep input order."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LogoError(f"batch size must be a whole number of at least 1, got {batch_size!r}")
        check_prompts(prompts)
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True)["input_ids"]]
        check_prompts(prompts, lengths, MAX_PROMPT_TOKENS)  # here, where a prompt's number is its input position
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def encoded_batches(self, prompts: list[str], batch_size: int, progress: bool = False,
                        desc: str = "") -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """``(indices, input_ids, attention_mask)`` for every batch of :meth:`batches`, with a progress bar."""
        batches = self.batches(prompts, batch_size)
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
            for batch in batches:
                ids, mask = self.encode([prompts[i] for i in batch])
                yield batch, ids, mask
                bar.update(len(batch))

    # ---------------------------------------------------------------- routing
    def route_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[Route]:
        """Route one batch of token ids: clean probe (any mixture suspended), score, calibrate, select."""
        self._check_open()
        with self._mixer.suspended():
            return self._router.route(input_ids, attention_mask)

    def route(self, prompts: list[str], batch_size: int = 8, progress: bool = False) -> list[Route]:
        """LoGo selection for each prompt (indices, names, weights, and all raw scores), in input order."""
        results: list[Route | None] = [None] * len(prompts)
        for batch, ids, mask in self.encoded_batches(prompts, batch_size, progress, "routing"):
            for i, route in zip(batch, self.route_batch(ids, mask)):
                results[i] = route
        return results  # type: ignore[return-value]

    def signals(self, prompts: list[str], points: Sequence[SignalPoint], batch_size: int = 8,
                progress: bool = False, module: str | None = None) -> dict[SignalPoint, torch.Tensor]:
        """Signal vectors ``[n, d_in]`` fp32 at every point, in prompt order: one clean probe per batch that
        stops at the deepest point (the router's probe, read at several layers and positions). A post-norm point
        reads the input of ``module`` (a short name such as ``up_proj``; default: the router's first signal module),
        so a fit can read each module's own input."""
        self._check_open()
        module = module if module is not None else self._router.config.signal_modules[0]
        chunks: dict[SignalPoint, list[torch.Tensor]] = {p: [] for p in points}
        order: list[int] = []
        for batch, ids, mask in self.encoded_batches(prompts, batch_size, progress, "probing"):
            with self._mixer.suspended():
                found = probe_points(self.model, ids, mask, list(points), module)
            for point in points:
                chunks[point].append(found[point])
            order += batch
        inverse = torch.argsort(torch.tensor(order))
        return {p: torch.cat(c)[inverse.to(c[0].device)] for p, c in chunks.items()}

    def scores(self, found: dict[SignalPoint, torch.Tensor]) -> torch.Tensor:
        """The router's raw scores of signal vectors already probed by :meth:`signals` (``found`` must hold the
        router's points; nothing is probed again): ``[n, N]`` for one signal, ``[n, S, N]`` for several. With
        :meth:`with_router`, one probe at many points scores many routers, each as its own routing would."""
        self._check_open()
        missing = [p for p in self._router.points if p not in found]
        if missing:
            raise LogoError(f"no signal vectors at {missing}; probe them with engine.signals(prompts, "
                            "engine.router.points)")
        if len(self._router.signals) == 1:
            return self._router.raw_scores(found[self._router.point])
        return self._router.signal_scores(found)

    def weight_norms(self) -> torch.Tensor:
        """``[N]``: what ``weight-norm`` calibration divides the router's (first) signal's raw scores by, each
        adapter's ``scaling * ||B A||_F`` in the signal module."""
        return weight_norms(self.library, self._router.signal_module)

    # --------------------------------------------------------------- mixtures
    def set_mixture(self, selections: Sequence[Selection | None]) -> None:
        """Give row ``i`` of the next forward passes the mixture ``selections[i]`` (None: the base model)."""
        self._check_open()
        self._mixer.set(*self._selection_tensors(selections))

    def add_mixture_rows(self, selections: Sequence[Selection | None]) -> None:
        """Append rows under ``selections`` after the current mixture's rows (a server admitting requests): only the
        new rows' factors are gathered. Run their prefill inside :meth:`mixture_rows_from`."""
        self._check_open()
        self._eager_mixer("add_mixture_rows").add_rows(*self._selection_tensors(selections))

    def keep_mixture_rows(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Keep rows ``rows`` of the current mixture, in that order (a server dropping finished requests); rows that
        stay in place keep their gathered factors, so filling each hole from the end of the batch moves one row."""
        self._eager_mixer("keep_mixture_rows").keep_rows(torch.as_tensor(rows, dtype=torch.long))

    @contextmanager
    def mixture_rows_from(self, first: int) -> Iterator[LoGoEngine]:
        """Run the block on rows ``first:`` of the current mixture alone (a batch of just those rows)."""
        with self._eager_mixer("mixture_rows_from").rows_from(first):
            yield self

    def _eager_mixer(self, what: str) -> Mixture:
        if not isinstance(self._mixer, Mixture):
            raise LogoError(f"{what} changes a mixture row by row, which only the eager decode path does; build the "
                            f"engine with decode='eager' (it has decode={self.decode_path!r})")
        return self._mixer

    def _selection_tensors(self, selections: Sequence[Selection | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """``indices`` and ``weights`` ``[len(selections), k]`` on the engine's device (k: the largest selection)."""
        check_selections(selections, len(self.library))
        k = max((len(s.indices) for s in selections if s is not None), default=0)
        indices = torch.zeros(len(selections), k, dtype=torch.long)
        weights = torch.zeros(len(selections), k, dtype=torch.float32)
        for row, sel in enumerate(selections):
            if sel is None:
                continue
            indices[row, : len(sel.indices)] = torch.tensor(sel.indices, dtype=torch.long)
            weights[row, : len(sel.weights)] = torch.tensor(sel.weights, dtype=torch.float32)
        return indices.to(self.device), weights.to(self.device)

    def clear_mixture(self) -> None:
        """Back to the plain base model."""
        self._mixer.clear()

    @contextmanager
    def mixture(self, selections: Sequence[Selection | None]) -> Iterator[LoGoEngine]:
        """Run the block with row ``i`` under ``selections[i]``; the base model comes back afterwards. Blocks do
        not nest (nor does :meth:`generate` inside one): leaving the inner block would drop the outer mixture."""
        if self._mixer.active:
            raise LogoError("a mixture is already set on this engine (inside `with engine.mixture(...)`, or by "
                            "set_mixture): leave that block or call clear_mixture() first")
        self.set_mixture(selections)
        try:
            yield self
        finally:
            self.clear_mixture()

    @property
    def mixture_active(self) -> bool:
        return self._mixer.active

    # ------------------------------------------------------------- generation
    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int = 256,
        early_stop: bool = False,
        batch_size: int = 8,
        selections: Sequence[Selection | None] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        progress: bool = False,
    ) -> list[Generation]:
        """Generate a continuation for every prompt.

        With ``selections=None`` each prompt is routed with LoGo; otherwise ``selections[i]`` is prompt
        i's fixed mixture (``None`` or empty indices = the base model; a :class:`Route` is kept as the route).
        """
        settings = GenerationSettings(max_new_tokens, early_stop, do_sample, temperature, top_p, seed)
        check_prompts(prompts)
        self._check_open()
        if selections is not None:
            if not isinstance(selections, (list, tuple)):
                raise LogoError(f"selections must be a list (one Selection or None per prompt), got "
                                f"{type(selections).__name__}")
            if len(selections) != len(prompts):
                raise LogoError(f"{len(selections)} selections given for {len(prompts)} prompts")
            check_selections(selections, len(self.library))
        self.timings = Timings()
        results: list[Generation | None] = [None] * len(prompts)
        with self._seeded(settings.seed) as generator:
            for batch, ids, mask in self.encoded_batches(prompts, batch_size, progress, "generating"):
                start = time.perf_counter()
                if selections is None:
                    routes: list[Route | None] = list(self.route_batch(ids, mask))
                    chosen: list[Selection] = list(routes)  # type: ignore[arg-type]
                else:
                    chosen = [selections[i] or Selection([], []) for i in batch]
                    routes = [s if isinstance(s, Route) else None for s in chosen]
                self.timings.probe_s += time.perf_counter() - start
                start = time.perf_counter()
                with self.mixture(chosen):
                    new_tokens = self.decode(ids, mask, settings, generator)
                self.timings.generate_s += time.perf_counter() - start
                self.timings.batches += 1
                texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for row, i in enumerate(batch):
                    results[i] = Generation(prompts[i], texts[row], routes[row], chosen[row])
        return results  # type: ignore[return-value]

    @contextmanager
    def _seeded(self, seed: int | None) -> Iterator[torch.Generator | None]:
        """A generator private to one call; transformers' ``generate`` draws from the global RNG, so for the
        eager path the global state is forked for the call and restored afterwards."""
        if seed is None:
            yield None
            return
        devices = [self.device] if self.device.type == "cuda" else []
        scope = torch.random.fork_rng(devices=devices) if self.decoder is None else nullcontext()
        with scope:
            if self.decoder is None:
                torch.manual_seed(seed)
            yield torch.Generator(self.device).manual_seed(seed)

    def stop_ids(self, early_stop: bool) -> list[int]:
        """Token ids that end a row: the model's end-of-sequence tokens, and the newline with ``early_stop``."""
        eos = self.model.generation_config.eos_token_id
        stops = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if early_stop:
            stops.append(self.newline_id)
        return stops

    def pad_id(self) -> int:
        stops = self.stop_ids(False)
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (stops or [0])[0]

    def decode(self, ids: torch.Tensor, mask: torch.Tensor, settings: GenerationSettings,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """New tokens ``[B, T]`` under the current mixture, by the engine's decode path."""
        if self.decoder is None:
            stopping = StoppingCriteriaList([NewlineStop(self.newline_id)]) if settings.early_stop else None
            with self._without_model_defaults():
                out = self.model.generate(input_ids=ids, attention_mask=mask,
                                          generation_config=self._generation_config(settings),
                                          stopping_criteria=stopping)
            return out[:, ids.shape[1] :]
        return self.decoder.generate(ids, mask, settings.max_new_tokens, stop_ids=self.stop_ids(settings.early_stop),
                                     pad_id=self.pad_id(), do_sample=settings.do_sample,
                                     temperature=settings.temperature, top_p=settings.top_p, generator=generator)

    def _generation_config(self, settings: GenerationSettings) -> GenerationConfig:
        """``settings`` as transformers' config (``top_k=0``: no top-k cut, as the static path and the server)."""
        sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0} if settings.do_sample \
            else {"temperature": None, "top_p": None, "top_k": None}
        return GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                                pad_token_id=self.tokenizer.pad_token_id, **sampling)

    @contextmanager
    def _without_model_defaults(self) -> Iterator[None]:
        """The model's own generation defaults (Qwen2.5-Instruct ships ``repetition_penalty``, ``top_k`` ...) set
        aside for one ``generate``: transformers fills every field a passed config leaves unset from them, so they
        would act on this path only, and the static/compiled paths and the server, which apply none of them, would
        give other tokens. Only the special tokens stay."""
        own = self.model.generation_config
        self.model.generation_config = GenerationConfig(eos_token_id=own.eos_token_id, bos_token_id=own.bos_token_id,
                                                        pad_token_id=own.pad_token_id)
        try:
            yield
        finally:
            self.model.generation_config = own

    # ------------------------------------------------------------ calibration
    def check_statistics(self) -> None:
        """Raise now, before any prompt is routed, where the calibration statistics that routing will read are
        missing (:meth:`Router.check_statistics`)."""
        self._router.check_statistics()

    def statistics(self, prompts: list[str] | None = None, batch_size: int = 8, source: str | None = None,
                   progress: bool = False) -> dict[str, dict]:
        """Calibration statistics (per-adapter mean and std of the raw score) of every signal the router reads,
        over unlabeled prompts (default: logo's generic calibration prompts); not stored."""
        if prompts is None:
            prompts, source = default_prompts(), source or "logo default calibration prompts"
        if not prompts:
            raise LogoError("no calibration prompts given")
        found = self.signals(prompts, self._router.points, batch_size, progress)
        return {key: {"method": "mean", **entry, "source": source or "user"}
                for key, entry in self._router.statistics(found).items()}

    def calibrate(self, prompts: list[str] | None = None, batch_size: int = 8, source: str | None = None,
                  progress: bool = False, save: bool = True) -> dict:
        """Compute calibration statistics (each adapter's mean and std raw score over unlabeled prompts, the
        default prompts if none are given) for the router's signals, keep them in the library and, with ``save``,
        store them. Returns the (first) signal's entry (and the file)."""
        entries = self.statistics(prompts, batch_size, source, progress)
        self.library.calibration.update(entries)
        entry = entries[self._router.signal_key]
        return {**entry, "file": str(save_calibration(self.library))} if save else entry

    def close(self, reason: str = "it was closed") -> None:
        """Remove the mixture hooks; the model is the plain base model again. The engine (and the engines
        :meth:`with_router` made from it) then refuse to route or generate, saying ``reason``."""
        self._mixer.remove()
        self._state.closed = reason

    def _check_open(self) -> None:
        if self._state.closed is not None:
            raise LogoError(f"this engine can no longer be used: {self._state.closed}; build a new one "
                            "(EngineSpec(...).build())")


@dataclass
class _EngineState:
    closed: str | None = None
    """Why the engine may no longer be used (None: it may)."""


def check_selections(selections: Sequence[Selection | None], n_adapters: int) -> None:
    """Each entry is a :class:`Selection` (or None) of whole adapter indices in range and as many finite weights."""
    for row, sel in enumerate(selections):
        if sel is None:
            continue
        if not isinstance(sel, Selection):
            raise LogoError(f"selection {row} is a {type(sel).__name__}, not a Selection(indices, weights) or None")
        if len(sel.indices) != len(sel.weights):
            raise LogoError(f"selection {row} has {len(sel.indices)} indices but {len(sel.weights)} weights")
        kinds = [i for i in sel.indices if isinstance(i, bool) or not isinstance(i, int)]
        if kinds:
            raise LogoError(f"selection {row}: adapter indices must be whole numbers (library positions; "
                            f"engine.library.names lists them), got {kinds}")
        bad = [i for i in sel.indices if not 0 <= i < n_adapters]
        if bad:
            raise LogoError(f"selection {row}: adapter indices {bad} out of range for a library of {n_adapters}")
        weights = [w for w in sel.weights if isinstance(w, bool) or not isinstance(w, (int, float))
                   or not math.isfinite(w)]
        if weights:
            raise LogoError(f"selection {row}: weights must be finite numbers, got {weights}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
