"""The adapter library: load PEFT LoRA adapters, validate them against the base model, stack them.

For every target module the library holds, once, ``A [N, r_max, d_in]``, ``B [N, d_out, r_max]`` and
``scaling [N]``. ``B`` is stored transposed (``Bt [N, r_max, d_out]``, contiguous) and exposed as a view: a
mixture then gathers its adapters' rows of ``A`` and ``Bt`` with one contiguous copy each, no transpose.
Ranks that differ are zero-padded (exact: padded rows of A meet padded columns of B).
An adapter that does not target a module has zeros there (it contributes nothing), and ``present`` says which
adapters do (routing scores an adapter that lacks the signal module 0, whatever the strategy).

The factors are kept *compact* where that is exact: adapter files in bf16 or fp16 (as training in bf16 writes them)
under an fp32 model are stored in their own dtype, since widening them to fp32 is exact. The library then holds half
the bytes, and a decode step reads half, while every consumer computes in the model's dtype (``ModuleStack.dtype``)
on values identical to those a widened copy would hold.
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from logo.adapter_source import CONFIG_FILE, resolve_adapters
from logo.calibration import load_calibration
from logo.errors import AdapterError

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")

# Config fields whose non-default value changes what the adapter computes; we refuse them.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "fan_in_fan_out": (False, None),
    "modules_to_save": (None, []),
    "layer_replication": (None, []),
    "use_qalora": (False, None),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []),
    "target_parameters": (None, []),
    "use_bdlora": (None, False),
    "kasa_config": (None,),
    "monteclora_config": (None,),
    "arrow_config": (None,),
}


@dataclass
class AdapterInfo:
    """One adapter as read from disk."""

    name: str
    path: Path
    config: dict
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, d_in], B [d_out, r])
    scaling: dict[str, float]  # module -> lora_alpha / r (or / sqrt(r) with rsLoRA)


def widens_exactly(stored: torch.dtype, compute: torch.dtype) -> bool:
    """Whether every value of dtype ``stored`` is exactly a value of ``compute`` (so storing in it loses nothing)."""
    if stored == compute:
        return True
    wider = {torch.bfloat16: (torch.float32, torch.float64), torch.float16: (torch.float32, torch.float64),
             torch.float32: (torch.float64,)}
    return compute in wider.get(stored, ())


def check_entries(entries: list[tuple[str, Path]]) -> None:
    """Refuse an empty list of adapters ``(name, dir)`` or two with one name (no file is read)."""
    if not entries:
        raise AdapterError("the adapter library is empty: give at least one adapter")
    seen: dict[str, Path] = {}
    for name, path in entries:
        if name in seen:
            raise AdapterError(
                f"duplicate adapter name {name!r}: {seen[name]} and {path}; adapter names are folder "
                "names and must be unique, rename one folder"
            )
        seen[name] = path


@dataclass
class ModuleStack:
    """All adapters' LoRA factors for one target module.

    ``A`` and ``Bt`` are stored in a dtype that widens exactly to ``dtype``, the dtype mixtures compute in (the
    model's): the adapter files' own where the library is compact (see the module docstring), else ``dtype``.
    """

    A: torch.Tensor  # [N, r_max, d_in]
    Bt: torch.Tensor  # [N, r_max, d_out]: B transposed, contiguous (the layout the mixture gathers from)
    scaling: torch.Tensor  # [N] fp32, 0 where an adapter lacks this module
    dtype: torch.dtype | None = None  # the compute dtype; None: the factors' own
    present: torch.Tensor | None = None
    """``[N]`` bool, on the factors' device: whether each adapter trains this module (its factors here are not the
    zero padding). None: the adapters whose scaling is not 0 (an adapter that lacks the module has scaling 0)."""
    _float: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dtype is None:
            self.dtype = self.A.dtype
        if self.A.dtype != self.Bt.dtype or not widens_exactly(self.A.dtype, self.dtype):
            raise ValueError(f"factors stored as {self.A.dtype}/{self.Bt.dtype} do not widen exactly to {self.dtype}")
        if self.present is None:
            self.present = self.scaling != 0
        if self.present.dtype != torch.bool or self.present.shape != self.scaling.shape:
            raise ValueError(f"present must be a bool mask of shape {tuple(self.scaling.shape)}, got "
                             f"{self.present.dtype} {tuple(self.present.shape)}")

    @property
    def B(self) -> torch.Tensor:
        """``[N, d_out, r_max]``, a view of :attr:`Bt` (in the stored dtype)."""
        return self.Bt.transpose(1, 2)

    def float_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` and ``B`` in fp32 (what routing scores with), widened once and kept where they are stored narrower
        (routing reads the signal module's on every batch)."""
        if self._float is None:
            self._float = (self.A.float(), self.Bt.float())
        a, bt = self._float
        return a, bt.transpose(1, 2)

    @property
    def in_features(self) -> int:
        """The module's input width ``d_in`` (what a signal vector fed to these adapters must have)."""
        return self.A.shape[-1]

    @property
    def compact(self) -> bool:
        """Whether the factors are stored narrower than the compute dtype."""
        return self.A.dtype != self.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: the factors, their scalings and presence mask, and a widened copy kept for routing (if any)."""
        widened = sum(t.nbytes for t in self._float) if self._float is not None and self.compact else 0
        return self.A.nbytes + self.Bt.nbytes + self.scaling.nbytes + self.present.nbytes + widened


@dataclass
class AdapterLibrary:
    """N named LoRA adapters stacked per target module, ready for routing and mixture inference."""

    names: list[str]
    paths: list[Path]
    configs: list[dict]
    stacks: dict[str, ModuleStack]
    calibration: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def modules(self) -> list[str]:
        return list(self.stacks)

    @property
    def nbytes(self) -> int:
        """Bytes the stacked factors hold."""
        return sum(stack.nbytes for stack in self.stacks.values())

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise AdapterError(f"no adapter named {name!r} in the library ({len(self)} adapters)") from None

    @property
    def root(self) -> Path | None:
        """The common parent directory of the adapters, where library-level files (calibration) live."""
        parents = {p.parent for p in self.paths}
        return parents.pop() if len(parents) == 1 else None

    @classmethod
    def load(
        cls,
        spec: str | Path | list[str | Path],
        model: nn.Module,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
        compact: bool = True,
    ) -> AdapterLibrary:
        """Load, validate and stack the adapters named by ``spec`` for ``model``.

        ``device``/``dtype`` (the compute dtype) default to the model's. ``compact``: keep factors in their files'
        dtype where it widens exactly to ``dtype`` (same results, half the memory for bf16/fp16 files under fp32).
        """
        entries = resolve_adapters(spec)
        return cls.from_entries(entries, model, device=device, dtype=dtype, progress=progress, compact=compact)

    @classmethod
    def from_entries(
        cls,
        entries: list[tuple[str, Path]],
        model: nn.Module,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = False,
        compact: bool = True,
    ) -> AdapterLibrary:
        check_entries(entries)
        param = next(model.parameters())
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(read_adapter, name, path, linears) for name, path in entries]
            iterator = futures
            if progress:
                iterator = tqdm(futures, desc="loading adapters", unit="adapter")
            infos = [f.result() for f in iterator]
        stacks = stack_adapters(infos, linears, device=device, dtype=dtype, compact=compact)
        lib = cls(
            names=[i.name for i in infos],
            paths=[i.path for i in infos],
            configs=[i.config for i in infos],
            stacks=stacks,
        )
        lib.calibration = load_calibration(lib)
        return lib


def _check_config(name: str, path: Path, config: dict) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"adapter {name!r} ({path / CONFIG_FILE}) has peft_type {config.get('peft_type')!r}; "
            "only LoRA adapters (peft_type LORA) can be routed and mixed"
        )
    for key, allowed in _UNSUPPORTED.items():
        if key in config and config[key] not in allowed:
            raise AdapterError(
                f"adapter {name!r} ({path / CONFIG_FILE}) uses {key}={config[key]!r}, which logo does not "
                "support (it would change the adapter's output); retrain or export it as a plain LoRA"
            )
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"adapter {name!r} ({path / CONFIG_FILE}) trains biases (bias={config['bias']!r}); logo supports "
            "bias='none' only"
        )


def _read_weights(name: str, path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    for filename in WEIGHT_FILES:
        file = path / filename
        if file.is_file():
            break
    else:
        raise AdapterError(f"adapter {name!r}: no {' or '.join(WEIGHT_FILES)} in {path}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return file, load_file(str(file))
        return file, torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means a corrupt file; we say which
        raise AdapterError(f"adapter {name!r}: cannot read {file} ({type(err).__name__}: {err}); "
                           "the file is corrupt or truncated, re-download or re-save it") from err


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_regex(where: str, key: str, text: str) -> None:
    try:
        re.compile(text)
    except re.error as err:
        raise AdapterError(f"{where} has {key} {text!r}, which is not a valid regular expression ({err})") from err


def _check_lora_fields(name: str, path: Path, config: dict) -> None:
    """The fields that say which modules an adapter targets, at what rank and scaling, hold what PEFT's LoraConfig
    expects (target_modules, exclude_modules, r, rank_pattern, lora_alpha, alpha_pattern, use_rslora)."""
    where = f"adapter {name!r} ({path / CONFIG_FILE})"
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key)
        if isinstance(value, str):
            _check_regex(where, key, value)
        elif value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise AdapterError(f"{where} has {key}={value!r}; {key} must be a list of module names or a regex string")
    if "r" in config and not _is_rank(config["r"]):
        raise AdapterError(f"{where} has r={config['r']!r}; r (the LoRA rank) must be an integer >= 1")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise AdapterError(f"{where} has lora_alpha={config['lora_alpha']!r}; lora_alpha must be a number")
    if "use_rslora" in config and not isinstance(config["use_rslora"], bool):
        raise AdapterError(f"{where} has use_rslora={config['use_rslora']!r}; use_rslora must be true or false")
    for key, valid, what in (("rank_pattern", _is_rank, "an integer >= 1"), ("alpha_pattern", _is_number, "a number")):
        pattern = config.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise AdapterError(f"{where} has {key}={pattern!r}; {key} must map module names or patterns to values")
        for module, value in pattern.items():
            _check_regex(where, f"{key} key", module)
            if not valid(value):
                raise AdapterError(f"{where} has {key}[{module!r}]={value!r}; each value must be {what}")


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rule for rank_pattern/alpha_pattern: the first key that matches the end of the module's name."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(list(pattern), module), default)


def _declared_rank(config: dict, module: str) -> int:
    return _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))


def _targets(config: dict, module: str) -> bool:
    """Whether PEFT, given this config, would put a LoRA on ``module`` (target_modules as a list of names or name
    suffixes, or a regex string; exclude_modules and layers_to_transform as PEFT applies them)."""
    if config.get("target_modules") is None or config.get("target_modules") == "all-linear":
        # PEFT picks the modules itself then (from the model type, or every linear layer); nothing to check against.
        return True
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    fields = ("target_modules", "exclude_modules", "modules_to_save", "target_parameters", "layers_to_transform",
              "layers_pattern")
    return bool(check_target_module_exists(SimpleNamespace(**{f: config.get(f) for f in fields}), module))


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_adapter(name: str, path: Path, linears: dict[str, nn.Linear]) -> AdapterInfo:
    """Read one adapter and check it against the base model's linear layers."""
    config_file = path / CONFIG_FILE
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"adapter {name!r}: cannot parse {config_file}: {err}") from err
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {config_file} does not hold a JSON object")
    _check_config(name, path, config)
    _check_lora_fields(name, path, config)
    target_modules = config.get("target_modules")
    file, tensors = _read_weights(name, path)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterError(
                f"adapter {name!r}: {file} holds {key!r}, which is not a LoRA A/B weight (embedding "
                "LoRA, DoRA magnitudes and extra trained modules are not supported)"
            )
        halves.setdefault(match["module"], {})[match["ab"]] = tensor
    if not halves:
        raise AdapterError(f"adapter {name!r}: {file} holds no LoRA weights")
    weights, scaling = {}, {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: {file} has lora_{'A' if 'A' in pair else 'B'} but not "
                               f"its partner for module {module!r}")
        if module not in linears:
            raise AdapterError(
                f"adapter {name!r} targets {module!r}, which is not a linear layer of the base model; "
                "was it trained for another base model?"
            )
        a, b = pair["A"], pair["B"]
        if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            raise AdapterError(
                f"adapter {name!r}, module {module!r}: {file} holds lora_A as {a.dtype} and lora_B as {b.dtype}; "
                "LoRA weights must be floating point (quantized or integer files are not supported), re-save it "
                "in float32, bfloat16 or float16"
            )
        linear = linears[module]
        if (a.dim() != 2 or b.dim() != 2 or a.shape[1] != linear.in_features
                or b.shape[0] != linear.out_features):
            raise AdapterError(
                f"adapter {name!r}, module {module!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                f"fit the base layer ({linear.in_features} -> {linear.out_features}); expected A [r, "
                f"{linear.in_features}] and B [{linear.out_features}, r]: the adapter belongs to another model"
            )
        r = a.shape[0]
        if b.shape[1] != r:
            raise AdapterError(
                f"adapter {name!r}, module {module!r}: {file} holds lora_A of rank {r} {tuple(a.shape)} but "
                f"lora_B of rank {b.shape[1]} {tuple(b.shape)}; A and B must share one rank, the file is "
                "inconsistent: re-save the adapter"
            )
        if r == 0:
            raise AdapterError(f"adapter {name!r}, module {module!r}: {file} holds rank-0 LoRA weights (empty A and "
                               "B); the rank must be >= 1, re-save the adapter or remove the module")
        declared = _declared_rank(config, module)
        if r != declared:
            raise AdapterError(
                f"adapter {name!r}, module {module!r}: {file} holds rank-{r} weights but {config_file} declares "
                f"rank {declared} (r / rank_pattern); the config does not belong to these weights, re-save the "
                "adapter with PEFT"
            )
        if not _targets(config, module):
            raise AdapterError(
                f"adapter {name!r}: {file} holds weights for {module!r}, which {config_file} does not target "
                f"(target_modules={target_modules!r}); the config does not belong to these weights, re-save the "
                "adapter with PEFT"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"adapter {name!r}, module {module!r}: {file} holds NaN or Inf weights")
        weights[module] = (a, b)
        scaling[module] = _scaling(config, module, r)
    return AdapterInfo(name, path, config, weights, scaling)


def stack_adapters(
    infos: list[AdapterInfo], linears: dict[str, nn.Linear], device: torch.device, dtype: torch.dtype,
    compact: bool = True,
) -> dict[str, ModuleStack]:
    """Stack per module, zero-padding ranks and absent modules. Module order follows the model.

    ``dtype`` is the compute dtype; with ``compact`` a module whose files all hold one dtype that widens exactly to it
    is stored in that dtype."""
    used = {m for info in infos for m in info.weights}
    stacks = {}
    n = len(infos)
    for module in (m for m in linears if m in used):
        linear = linears[module]
        r_max = max(info.weights[module][0].shape[0] for info in infos if module in info.weights)
        stored = dtype
        if compact:
            found = {t.dtype for info in infos if module in info.weights for t in info.weights[module]}
            if len(found) == 1 and widens_exactly(next(iter(found)), dtype):
                stored = found.pop()
        a = torch.zeros(n, r_max, linear.in_features, dtype=stored)
        bt = torch.zeros(n, r_max, linear.out_features, dtype=stored)
        s = torch.zeros(n, dtype=torch.float32)
        present = torch.zeros(n, dtype=torch.bool)
        for i, info in enumerate(infos):
            if module in info.weights:
                ai, bi = info.weights[module]
                r = ai.shape[0]
                a[i, :r] = ai
                bt[i, :r] = bi.t()
                s[i] = info.scaling[module]
                present[i] = True
        stacks[module] = ModuleStack(a.to(device), bt.to(device), s.to(device), dtype, present.to(device))
    return stacks
