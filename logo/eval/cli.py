"""`logo run` (the official evaluation entry point, plus baselines) and `logo compare`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from logo.cli_options import Calibration, Layer, Module, Position, PostNorm, Weighting, WeightTemp
from logo.errors import LogoError

OFFICIAL_DATA_DIR = Path("data")
METHOD_HELP = "logo | fitted | base | uniform | random | fixed:NAME | arrow"
"""The registry's names (logo.methods.method_names(); a test keeps the two equal): spelled out here so that
`logo --help` need not import the model stack."""  # the official --data_dir default, used when it exists


def run(
    dataset: Annotated[str, typer.Option(
        "--dataset", help="e.g. bbh.boolean_expressions, or a comma-separated list; empty = the paper's 26.")] = "",
    base_model: Annotated[str, typer.Option(
        "--base-model", "--base_model", help="Preset (Llama-3.1-8B, Qwen2.5-7B, deepseek-llm-7b-base, smollm2-135m), "
        "local dir or hub id.")] = "Llama-3.1-8B",
    selection_strategy: Annotated[str, typer.Option("--selection-strategy", "--selection_strategy",
                                                    help="norm | entropy")] = "norm",
    n_selected_modules: Annotated[int, typer.Option("--n-selected-modules", "--n_selected_modules",
                                                    help="k: adapters merged per prompt.")] = 20,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    generation_early_stop: Annotated[bool, typer.Option(
        "--generation-early-stop", "--generation_early_stop", help="Stop each prompt at its first newline.")] = False,
    data_dir: Annotated[str | None, typer.Option(
        "--data-dir", "--data_dir", help="Official jsonl layout, BBH JSON and/or hub snapshots (default: ./data if "
        "it exists, else the hub).")] = None,
    adapters: Annotated[list[str] | None, typer.Option(
        "--adapters", help="Adapter library (default: the preset's, e.g. the 260 FlanV2 LoRAs).")] = None,
    output_dir: Annotated[str, typer.Option("--output-dir", "--output_dir", "--result-dir",
                                            "--result_dir")] = "results",
    batch_size: Annotated[int, typer.Option("--batch-size", "--batch_size")] = 1,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N instances of each dataset.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "--max_new_tokens")] = 256,
    method: Annotated[str, typer.Option(
        "--method", help=f"{METHOD_HELP}, or a comma-separated list (one model load for all).")
    ] = "logo",
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 (default: cuda if any)")] = None,
    gpu: Annotated[int | None, typer.Option("--gpu", help="Official: CUDA device index (= --device cuda:N)")] = None,
    model_dir: Annotated[str | None, typer.Option(
        "--model-dir", "--model_dir", help="Official: a directory holding the base model as <model_dir>/<base_model>.")
    ] = None,
    save_dir: Annotated[str | None, typer.Option(
        "--save-dir", "--save_dir", hidden=True, help="Official, and unused there too: accepted with a note.")] = None,
    dtype: Annotated[str, typer.Option("--dtype")] = "auto",
    decode: Annotated[str, typer.Option(
        "--decode", help="eager (transformers generate) | static (static KV cache) | compiled (+ torch.compile)")
    ] = "eager",
    signal_layer: Layer = -1,
    signal_module: Module = "q_proj",
    post_norm: PostNorm = False,
    position: Position = "last",
    weighting: Weighting = "normalize",
    weight_temperature: WeightTemp = 1.0,
    calibration: Calibration = "none",
    ray: Annotated[str | None, typer.Option(
        "--ray", help="Run on Ray: 'local' (or '') starts a local Ray, HOST:PORT joins a cluster.")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="With --ray: worker actors, one engine each (default 2).")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option(
        "--gpus-per-worker", help="With --ray: GPUs per worker (default 0).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start afresh instead of continuing the results already in the output directory.")] = False,
) -> None:
    """Evaluate on the paper's datasets with the official arguments and output files (resumable)."""
    from logo.eval.runner import RunConfig, run_methods

    if gpu is not None:
        if device is not None:
            raise LogoError("give --gpu or --device, not both")
        device = f"cuda:{gpu}"
    if ray is None:
        given = [flag for flag, value in (("--workers", workers), ("--gpus-per-worker", gpus_per_worker))
                 if value is not None]
        if given:
            raise LogoError(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --ray (e.g. --ray local); "
                            "without it the run is one process")
    if save_dir is not None:
        print(f"note: --save-dir {save_dir} is not used (the official main.py does not use it either); each dataset's "
              "progress is kept in its result directory (.logo_records.jsonl)", file=sys.stderr)
    if data_dir is None and OFFICIAL_DATA_DIR.is_dir():
        data_dir = str(OFFICIAL_DATA_DIR)
        print(f"--data-dir {OFFICIAL_DATA_DIR} (the official default; datasets not found there come from the hub)")
    methods = [m.strip() for m in method.split(",") if m.strip()]
    if not methods:
        raise LogoError(f"--method is empty; give one or more of {METHOD_HELP}")
    config = RunConfig(
        base_model=base_model, model_dir=model_dir, dataset=dataset, selection_strategy=selection_strategy,
        n_selected_modules=n_selected_modules, seed=seed, generation_early_stop=generation_early_stop,
        data_dir=data_dir, adapters=adapters or None, output_dir=output_dir, batch_size=batch_size, limit=limit,
        max_new_tokens=max_new_tokens, method=methods[0], device=device, dtype=dtype, decode=decode,
        router_options={"layer": signal_layer, "module": signal_module, "post_norm": post_norm, "position": position,
                        "weighting": weighting, "temperature": weight_temperature, "calibration": calibration},
        overwrite=overwrite,
    )
    fitted_ignores = _flags_fitted_ignores(config)
    if "fitted" in methods and fitted_ignores:
        print(f"note: method 'fitted' routes with the library's router file as it was fitted; "
              f"{', '.join(fitted_ignores)} apply only to the other methods", file=sys.stderr)
    if ray is None:
        run_methods(config, methods)
        return
    from logo.eval.distributed import run_methods_ray  # lazy: Ray is an optional extra

    run_methods_ray(config, methods, address=ray, workers=2 if workers is None else workers,
                    gpus_per_worker=0.0 if gpus_per_worker is None else gpus_per_worker)


def compare(
    results: Annotated[list[Path], typer.Argument(help="Run directories, or directories holding them.")],
    output: Annotated[Path, typer.Option(
        "--output", help="Where compare.md, compare.csv and selection.png go.")] = Path("comparison"),
) -> None:
    """Table of methods x datasets (plus averages) from `logo run` results; markdown, CSV and a PNG."""
    from logo.eval.compare import compare as do_compare

    report = do_compare(results, output)
    print(report.markdown)
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(f"wrote {', '.join(str(p) for p in report.files)}")


def register(app: typer.Typer) -> None:
    """Add run and compare to ``app``."""
    app.command()(run)
    app.command()(compare)


def _flags_fitted_ignores(config) -> list[str]:
    """The router flags of ``config`` set away from the official router's values (method ``fitted`` ignores them)."""
    from logo.router import RouterConfig  # lazy: keeps `logo --help` free of the torch import

    official = RouterConfig()
    flags = {"layer": "--signal-layer", "module": "--signal-module", "post_norm": "--post-norm",
             "position": "--position", "weighting": "--weighting", "temperature": "--weight-temperature",
             "calibration": "--calibration"}
    given = {"--selection-strategy": (config.selection_strategy, official.strategy),
             "--n-selected-modules": (config.n_selected_modules, official.k)}
    given.update({flags[name]: (value, getattr(official, name)) for name, value in config.router_options.items()})
    return [flag for flag, (value, default) in given.items() if value != default]
