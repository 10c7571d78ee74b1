"""Which routing signal works on this model? Precision@1 of every signal option on labelled validation prompts.

One full forward per prompt (``output_hidden_states``) gives the residual stream entering every layer,
so all layers x {residual, post-norm} x {last token, mean} x {norm, entropy} x calibrations are scored
from one pass. Use validation instances (never the test set) to choose settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from logo.calibration import weight_norms
from logo.engine import LoGoEngine
from logo.router import RouterConfig, SignalPoint, decoder_layers, score, signal_module_name


@dataclass
class StudyRow:
    layer: int
    post_norm: bool
    position: str
    strategy: str
    calibration: str
    precision_at_1: float


def all_layer_signals(engine: LoGoEngine, prompts: list[str], layers: list[int], batch_size: int = 16):
    """``{(layer, post_norm, position): [n, d] fp32}`` for the given (non-negative) layer indices."""
    points = [SignalPoint(layer, post_norm, position) for layer in layers for post_norm in (False, True)
              for position in ("last", "mean")]
    found = engine.signals(prompts, points, batch_size)
    return {(p.layer, p.post_norm, p.position): h for p, h in found.items()}


def run_study(engine: LoGoEngine, prompts: list[str], targets: list[int], calibration_prompts: list[str],
              layers: list[int], batch_size: int = 16) -> list[StudyRow]:
    """Precision@1 (top-1 adapter == target) for every signal option; ``layers`` may be negative."""
    n_layers = len(decoder_layers(engine.model))
    layers = sorted({layer % n_layers for layer in layers})
    signals = all_layer_signals(engine, prompts, layers, batch_size)
    calib = all_layer_signals(engine, calibration_prompts, layers, batch_size)
    target = torch.tensor(targets)
    rows = []
    module_of = {
        layer: signal_module_name(engine.model, RouterConfig(layer=layer, module=engine.router.config.module))
        for layer in layers
    }
    for (layer, post_norm, position), h in signals.items():
        module = module_of[layer]
        for strategy in ("norm", "entropy"):
            raw = score(h, engine.library, module, strategy)
            divs = {
                "none": None,
                "mean": score(calib[(layer, post_norm, position)], engine.library, module, strategy).mean(0),
                "weight-norm": weight_norms(engine.library, module),
            }
            for calibration, div in divs.items():
                scores = raw if div is None else raw / div.clamp(min=1e-12)
                precision = (scores.argmax(1) == target).float().mean().item()
                rows.append(StudyRow(layer, post_norm, position, strategy, calibration, precision))
    return rows


def study_demo(n_per_task: int = 10, layers: list[int] | None = None, batch_size: int = 32) -> list[StudyRow]:
    """The study on the demo library: validation instances (split ``valid``) of its seen tasks."""
    from logo.calibration import default_prompts
    from logo.demo import build_instances

    engine = LoGoEngine.from_pretrained("smollm2-135m", "embedded:demo", RouterConfig(k=1), device="cpu")
    names = engine.library.names
    instances = [x for x in build_instances(names, n_per_task, split="valid") if x.seen]
    layers = layers or [-1, -2, -3, -5, -8, -11, -15, -20, -25, -30]
    rows = run_study(engine, [x.prompt for x in instances], [names.index(x.task) for x in instances],
                     default_prompts(), layers, batch_size)
    engine.close()
    return rows


def study_table(rows: list[StudyRow], num_layers: int) -> str:
    lines = ["| layer | input | position | strategy | calibration | precision@1 |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r.precision_at_1, -r.layer)):
        lines.append(f"| {r.layer} ({r.layer - num_layers}) | {'post-norm' if r.post_norm else 'residual'} | "
                     f"{r.position} | {r.strategy} | {r.calibration} | {r.precision_at_1:.3f} |")
    return "\n".join(lines)
