"""`logo run` (the official evaluation entry point, plus baselines) and `logo compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def run(
    dataset: Annotated[str, typer.Option("--dataset", help="e.g. bbh.boolean_expressions; empty = all 26.")] = "",
    base_model: Annotated[str, typer.Option("--base-model", "--base_model")] = "Llama-3.1-8B",
    selection_strategy: Annotated[str, typer.Option("--selection-strategy", "--selection_strategy")] = "norm",
    n_selected_modules: Annotated[int, typer.Option("--n-selected-modules", "--n_selected_modules")] = 20,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    generation_early_stop: Annotated[bool, typer.Option("--generation-early-stop", "--generation_early_stop")] = False,
    data_dir: Annotated[str | None, typer.Option("--data-dir", "--data_dir")] = None,
    adapters: Annotated[list[str] | None, typer.Option("--adapters")] = None,
    output_dir: Annotated[str, typer.Option("--output-dir", "--output_dir", "--result_dir")] = "results",
    batch_size: Annotated[int, typer.Option("--batch-size", "--batch_size")] = 1,
    limit: Annotated[int | None, typer.Option("--limit")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "--max_new_tokens")] = 256,
    method: Annotated[
        str, typer.Option("--method", help="logo | base | uniform | random | fixed:NAME | arrow")
    ] = "logo",
    device: Annotated[str | None, typer.Option("--device")] = None,
    dtype: Annotated[str, typer.Option("--dtype")] = "auto",
    calibration: Annotated[str, typer.Option("--calibration", help="none (official) | mean | weight-norm")] = "none",
) -> None:
    """Evaluate on the paper's datasets with the official arguments and output files."""
    from logo.eval.runner import RunConfig
    from logo.eval.runner import run as run_eval

    config = RunConfig(
        base_model=base_model, dataset=dataset, selection_strategy=selection_strategy,
        n_selected_modules=n_selected_modules, seed=seed, generation_early_stop=generation_early_stop,
        data_dir=data_dir, adapters=adapters or None, output_dir=output_dir, batch_size=batch_size, limit=limit,
        max_new_tokens=max_new_tokens, method=method, device=device, dtype=dtype,
        router_options={"calibration": calibration},
    )
    run_eval(config)


def compare(
    results: Annotated[list[Path], typer.Argument(help="Run directories, or directories holding them.")],
    output: Annotated[Path, typer.Option("--output", help="Where compare.md / .csv / selection.png go.")] = Path(
        "comparison"),
) -> None:
    """Table of methods x datasets (plus averages) from `logo run` results; markdown, CSV and a PNG."""
    from logo.eval.compare import compare as do_compare

    print(do_compare(results, output))
    print(f"wrote {output}/compare.md, compare.csv, selection.png")


def register(app: typer.Typer) -> None:
    """Add run and compare to ``app``."""
    app.command()(run)
    app.command()(compare)
