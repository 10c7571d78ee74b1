"""Rebuild the committed demo library: one adapter per seen task, measured, with a manifest.

`logo build-demo-library` trains every seen task that has no up-to-date adapter yet (so an interrupted
build continues) on its training templates, measures each adapter's accuracy and the base model's on
held-out instances asked in the task's test templates, writes ``manifest.json`` (with each adapter's trained
and held-out templates), computes the library's calibration statistics on the generic default prompts
(never on task data) and fits the library's router (``logo_router.json``) on the validation templates.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from logo.adapter_source import EMBEDDED_LIBRARIES
from logo.errors import LogoError
from logo.fit import examples_from_manifest, fit_router
from logo.router_file import FILE_NAME as ROUTER_FILE
from logo.train.tasks import Task, seen_tasks, unseen_tasks
from logo.train.trainer import RECORD_FILE, TrainConfig, train_lora

DEMO_MODEL = "smollm2-135m"
FIT_PER_TEMPLATE = 8
"""Example prompts per validation template that the library's router is fitted on (`logo fit-router`'s default)."""
DEMO_CONFIG = TrainConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), steps=100, lr=3e-3, batch_size=8, seed=0)


def sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _up_to_date(adapter_dir: Path, task: Task, config: TrainConfig) -> bool:
    """True if the adapter was trained on this task's data and template with this config."""
    record = adapter_dir / RECORD_FILE
    if not record.is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        return False
    saved = json.loads(record.read_text())
    wanted = json.loads(json.dumps({"config": asdict(config), "data_source": task.describe()}))
    return all(saved.get(k) == v for k, v in wanted.items())


def build_library(
    out_dir: Path | None = None,
    tasks: list[Task] | None = None,
    config: TrainConfig = DEMO_CONFIG,
    base_model: str = DEMO_MODEL,
    n_eval: int = 50,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Train missing adapters, evaluate all, write manifest.json and calibration. Returns the manifest."""
    from logo.engine import LoGoEngine
    from logo.library import AdapterLibrary
    from logo.models import load_base_model
    from logo.router import RouterConfig, Selection
    from logo.train.evaluate import task_accuracy

    out_dir = out_dir or EMBEDDED_LIBRARIES["demo"]
    tasks = tasks if tasks is not None else seen_tasks()
    if not tasks:
        raise LogoError("no tasks to build a library from")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in sorted(out_dir.iterdir()):  # adapters this builder made for tasks no longer in the library
        if stale.is_dir() and (stale / RECORD_FILE).is_file() and stale.name not in {t.name for t in tasks}:
            shutil.rmtree(stale)
    model, tokenizer = load_base_model(base_model)
    records = {}
    for task in tasks:
        adapter_dir = out_dir / task.name
        if force or not _up_to_date(adapter_dir, task, config):
            if adapter_dir.exists():
                shutil.rmtree(adapter_dir)
            train_lora(model, tokenizer, task, adapter_dir, config, base_model, progress=progress)
        records[task.name] = json.loads((adapter_dir / RECORD_FILE).read_text())
    # adapters in folder-name order, as `logo ... --adapters DIR` loads them, so the calibration file matches
    library = AdapterLibrary.load(sorted((out_dir / t.name for t in tasks), key=lambda p: p.name), model)
    engine = LoGoEngine(model, tokenizer, library, RouterConfig(k=1))
    adapters = []
    for task in tasks:
        held_out = task.examples(0, n_eval, split="eval")
        base = task_accuracy(engine, task, None, held_out)
        own = task_accuracy(engine, task, Selection([library.names.index(task.name)], [1.0]), held_out)
        rec = records[task.name]
        adapters.append({
            "name": task.name,
            "task": task.describe(),
            "trained_templates": list(task.templates_for("train")),
            "held_out_templates": {"valid": list(task.templates_for("valid")),
                                   "test": list(task.templates_for("eval"))},
            "seed": config.seed,
            "steps": config.steps,
            "wall_time_s": rec["wall_time_s"],
            "cpu_threads": rec.get("cpu_threads"),
            "sha256": sha256(out_dir / task.name / "adapter_model.safetensors"),
            "base_accuracy": base,
            "own_accuracy": own,
            "n_eval": n_eval,
        })
        if progress:
            print(f"{task.name:24s} base {base:.2f}  own {own:.2f}", flush=True)
    manifest = {
        "base_model": base_model,
        "train_config": asdict(config),
        "eval_split": "eval: seed 10000 + seed; per task held_out: disjoint word pool / hashed question split / seed",
        "template_split": "per seen task: 7 training templates, 2 validation templates (fit routers), 2 test "
                          "templates (report); accuracies are on eval instances in the test templates",
        "adapters": adapters,
        "unseen_tasks": [
            {"name": t.name, "task": t.describe(),
             "held_out_templates": {"valid": list(t.templates_for("valid")), "test": list(t.templates_for("eval"))}}
            for t in unseen_tasks()
        ],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out_dir / "README.md").write_text(library_readme(manifest))
    for signal in calibration_signals():
        engine.with_router(signal).calibrate()
    fitted = fit_router(engine, examples_from_manifest(out_dir / "manifest.json", "valid", FIT_PER_TEMPLATE),
                        base_model=base_model,
                        source=f"manifest validation templates, {FIT_PER_TEMPLATE} prompts per template")
    fitted.save(out_dir / ROUTER_FILE)
    engine.close()
    return manifest


def calibration_signals() -> list:
    """The signals whose `mean` statistics ship with the demo library (official + the demo's options)."""
    from logo.router import RouterConfig

    return [RouterConfig(strategy=s, k=1) for s in ("norm", "entropy")]


def library_readme(manifest: dict) -> str:
    """A human-readable summary of the manifest (written next to it by every build)."""
    cfg = manifest["train_config"]
    lines = [
        "# LoGo demo adapter library",
        "",
        f"One LoRA per task for `{manifest['base_model']}` (SmolLM2-135M-Instruct), trained by "
        "`logo build-demo-library` with PEFT on the project's offline task generators (`logo.train.tasks`): "
        f"rank {cfg['rank']}, alpha {cfg['alpha']:g}, targets {', '.join(cfg['targets'])}, {cfg['steps']} steps of "
        f"batch {cfg['batch_size']}, lr {cfg['lr']:g}, seed {cfg['seed']}; loss on answer tokens only; stored in bf16. "
        "`manifest.json` is the machine-readable record (sha256 of every adapter); each adapter directory "
        "also holds its `train_record.json` (loss curve, versions).",
        "",
        "Templates (FlanV2-style): every task is asked in 11 instruction templates that differ in wording and shape "
        "(question or imperative, input first or last, with or without an answer cue, short or long). Each adapter "
        "is trained on 7 of them; 2 validation templates fit the router (`logo_router.json`, by `logo fit-router`) "
        "and 2 test templates report. `manifest.json` lists them per adapter (`trained_templates`, "
        "`held_out_templates`).",
        "",
        "Accuracy: greedy, exact match after normalisation, on held-out instances (the `eval` split: seed "
        "10000 + seed, and per task disjoint word pools or a hashed instance split, so no evaluation "
        "instance was a training instance; `products` and `next_letter` cover their whole instance space, where only "
        "the seeds differ) asked in the task's test templates (never trained on).",
        "",
        "| adapter | generator | base | own adapter | n | train wall time (s, threads) |",
        "|---|---|---|---|---|---|",
    ]
    for a in manifest["adapters"]:
        gen = f"{a['task']['source']}:{a['task']['generator']}"
        lines.append(f"| {a['name']} | {gen} | {a['base_accuracy']:.2f} | {a['own_accuracy']:.2f} | {a['n_eval']} "
                     f"| {a['wall_time_s']:.0f} ({a.get('cpu_threads', '?')}) |")
    lines += ["", "Unseen tasks (no adapter; each asked few-shot and plainly, in 2 validation and 2 test templates): "
              + ", ".join(f"`{u['name']}`" for u in manifest["unseen_tasks"]) + ".", "",
              "Rebuild: `logo build-demo-library` (resumable: it trains only adapters that are missing or out of date; "
              "`--force` retrains all; the wall times above are one torch thread on a 2-core machine shared with other "
              "jobs).", ""]
    return "\n".join(lines)
