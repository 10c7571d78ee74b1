"""A router fitted to an adapter library, stored with it: ``logo_router.json`` next to the adapters.

The file holds the router's settings (a :class:`~logo.router.RouterConfig`), the calibration statistics it
was fitted with (per signal and adapter: mean and std of the raw score over the fit prompts), what it was
fitted for (the adapters' names in library order and the base model's shape) and the fit's own report.
:meth:`RouterFile.check` refuses, in one line that names the mismatch, a file that does not match the
library or the model it is used with; :meth:`RouterFile.apply` then hands the statistics to the library.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from logo.errors import LogoError, json_kind
from logo.paths import write_atomic
from logo.router import RouterConfig

FILE_NAME = "logo_router.json"
VERSION = 1
FINGERPRINT_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")


REFIT = "fit the router again with `logo fit-router`"


def check_fields(data: dict) -> str | None:
    """What is wrong with the types of a router file's fields other than ``router`` (None: nothing): ``model``
    and ``fit`` are objects, ``adapters`` an array of names, ``base_model`` a string, and each ``statistics``
    entry an object whose ``values`` and ``std`` are arrays of finite numbers."""
    def numbers(value) -> bool:
        return isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                               and math.isfinite(x) for x in value)

    for name, check, wanted in (("model", lambda v: isinstance(v, dict), "an object"),
                                ("adapters", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                                 "an array of adapter names"),
                                ("statistics", lambda v: isinstance(v, dict), "an object"),
                                ("base_model", lambda v: isinstance(v, str), "a string"),
                                ("fit", lambda v: isinstance(v, dict), "an object")):
        if name in data and not check(data[name]):
            return f"field {name!r} must be {wanted}, got {json_kind(data[name])}"
    for key, entry in data["statistics"].items():
        if not isinstance(entry, dict):
            return f"statistics entry {key!r} must be an object, got {json_kind(entry)}"
        for name in ("values", "std"):
            if name not in entry:
                return f"statistics entry {key!r} lacks {name!r}"
            if not numbers(entry[name]):
                return f"statistics entry {key!r}: {name!r} must be an array of numbers, got {json_kind(entry[name])}"
    return None


def model_fingerprint(model: nn.Module) -> dict:
    """The base model's shape as a router depends on it (architecture, layers, widths, vocabulary)."""
    config = model.config
    return {name: getattr(config, name, None) for name in FINGERPRINT_FIELDS}


@dataclass
class RouterFile:
    """A fitted router: settings, statistics, what it was fitted for, and the fit's report."""

    config: RouterConfig
    adapters: list[str]
    model: dict
    statistics: dict[str, dict] = field(default_factory=dict)
    base_model: str = ""
    """The base model's name as given to the fit (for people; the check compares :attr:`model`)."""
    fit: dict = field(default_factory=dict)
    path: Path | None = None
    """Where the file was read from (None for a file not read from disk)."""

    def to_dict(self) -> dict:
        return {"version": VERSION, "base_model": self.base_model, "model": self.model, "adapters": self.adapters,
                "router": self.config.to_dict(), "statistics": self.statistics, "fit": self.fit}

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> RouterFile:
        """Read a router file; a missing, unreadable or malformed file is a one-line error naming it."""
        path = Path(path)
        if not path.is_file():
            raise LogoError(f"router file {path} does not exist; fit one with `logo fit-router`")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
            raise LogoError(f"cannot read router file {path}: {err}") from err
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise LogoError(f"router file {path} is not a version-{VERSION} logo router file; {REFIT}")
        missing = [k for k in ("model", "adapters", "router", "statistics") if k not in data]
        if missing:
            raise LogoError(f"router file {path} lacks {', '.join(missing)}; {REFIT}")
        wrong = check_fields(data)
        if wrong:
            raise LogoError(f"router file {path}: {wrong}; {REFIT}")
        try:
            config = RouterConfig.from_dict(data["router"], where=f"router file {path}: 'router'")
        except LogoError as err:
            raise LogoError(f"{err}; {REFIT}") from None
        return cls(config, list(data["adapters"]), dict(data["model"]), dict(data["statistics"]),
                   data.get("base_model", ""), dict(data.get("fit", {})), path)

    def check_adapters(self, names: list[str], where: str = "router file", hint: str = "") -> None:
        """Refuse a file fitted for other adapters (one line; no model needed, so before any loads); ``hint``: what
        else the caller can do, appended to the message."""
        missing = [n for n in self.adapters if n not in names]
        if missing:
            raise LogoError(f"{where} was fitted with adapter(s) {missing} that the library does not have; "
                            f"fit the router again for this library (`logo fit-router`){hint}")
        extra = [n for n in names if n not in self.adapters]
        if extra:
            raise LogoError(f"{where} does not know the library's adapter(s) {extra}; fit the router again for "
                            f"this library (`logo fit-router`){hint}")
        if names != self.adapters:
            raise LogoError(f"{where} lists the adapters in another order than the library; fit the router again"
                            f"{hint}")

    def check(self, names: list[str], model: nn.Module | None = None, library_modules: list[str] | None = None,
              where: str = "router file") -> None:
        """Refuse a file fitted for other adapters, another base model or another signal module (one line)."""
        self.check_adapters(names, where)
        if model is not None:
            here = model_fingerprint(model)
            diff = [f"{k} {self.model.get(k)} (file) vs {here[k]} (model)" for k in FINGERPRINT_FIELDS
                    if self.model.get(k) != here[k]]
            if diff:
                raise LogoError(f"{where} was fitted on another base model ({self.base_model or 'unnamed'}): "
                                f"{'; '.join(diff)}")
        if library_modules is not None:
            short = {m.rsplit(".", 1)[-1] for m in library_modules}
            used = list(self.config.signal_modules)
            if self.config.abstain_signal is not None:
                used.append(self.config.abstain_signal.module)
            foreign = [m for m in dict.fromkeys(used) if m not in short]
            if foreign:
                raise LogoError(f"{where} routes on signal module(s) {foreign}, which no adapter of the library "
                                f"targets (they target {sorted(short)})")
        for key, entry in self.statistics.items():
            if len(entry.get("values", [])) != len(names) or len(entry.get("std", [])) != len(names):
                raise LogoError(f"{where}: statistics {key} do not cover the library's {len(names)} adapters")

    def apply(self, library, overrides: RouterConfig | None = None) -> RouterConfig:
        """Hand the file's statistics to ``library`` (in memory) and return the router to use: the file's own,
        or ``overrides`` reading the file's statistics where it uses fitted statistics."""
        library.calibration.update(self.statistics)
        return overrides if overrides is not None else self.config

    def without_abstain(self) -> RouterConfig:
        """The fitted router with its confidence rule off (always routes)."""
        return replace(self.config, abstain="none", abstain_below=0.0, abstain_signal=None)


def library_router_file(adapter_dirs: list[Path]) -> Path | None:
    """The router file stored with a library (in the adapters' common parent directory), if there is one."""
    parents = {Path(d).resolve().parent for d in adapter_dirs}
    if len(parents) != 1:
        return None
    file = parents.pop() / FILE_NAME
    return file if file.is_file() else None


ROUTER_CHOICES = ("auto", "official")


def choose_router_file(adapter_dirs: list[Path], choice: str | Path | None) -> Path | None:
    """The router file ``--router`` names: ``auto`` (default: the library's own file, if it has one), ``official``
    (none: the paper's router), a path to a router file (which must exist) or a folder holding ``logo_router.json``."""
    if choice is None or str(choice) == "auto":
        return library_router_file(adapter_dirs)
    if str(choice) == "official":
        return None
    path = Path(choice)
    if path.is_dir():
        if not (path / FILE_NAME).is_file():
            raise LogoError(f"--router {choice} is a folder without a {FILE_NAME}; give auto, official, a router "
                            f"file's path or a folder holding {FILE_NAME}")
        return path / FILE_NAME
    if not path.is_file():
        raise LogoError(f"--router {choice}: no such router file; give auto, official or a {FILE_NAME} path")
    return path
