"""Which routing signal works on this model? Precision@1 of signal options on labelled validation prompts.

The engine's probe reads every signal point (layers x {residual, post-norm} x {last token, mean}) in one pass
per batch, and each option is scored by the engine under a router of that signal
(``engine.with_router(config).scores(...)``), exactly as routing would score it: {norm, entropy} x calibrations
{none, mean, weight-norm}, on the engine's signal module (the demo's: q_proj). Not studied: zscore calibration,
other signal modules, several layers or modules summed. Use validation instances (never the test set) to choose
settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from logo.calibration import default_prompts
from logo.engine import LoGoEngine
from logo.experiments.demo import build_instances
from logo.router import RouterConfig, SignalPoint
from logo.spec import EngineSpec

POSITIONS = ("last", "mean")
STRATEGIES = ("norm", "entropy")
CALIBRATIONS = ("none", "mean", "weight-norm")
"""The calibrations the study scores (``zscore`` is not among them)."""
DEMO_LAYERS = (-1, -2, -3, -5, -8, -11, -15, -20, -25, -30)
"""The signal layers :func:`study_demo` scores by default (negative: from the end)."""


@dataclass
class StudyRow:
    layer: int
    post_norm: bool
    position: str
    strategy: str
    calibration: str
    precision_at_1: float


def run_study(engine: LoGoEngine, prompts: list[str], targets: list[int], calibration_prompts: list[str],
              layers: list[int], batch_size: int = 16, progress: bool = False) -> list[StudyRow]:
    """Precision@1 (top-1 adapter == target) for every studied signal option; ``layers`` may be negative;
    ``progress``: bars on stderr while probing."""
    layers = sorted({layer % engine.num_layers for layer in layers})
    points = [SignalPoint(layer, post_norm, position) for layer in layers for post_norm in (False, True)
              for position in POSITIONS]
    signals = engine.signals(prompts, points, batch_size, progress)
    calib = engine.signals(calibration_prompts, points, batch_size, progress)
    rows = []
    for point in points:
        for strategy in STRATEGIES:
            config = RouterConfig(strategy=strategy, k=1, layer=point.layer, module=engine.router.config.module,
                                  post_norm=point.post_norm, position=point.position)
            routed = engine.with_router(config)
            raw = routed.scores(signals)
            divisors = {"none": None, "mean": routed.scores(calib).mean(0), "weight-norm": routed.weight_norms()}
            for calibration in CALIBRATIONS:
                div = divisors[calibration]
                scores = raw if div is None else raw / div.clamp(min=1e-12)
                hits = [int(top) == target for top, target in zip(scores.argmax(1), targets)]
                rows.append(StudyRow(point.layer, point.post_norm, point.position, strategy, calibration,
                                     sum(hits) / len(hits)))
    return rows


def study_demo(n_per_task: int = 10, layers: list[int] | None = None, batch_size: int = 32,
               progress: bool = False) -> list[StudyRow]:
    """The study on the demo library: validation instances (split ``valid``) of its seen tasks."""
    engine = EngineSpec("smollm2-135m", "embedded:demo", RouterConfig(k=1), device="cpu").build()
    names = engine.library.names
    instances = [x for x in build_instances(names, n_per_task, split="valid") if x.seen]
    layers = layers or list(DEMO_LAYERS)
    rows = run_study(engine, [x.prompt for x in instances], [names.index(x.task) for x in instances],
                     default_prompts(), layers, batch_size, progress)
    engine.close()
    return rows


def study_table(rows: list[StudyRow], num_layers: int) -> str:
    lines = ["| layer | input | position | strategy | calibration | precision@1 |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r.precision_at_1, -r.layer)):
        lines.append(f"| {r.layer} ({r.layer - num_layers}) | {'post-norm' if r.post_norm else 'residual'} | "
                     f"{r.position} | {r.strategy} | {r.calibration} | {r.precision_at_1:.3f} |")
    return "\n".join(lines)
