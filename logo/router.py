"""LoGo routing: probe the base model, score every adapter, select the top-k and weight them.

Defaults reproduce the official code: the signal is the residual stream entering the last decoder
layer (``hidden_states[L-1]``, before the layer's norm), at each row's last prompt token, projected
through every adapter's ``q_proj`` LoRA: ``o_i = scaling_i * B_i A_i h``.
``norm`` scores ``||o_i||_2``; ``entropy`` scores ``1 / (H(softmax(o_i)) + 1e-6)`` with
``H = -sum p log(p + 1e-8)``. Weights are ``s_i / sum_{j in top-k} s_j``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from logo.calibration import divisors
from logo.errors import LogoError
from logo.library import AdapterLibrary

STRATEGIES = ("norm", "entropy")
POSITIONS = ("last", "mean")
WEIGHTINGS = ("normalize", "softmax")
CALIBRATIONS = ("none", "mean", "weight-norm")


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

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.strategy, STRATEGIES, "selection strategy"),
            (self.position, POSITIONS, "token position"),
            (self.weighting, WEIGHTINGS, "weighting"),
            (self.calibration, CALIBRATIONS, "calibration"),
        ):
            if value not in allowed:
                raise LogoError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        if self.k < 1:
            raise LogoError(f"k (--n-selected-modules) must be at least 1, got {self.k}")
        if self.temperature <= 0:
            raise LogoError(f"temperature must be positive, got {self.temperature}")

    def signal_key(self, num_layers: int) -> str:
        """Identifies the signal (for calibration statistics): strategy, layer, module, input, position."""
        layer = self.layer % num_layers
        return f"{self.strategy}|layer={layer}|module={self.module}|post_norm={self.post_norm}|position={self.position}"

    def to_dict(self) -> dict:
        return asdict(self)


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
    """The raw score of every adapter in the library (the official ``metric_dict``)."""


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
    low = torch.einsum("bd,nrd->bnr", h.to(stack.A.device), stack.A.float())
    return torch.einsum("bnr,nor->bno", low, stack.B.float()) * stack.scaling[None, :, None]


def score(h: torch.Tensor, library: AdapterLibrary, module: str, strategy: str) -> torch.Tensor:
    """Raw LoGo scores ``[B, N]`` for signal vectors ``h [B, d_in]``."""
    outputs = adapter_outputs(h, library, module)
    if strategy == "norm":
        return outputs.norm(dim=-1)
    return 1.0 / (entropy(outputs, dim=-1) + 1e-6)


def check_k(k: int, n: int, flag: str = "--n-selected-modules", holder: str = "the library") -> int:
    """k adapters out of n: the one check of that range, for every caller (``flag`` names the user's option)."""
    if not 1 <= k <= n:
        raise LogoError(f"k={k} adapters requested but {holder} holds {n}; choose 1 <= k <= {n} "
                        f"({flag} must be between 1 and {n})")
    return k


def select(scores: torch.Tensor, k: int, weighting: str = "normalize", temperature: float = 1.0):
    """Top-k per row and their weights. Returns ``(top_scores, indices, weights)``, each ``[B, k]``."""
    check_k(k, scores.shape[-1])
    top, idx = torch.topk(scores, k=k, dim=-1)
    if weighting == "softmax":
        weights = torch.softmax(top / temperature, dim=-1)
    else:
        weights = top / top.sum(dim=-1, keepdim=True)
    return top, idx, weights


class Router:
    """A :class:`RouterConfig` bound to a model and an adapter library: probe, score, calibrate, select.

    Construction checks everything the config cannot check alone (k against the library size, the signal
    layer against the model, the signal module against the adapters), so a Router that exists can route.
    It never touches adapters in the model: whoever holds a mixture suspends it around :meth:`route`.
    """

    def __init__(self, model: nn.Module, library: AdapterLibrary, config: RouterConfig | None = None) -> None:
        self.model, self.library = model, library
        self.config = config or RouterConfig()
        check_k(self.config.k, len(library))
        self.num_layers = len(decoder_layers(model))
        self.signal_module = signal_module_name(model, self.config)
        if self.signal_module not in library.stacks:
            raise LogoError(
                f"no adapter targets the signal module {self.signal_module}; pick --signal-module/--signal-layer "
                f"among the adapters' modules (e.g. {library.modules[:2]})"
            )

    @property
    def point(self) -> SignalPoint:
        """Where this router reads its signal."""
        return SignalPoint(self.config.layer % self.num_layers, self.config.post_norm, self.config.position)

    @property
    def signal_key(self) -> str:
        """The key of this signal's calibration statistics (see :meth:`RouterConfig.signal_key`)."""
        return self.config.signal_key(self.num_layers)

    def probe(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The signal vector of every row, ``[B, d_in]`` fp32 (no adapter may be active)."""
        return probe_points(self.model, input_ids, attention_mask, [self.point], self.config.module)[self.point]

    def raw_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Raw LoGo scores ``[B, N]`` for signal vectors ``h [B, d_in]``."""
        return score(h, self.library, self.signal_module, self.config.strategy)

    def calibrated(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw scores divided by the configured per-adapter statistic (unchanged for ``calibration='none'``)."""
        div = divisors(self.library, self.config, self.signal_module, self.num_layers)
        return raw if div is None else raw / div.to(raw.device)

    def routes(self, raw: torch.Tensor) -> list[Route]:
        """Top-k selections and weights from raw scores ``[B, N]`` (calibrated first)."""
        top, idx, weights = select(self.calibrated(raw), self.config.k, self.config.weighting,
                                   self.config.temperature)
        routes = []
        for row in range(raw.shape[0]):
            indices = idx[row].tolist()
            routes.append(Route(indices=indices, weights=weights[row].tolist(),
                                names=[self.library.names[i] for i in indices], scores=top[row].tolist(),
                                all_scores=raw[row].tolist()))
        return routes

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[Route]:
        """Probe, score, calibrate and select for one batch of token ids."""
        return self.routes(self.raw_scores(self.probe(input_ids, attention_mask)))

    def mean_statistics(self, h: torch.Tensor) -> torch.Tensor:
        """``mean`` calibration statistics from signal vectors of unlabeled prompts: each adapter's mean raw score."""
        return self.raw_scores(h).mean(0)
