"""Per-adapter score calibration (beyond the paper).

Raw LoGo scores compare adapters whose output scale differs for reasons unrelated to the input
(training length, rank, alpha). Calibration divides each adapter's score by a per-adapter statistic:

- ``mean``: the adapter's mean raw score over unlabeled calibration prompts (training-free and
  label-free; computed once per library and signal, stored next to the library in
  ``logo_calibration.json``, or in the logo cache when the library's folder is not writable);
- ``zscore``: ``(s_i - mean_i) / std_i`` with the mean and the (population) standard deviation of the
  adapter's raw score over the same unlabeled prompts: adapters are compared by how unusual their score is;
- ``weight-norm``: data-free, ``scaling_i * ||B_i A_i||_F`` of the signal module.

A fitted router file (:mod:`logo.router_file`) carries its own statistics, computed on its fit prompts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from logo.adapter_source import resolve_adapters
from logo.errors import AdapterError, LogoError, json_kind
from logo.paths import cache_dir, write_atomic

FILE_NAME = "logo_calibration.json"
DEFAULT_PROMPTS = Path(__file__).parent / "assets" / "calibration_prompts.txt"


def cache_file(names: list[str]) -> Path:
    """Where the logo cache keeps the statistics of the library of adapters ``names`` (when its folder is not
    writable)."""
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return cache_dir() / "calibration" / f"{digest}.json"


def library_folder(adapter_dirs: list[Path]) -> Path | None:
    """The folder whose library files (``logo_calibration.json``, ``logo_router.json``) belong to exactly these
    adapters: their common parent, when they are all the adapters ``--adapters FOLDER`` gives; None for some of a
    folder's adapters (the folder's files are the whole folder's) or adapters from several folders."""
    parents = {Path(d).resolve().parent for d in adapter_dirs}
    if len(parents) != 1:
        return None
    folder = parents.pop()
    try:
        whole = {path.resolve() for _, path in resolve_adapters(folder)}
    except AdapterError:  # the folder is no library of its own (e.g. a sibling folder is a broken adapter)
        return None
    return folder if whole == {Path(d).resolve() for d in adapter_dirs} else None


def _candidates(library) -> list[Path]:
    files = []
    if library.root is not None:
        files.append(library.root / FILE_NAME)
    files.append(cache_file(library.names))
    return files


def load_calibration(library) -> dict:
    """Stored statistics for this library, keyed by signal; empty if none were computed."""
    for file in _candidates(library):
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise LogoError(f"cannot read calibration file {file}: {err}; delete it and recalibrate") from err
            if not isinstance(data, dict) or not isinstance(data.get("entries", {}), dict):
                raise LogoError(f"calibration file {file} is not one `logo calibrate` writes (an object whose "
                                "\"entries\" map signals to statistics); delete it and recalibrate")
            if data.get("adapters") != library.names:
                continue  # statistics for another set of adapters
            entries = data.get("entries", {})
            for key, entry in entries.items():
                check_entry(file, key, entry, len(library.names))
            return entries
    return {}


def _finite_numbers(value: object, adapters: int) -> bool:
    """Whether ``value`` is an array of ``adapters`` finite numbers (booleans are not numbers here)."""
    return (isinstance(value, list) and len(value) == adapters
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value))


def check_entry(file: Path, key: str, entry: object, adapters: int) -> None:
    """One entry of a calibration file as :func:`save_calibration` writes it: an object whose ``values`` (the
    per-adapter means) and, when present, ``std`` are arrays of one finite number per adapter (``std`` not
    negative). Checked when the file loads, so a hand-edited or truncated file is a one-line error naming the file
    and the entry rather than a traceback or NaN scores when a router reads it."""
    where = f"calibration file {file}, entry {key!r}"
    fix = "delete the file (or the entry) and recalibrate with `logo calibrate`"
    if not isinstance(entry, dict):
        raise LogoError(f"{where} must be an object with \"values\" (and \"std\"), got {json_kind(entry)}; {fix}")
    if "values" not in entry:
        raise LogoError(f"{where} lacks \"values\" (each adapter's mean score); {fix}")
    for name in ("values", "std"):
        if name in entry and not _finite_numbers(entry[name], adapters):
            raise LogoError(f"{where}: {name!r} must be an array of {adapters} finite numbers (one per adapter), got "
                            f"{json_kind(entry[name])}; {fix}")
    if "std" in entry and any(x < 0 for x in entry["std"]):
        raise LogoError(f"{where}: 'std' holds a negative standard deviation; {fix}")


def save_calibration(library, path: Path | None = None) -> Path:
    """Write ``library.calibration`` (less a router file's own statistics, ``"method": "fit"``, which stay in that
    file): to ``path``, else next to the library if writable and the library is its whole folder (the folder's
    file is the whole folder's, so some of its adapters keep theirs in the cache), else the logo cache."""
    entries = {key: entry for key, entry in library.calibration.items() if entry.get("method") != "fit"}
    payload = {"version": 1, "adapters": library.names, "entries": entries}
    if path is None:
        beside = library.root / FILE_NAME if library.root is not None else None
        writable = (beside is not None and library_folder(library.paths) is not None
                    and os.access(beside.parent, os.W_OK))
        path = beside if writable else cache_file(library.names)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(payload, indent=1))
    return path


def default_prompts() -> list[str]:
    """A small generic prompt set (not evaluation data) for label-free calibration."""
    text = DEFAULT_PROMPTS.read_text()
    return [block.strip().replace("\\n", "\n") for block in text.splitlines() if block.strip()]


def weight_norms(library, module: str) -> torch.Tensor:
    """``scaling_i * ||B_i A_i||_F`` per adapter, without forming ``B A``: trace((B^T B)(A A^T))."""
    stack = library.stacks[module]
    a, b = stack.A.float(), stack.B.float()
    gram_b = b.transpose(1, 2) @ b  # [N, r, r]
    gram_a = a @ a.transpose(1, 2)  # [N, r, r]
    return (gram_b * gram_a).sum((1, 2)).clamp(min=0).sqrt() * stack.scaling


def score_statistics(raw: torch.Tensor) -> dict:
    """Calibration statistics of raw scores ``[n, N]`` of ``n`` unlabeled prompts: per-adapter mean and
    population standard deviation (``values`` is the mean, as ``mean`` calibration has always stored it)."""
    if raw.shape[0] < 2:
        raise LogoError(f"calibration needs at least 2 prompts, got {raw.shape[0]}")
    raw = raw.double()
    return {"values": raw.mean(0).tolist(), "std": raw.std(0, correction=0).tolist(), "n_prompts": raw.shape[0]}


def calibrate_scores(raw: torch.Tensor, library, calibration: str, module_name: str, key: str,
                     num_layers: int | None = None) -> torch.Tensor:
    """Raw scores ``[B, N]`` of one signal calibrated per adapter: unchanged (``none``), divided by the mean
    (``mean``) or the weight norm (``weight-norm``), or z-scored (``zscore``: ``(raw - mean) / std``)."""
    if calibration == "none":
        return raw
    if calibration == "weight-norm":
        return raw / weight_norms(library, module_name).clamp(min=1e-12).to(raw.device)
    return apply_statistics(raw, statistics_for(library, calibration, key, raw.shape[-1], num_layers), calibration)


def describe_signal(key: str, num_layers: int | None = None) -> str:
    """A statistics key as an error names it: the key, or, given the model's ``num_layers``, its layer counted from
    the end as ``--signal-layer`` takes it (the key holds the index from the start), then the rest of the key."""
    fields = dict(part.split("=", 1) for part in key.split("|")[1:] if "=" in part)
    if num_layers is None or not fields.get("layer", "").isdigit():
        return key
    layer = int(fields.pop("layer"))
    rest = "|".join([key.split("|", 1)[0], *(f"{name}={value}" for name, value in fields.items())])
    return f"at layer {layer - num_layers} (= {layer}; {rest})"


def statistics_for(library, calibration: str, key: str, adapters: int, num_layers: int | None = None) -> dict:
    """The library's statistics of signal ``key`` that ``mean`` or ``zscore`` calibration reads, for ``adapters``
    adapters; raises, saying how to compute them, where they are missing or cover another number of adapters
    (``num_layers``: the model's, to name the layer as ``--signal-layer`` counts it)."""
    entry = library.calibration.get(key)
    if entry is None or (calibration == "zscore" and "std" not in entry):
        raise LogoError(
            f"no '{calibration}' calibration statistics for signal {describe_signal(key, num_layers)}; fit a router "
            "with `logo fit-router` or compute them with `logo calibrate --base-model ... --adapters ...` (same "
            "router options), or route uncalibrated with --calibration none"
        )
    if len(entry["values"]) != adapters:
        raise LogoError(f"calibration statistics for {describe_signal(key, num_layers)} cover {len(entry['values'])} "
                        f"adapters, the library holds {adapters}; recalibrate")
    return entry


def apply_statistics(raw: torch.Tensor, entry: dict, calibration: str) -> torch.Tensor:
    """Raw scores ``[B, N]`` calibrated with one signal's statistics (:func:`score_statistics`): ``none``,
    ``mean`` (divided by the mean) or ``zscore`` (``(raw - mean) / std``)."""
    if calibration == "none":
        return raw
    mean = torch.tensor(entry["values"], dtype=torch.float32, device=raw.device)
    if calibration == "mean":
        return raw / mean.clamp(min=1e-12)
    std = torch.tensor(entry["std"], dtype=torch.float32, device=raw.device)
    return (raw - mean) / std.clamp(min=1e-12)
