"""`logo train` (one adapter) and `logo build-demo-library` (the committed demo library)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from logo.errors import LogoError


def train(
    task: Annotated[str, typer.Option("--task", help="Task name (see `logo tasks`).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the PEFT adapter and train_record.json.")],
    base_model: Annotated[str, typer.Option("--base-model", "--base_model", "-m")] = "smollm2-135m",
    rank: Annotated[int, typer.Option("--rank")] = 4,
    alpha: Annotated[float, typer.Option("--alpha")] = 8.0,
    targets: Annotated[str, typer.Option("--targets", help="Comma-separated module names.")] = "q_proj,v_proj",
    steps: Annotated[int, typer.Option("--steps")] = 100,
    lr: Annotated[float, typer.Option("--lr")] = 3e-3,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device")] = "cpu",
) -> None:
    """Train one LoRA adapter with PEFT on a task (loss on answer tokens only); defaults = the demo library's."""
    from logo.models import load_base_model
    from logo.paths import check_output_dir
    from logo.spec import check_base_model, check_device
    from logo.train.tasks import get_task
    from logo.train.trainer import TrainConfig, train_lora

    # everything that needs no model first, so a typo fails in a second, before the model loads
    spec = get_task(task).check_trainable()
    config = TrainConfig(rank=rank, alpha=alpha, targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                         steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    check_base_model(base_model)
    device = check_device(device)
    if out.is_dir() and any(out.iterdir()):
        raise LogoError(f"{out} exists and is not empty; choose a new --out directory (nothing was overwritten)")
    check_output_dir(out, "--out")
    model, tokenizer = load_base_model(base_model, device=device, dtype="float32")
    record = train_lora(model, tokenizer, spec, out, config, base_model)
    print(f"wrote {out} (final loss {record.loss_curve[-1]:.3f}, {record.wall_time_s:.0f} s)")


def build_demo_library(
    out: Annotated[Path | None, typer.Option("--out", help="Default: the package's embedded demo library.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain adapters that are already up to date.")] = False,
    n_eval: Annotated[int, typer.Option("--n-eval")] = 50,
) -> None:
    """Rebuild the demo library reproducibly: train each seen task, measure, write manifest + calibration."""
    from logo.train.library_builder import build_library

    manifest = build_library(out_dir=out, n_eval=n_eval, force=force)
    print(json.dumps([{k: a[k] for k in ("name", "base_accuracy", "own_accuracy")} for a in manifest["adapters"]]))


def tasks() -> None:
    """List the demo tasks (seen ones have an adapter in the demo library)."""
    from logo.train.tasks import TASKS

    for task in TASKS.values():
        kind = "seen" if task.seen else "unseen"
        print(f"{task.name:24s} {kind:8s} {task.generator:24s} held out by {task.held_out}")


def register(app: typer.Typer) -> None:
    """Add train, build-demo-library and tasks to ``app``."""
    app.command()(train)
    app.command(name="build-demo-library")(build_demo_library)
    app.command()(tasks)
