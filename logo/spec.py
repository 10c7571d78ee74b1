"""One validated description of an engine, shared by every front end (CLI, ``logo run``, lm-eval, server).

:class:`EngineSpec` holds the base model, the adapters, the device, the dtype, the decode path and the
full :class:`~logo.router.RouterConfig`. It checks itself on construction (as PEFT's configs do), so a
typo fails in a line, before any model loads: an unknown preset gets a did-you-mean, an unknown device
or dtype names the ones there are. :meth:`EngineSpec.build` is the only place that loads an engine.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from logo.adapter_source import resolve_adapters
from logo.engine import LoGoEngine, default_device
from logo.errors import LogoError
from logo.generation import check_decode
from logo.library import AdapterLibrary, check_entries
from logo.models import DTYPES, load_base_model
from logo.presets import PRESETS, default_adapters, get_preset
from logo.router import RouterConfig, check_k
from logo.router_file import RouterFile, choose_router_file


def did_you_mean(value: str, known: list[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest known name, or an empty string."""
    lowered = {name.lower(): name for name in known}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.5)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def check_base_model(name: str) -> str:
    """A preset, an existing local directory, or a hub id (``OWNER/NAME``); anything else is a typo."""
    if not name:
        raise LogoError("--base-model is empty; give a preset, a local model directory or a hub id")
    if get_preset(name) is not None or Path(name).exists() or "/" in name:
        return name
    raise LogoError(f"unknown base model {name!r}{did_you_mean(name, list(PRESETS))}: not a preset "
                    f"({', '.join(PRESETS)}), not a local directory, and not a hub id (OWNER/NAME)")


def check_device(device: str | None) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (that exists here); None means cuda if there is one, else cpu."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise LogoError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise LogoError(f"device {device!r} asked for, but this machine has no CUDA device; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise LogoError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu":
        raise LogoError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return device


@dataclass
class EngineSpec:
    """Everything that decides an engine. Defaults: the embedded SmolLM2, its demo library, the official router."""

    base_model: str = "smollm2-135m"
    """A preset (``smollm2-135m``, ``Llama-3.1-8B``, ``Qwen2.5-7B``, ``deepseek-llm-7b-base``), a local
    directory or a hub id."""
    adapters: str | list[str] | None = None
    """A directory of PEFT adapters, adapter paths, ``hub:REPO/PREFIX`` or ``embedded:demo``; None: the
    preset's library."""
    router: RouterConfig | None = None
    """The router; None: the library's fitted router (``router_file``) if it has one, else the official one."""
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:N``; None: cuda if available."""
    dtype: str | torch.dtype | None = "auto"
    """``auto`` (bf16 on CUDA, fp32 elsewhere), ``float32``, ``bfloat16``, ``float16``."""
    decode: str = "eager"
    """``eager`` (transformers generate) | ``static`` (static KV cache) | ``compiled`` (+ torch.compile)."""
    fit_k: bool = False
    """When the library holds fewer adapters than ``router.k``, use them all (with a note) instead of refusing."""
    router_file: str | Path | None = "auto"
    """``auto``: the library's fitted router (``logo_router.json`` next to the adapters) when ``router`` is None;
    ``official``: never (the paper's router); or the path of a router file."""
    router_overrides: dict = field(default_factory=dict)
    """Router fields set on the command line, applied over the router chosen above (fitted or official); a
    ``layer`` or ``module`` replaces a pooled router's ``layers`` or ``modules`` (the flag's signal is the one read)."""

    def __post_init__(self) -> None:
        check_base_model(self.base_model)
        self.device = check_device(self.device)
        if isinstance(self.dtype, str) and self.dtype != "auto" and self.dtype not in DTYPES:
            raise LogoError(f"unknown dtype {self.dtype!r}; use auto or one of {', '.join(sorted(DTYPES))}")
        check_decode(self.decode)
        if isinstance(self.adapters, (list, tuple)) and not self.adapters:
            self.adapters = None
        if self.router is not None and not isinstance(self.router, RouterConfig):
            raise LogoError(f"router must be a RouterConfig, got {type(self.router).__name__}")
        known = {f.name for f in fields(RouterConfig)}
        unknown = sorted(set(self.router_overrides) - known)
        if unknown:
            raise LogoError(f"unknown router option(s) {unknown}; known: {', '.join(sorted(known))}")

    def adapter_spec(self) -> str | list[str]:
        """The adapters to load: the given ones, else the preset's library."""
        return self.adapters if self.adapters is not None else default_adapters(self.base_model)

    def entries(self) -> list[tuple[str, Path]]:
        """The adapters as ``(name, dir)``, their names checked unique (no model is loaded)."""
        entries = resolve_adapters(self.adapter_spec())
        check_entries(entries)
        return entries

    def resolved(self) -> tuple[list[tuple[str, Path]], RouterConfig]:
        """The adapters as ``(name, dir)`` and the router with k checked against them (no model is loaded)."""
        entries = self.entries()
        return entries, self.router_choice(entries)[0]

    def router_choice(self, entries: list[tuple[str, Path]]) -> tuple[RouterConfig, RouterFile | None]:
        """The router to build (given, fitted or official, then the overrides) and the router file it reads, checked
        against the adapters' names."""
        path = choose_router_file([p for _, p in entries], self.router_file) if self.router is None else None
        if self.router is not None and self.router_file not in (None, "auto", "official"):
            raise LogoError("give either router options or a router file, not both")
        file = RouterFile.load(path) if path is not None else None
        if file is not None:
            file.check_adapters([name for name, _ in entries], where=f"router file {file.path}",
                                hint="; or give --router official to route without it")
        router = self.router or (file.config if file is not None else RouterConfig())
        if self.router_overrides:
            changes = _changed(router, self.router_overrides)  # restating a value the router has changes nothing
            fitted = file is not None and self.router is None
            if fitted and SIGNAL_FIELDS & set(changes):
                changes.setdefault("statistics", "default")  # another signal: the fit's statistics do not apply
            rescored = (fitted and router.abstain_signal is None
                        and bool((SIGNAL_FIELDS | {"calibration"}) & set(changes)))
            if rescored and "abstain_below" not in changes:
                changes.setdefault("abstain", "none")  # nor its abstain threshold, fitted on the fit's scores
            _check_abstain_flags(self.router_overrides, router, keeps_threshold=not rescored)
            for single, pooled in (("layer", "layers"), ("module", "modules")):
                if single in changes and pooled not in changes and getattr(router, pooled) is not None:
                    changes[pooled] = None  # --signal-layer/--signal-module replaces a pooled signal's layers/modules
            router = replace(router, **changes)
        if router.k > len(entries):
            if not self.fit_k:
                check_k(router.k, len(entries))
            print(f"note: the library holds {len(entries)} adapters; using k={len(entries)}", file=sys.stderr)
            router = replace(router, k=len(entries))
        return router, file

    def build(self, progress: bool = False,
              router_for: Callable[[torch.nn.Module, AdapterLibrary], RouterConfig] | None = None) -> LoGoEngine:
        """Resolve the adapters and the router first (bad input fails before the slow model load), then load the
        engine; a router file is checked against the library and the model, and lends the library its statistics.
        ``router_for(model, library)``: a router that can only be chosen once both are loaded (the fit's probe
        router, on a module the adapters train); no router file is read then."""
        entries = self.entries()
        router, file = self.router_choice(entries) if router_for is None else (None, None)
        model, tokenizer = load_base_model(self.base_model, device=self.device, dtype=self.dtype)
        library = AdapterLibrary.from_entries(entries, model, progress=progress)
        if router_for is not None:
            router = router_for(model, library)
        if file is not None:
            file.check(library.names, model, library.modules, where=f"router file {file.path}")
            file.apply(library)
        return LoGoEngine(model, tokenizer, library, router, decode=self.decode)


def _changed(router: RouterConfig, overrides: dict) -> dict:
    """The overrides that change ``router``: a flag restating the value it already has is no change (restating a
    fitted router's own calibration must not turn off its abstain rule, nor its own signal send it to other
    statistics). A single ``layer``/``module`` changes a signal pooled over others, which it replaces."""
    def same(name: str, value) -> bool:
        if name in ("layer", "module") and getattr(router, name + "s") is not None:
            return tuple(getattr(router, name + "s")) == (value,)
        return getattr(router, name) == value

    return {name: value for name, value in overrides.items() if not same(name, value)}


def _check_abstain_flags(flags: dict, before: RouterConfig, keeps_threshold: bool) -> None:
    """``--abstain-below`` needs a rule to set the threshold of, and a rule the router did not have (or whose scores
    the flags change) needs its threshold: no silent 0 and no ignored flag."""
    rule = flags.get("abstain", before.abstain)
    if "abstain_below" in flags and rule == "none":
        raise LogoError("--abstain-below sets the threshold of an abstain rule, but this router does not abstain; "
                        "add --abstain top|margin")
    if flags.get("abstain", "none") != "none" and "abstain_below" not in flags and not (
            keeps_threshold and before.abstain == rule):
        raise LogoError(f"--abstain {rule} needs its threshold: add --abstain-below X (or fit one with "
                        "`logo fit-router`, which stores it in the router file)")


SIGNAL_FIELDS = {"strategy", "layer", "module", "post_norm", "position", "layers", "modules"}
"""Router fields that change the signal (and so which calibration statistics apply)."""
