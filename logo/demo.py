"""`logo demo`: LoGo on the embedded default, end to end, with baselines and a routing-quality report.

SmolLM2-135M-Instruct and the committed demo library route a shuffled stream of held-out instances
from seen tasks (each has its own adapter) and unseen tasks (no adapter). Every method generates on
the same instances; the report gives accuracy per task and method, routing precision@1 on seen tasks,
and the share of the oracle's gain over base that each method recovers.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.router import Router, RouterConfig, Selection, select
from logo.train.evaluate import first_line


@dataclass
class Instance:
    task: str
    seen: bool
    question: str
    answer: str
    prompt: str


@dataclass
class Method:
    """A named way to choose each instance's mixture."""

    name: str
    kind: str  # base | oracle | uniform | random | logo | arrow
    k: int = 0
    strategy: str = "norm"
    calibration: str = "none"
    layer: int = -1
    post_norm: bool = False


# Chosen by `logo signal-study` on the validation split (never the test instances): see BENCHMARKS.md.
TUNED_SIGNAL = {"layer": -8, "post_norm": True, "strategy": "norm", "calibration": "mean"}


def default_methods(n_adapters: int) -> list[Method]:
    methods = [Method("base", "base"), Method("oracle", "oracle"), Method("uniform", "uniform", n_adapters),
               Method("random-k3", "random", min(3, n_adapters))]
    for calibration in ("none", "mean"):
        for strategy in ("norm", "entropy"):
            for k in (1, 3):
                if k <= n_adapters:
                    suffix = "" if calibration == "none" else "+cal"
                    methods.append(Method(f"logo-{strategy}-k{k}{suffix}", "logo", k, strategy, calibration))
    for k in (1, 3):
        if k <= n_adapters:
            methods.append(Method(f"logo-tuned-k{k}", "logo", k, **TUNED_SIGNAL))
    methods.append(Method("arrow", "arrow", min(3, n_adapters)))
    return methods


def build_instances(adapter_names: list[str], n_per_task: int, seed: int = 0, split: str = "eval") -> list[Instance]:
    """Held-out instances of every seen (has an adapter) and unseen demo task, shuffled into one stream."""
    from logo.train.tasks import seen_tasks, unseen_tasks

    out = []
    for seen, tasks in ((True, seen_tasks(adapter_names)), (False, unseen_tasks())):
        for task in tasks:
            for question, answer in task.make(seed, n_per_task, split=split):
                out.append(Instance(task.name, seen, question, answer, task.prompt(question)))
    random.Random(seed).shuffle(out)
    return out


class Signals:
    """Signal vectors of the instances (and of the calibration prompts) per signal option, probed once each."""

    def __init__(self, engine: LoGoEngine, prompts: list[str], batch_size: int) -> None:
        self.engine, self.prompts, self.batch_size = engine, prompts, batch_size
        self._cache: dict[tuple, torch.Tensor] = {}

    def get(self, router: Router, prompts: list[str] | None = None) -> torch.Tensor:
        key = (router.point, prompts is None)
        if key not in self._cache:
            found = self.engine.signals(prompts or self.prompts, [router.point], self.batch_size)
            self._cache[key] = found[router.point]
        return self._cache[key]


def logo_selections(engine: LoGoEngine, signals: Signals, method: Method) -> tuple[list[Selection], torch.Tensor]:
    """Selections for a LoGo method from the instances' signal vectors; also returns the scores used."""
    from logo.calibration import default_prompts

    config = RouterConfig(strategy=method.strategy, k=method.k, calibration=method.calibration, layer=method.layer,
                          post_norm=method.post_norm)
    router = engine.with_router(config).router
    raw = router.raw_scores(signals.get(router))
    if method.calibration == "mean" and router.signal_key not in engine.library.calibration:
        # statistics for a signal the library does not ship: computed here, label-free, on the default prompts
        scores = raw / router.mean_statistics(signals.get(router, default_prompts())).clamp(min=1e-12)
    else:
        scores = router.calibrated(raw)
    _, idx, weights = select(scores, method.k)
    return [Selection(i.tolist(), w.tolist()) for i, w in zip(idx, weights)], scores


def selections_for(method: Method, instances: list[Instance], engine: LoGoEngine, h: Signals,
                   seed: int) -> list[Selection | None]:
    names = engine.library.names
    n = len(names)
    if method.kind == "base":
        return [None] * len(instances)
    if method.kind == "oracle":
        return [Selection([names.index(x.task)], [1.0]) if x.seen else None for x in instances]
    if method.kind == "uniform":
        return [Selection(list(range(n)), [1.0 / n] * n)] * len(instances)
    if method.kind == "random":
        rng = random.Random(seed)
        return [Selection(rng.sample(range(n), method.k), [1.0 / method.k] * method.k) for _ in instances]
    if method.kind == "logo":
        return logo_selections(engine, h, method)[0]  # type: ignore[return-value]
    raise LogoError(f"unknown method kind {method.kind}")


def run_method(engine: LoGoEngine, method: Method, instances: list[Instance], h: Signals, seed: int,
               batch_size: int, max_new_tokens: int, cache: dict) -> tuple[list[str], list[Selection | None]]:
    """Predictions (first line of the greedy generation) for one method; reuses identical (prompt, mixture) runs."""
    selections = selections_for(method, instances, engine, h, seed)
    keys = [(x.prompt, _sel_key(s)) for x, s in zip(instances, selections)]
    todo = [i for i, key in enumerate(keys) if key not in cache]
    if todo:
        outs = engine.generate([instances[i].prompt for i in todo], selections=[selections[i] for i in todo],
                               max_new_tokens=max_new_tokens, early_stop=True, batch_size=batch_size)
        for i, out in zip(todo, outs):
            cache[keys[i]] = first_line(out.text)
    return [cache[key] for key in keys], selections


def _sel_key(sel: Selection | None) -> tuple:
    if sel is None or not sel.indices:
        return ()
    return tuple(sorted((i, round(w, 6)) for i, w in zip(sel.indices, sel.weights) if w != 0))


def summarize(instances: list[Instance], results: dict[str, list[int]], routes: dict[str, list[Selection]],
              names: list[str]) -> dict:
    """Per task/method accuracy, precision@1 of each LoGo method on seen tasks, oracle gain recovered."""
    tasks = sorted({x.task for x in instances}, key=lambda t: (not _seen(instances, t), t))
    per_task = {}
    for task in tasks:
        rows = [i for i, x in enumerate(instances) if x.task == task]
        per_task[task] = {
            "seen": _seen(instances, task),
            "n": len(rows),
            "accuracy": {m: sum(res[i] for i in rows) / len(rows) for m, res in results.items()},
        }
    seen_rows = [i for i, x in enumerate(instances) if x.seen]
    unseen_rows = [i for i, x in enumerate(instances) if not x.seen]

    def mean_acc(method: str, rows: list[int]) -> float | None:
        return sum(results[method][i] for i in rows) / len(rows) if rows else None

    summary = {"tasks": per_task, "methods": {}}
    base_seen, oracle_seen = mean_acc("base", seen_rows), mean_acc("oracle", seen_rows)
    for method in results:
        entry = {"seen_accuracy": mean_acc(method, seen_rows), "unseen_accuracy": mean_acc(method, unseen_rows)}
        if base_seen is not None and oracle_seen is not None and oracle_seen > base_seen:
            entry["oracle_gain_recovered"] = (entry["seen_accuracy"] - base_seen) / (oracle_seen - base_seen)
        if method in routes:
            hits = [routes[method][i].indices[0] == names.index(instances[i].task) for i in seen_rows]
            entry["precision_at_1"] = sum(hits) / len(hits) if hits else None
        summary["methods"][method] = entry
    return summary


def _seen(instances: list[Instance], task: str) -> bool:
    return next(x.seen for x in instances if x.task == task)


def markdown_table(summary: dict, methods: list[str]) -> str:
    head = "| task | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 1)]
    for task, entry in summary["tasks"].items():
        label = task if entry["seen"] else f"{task} (unseen)"
        lines.append(f"| {label} | " + " | ".join(f"{entry['accuracy'][m]:.2f}" for m in methods) + " |")
    for key, label in (("seen_accuracy", "**mean seen**"), ("unseen_accuracy", "**mean unseen**"),
                       ("oracle_gain_recovered", "oracle gain recovered"), ("precision_at_1", "precision@1")):
        cells = []
        for m in methods:
            value = summary["methods"][m].get(key)
            cells.append("" if value is None else f"{value:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selection_heatmap(path: Path, instances: list[Instance], selections: list[Selection], names: list[str],
                      title: str) -> None:
    """PNG of how often each adapter is selected (weight-summed) per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({x.task for x in instances}, key=lambda t: (not _seen(instances, t), t))
    freq = torch.zeros(len(tasks), len(names))
    for x, sel in zip(instances, selections):
        for i in sel.indices:
            freq[tasks.index(x.task), i] += 1
    freq = freq / freq.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.45 * len(tasks)))
    im = ax.imshow(freq.numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), [t if _seen(instances, t) else f"{t} (unseen)" for t in tasks], fontsize=8)
    ax.set_xlabel("adapter")
    ax.set_ylabel("task of the instance")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, label="selection share")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: Path, summary: dict, table: str, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary | {"meta": meta}, indent=1))
    (out_dir / "results.md").write_text(table + "\n")


def run_demo(
    output_dir: Path,
    n_per_task: int = 6,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    seed: int = 0,
    quick: bool = False,
    with_arrow: bool = True,
    adapters: str = "embedded:demo",
    console=None,
) -> dict:
    """The whole demo: load, route, generate for every method, score, report. Returns the summary."""
    from rich.console import Console

    from logo.eval.arrow import ArrowGenerator
    from logo.models import load_base_model
    from logo.train.tasks import get_task

    console = console or Console()
    start = time.perf_counter()
    engine = LoGoEngine.from_pretrained("smollm2-135m", adapters, RouterConfig(k=1), device="cpu")
    names = engine.library.names
    load_s = time.perf_counter() - start
    instances = build_instances(names, 2 if quick else n_per_task, seed=seed)
    methods = default_methods(len(names))
    if quick:
        quick_methods = ("base", "oracle", "uniform", "logo-norm-k1", "logo-norm-k1+cal", "logo-tuned-k1", "arrow")
        methods = [m for m in methods if m.name in quick_methods]
        max_new_tokens = min(max_new_tokens, 8)
    if not with_arrow:
        methods = [m for m in methods if m.kind != "arrow"]
    console.print(f"[bold]LoGo demo[/bold]: SmolLM2-135M-Instruct, {len(names)} adapters, "
                  f"{len(instances)} held-out instances from {len({x.task for x in instances})} tasks "
                  f"({sum(not x.seen for x in instances)} instances of unseen tasks)")
    h = Signals(engine, [x.prompt for x in instances], batch_size)
    cache: dict = {}
    results: dict[str, list[int]] = {}
    selections: dict[str, list[Selection]] = {}
    predictions: dict[str, list[str]] = {}
    timings: dict[str, float] = {}
    from tqdm import tqdm

    for method in tqdm(methods, desc="methods", unit="method"):
        t0 = time.perf_counter()
        if method.kind == "arrow":
            base_copy, tokenizer = load_base_model("smollm2-135m")
            arrow = ArrowGenerator(base_copy, tokenizer, engine.library.paths, method.k)
            texts = arrow.generate([x.prompt for x in instances], max_new_tokens, True, batch_size)
            preds, sels = [first_line(t) for t in texts], None
        else:
            preds, sels = run_method(engine, method, instances, h, seed, batch_size, max_new_tokens, cache)
        timings[method.name] = round(time.perf_counter() - t0, 2)
        predictions[method.name] = preds
        results[method.name] = [int(get_task(x.task).score(p, x.answer)) for x, p in zip(instances, preds)]
        if method.kind == "logo":
            selections[method.name] = sels  # type: ignore[assignment]
    summary = summarize(instances, results, selections, names)
    main = "logo-norm-k1+cal" if "logo-norm-k1+cal" in selections else "logo-norm-k1"
    _show_examples(console, instances, selections[main], predictions[main], names, main)
    table = markdown_table(summary, [m.name for m in methods])
    output_dir.mkdir(parents=True, exist_ok=True)
    selection_heatmap(output_dir / "selection_heatmap.png", instances, selections[main], names,
                      f"{main}: adapter selected per task (held-out instances)")
    total_s = time.perf_counter() - start
    meta = {"n_instances": len(instances), "n_per_task": 2 if quick else n_per_task, "seed": seed,
            "adapters": names, "methods": [m.__dict__ for m in methods], "load_s": round(load_s, 2),
            "method_seconds": timings, "total_seconds": round(total_s, 1), "quick": quick,
            "max_new_tokens": max_new_tokens}
    summary["precision_at_1"] = summary["methods"][main].get("precision_at_1")
    summary["oracle_gain_recovered"] = summary["methods"][main].get("oracle_gain_recovered")
    summary["main_method"] = main
    write_outputs(output_dir, summary, table, meta)
    _show_table(console, summary, [m.name for m in methods])
    console.print(f"main method {main}: precision@1 {_fmt(summary['precision_at_1'])}, oracle gain recovered "
                  f"{_fmt(summary['oracle_gain_recovered'])}; run time {total_s:.0f} s; wrote {output_dir}/"
                  "{summary.json, results.md, selection_heatmap.png}")
    engine.close()
    return summary


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _show_examples(console, instances, selections, predictions, names, method, n=4) -> None:
    console.print(f"\n[bold]Worked examples[/bold] ({method})")
    shown = set()
    for x, sel, pred in zip(instances, selections, predictions):
        if x.task in shown or len(shown) >= n:
            continue
        shown.add(x.task)
        mix = ", ".join(f"{names[i]} {w:.2f}" for i, w in zip(sel.indices, sel.weights))
        tag = "" if x.seen else " (unseen task)"
        console.print(f"[cyan]{x.prompt!r}[/cyan]{tag}\n  adapters: {mix}\n  answer: {pred!r}  expected: {x.answer!r}")


def _show_table(console, summary: dict, methods: list[str]) -> None:
    """One row per method (the per-task table is in results.md): fits an 80-column terminal."""
    from rich.table import Table

    table = Table(title="held-out accuracy by method (per task: results.md)", title_justify="left")
    for column in ("method", "seen", "unseen", "oracle gain", "precision@1"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for m in methods:
        entry = summary["methods"][m]
        table.add_row(m, _fmt(entry.get("seen_accuracy")), _fmt(entry.get("unseen_accuracy")),
                      _fmt(entry.get("oracle_gain_recovered")), _fmt(entry.get("precision_at_1")))
    console.print(table)
