"""`logo demo` (the main job on the embedded default) and `logo signal-study`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    output: Annotated[Path, typer.Option("--output", help="Directory for summary.json, results.md, heatmap.")] = Path(
        "demo_results"),
    quick: Annotated[bool, typer.Option("--quick", help="A CI-sized run of the whole path.")] = False,
    n_per_task: Annotated[int, typer.Option("--n-per-task")] = 6,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    no_arrow: Annotated[bool, typer.Option("--no-arrow", help="Skip the PEFT Arrow baseline.")] = False,
) -> None:
    """The main job: LoGo on the embedded SmolLM2 with the demo library, against baselines."""
    from logo.experiments.demo import run_demo  # lazy: keeps `logo --help` free of the model stack

    run_demo(output, n_per_task=n_per_task, batch_size=batch_size, seed=seed, quick=quick, with_arrow=not no_arrow)


def signal_study(
    n_per_task: Annotated[int, typer.Option("--n-per-task")] = 10,
    output: Annotated[Path | None, typer.Option("--output", help="Write the table (markdown) here.")] = None,
) -> None:
    """Precision@1 of every routing-signal option on validation instances of the demo tasks (not the test set)."""
    from logo.experiments.signal_study import study_demo, study_table  # lazy: as above

    rows = study_demo(n_per_task)
    table = study_table(rows, 30)
    print(table)
    if output is not None:
        output.write_text(table + "\n")


def register(app: typer.Typer) -> None:
    """Add demo and signal-study to ``app``."""
    app.command()(demo)
    app.command(name="signal-study")(signal_study)
