"""Rebuild the committed demo library: one adapter per seen task, measured, with a manifest.

`logo build-demo-library` trains every seen task that has no up-to-date adapter yet (so an interrupted
build continues) on its training templates, measures each adapter's accuracy and the base model's on
held-out instances asked in the task's test templates, writes ``manifest.json`` (with each adapter's trained
and held-out templates), computes the library's calibration statistics on the generic default prompts
(never on task data) and fits the library's router (``logo_router.json``) on the validation templates.
Every file is written atomically (a cut-off build leaves whole files, so the next one resumes), and a build that
changes the adapters first removes the old router and statistics, so none is left beside adapters it was not
fitted to; the engine that measures and fits is built by :class:`~logo.spec.EngineSpec`, as every front end's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from logo.adapter_source import EMBEDDED_LIBRARIES
from logo.calibration import FILE_NAME as CALIBRATION_FILE
from logo.errors import LogoError
from logo.fit import fit_router
from logo.paths import check_output_dir, replacing, write_atomic
from logo.router_file import FILE_NAME as ROUTER_FILE
from logo.train.manifest_examples import examples_from_manifest
from logo.train.tasks import Task, seen_tasks, unseen_tasks
from logo.train.trainer import RECORD_FILE, TrainConfig, train_lora

DEMO_MODEL = "smollm2-135m"
MANIFEST_FILE = "manifest.json"
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
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):  # a truncated record (an interrupted build): retrain
        return False
    if not isinstance(saved, dict):
        return False
    wanted = json.loads(json.dumps({"config": asdict(config), "data_source": task.describe()}))
    return all(saved.get(k) == v for k, v in wanted.items())


def check_n_eval(n_eval: int) -> int:
    """The held-out instances per task that the manifest's accuracies are measured on: at least one."""
    if isinstance(n_eval, bool) or not isinstance(n_eval, int) or n_eval < 1:
        raise LogoError(f"--n-eval must be at least 1 (held-out instances per task to measure each adapter's and the "
                        f"base model's accuracy on), got {n_eval!r}")
    return n_eval


def built_names(out_dir: Path) -> set[str]:
    """The adapter folders that the last build into ``out_dir`` made: those its manifest lists (none if unreadable)."""
    try:
        entries = json.loads((out_dir / MANIFEST_FILE).read_text())["adapters"]
        names = {entry["name"] for entry in entries}
    except (OSError, ValueError, KeyError, TypeError):  # no manifest, or one this builder did not write
        return set()
    return {n for n in names if isinstance(n, str) and n not in ("", ".", "..") and Path(n).name == n}


def _holds_adapter(folder: Path) -> bool:
    return any((folder / f).is_file() for f in (RECORD_FILE, "adapter_config.json", "adapter_model.safetensors"))


def _trained_for(folder: Path, task_name: str) -> bool:
    """True if ``folder`` has the train record of an adapter trained for ``task_name`` (an interrupted build's)."""
    try:
        return json.loads((folder / RECORD_FILE).read_text()).get("task") == task_name
    except (OSError, ValueError, AttributeError):
        return False


def sort_folders(out_dir: Path, names: list[str]) -> tuple[list[Path], list[str]]:
    """The adapter folders in ``out_dir`` that a build of ``names`` may delete, and those it must not touch.

    Stale: a folder the last build made (its manifest lists it) whose task is no longer built. Foreign: what the
    builder did not make but a build would delete, overwrite or leave in the library unmeasured: an adapter folder
    that its manifest does not list, and in the place of a task's adapter a file or a non-empty folder that is
    neither in the manifest nor a trainer output for that task. Anything else (files, folders without an adapter)
    is left alone.
    """
    made = built_names(out_dir)
    stale: list[Path] = []
    foreign: list[str] = []
    for path in sorted(out_dir.iterdir()):
        if path.name in names:
            if not path.is_dir():
                foreign.append(f"{path.name} (a file where the {path.name} adapter goes)")
            elif path.name not in made and not _trained_for(path, path.name) and any(path.iterdir()):
                foreign.append(path.name)
        elif path.is_dir() and _holds_adapter(path):
            if path.name in made:
                stale.append(path)
            else:
                foreign.append(path.name)
    return stale, foreign


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
    from logo.models import load_base_model
    from logo.router import RouterConfig, Selection
    from logo.spec import EngineSpec
    from logo.train.evaluate import task_accuracy

    # everything that needs no model first: a bad flag or a folder in the way fails before any training
    out_dir = out_dir or EMBEDDED_LIBRARIES["demo"]
    tasks = tasks if tasks is not None else seen_tasks()
    if not tasks:
        raise LogoError("no tasks to build a library from")
    for task in tasks:
        task.check_trainable()
    check_n_eval(n_eval)
    check_output_dir(out_dir, "--out")
    stale, foreign = sort_folders(out_dir, [t.name for t in tasks])
    if foreign:
        raise LogoError(f"--out {out_dir} holds {', '.join(foreign)}, which `logo build-demo-library` did not make "
                        f"(its {MANIFEST_FILE} does not list them) and would delete or mix into the library; move them "
                        f"out of {out_dir} or choose another --out (nothing was deleted)")
    held_out = {task.name: task.examples(0, n_eval, split="eval") for task in tasks}  # enough distinct instances?
    retrain = [task for task in tasks if force or not _up_to_date(out_dir / task.name, task, config)]
    if stale or retrain:  # the adapters change: the library's router and statistics are the old adapters'
        remove_library_files(out_dir)
    for folder in stale:  # adapters this builder made (its last manifest lists them) for tasks no longer built
        shutil.rmtree(folder)
    if retrain:
        model, tokenizer = load_base_model(base_model)
        for task in retrain:
            adapter_dir = out_dir / task.name
            if adapter_dir.exists():
                shutil.rmtree(adapter_dir)
            train_lora(model, tokenizer, task, adapter_dir, config, base_model, progress=progress)
        del model, tokenizer  # the engine below loads its own (the same weights: training hands them back unchanged)
    records = {task.name: json.loads((out_dir / task.name / RECORD_FILE).read_text()) for task in tasks}
    # adapters in folder-name order, as `logo ... --adapters DIR` loads them, so the calibration file matches
    paths = sorted((out_dir / t.name for t in tasks), key=lambda p: p.name)
    engine = EngineSpec(base_model, [str(p) for p in paths], RouterConfig(k=1), device="cpu", dtype="float32",
                        router_file="official").build()
    library = engine.library
    adapters = []
    for task in tasks:
        base = task_accuracy(engine, task, None, held_out[task.name])
        own = task_accuracy(engine, task, Selection([library.names.index(task.name)], [1.0]), held_out[task.name])
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
    write_atomic(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    write_atomic(out_dir / "README.md", library_readme(manifest))
    for signal in calibration_signals():
        engine.with_router(signal).calibrate()
    fitted = fit_router(engine, examples_from_manifest(out_dir / MANIFEST_FILE, "valid", FIT_PER_TEMPLATE),
                        base_model=base_model,
                        source=f"manifest validation templates, {FIT_PER_TEMPLATE} prompts per template")
    with replacing(out_dir / ROUTER_FILE) as tmp:  # only a finished fit replaces the router file
        fitted.save(tmp)
    engine.close()
    return manifest


def remove_library_files(out_dir: Path) -> None:
    """Remove the library's fitted router and calibration statistics before its adapters change: they describe the
    old adapters (under the same names, so nothing would notice), and a build cut off before its new fit must
    leave no router at all (the fitted method then says to fit one; the next build refits) rather than a stale one."""
    for name in (ROUTER_FILE, CALIBRATION_FILE):
        (out_dir / name).unlink(missing_ok=True)


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
