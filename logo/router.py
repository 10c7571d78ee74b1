"""LoGo routing: probe the base model, score every adapter, select the top-k and weight them.

Defaults reproduce the official code: the signal is the residual stream entering the last decoder
layer (``hidden_states[L-1]``, before the layer's norm), at each row's last prompt token, projected
through every adapter's ``q_proj`` LoRA: ``o_i = scaling_i * B_i A_i h``.
``norm`` scores ``||o_i||_2``; ``entropy`` scores ``1 / (H(softmax(o_i)) + 1e-6)`` with
``H = -sum p log(p + 1e-8)``; an adapter that does not train the signal module scores 0 under both. Weights are
``s_i / sum_{j in top-k} s_j`` (equal, ``1 / k``, where that sum is 0).

Beyond the paper (all off by default): the signal can pool evidence over several layers and modules
(``layers``, ``modules``: the calibrated scores of every (layer, module) are summed), scores can be
calibrated per adapter (``mean``, ``zscore``, ``weight-norm``; see :mod:`logo.calibration`), and the router
can abstain to the base model when it is not confident (``abstain``: the top score, or the top-1/top-2
margin, below ``abstain_below``), read from the routing scores or from a signal of its own
(``abstain_signal``: the signal that best tells prompts of no adapter's task apart need not be the one
that best tells the adapters apart).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch import nn

from logo.calibration import calibrate_scores, score_statistics, statistics_for
from logo.errors import LogoError, json_kind
from logo.library import AdapterLibrary

STRATEGIES = ("norm", "entropy")
POSITIONS = ("last", "mean")
WEIGHTINGS = ("normalize", "softmax")
CALIBRATIONS = ("none", "mean", "zscore", "weight-norm")
ABSTAIN_RULES = ("none", "top", "margin")
STATISTICS = ("default", "fit")


def signal_key(strategy: str, layer: int, module: str, post_norm: bool, position: str, statistics: str,
               num_layers: int) -> str:
    """Identifies one signal (for calibration statistics): strategy, layer, module, input, position, source."""
    key = (f"{strategy}|layer={layer % num_layers}|module={module}|post_norm={post_norm}|position={position}")
    return key if statistics == "default" else f"{key}|statistics={statistics}"


@dataclass(frozen=True)
class AbstainSignal:
    """The single signal an abstain rule reads when it is not the routing signal (a fitted router's choice).

    Its calibration statistics are the router file's own (``statistics="fit"``)."""

    layer: int
    """Negative from the end, like :attr:`RouterConfig.layer`."""
    module: str
    post_norm: bool
    position: str
    strategy: str
    calibration: str

    def __post_init__(self) -> None:
        for value, allowed, what in ((self.strategy, STRATEGIES, "abstain signal strategy"),
                                     (self.position, POSITIONS, "abstain signal position"),
                                     (self.calibration, CALIBRATIONS, "abstain signal calibration")):
            if value not in allowed:
                raise LogoError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")

    def key(self, num_layers: int) -> str:
        return signal_key(self.strategy, self.layer, self.module, self.post_norm, self.position,
                          "default" if self.calibration in ("none", "weight-norm") else "fit", num_layers)

    def describe(self) -> str:
        return (f"layer {self.layer}, {self.module}, {'post-norm' if self.post_norm else 'residual'}, "
                f"{self.position}, {self.strategy}, {self.calibration}")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _array_of(check):
    return lambda value: isinstance(value, (list, tuple)) and all(check(x) for x in value)


_TEXT = (lambda v: isinstance(v, str), "a string")
_FIELD_TYPES = {
    "strategy": _TEXT, "k": (_integer, "an integer"), "layer": (_integer, "an integer"), "module": _TEXT,
    "post_norm": (lambda v: isinstance(v, bool), "true or false"), "position": _TEXT, "weighting": _TEXT,
    "temperature": (_number, "a finite number"), "calibration": _TEXT,
    "layers": (_array_of(_integer), "null or an array of integers"),
    "modules": (_array_of(lambda v: isinstance(v, str)), "null or an array of strings"), "statistics": _TEXT,
    "abstain": _TEXT, "abstain_below": (_number, "a finite number"),
    "abstain_signal": (lambda v: isinstance(v, (dict, AbstainSignal)), "null or an object"),
}
_NULLABLE = ("layers", "modules", "abstain_signal")


def check_field_types(values: dict, where: str) -> None:
    """Every router (and abstain signal) field of ``values`` has its type (integers not bools, finite numbers),
    else one line naming ``where`` and the field."""
    checks = [(name, value, *_FIELD_TYPES[name]) for name, value in values.items()
              if name in _FIELD_TYPES and not (value is None and name in _NULLABLE)]
    own = values.get("abstain_signal")
    if isinstance(own, dict):  # its fields' names are checked on construction
        own_fields = {f.name for f in fields(AbstainSignal)}
        checks += [(f"abstain_signal.{name}", value, *_FIELD_TYPES[name]) for name, value in own.items()
                   if name in own_fields]
    for name, value, check, wanted in checks:
        if not check(value):
            raise LogoError(f"{where}: field {name!r} must be {wanted}, got {json_kind(value)}")


@dataclass
class RouterConfig:
    """How to probe, score and select. The defaults are the official LoGo settings."""

    strategy: str = "norm"
    k: int = 20
    layer: int = -1
    """Signal layer index; negative counts from the end (-1 = last decoder layer)."""
    module: str = "q_proj"
    post_norm: bool = False
    """Use the module's real input (after the layer's input norm) instead of the residual stream."""
    position: str = "last"
    weighting: str = "normalize"
    temperature: float = 1.0
    calibration: str = "none"
    layers: tuple[int, ...] | None = None
    """Several signal layers (negative from the end) whose calibrated scores are summed; None: ``layer`` alone."""
    modules: tuple[str, ...] | None = None
    """Several signal modules per layer whose calibrated scores are summed; None: ``module`` alone. With
    ``post_norm`` they must share their input (e.g. q_proj, k_proj, v_proj)."""
    statistics: str = "default"
    """Where ``mean``/``zscore`` statistics come from: ``default`` (`logo calibrate`, stored with the library)
    or ``fit`` (a fitted router file's own, computed on its fit prompts)."""
    abstain: str = "none"
    """``none`` | ``top`` (the top calibrated score) | ``margin`` (top-1 minus top-2): below ``abstain_below``
    the prompt runs on the base model (an empty selection)."""
    abstain_below: float = 0.0
    abstain_signal: AbstainSignal | None = None
    """The signal ``abstain`` reads; None: the routing scores."""

    def __post_init__(self) -> None:
        check_field_types({f.name: getattr(self, f.name) for f in fields(self)}, "RouterConfig")
        for value, allowed, what in (
            (self.strategy, STRATEGIES, "selection strategy"),
            (self.position, POSITIONS, "token position"),
            (self.weighting, WEIGHTINGS, "weighting"),
            (self.calibration, CALIBRATIONS, "calibration"),
            (self.abstain, ABSTAIN_RULES, "abstain rule"),
            (self.statistics, STATISTICS, "statistics source"),
        ):
            if value not in allowed:
                raise LogoError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        if self.k < 1:
            raise LogoError(f"k (--n-selected-modules) must be at least 1, got {self.k}")
        if self.temperature <= 0:
            raise LogoError(f"temperature must be positive, got {self.temperature}")
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
            if not self.layers:
                raise LogoError("layers is empty; give at least one signal layer (or none for the single layer)")
        if self.modules is not None:
            self.modules = tuple(str(x) for x in self.modules)
            if not self.modules:
                raise LogoError("modules is empty; give at least one signal module (or none for the single module)")
        if self.calibration == "zscore" and self.weighting == "normalize" and self.k > 1:
            raise LogoError("z-scores can be negative, so k > 1 with --calibration zscore needs --weighting softmax")
        if isinstance(self.abstain_signal, dict):
            known = {f.name for f in fields(AbstainSignal)}
            unknown = sorted(set(self.abstain_signal) - known)
            missing = sorted(known - set(self.abstain_signal))
            if unknown or missing:
                wrong = (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else "")
                raise LogoError(f"abstain_signal needs the fields {', '.join(sorted(known))}{wrong}")
            self.abstain_signal = AbstainSignal(**self.abstain_signal)
        if self.abstain == "margin" and self.abstain_below < 0:
            raise LogoError(f"an abstain margin cannot be negative, got {self.abstain_below}")

    @property
    def signal_layers(self) -> tuple[int, ...]:
        return self.layers if self.layers is not None else (self.layer,)

    @property
    def signal_modules(self) -> tuple[str, ...]:
        return self.modules if self.modules is not None else (self.module,)

    @property
    def pooled(self) -> bool:
        """True when the signal sums evidence from more than one (layer, module)."""
        return len(self.signal_layers) * len(self.signal_modules) > 1

    def signal_key(self, num_layers: int, layer: int | None = None, module: str | None = None) -> str:
        """Identifies one signal (for calibration statistics): strategy, layer, module, input, position, source."""
        return signal_key(self.strategy, self.layer if layer is None else layer, module or self.module,
                          self.post_norm, self.position, self.statistics, num_layers)

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("layers", "modules"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "router config") -> RouterConfig:
        """The inverse of :meth:`to_dict` (JSON values): unknown keys are refused (a typo must not be ignored),
        ``k`` is required (the library's size decides it; the official 20 is no safe guess), the other fields
        left out take the official router's values, and every field must have its JSON type. Each error is one
        line that names ``where`` and the field."""

        if not isinstance(data, dict):
            raise LogoError(f"{where} must be a JSON object, got {json_kind(data)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LogoError(f"{where} has unknown field(s) {unknown}; known: {', '.join(sorted(known))}")
        if "k" not in data:
            raise LogoError(f"{where} lacks the field 'k' (how many adapters to select)")
        check_field_types(data, where)
        try:
            return cls(**data)
        except LogoError as err:
            raise LogoError(f"{where}: {err}") from None


@dataclass
class Selection:
    """A mixture for one prompt: adapter indices (descending score) and their weights."""

    indices: list[int]
    weights: list[float]


@dataclass
class Route(Selection):
    """A LoGo routing decision for one prompt."""

    names: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    """Scores of the selected adapters (calibrated if calibration is on), descending."""
    all_scores: list[float] = field(default_factory=list)
    """The raw score of every adapter in the library (the official ``metric_dict``; summed over the signals
    of a pooled router)."""
    abstained: bool = False
    """True when the confidence rule sent the prompt to the base model (``indices`` is then empty)."""
    strategy: str = ""
    """The scoring strategy behind ``all_scores`` (``norm`` | ``entropy``)."""


class _StopProbe(Exception):
    """Raised inside the forward pass once the signal is captured, so later layers never run."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (``model.model.layers`` for Llama/Qwen2/Mistral/DeepSeek)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return module
    raise LogoError(f"cannot find the decoder layers of {type(model).__name__}")


def signal_module_name(model: nn.Module, config: RouterConfig) -> str:
    """Full module name of the signal module, e.g. ``model.layers.31.self_attn.q_proj``."""
    layers = decoder_layers(model)
    n = len(layers)
    if not -n <= config.layer < n:
        raise LogoError(f"signal layer {config.layer} is out of range for a model with {n} layers")
    layer_idx = config.layer % n
    prefix = next(name for name, m in model.named_modules() if m is layers)
    layer_name = f"{prefix}.{layer_idx}"
    matches = [
        name
        for name, _ in layers[layer_idx].named_modules()
        if name == config.module or name.endswith("." + config.module)
    ]
    if len(matches) != 1:
        raise LogoError(
            f"signal module {config.module!r} matches {len(matches)} modules in layer {layer_idx} "
            f"({matches}); give a more specific name"
        )
    return f"{layer_name}.{matches[0]}"


@dataclass(frozen=True)
class SignalPoint:
    """Where a signal vector is read: a decoder layer (non-negative index), which input, which token(s)."""

    layer: int
    post_norm: bool = False
    """False: the residual stream entering the layer; True: the signal module's real input (after the norm)."""
    position: str = "last"
    """``last``: each row's last attended token (any padding side); ``mean``: the mean over attended tokens."""


@torch.no_grad()
def probe_points(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, points: list[SignalPoint],
                 module: str = "q_proj") -> dict[SignalPoint, torch.Tensor]:
    """Signal vectors ``[B, d_in]`` (fp32) at every point, from one forward pass of the base model that stops
    once the deepest point is read (no later layer and no ``lm_head`` runs).

    A post-norm point reads the input of ``module`` in its layer, so no norm is assumed by name. The caller
    makes sure no adapter is active (the engine suspends its mixture around this call).
    """
    if not points:
        raise LogoError("no signal points to probe")
    layers = decoder_layers(model)
    targets: dict[tuple[int, bool], nn.Module] = {}
    for point in points:
        if point.position not in POSITIONS:
            raise LogoError(f"unknown token position {point.position!r}; choose one of {', '.join(POSITIONS)}")
        if not 0 <= point.layer < len(layers):
            raise LogoError(f"signal layer {point.layer} is out of range for a model with {len(layers)} layers")
        key = (point.layer, point.post_norm)
        if key not in targets:
            config = RouterConfig(layer=point.layer, module=module, post_norm=point.post_norm)
            name = signal_module_name(model, config)
            targets[key] = dict(model.named_modules())[name] if point.post_norm else layers[point.layer]
    captured: dict[tuple[int, bool], torch.Tensor] = {}

    def grabber(key: tuple[int, bool]):
        def grab(_module, args, kwargs):
            captured[key] = args[0] if args else kwargs["hidden_states"]
            if len(captured) == len(targets):
                raise _StopProbe

        return grab

    handles = [target.register_forward_pre_hook(grabber(key), with_kwargs=True) for key, target in targets.items()]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopProbe:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != len(targets):
        raise LogoError("the probe did not reach the signal layer; is this a decoder-only causal LM?")
    return {point: pool(captured[(point.layer, point.post_norm)], attention_mask, point.position) for point in points}


_SAME_INPUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per model, ``(probed, module) -> bool`` from :func:`differing_inputs` (a fact of the architecture), so a router
built again on the same model (``with_router``, a server's per-request check) runs no layer."""


def differing_inputs(model: nn.Module, layer: int, probed: str, modules: list[str]) -> list[str]:
    """The ones of ``modules`` (full names, in decoder layer ``layer``) whose input is not ``probed``'s input.

    Decided by running the layer, not by names: a post-norm probe reads ``probed``'s input and feeds it to every
    module's adapters, which scores a module correctly only if that vector is its input too (``q_proj``,
    ``k_proj`` and ``v_proj`` read the same normed state; ``up_proj`` reads the state after attention)."""
    known = _SAME_INPUT.setdefault(model, {})
    unknown = [m for m in modules if m != probed and (probed, m) not in known]
    if unknown:
        inputs = layer_inputs(model, layer, [probed, *unknown])
        for m in unknown:
            here, there = inputs[probed], inputs[m]
            known[(probed, m)] = here.shape == there.shape and torch.allclose(here.float(), there.float())
    return [m for m in modules if m != probed and not known[(probed, m)]]


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: int, names: list[str]) -> dict[str, torch.Tensor]:
    """The inputs modules ``names`` (full names, in decoder layer ``layer``) receive when that layer alone runs on a
    seeded random hidden state ``[1, 2, hidden]``; its other arguments (rotary embeddings, mask, positions) are those
    the model passes its first layer for two tokens. The layer stops once every input is captured."""
    layers = decoder_layers(model)
    args, kwargs = _first_layer_call(model, layers[0])
    hidden = args[0] if args else kwargs["hidden_states"]
    generator = torch.Generator().manual_seed(0)
    state = torch.randn(hidden.shape, generator=generator).to(hidden.device, hidden.dtype)
    args, kwargs = ((state, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": state})
    named = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}

    def grabber(name: str):
        def grab(_module, module_args, module_kwargs):
            captured[name] = module_args[0] if module_args else next(iter(module_kwargs.values()))
            if len(captured) == len(names):
                raise _StopProbe

        return grab

    handles = [named[name].register_forward_pre_hook(grabber(name), with_kwargs=True) for name in dict.fromkeys(names)]
    try:
        layers[layer](*args, **kwargs)
    except _StopProbe:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in captured]
    if missing:
        raise LogoError(f"decoder layer {layer} never called {missing}; choose signal modules that the layer runs")
    return captured


def _first_layer_call(model: nn.Module, first: nn.Module) -> tuple[tuple, dict]:
    """The positional and keyword arguments the model passes its first decoder layer for two tokens (the layer
    itself does not run)."""
    call: dict[str, object] = {}

    def grab(_module, args, kwargs):
        call["args"], call["kwargs"] = args, kwargs
        raise _StopProbe

    device = model.get_input_embeddings().weight.device
    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    except _StopProbe:
        pass
    finally:
        handle.remove()
    if not call:
        raise LogoError("the model never called its first decoder layer; is this a decoder-only causal LM?")
    return call["args"], call["kwargs"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, position: str) -> torch.Tensor:
    """``hidden [B, T, d]`` to one fp32 vector per row: the last attended token, or the mean over attended ones."""
    hidden = hidden.float()
    mask = attention_mask.to(hidden.dtype)
    if position == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (attention_mask.long() * (positions + 1)).argmax(dim=1)  # last attended token, any padding side
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def entropy(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    probs = torch.softmax(x, dim=dim)
    return -(probs * torch.log(probs + eps)).sum(dim=dim)


def adapter_outputs(h: torch.Tensor, library: AdapterLibrary, module: str) -> torch.Tensor:
    """``o[b, i] = scaling_i * B_i A_i h_b`` for every row and adapter, fp32 ``[B, N, d_out]``."""
    if module not in library.stacks:
        raise LogoError(
            f"no adapter in the library targets the signal module {module!r}; choose a module the adapters "
            f"train (they target e.g. {library.modules[:3]})"
        )
    stack = library.stacks[module]
    if h.shape[-1] != stack.in_features:
        raise LogoError(f"signal vectors of width {h.shape[-1]} cannot be fed to the adapters of {module}, whose "
                        f"input width is {stack.in_features}; choose a signal module whose input is the probed vector")
    a, b = stack.float_factors()
    low = torch.einsum("bd,nrd->bnr", h.to(a.device), a)
    return torch.einsum("bnr,nor->bno", low, b) * stack.scaling[None, :, None]


def score(h: torch.Tensor, library: AdapterLibrary, module: str, strategy: str) -> torch.Tensor:
    """Raw LoGo scores ``[B, N]`` for signal vectors ``h [B, d_in]``.

    An adapter that does not train ``module`` scores 0 under every strategy: its output there is the zero padding
    of the stack, no evidence for it (``entropy`` would otherwise score that zero vector ``1 / log d``)."""
    outputs = adapter_outputs(h, library, module)
    if strategy == "norm":
        raw = outputs.norm(dim=-1)
    else:
        raw = 1.0 / (entropy(outputs, dim=-1) + 1e-6)
    present = library.stacks[module].present.to(raw.device)
    return torch.where(present, raw, torch.zeros_like(raw))


def trains_any(library: AdapterLibrary, modules: list[str]) -> torch.Tensor:
    """``[N]`` bool: which adapters of ``library`` train at least one of ``modules`` (full names)."""
    return torch.stack([library.stacks[module].present.cpu() for module in modules]).any(0)


def ranked(scores: torch.Tensor, eligible: torch.Tensor | None) -> torch.Tensor:
    """Calibrated scores ``[B, N]`` as they are ranked: an adapter ``eligible`` (``[N]`` bool) leaves out, one that
    trains none of the signal's modules, is ``-inf``. Its score (0, no evidence) could otherwise outrank adapters
    that do answer, since calibrated scores can be negative (z-scores). For ranking and confidence only; weights
    are taken from the scores themselves (:func:`select`)."""
    if eligible is None:
        return scores
    return torch.where(eligible.to(scores.device), scores, torch.full_like(scores, float("-inf")))


def confidence(scores: torch.Tensor, rule: str) -> torch.Tensor:
    """Per-row confidence ``[B]`` of calibrated scores ``[B, N]`` (:func:`ranked`): the top score, or the
    top-1/top-2 margin (``inf`` with a single eligible adapter, as with a single adapter)."""
    if rule == "margin":
        if scores.shape[-1] < 2:
            return torch.full(scores.shape[:-1], float("inf"), device=scores.device)
        top2 = torch.topk(scores, 2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return scores.max(dim=-1).values


def check_k(k: int, n: int, flag: str = "--n-selected-modules", holder: str = "the library") -> int:
    """k adapters out of n: the one check of that range, for every caller (``flag`` names the user's option)."""
    if not 1 <= k <= n:
        raise LogoError(f"k={k} adapters requested but {holder} holds {n}; choose 1 <= k <= {n} "
                        f"({flag} must be between 1 and {n})")
    return k


def select(scores: torch.Tensor, k: int, weighting: str = "normalize", temperature: float = 1.0,
           eligible: torch.Tensor | None = None):
    """Top-k per row and their weights. Returns ``(top_scores, indices, weights)``, each ``[B, k]``.

    ``normalize`` weighs ``s_i / sum_j s_j`` over the top-k. Where that sum is 0 (every selected adapter scored 0,
    e.g. none of them trains the signal module) the ratio is undefined, and the selected adapters get equal weights
    ``1 / k`` (its value for any equal scores), so that no weight is NaN.

    ``eligible`` (``[N]`` bool) ranks the adapters it leaves out below every other one whatever their scores (a
    z-score can be negative, so an adapter without evidence, scored 0, would otherwise outrank the ones below their
    mean); they are selected only when k exceeds the eligible adapters, and weigh 0 (their scores are 0, and the
    softmax reads them as ``-inf``)."""
    check_k(k, scores.shape[-1])
    order = ranked(scores, eligible)
    idx = torch.topk(order, k=k, dim=-1).indices
    top = scores.gather(-1, idx)
    if weighting == "softmax":
        weights = torch.softmax(order.gather(-1, idx) / temperature, dim=-1)
    else:
        total = top.sum(dim=-1, keepdim=True)
        zero = total == 0
        ratio = top / torch.where(zero, torch.ones_like(total), total)
        weights = torch.where(zero, torch.full_like(top, 1.0 / k), ratio)
    return top, idx, weights


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream (the hidden state a residual signal probes): the config's ``hidden_size``,
    or, for a model whose config does not name it, its input embeddings' width."""
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    return size if _integer(size) else model.get_input_embeddings().embedding_dim


@dataclass(frozen=True)
class Signal:
    """One (layer, module) a router reads: where the vector is probed, the full module name, the statistics key."""

    point: SignalPoint
    module: str
    key: str


class Router:
    """A :class:`RouterConfig` bound to a model and an adapter library: probe, score, calibrate, select.

    Construction checks everything the config cannot check alone (k against the library size, the signal
    layers against the model, the signal modules against the adapters), so a Router that exists can route.
    It never touches adapters in the model: whoever holds a mixture suspends it around :meth:`route`.
    """

    def __init__(self, model: nn.Module, library: AdapterLibrary, config: RouterConfig | None = None) -> None:
        self.model, self.library = model, library
        self.config = config or RouterConfig()
        check_k(self.config.k, len(library))
        self.num_layers = len(decoder_layers(model))
        signals = []
        for layer in self.config.signal_layers:
            for module in self.config.signal_modules:
                name = signal_module_name(model, replace(self.config, layer=layer, module=module))
                if name not in library.stacks:
                    raise LogoError(
                        f"no adapter targets the signal module {name}; pick --signal-module/--signal-layer "
                        f"among the adapters' modules (e.g. {library.modules[:2]})"
                    )
                point = SignalPoint(layer % self.num_layers, self.config.post_norm, self.config.position)
                signals.append(Signal(point, name, self.config.signal_key(self.num_layers, layer, module)))
                self._check_width(signals[-1], module)
        self.signals: list[Signal] = signals
        self.signal_module = signals[0].module
        self.eligible = trains_any(library, [s.module for s in signals])
        """``[N]`` bool: the adapters that train one of the signal modules (the others rank last: :func:`ranked`)."""
        self.abstain_signal: Signal | None = None
        """The signal the abstain rule reads when it has its own (``config.abstain_signal``)."""
        own = self.config.abstain_signal
        if own is not None and self.config.abstain != "none":
            name = signal_module_name(model, replace(self.config, layer=own.layer, module=own.module))
            if name not in library.stacks:
                raise LogoError(f"no adapter targets the abstain signal's module {name}; fit the router again")
            point = SignalPoint(own.layer % self.num_layers, own.post_norm, own.position)
            self.abstain_signal = Signal(point, name, own.key(self.num_layers))
            self._check_width(self.abstain_signal, own.module, abstain=True)
        self._check_inputs()

    def _check_width(self, signal: Signal, module: str, abstain: bool = False) -> None:
        """The vector probed for ``signal`` must fit its module's adapters (``o = B A h`` needs ``h`` of their input
        width): the residual stream has the model's hidden size; a post-norm probe reads the input of the first
        signal module in that layer, which every pooled module must share."""
        d_in = self.library.stacks[signal.module].in_features
        if signal.point.post_norm:
            probed = self._probed_module(signal.point.layer)
            width = dict(self.model.named_modules())[probed].in_features
            if d_in == width:
                return
            if abstain:
                raise LogoError(f"the abstain signal's module {signal.module} takes inputs of width {d_in}, but its "
                                f"post-norm probe reads the input of {probed} (width {width}); fit the router again")
            raise LogoError(f"post-norm signal modules must share their input, but {probed} takes inputs of width "
                            f"{width} and {signal.module} of width {d_in}; pool modules that read the same input "
                            "(e.g. q_proj, k_proj, v_proj)")
        hidden = hidden_size(self.model)
        if d_in == hidden:
            return
        if abstain:
            raise LogoError(f"the abstain signal's module {signal.module} takes inputs of width {d_in}, not the "
                            f"model's hidden size {hidden}, so the probed hidden state cannot be fed to it; fit the "
                            "router again")
        fitting = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, stack in self.library.stacks.items()
                                     if stack.in_features == hidden))
        choose = (f"choose a --signal-module whose input is the hidden state ({', '.join(fitting)} in this library)"
                  if fitting else "no module the adapters train takes the hidden state")
        raise LogoError(f"signal module {module!r} ({signal.module}) takes inputs of width {d_in}, not the model's "
                        f"hidden size {hidden}, so the probed hidden state cannot be fed to it; {choose}, or read "
                        f"{module}'s own input with --post-norm")

    def _probed_module(self, layer: int) -> str:
        """The module whose input a post-norm probe reads in ``layer``: the first signal module there (see
        :func:`probe_points`, which every post-norm signal of the layer, the abstain signal's included, shares)."""
        first = self.config.signal_modules[0]
        return signal_module_name(self.model, replace(self.config, layer=layer, module=first))

    def _check_inputs(self) -> None:
        """Every post-norm signal (and a post-norm abstain signal) must be scored on its own module's input: the
        probe reads the first signal module's input in each layer, so a module that reads another one (``up_proj``
        beside ``q_proj``: the state after attention) is refused rather than scored on the wrong vector. Widths
        alone cannot tell (:meth:`_check_width` has run); one run of the layer does (:func:`differing_inputs`)."""
        own = [self.abstain_signal] if self.abstain_signal is not None else []
        by_layer: dict[int, list[Signal]] = {}
        for signal in self.signals + own:
            if signal.point.post_norm:
                by_layer.setdefault(signal.point.layer, []).append(signal)
        for layer, signals in by_layer.items():
            probed = self._probed_module(layer)
            differing = differing_inputs(self.model, layer, probed, [signal.module for signal in signals])
            signal = next((signal for signal in signals if signal.module in differing), None)
            if signal is None:
                continue
            if signal is self.abstain_signal:
                raise LogoError(f"the abstain signal's module {signal.module} does not take the input of {probed}, "
                                "which its post-norm probe reads; fit the router again")
            raise LogoError(f"post-norm signal module {signal.module} does not take the input of {probed}, which "
                            "the post-norm probe reads, so its adapters would be scored on another module's input; "
                            "pool modules that read the same input (e.g. q_proj, k_proj, v_proj), or drop post-norm")

    @property
    def point(self) -> SignalPoint:
        """Where this router reads its (first) signal."""
        return self.signals[0].point

    @property
    def points(self) -> list[SignalPoint]:
        """Every distinct point this router reads (one per layer, and the abstain signal's)."""
        extra = [self.abstain_signal.point] if self.abstain_signal is not None else []
        return list(dict.fromkeys([s.point for s in self.signals] + extra))

    @property
    def signal_key(self) -> str:
        """The key of the (first) signal's calibration statistics (see :meth:`RouterConfig.signal_key`)."""
        return self.signals[0].key

    def probe(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The (first) signal vector of every row, ``[B, d_in]`` fp32 (no adapter may be active)."""
        return self.probe_all(input_ids, attention_mask)[self.point]

    def probe_all(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[SignalPoint, torch.Tensor]:
        """The signal vectors at every point this router reads, from one forward pass (no adapter may be active)."""
        return probe_points(self.model, input_ids, attention_mask, self.points, self.config.signal_modules[0])

    def raw_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Raw LoGo scores ``[B, N]`` of the (first) signal for signal vectors ``h [B, d_in]``."""
        return score(h, self.library, self.signal_module, self.config.strategy)

    def signal_scores(self, found: dict[SignalPoint, torch.Tensor]) -> torch.Tensor:
        """Raw scores ``[B, S, N]`` of every signal (layer, module) from the probed vectors."""
        return torch.stack([score(found[s.point], self.library, s.module, self.config.strategy)
                            for s in self.signals], dim=1)

    def calibrated(self, raw: torch.Tensor) -> torch.Tensor:
        """Calibrated scores ``[B, N]``: each signal's raw scores (``[B, N]`` for one signal, ``[B, S, N]`` for
        several) calibrated with its own per-adapter statistics, summed over the signals."""
        per_signal = raw[:, None] if raw.dim() == 2 else raw
        if per_signal.shape[1] != len(self.signals):
            raise LogoError(f"{per_signal.shape[1]} signals' scores given for a router that reads {len(self.signals)}")
        total = torch.zeros_like(per_signal[:, 0])
        for j, signal in enumerate(self.signals):
            total = total + calibrate_scores(per_signal[:, j], self.library, self.config.calibration, signal.module,
                                             signal.key, self.num_layers)
        return total

    def check_statistics(self) -> None:
        """Raise (saying how to compute them) where the calibration statistics that routing will read are missing:
        each signal's, and the abstain signal's. Construction does not ask for them, since ``logo calibrate``
        builds a router to compute them; a server checks a requested router with this before queueing."""
        needs = [(self.config.calibration, s.key) for s in self.signals]
        if self.abstain_signal is not None:
            needs.append((self.config.abstain_signal.calibration, self.abstain_signal.key))
        for calibration, key in needs:
            if calibration in ("mean", "zscore"):
                statistics_for(self.library, calibration, key, len(self.library), self.num_layers)

    def abstain_confidence(self, found: dict[SignalPoint, torch.Tensor]) -> torch.Tensor:
        """Per-row confidence ``[B]`` of the abstain rule on its own signal, from the probed vectors."""
        own, sig = self.config.abstain_signal, self.abstain_signal
        if sig is None:
            raise LogoError("this router's abstain rule reads the routing scores; it has no signal of its own")
        raw = score(found[sig.point], self.library, sig.module, own.strategy)
        scores = calibrate_scores(raw, self.library, own.calibration, sig.module, sig.key, self.num_layers)
        return confidence(ranked(scores, trains_any(self.library, [sig.module])), self.config.abstain)

    def routes(self, raw: torch.Tensor, abstain_confidence: torch.Tensor | None = None) -> list[Route]:
        """Top-k selections and weights from raw scores (``[B, N]``, or ``[B, S, N]`` per signal), calibrated
        first; rows whose confidence is below the abstain threshold get an empty selection (the base model).
        A router whose abstain rule has a signal of its own takes that signal's confidence
        (:meth:`abstain_confidence`)."""
        scores = self.calibrated(raw)
        summed_raw = raw if raw.dim() == 2 else raw.sum(1)
        top, idx, weights = select(scores, self.config.k, self.config.weighting, self.config.temperature,
                                   self.eligible)
        abstain = torch.zeros(raw.shape[0], dtype=torch.bool)
        if self.abstain_signal is not None:
            if abstain_confidence is None:
                raise LogoError("this router abstains on a signal of its own: pass abstain_confidence "
                                "(Router.route does)")
            abstain = (abstain_confidence < self.config.abstain_below).cpu()
        elif self.config.abstain != "none":
            abstain = (confidence(ranked(scores, self.eligible), self.config.abstain)
                       < self.config.abstain_below).cpu()
        routes = []
        for row in range(raw.shape[0]):
            if abstain[row]:
                routes.append(Route(indices=[], weights=[], all_scores=summed_raw[row].tolist(), abstained=True,
                                    strategy=self.config.strategy))
                continue
            indices = idx[row].tolist()
            routes.append(Route(indices=indices, weights=weights[row].tolist(),
                                names=[self.library.names[i] for i in indices], scores=top[row].tolist(),
                                all_scores=summed_raw[row].tolist(), strategy=self.config.strategy))
        return routes

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[Route]:
        """Probe, score, calibrate and select for one batch of token ids."""
        found = self.probe_all(input_ids, attention_mask)
        raw = self.raw_scores(found[self.point]) if len(self.signals) == 1 else self.signal_scores(found)
        return self.routes(raw, self.abstain_confidence(found) if self.abstain_signal is not None else None)

    def mean_statistics(self, h: torch.Tensor) -> torch.Tensor:
        """``mean`` calibration statistics from signal vectors of unlabeled prompts: each adapter's mean raw score."""
        return self.raw_scores(h).mean(0)

    def statistics(self, found: dict[SignalPoint, torch.Tensor]) -> dict[str, dict]:
        """Per-signal calibration statistics (mean and std of every adapter's raw score) from unlabeled prompts'
        signal vectors, keyed like the library's calibration entries."""
        raw = self.signal_scores(found)
        return {s.key: score_statistics(raw[:, j]) for j, s in enumerate(self.signals)}


def router_overrides(strategy: str | None = None, k: int | None = None, layer: int | None = None,
                     module: str | None = None, post_norm: bool | None = None, position: str | None = None,
                     weighting: str | None = None, temperature: float | None = None, calibration: str | None = None,
                     abstain: str | None = None, abstain_below: float | None = None) -> dict:
    """The router fields the flags set (the ones left out keep the fitted or official router's values)."""
    given = {"strategy": strategy, "k": k, "layer": layer, "module": module, "post_norm": post_norm,
             "position": position, "weighting": weighting, "temperature": temperature, "calibration": calibration,
             "abstain": abstain, "abstain_below": abstain_below}
    return {name: value for name, value in given.items() if value is not None}
