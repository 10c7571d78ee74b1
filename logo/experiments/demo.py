"""`logo demo`: LoGo on the embedded default, end to end, with baselines and a routing-quality report.

SmolLM2-135M-Instruct and the committed demo library route a shuffled stream of held-out instances
from seen tasks (each has its own adapter) and unseen tasks (no adapter). Every method (from the registry
in :mod:`logo.methods`, plus the oracle, which knows each instance's task) generates on the same instances;
the report gives accuracy per task and method, routing precision@1 on seen tasks, and the share of the
oracle's gain over base that each method recovers.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.generation import GenerationSettings, first_line
from logo.methods import Fitted, LoGo, Method, get_method
from logo.paths import check_output_dir, replacing, write_atomic
from logo.plots import selection_heatmap
from logo.router import RouterConfig, Selection
from logo.spec import EngineSpec
from logo.train.tasks import get_task, seen_tasks, unseen_tasks


@dataclass
class Instance:
    task: str
    seen: bool
    answer: str
    prompt: str


@dataclass
class Oracle(Method):
    """Each seen instance's own task adapter (an upper bound for routing; unseen instances run on base)."""

    tasks: list[str | None] = field(default_factory=list)
    """The adapter of instance i, or None for an unseen task."""
    name: str = "oracle"

    def select(self, engine, prompts, indices, seed):
        return [None if self.tasks[i] is None else Selection([engine.library.index(self.tasks[i])], [1.0])
                for i in indices]


def default_methods(instances: list[Instance], n_adapters: int) -> list[tuple[str, Method]]:
    """``(label, method)`` pairs: base, oracle, uniform, random, the official LoGo signal (raw and calibrated),
    the library's fitted router (without and with abstaining to base; the latter is the default), Arrow (last)."""
    oracle = Oracle(tasks=[x.task if x.seen else None for x in instances])
    return [("base", get_method("base")), ("oracle", oracle), ("uniform", get_method("uniform")),
            ("random-k3", get_method("random", k=min(3, n_adapters))),
            ("logo-official-k1", LoGo(RouterConfig(k=1))),
            ("logo-official-k1+cal", LoGo(RouterConfig(k=1, calibration="mean"))),
            ("logo-fitted", Fitted(abstain=False)),
            (MAIN_METHOD, get_method("fitted")),
            ("arrow", get_method("arrow", k=min(3, n_adapters)))]


MAIN_METHOD = "logo-fitted+abstain"
"""The default router of the embedded library (no router flags): its fitted router file."""


def build_instances(adapter_names: list[str], n_per_task: int, seed: int = 0, split: str = "eval") -> list[Instance]:
    """Held-out instances of every seen (has an adapter) and unseen demo task, asked in the split's held-out
    templates in turn (``eval``: the test templates; ``valid``: the validation templates), shuffled into one stream."""
    out = []
    for seen, tasks in ((True, seen_tasks(adapter_names)), (False, unseen_tasks())):
        for task in tasks:
            for prompt, answer in task.examples(seed, n_per_task, split=split):
                out.append(Instance(task.name, seen, answer, prompt))
    random.Random(seed).shuffle(out)
    return out


def calibrate_missing(engine: LoGoEngine, methods: list[tuple[str, Method]]) -> None:
    """`mean` statistics for LoGo signals the library does not ship: computed label-free on the default
    prompts and kept in memory for this run (the library's file is not changed)."""
    for _, method in methods:
        if isinstance(method, LoGo) and method.router is not None and method.router.calibration == "mean":
            routed = method.engine(engine)
            if routed.router.signal_key not in engine.library.calibration:
                routed.calibrate(save=False)


def run_method(engine: LoGoEngine, method: Method, instances: list[Instance], seed: int, batch_size: int,
               settings: GenerationSettings, cache: dict) -> tuple[list[str], list[Selection | None] | None]:
    """Predictions (first line of the generation) for one method; reuses identical (prompt, mixture) runs."""
    prompts = [x.prompt for x in instances]
    indices = list(range(len(instances)))
    if method.takes_over_model:
        gens = method.generate(engine, prompts, indices, seed, settings, batch_size)
        return [first_line(g.text) for g in gens], None
    selections = method.select(engine, prompts, indices, seed)
    keys = [(x.prompt, _sel_key(s)) for x, s in zip(instances, selections)]
    todo = [i for i, key in enumerate(keys) if key not in cache]
    if todo:
        outs = engine.generate([prompts[i] for i in todo], selections=[selections[i] for i in todo],
                               batch_size=batch_size, **settings.to_dict())
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
    tasks = _task_order(instances)
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
            hits = [bool(routes[method][i].indices) and routes[method][i].indices[0] == names.index(instances[i].task)
                    for i in seen_rows]  # a prompt sent to the base model is not routed right
            entry["precision_at_1"] = sum(hits) / len(hits) if hits else None
        summary["methods"][method] = entry
    return summary


def _seen(instances: list[Instance], task: str) -> bool:
    return next(x.seen for x in instances if x.task == task)


def _task_order(instances: list[Instance]) -> list[str]:
    return sorted({x.task for x in instances}, key=lambda t: (not _seen(instances, t), t))


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


def task_shares(instances: list[Instance], selections: list[Selection], names: list[str]) -> np.ndarray:
    """How often each adapter is selected per task, as a share of the task's selections."""
    tasks = _task_order(instances)
    freq = np.zeros((len(tasks), len(names)))
    for x, sel in zip(instances, selections):
        for i in sel.indices:
            freq[tasks.index(x.task), i] += 1
    return freq / np.maximum(freq.sum(1, keepdims=True), 1)


def write_outputs(out_dir: Path, summary: dict, table: str, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "summary.json", json.dumps(summary | {"meta": meta}, indent=1))
    write_atomic(out_dir / "results.md", table + "\n")


DEFAULT_N_PER_TASK = 6
QUICK_N_PER_TASK = 2
"""Held-out instances per task: by default, and under ``--quick``."""


def check_demo_options(n_per_task: int | None, batch_size: int, quick: bool) -> int:
    """The instances per task that the demo runs, with its flags checked (before any model loads): ``n_per_task``
    None is the default (or ``--quick``'s), and ``--quick`` with an explicit ``--n-per-task`` is an error, not an
    override."""
    if quick and n_per_task is not None:
        raise LogoError(f"--quick runs {QUICK_N_PER_TASK} instances per task, so it cannot take --n-per-task "
                        f"{n_per_task}; give one of --quick or --n-per-task")
    for flag, value in (("--n-per-task", n_per_task), ("--batch-size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LogoError(f"{flag} must be a whole number of at least 1, got {value!r}")
    return QUICK_N_PER_TASK if quick else DEFAULT_N_PER_TASK if n_per_task is None else n_per_task


def run_demo(
    output_dir: Path,
    n_per_task: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    seed: int = 0,
    quick: bool = False,
    with_arrow: bool = True,
    adapters: str = "embedded:demo",
    console: Console | None = None,
) -> dict:
    """The whole demo: load, route, generate for every method, score, report. Returns the summary.
    ``n_per_task``: held-out instances per task (None: 6, or 2 with ``quick``; giving both is an error)."""
    n_per_task = check_demo_options(n_per_task, batch_size, quick)  # flags, then the output, before the model
    check_output_dir(output_dir)  # before the minute of loading and generating
    console = console or Console()
    start = time.perf_counter()
    engine = EngineSpec("smollm2-135m", adapters, device="cpu").build()  # the library's fitted router
    names = engine.library.names
    load_s = time.perf_counter() - start
    instances = build_instances(names, n_per_task, seed=seed)
    methods = default_methods(instances, len(names))
    if quick:
        quick_methods = ("base", "oracle", "uniform", "logo-official-k1", "logo-official-k1+cal", MAIN_METHOD, "arrow")
        methods = [(label, m) for label, m in methods if label in quick_methods]
        max_new_tokens = min(max_new_tokens, 8)
    if not with_arrow:
        methods = [(label, m) for label, m in methods if not m.takes_over_model]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, early_stop=True)
    console.print(f"[bold]LoGo demo[/bold]: SmolLM2-135M-Instruct, {len(names)} adapters, "
                  f"{len(instances)} held-out instances from {len({x.task for x in instances})} tasks "
                  f"({sum(not x.seen for x in instances)} instances of unseen tasks)")
    calibrate_missing(engine, methods)
    cache: dict = {}
    results: dict[str, list[int]] = {}
    selections: dict[str, list[Selection]] = {}
    predictions: dict[str, list[str]] = {}
    timings: dict[str, float] = {}
    for label, method in tqdm(methods, desc="methods", unit="method"):
        t0 = time.perf_counter()
        preds, sels = run_method(engine, method, instances, seed, batch_size, settings, cache)
        timings[label] = round(time.perf_counter() - t0, 2)
        predictions[label] = preds
        results[label] = [int(get_task(x.task).score(p, x.answer)) for x, p in zip(instances, preds)]
        if method.routes:
            selections[label] = sels  # type: ignore[assignment]
    summary = summarize(instances, results, selections, names)
    main = MAIN_METHOD
    _show_examples(console, instances, selections[main], predictions[main], names, main)
    labels = [label for label, _ in methods]
    table = markdown_table(summary, labels)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = [t if _seen(instances, t) else f"{t} (unseen)" for t in _task_order(instances)]
    with replacing(output_dir / "selection_heatmap.png") as heatmap:
        selection_heatmap(heatmap, task_shares(instances, selections[main], names), rows, names,
                          f"{main}: adapter selected per task (held-out instances)", "task of the instance")
    total_s = time.perf_counter() - start
    meta = {"n_instances": len(instances), "n_per_task": n_per_task, "seed": seed,
            "adapters": names, "methods": {label: repr(m) for label, m in methods}, "load_s": round(load_s, 2),
            "method_seconds": timings, "total_seconds": round(total_s, 1), "quick": quick,
            "max_new_tokens": max_new_tokens}
    summary["precision_at_1"] = summary["methods"][main].get("precision_at_1")
    summary["oracle_gain_recovered"] = summary["methods"][main].get("oracle_gain_recovered")
    summary["main_method"] = main
    write_outputs(output_dir, summary, table, meta)
    _show_table(console, summary, labels)
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
        mix = ", ".join(f"{names[i]} {w:.2f}" for i, w in zip(sel.indices, sel.weights)) or "none (abstained: base)"
        tag = "" if x.seen else " (unseen task)"
        console.print(f"[cyan]{x.prompt!r}[/cyan]{tag}\n  adapters: {mix}\n  answer: {pred!r}  expected: {x.answer!r}")


def _show_table(console, summary: dict, methods: list[str]) -> None:
    """One row per method (the per-task table is in results.md): fits an 80-column terminal."""
    table = Table(title="held-out accuracy by method (per task: results.md)", title_justify="left")
    for column in ("method", "seen", "unseen", "oracle gain", "precision@1"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for m in methods:
        entry = summary["methods"][m]
        table.add_row(m, _fmt(entry.get("seen_accuracy")), _fmt(entry.get("unseen_accuracy")),
                      _fmt(entry.get("oracle_gain_recovered")), _fmt(entry.get("precision_at_1")))
    console.print(table)

