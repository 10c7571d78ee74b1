"""Ways to choose each prompt's mixture, as registered strategies: LoGo and the baselines it is compared with.

Every front end (``logo run``, ``logo demo``, the server) takes its methods from :func:`get_method`:

- ``logo``: LoGo routing (the engine's router, or a given :class:`RouterConfig`);
- ``fitted``: LoGo with the router fitted to the library (its ``logo_router.json``, see ``logo fit-router``),
  which abstains to the base model when it is unsure;
- ``base``: no adapter;
- ``uniform``: all N adapters, weight 1/N each;
- ``random``: k adapters drawn per instance (seeded by the run seed and the instance's index), equal weights;
- ``fixed:NAME``: one named adapter, weight 1;
- ``arrow``: PEFT's Arrow router over the same adapters (per token; see :mod:`logo.arrow`).

A method either chooses a mixture per prompt (:meth:`Method.select`) or, like Arrow, only generates
(:meth:`Method.generate`). An unknown name is an error that lists the known ones and suggests the nearest.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from logo.arrow import ArrowGenerator
from logo.engine import Generation, LoGoEngine
from logo.errors import LogoError
from logo.generation import GenerationSettings
from logo.router import RouterConfig, Selection, check_k
from logo.router_file import RouterFile, library_router_file


class Method:
    """A named way to choose each prompt's mixture."""

    name: str = ""
    routes: bool = False
    """True when the method routes with LoGo (its generations carry a :class:`~logo.router.Route`)."""
    takes_over_model: bool = False
    """True when the method changes the engine's model for good (run it after every other method)."""

    def check_library(self, names: list[str], paths: list[Path]) -> None:
        """Raise where this method cannot run on the library of adapters ``names`` (stored in ``paths``): checked
        before any model loads, and again when the method runs."""

    def select(self, engine: LoGoEngine, prompts: list[str], indices: Sequence[int],
               seed: int) -> list[Selection | None]:
        """The mixture of each prompt (``indices`` are the prompts' instance numbers; None = the base model)."""
        raise LogoError(f"method {self.name!r} routes inside generation and has no per-prompt selection")

    def generate(self, engine: LoGoEngine, prompts: list[str], indices: Sequence[int], seed: int,
                 settings: GenerationSettings, batch_size: int = 8, progress: bool = False) -> list[Generation]:
        """Generate every prompt under this method's mixtures."""
        check_settings(settings)
        return engine.generate(prompts, selections=self.select(engine, prompts, indices, seed), batch_size=batch_size,
                               progress=progress, **settings.to_dict())


@dataclass
class LoGo(Method):
    """LoGo routing with ``router`` (None: the engine's own router)."""

    router: RouterConfig | None = None
    name: str = "logo"
    routes: bool = True

    def engine(self, engine: LoGoEngine) -> LoGoEngine:
        return engine if self.router is None else engine.with_router(self.router)

    def select(self, engine, prompts, indices, seed):
        return self.engine(engine).route(prompts)

    def generate(self, engine, prompts, indices, seed, settings, batch_size=8, progress=False):
        return self.engine(engine).generate(prompts, batch_size=batch_size, progress=progress, **settings.to_dict())


@dataclass
class Fitted(LoGo):
    """LoGo with the library's fitted router (``logo_router.json`` next to the adapters), checked against the
    library and the model; ``abstain=False`` turns its confidence rule off."""

    abstain: bool = True
    name: str = "fitted"

    def check_library(self, names: list[str], paths: list[Path]) -> None:
        if library_router_file(paths) is None:
            raise LogoError("method 'fitted': the library has no fitted router (logo_router.json next to the "
                            "adapters); fit one with `logo fit-router`")

    def engine(self, engine: LoGoEngine) -> LoGoEngine:
        self.check_library(engine.library.names, engine.library.paths)
        path = library_router_file(engine.library.paths)
        file = RouterFile.load(path)
        file.check(engine.library.names, engine.model, engine.library.modules, where=f"router file {path}")
        file.apply(engine.library)
        return engine.with_router(file.config if self.abstain else file.without_abstain())


@dataclass
class Base(Method):
    name: str = "base"

    def select(self, engine, prompts, indices, seed):
        return [None] * len(prompts)


@dataclass
class Uniform(Method):
    name: str = "uniform"

    def select(self, engine, prompts, indices, seed):
        n = len(engine.library)
        return [Selection(list(range(n)), [1.0 / n] * n)] * len(prompts)


@dataclass
class Random(Method):
    """k adapters per instance, equal weights; instance i draws from ``Random(seed * 1_000_003 + i)``."""

    k: int = 3
    name: str = "random"

    def check_library(self, names: list[str], paths: list[Path]) -> None:
        check_k(self.k, len(names))

    def select(self, engine, prompts, indices, seed):
        n = len(engine.library)
        self.check_library(engine.library.names, engine.library.paths)
        picks = []
        for index in indices:
            rng = random.Random(seed * 1_000_003 + index)
            picks.append(Selection(sorted(rng.sample(range(n), self.k)), [1.0 / self.k] * self.k))
        return picks


@dataclass
class Fixed(Method):
    """One named adapter at weight 1 for every prompt."""

    adapter: str = ""
    name: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.adapter:
            raise LogoError("fixed:NAME needs an adapter name, e.g. fixed:word_sorting")
        self.name = f"fixed:{self.adapter}"

    def check_library(self, names: list[str], paths: list[Path]) -> None:
        if self.adapter not in names:
            raise LogoError(f"{self.name}: no adapter of that name in the library ({len(names)} adapters: "
                            f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); give --method fixed:NAME "
                            "with one of them")

    def select(self, engine, prompts, indices, seed):
        self.check_library(engine.library.names, engine.library.paths)
        return [Selection([engine.library.index(self.adapter)], [1.0])] * len(prompts)


@dataclass
class Arrow(Method):
    """PEFT's Arrow router (top-k per token) built on the engine's base model, which it takes over."""

    k: int = 3
    temperature: float = 1.0
    name: str = "arrow"
    takes_over_model: bool = True
    _built: dict = field(default_factory=dict, repr=False)

    def check_library(self, names: list[str], paths: list[Path]) -> None:
        check_k(self.k, len(names))

    def generator(self, engine: LoGoEngine, seed: int) -> ArrowGenerator:
        """The Arrow model over the engine's base model and adapter directories (made once per engine); the
        library is checked before the engine is closed, so a refusal leaves the engine usable."""
        key = (id(engine.model), seed)
        if key not in self._built:
            self.check_library(engine.library.names, engine.library.paths)
            # the engine's hooks come off and it refuses further use: PEFT's layers replace the base model's
            engine.close("the arrow method took over its model (PEFT's Arrow layers replace the base model's)")
            self._built[key] = ArrowGenerator(engine.model, engine.tokenizer, engine.library.paths, top_k=self.k,
                                              temperature=self.temperature, seed=seed)
        return self._built[key]

    def generate(self, engine, prompts, indices, seed, settings, batch_size=8, progress=False):
        check_settings(settings)
        texts = self.generator(engine, seed).generate(prompts, settings.max_new_tokens, settings.early_stop,
                                                      batch_size)
        return [Generation(p, t, None, Selection([], [])) for p, t in zip(prompts, texts)]


def check_settings(settings: GenerationSettings) -> None:
    if not isinstance(settings, GenerationSettings):
        raise LogoError(f"settings must be a GenerationSettings, got {type(settings).__name__}")


METHODS: dict[str, Callable[..., Method]] = {
    "logo": lambda arg, k, router: LoGo(router),
    "fitted": lambda arg, k, router: Fitted(),
    "base": lambda arg, k, router: Base(),
    "uniform": lambda arg, k, router: Uniform(),
    "random": lambda arg, k, router: Random(k),
    "fixed": lambda arg, k, router: Fixed(arg),
    "arrow": lambda arg, k, router: Arrow(k),
}
"""Method name -> factory ``(argument after ':', k, router) -> Method``."""
TAKES_ARGUMENT = {"fixed": "NAME"}


def method_names() -> list[str]:
    """The registered names as a user spells them (``fixed:NAME``)."""
    return [f"{name}:{TAKES_ARGUMENT[name]}" if name in TAKES_ARGUMENT else name for name in METHODS]


def get_method(spec: str, k: int = 3, router: RouterConfig | None = None) -> Method:
    """The method ``spec`` names (``logo``, ``random``, ``fixed:NAME``, ...); ``k`` is used by random and arrow,
    ``router`` by logo (None: the engine's)."""
    name, _, arg = spec.strip().partition(":")
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise LogoError(f"unknown method {spec!r}; {hint}known methods: {', '.join(method_names())}")
    if bool(arg) != (name in TAKES_ARGUMENT):
        raise LogoError(f"method {spec!r}: write it as {name}:{TAKES_ARGUMENT[name]}" if name in TAKES_ARGUMENT
                        else f"method {name!r} takes no ':' argument; known methods: {', '.join(method_names())}")
    return METHODS[name](arg, k, router)
