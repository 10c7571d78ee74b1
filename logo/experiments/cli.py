"""`logo demo` (the main job on the embedded default) and `logo signal-study`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from logo.errors import LogoError
from logo.paths import check_output_file, write_output_file


def demo(
    output: Annotated[Path, typer.Option("--output", help="Directory for summary.json, results.md, heatmap.")] = Path(
        "demo_results"),
    quick: Annotated[bool, typer.Option("--quick", help="A CI-sized run of the whole path.")] = False,
    n_per_task: Annotated[int | None, typer.Option(
        "--n-per-task", help="Held-out instances per task, at least 1 (default 6; --quick: 2).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per batch, at least 1.")] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    no_arrow: Annotated[bool, typer.Option("--no-arrow", help="Skip the PEFT Arrow baseline.")] = False,
) -> None:
    """The main job: LoGo on the embedded SmolLM2 with the demo library, against baselines."""
    from logo.experiments.demo import run_demo  # lazy: keeps `logo --help` free of the model stack

    run_demo(output, n_per_task=n_per_task, batch_size=batch_size, seed=seed, quick=quick, with_arrow=not no_arrow)


def signal_study(
    n_per_task: Annotated[int, typer.Option("--n-per-task", help="Validation prompts per demo task, at least 1.")] = (
        10),
    output: Annotated[Path | None, typer.Option("--output", help="Also write the table (markdown) to this file.")] = (
        None),
) -> None:
    """Precision@1 of routing-signal options on validation instances of the demo tasks (not the test set).

    Covered: the q_proj signal module at 10 layers (last to 30th from last), residual or post-norm input.

    Each with last-token or mean position, norm or entropy strategy, calibration none, mean or weight-norm.

    Not covered: zscore calibration, other signal modules, several layers or modules summed.
    """
    if n_per_task < 1:
        raise LogoError(f"--n-per-task must be at least 1, got {n_per_task}")
    if output is not None:
        check_output_file(output, "--output", "signal_study.md")  # before the study, not after it
    from logo.experiments.signal_study import study_demo, study_table  # lazy: as above

    rows = study_demo(n_per_task, progress=True)
    table = study_table(rows, 30)
    print(table, flush=True)
    if output is not None:  # after printing: a failed write loses nothing
        write_output_file(output, table + "\n", "--output",
                          "the table is printed above; run again with another --output to keep it as a file")


def register(app: typer.Typer) -> None:
    """Add demo and signal-study to ``app``."""
    app.command()(demo)
    app.command(name="signal-study")(signal_study)
