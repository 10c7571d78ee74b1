"""`logo route`, `logo generate` and `logo calibrate`: LoGo on prompts given on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from logo.cli_options import (
    Abstain,
    AbstainBelow,
    Adapters,
    BaseModel,
    BatchSize,
    Calibration,
    Decode,
    Device,
    Dtype,
    Json,
    K,
    Layer,
    Module,
    Position,
    PostNorm,
    Prompts,
    PromptsFile,
    Router,
    Strategy,
    Weighting,
    WeightTemp,
)
from logo.errors import LogoError
from logo.generation import GenerationSettings, check_prompts, check_sampling_flags
from logo.router import router_overrides


def read_prompts(prompts: list[str] | None, prompts_file: Path | None,
                 options: str = "--prompt TEXT (repeatable) or --prompts-file FILE") -> list[str]:
    """The prompts of ``--prompt`` and of ``--prompts-file`` (one per line, ``-`` for stdin; ``\\n`` in a prompt
    is a newline); ``options``: the command's own, for the message when there are none."""
    out = [p.replace("\\n", "\n") for p in prompts or []]
    if prompts_file is not None:
        if str(prompts_file) == "-":
            text = sys.stdin.read()
        elif prompts_file.is_dir():
            raise LogoError(f"prompts file {prompts_file} is a directory; give a text file, one prompt per line")
        elif not prompts_file.is_file():
            raise LogoError(f"prompts file {prompts_file} does not exist")
        else:
            try:
                text = prompts_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise LogoError(f"prompts file {prompts_file} is not UTF-8 text (byte {err.start}); save it as "
                                "UTF-8, one prompt per line") from None
        out += [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not out:
        raise LogoError(f"no prompts: give {options}")
    check_prompts(out)
    return out


def engine_spec(base_model, adapters, overrides: dict, router_file: str, device, dtype, decode="eager"):
    """The :class:`EngineSpec` the flags describe: the library's fitted router (or ``--router``'s) with the router
    flags over it, checked before any model loads."""
    from logo.spec import EngineSpec  # lazy: keeps `logo --help` free of the transformers import

    return EngineSpec(base_model, adapters, None, device, dtype, decode, fit_k="k" not in overrides,
                      router_file=router_file, router_overrides=overrides)


def build_engine(base_model, adapters, overrides: dict, router_file: str, device, dtype, decode="eager"):
    """The engine the flags describe (see :func:`engine_spec`), its calibration statistics checked before any
    prompt is routed."""
    return build_checked(engine_spec(base_model, adapters, overrides, router_file, device, dtype, decode))


def build_checked(spec, progress: bool = True):
    """``spec``'s engine, its calibration statistics checked (:meth:`LoGoEngine.check_statistics`), so a router
    that would fail every prompt fails here, once, instead (the engine is closed then)."""
    engine = spec.build(progress=progress)
    try:
        engine.check_statistics()
    except LogoError:
        engine.close()
        raise
    return engine


def signal_description(config) -> str:
    """The signal a router reads, its layers as the flags (or the router file) give them."""
    layers = ", ".join(str(layer) for layer in config.signal_layers)
    return (f"{config.strategy} of {'+'.join(config.signal_modules)} at layer{'s' * (len(config.signal_layers) > 1)} "
            f"{layers} ({'post-norm' if config.post_norm else 'residual'}, {config.position} token)")


def route_record(prompt: str, route, names: list[str]) -> dict:
    """The JSON record of one routed prompt (``selected`` in descending score order; empty, with ``abstained``
    true, when the router sent the prompt to the base model)."""
    return {
        "prompt": prompt,
        "abstained": route.abstained,
        "selected": [
            {"name": n, "index": i, "score": s, "weight": w}
            for n, i, s, w in zip(route.names, route.indices, route.scores, route.weights)
        ],
        "scores": dict(zip(names, route.all_scores)),
    }


def _print_table(records: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for rec in records:
        table = Table(title=rec["prompt"][:100].replace("\n", "⏎"), title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("adapter")
        table.add_column("score", justify="right")
        table.add_column("weight", justify="right")
        for rank, sel in enumerate(rec["selected"], 1):
            table.add_row(str(rank), sel["name"], f"{sel['score']:.4g}", f"{sel['weight']:.3f}")
        console.print(table)
        if rec.get("abstained"):
            console.print("abstained: no adapter fits this prompt well enough, so it runs on the base model")
        if "output" in rec:
            console.print(f"[bold]output:[/bold] {rec['output']}\n")


def route(
    prompt: Prompts = None,
    prompts_file: PromptsFile = None,
    base_model: BaseModel = "smollm2-135m",
    adapters: Adapters = None,
    router: Router = "auto",
    selection_strategy: Strategy = None,
    n_selected_modules: K = None,
    signal_layer: Layer = None,
    signal_module: Module = None,
    post_norm: PostNorm = None,
    position: Position = None,
    weighting: Weighting = None,
    weight_temperature: WeightTemp = None,
    calibration: Calibration = None,
    abstain: Abstain = None,
    abstain_below: AbstainBelow = None,
    device: Device = None,
    dtype: Dtype = "auto",
    batch_size: BatchSize = 8,
    json_out: Json = False,
) -> None:
    """Select adapters for each prompt (LoGo probe, score, top-k) and show the mixture."""
    prompts = read_prompts(prompt, prompts_file)
    overrides = router_overrides(selection_strategy, n_selected_modules, signal_layer, signal_module, post_norm,
                                 position, weighting, weight_temperature, calibration, abstain, abstain_below)
    engine = build_engine(base_model, adapters, overrides, router, device, dtype)
    routes = engine.route(prompts, batch_size=batch_size, progress=len(prompts) > batch_size)
    records = [route_record(p, r, engine.library.names) for p, r in zip(prompts, routes)]
    print_records(records, json_out)


def generate(
    prompt: Prompts = None,
    prompts_file: PromptsFile = None,
    base_model: BaseModel = "smollm2-135m",
    adapters: Adapters = None,
    router: Router = "auto",
    selection_strategy: Strategy = None,
    n_selected_modules: K = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "--max_new_tokens")] = 256,
    generation_early_stop: Annotated[
        bool, typer.Option("--generation-early-stop", "--generation_early_stop", help="Stop at the first newline.")
    ] = False,
    do_sample: Annotated[bool, typer.Option("--do-sample", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float | None, typer.Option(
        "--temperature", help="Sampling temperature (with --do-sample; default 1.0).")] = None,
    top_p: Annotated[float | None, typer.Option(
        "--top-p", help="Nucleus sampling mass (with --do-sample; default 1.0).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    signal_layer: Layer = None,
    signal_module: Module = None,
    post_norm: PostNorm = None,
    position: Position = None,
    weighting: Weighting = None,
    weight_temperature: WeightTemp = None,
    calibration: Calibration = None,
    abstain: Abstain = None,
    abstain_below: AbstainBelow = None,
    device: Device = None,
    dtype: Dtype = "auto",
    batch_size: BatchSize = 8,
    decode: Decode = "eager",
    json_out: Json = False,
) -> None:
    """Route each prompt and generate with its own weighted mixture of adapters."""
    prompts = read_prompts(prompt, prompts_file)
    check_sampling_flags(do_sample, {"--temperature": temperature, "--top-p": top_p})
    settings = GenerationSettings(max_new_tokens, generation_early_stop, do_sample,
                                  1.0 if temperature is None else temperature, 1.0 if top_p is None else top_p, seed)
    overrides = router_overrides(selection_strategy, n_selected_modules, signal_layer, signal_module, post_norm,
                                 position, weighting, weight_temperature, calibration, abstain, abstain_below)
    engine = build_engine(base_model, adapters, overrides, router, device, dtype, decode)
    results = engine.generate(prompts, batch_size=batch_size, progress=len(prompts) > batch_size,
                              **settings.to_dict())
    records = []
    for res in results:
        rec = route_record(res.prompt, res.route, engine.library.names)
        rec["output"] = res.text
        records.append(rec)
    print_records(records, json_out)


def calibrate(
    base_model: BaseModel = "smollm2-135m",
    adapters: Adapters = None,
    prompts_file: PromptsFile = None,
    router: Router = "auto",
    selection_strategy: Strategy = None,
    signal_layer: Layer = None,
    signal_module: Module = None,
    post_norm: PostNorm = None,
    position: Position = None,
    device: Device = None,
    dtype: Dtype = "auto",
    batch_size: BatchSize = 8,
) -> None:
    """Compute per-adapter score statistics (mean and std, label-free) for `mean` and `zscore` calibration of the
    signal `logo route` reads with the same flags (every layer and module of a pooled one: the library's fitted
    router's unless --router says otherwise, with the signal flags over it) and store them with the library."""
    prompts = read_prompts(None, prompts_file, "prompts in --prompts-file FILE") if prompts_file else None
    overrides = router_overrides(selection_strategy, 1, signal_layer, signal_module, post_norm, position)
    overrides.update(statistics="default", abstain="none")  # `logo calibrate`'s statistics, whatever the file's
    engine = engine_spec(base_model, adapters, overrides, router, device, dtype).build(progress=True)
    try:
        entry = engine.calibrate(prompts, batch_size=batch_size, source=str(prompts_file) if prompts_file else None,
                                 progress=True)
    finally:
        engine.close()
    print(f"calibrated {len(engine.library)} adapters for {signal_description(engine.router.config)} on "
          f"{entry['n_prompts']} prompts -> {entry['file']}")


def print_records(records: list[dict], json_out: bool) -> None:
    """Routed (and generated) records as JSON lines, or as one table per prompt."""
    if json_out:
        for rec in records:
            print(json.dumps(rec, ensure_ascii=False))
    else:
        _print_table(records)


def register(app: typer.Typer) -> None:
    """Add route, generate and calibrate to ``app``."""
    app.command()(route)
    app.command()(generate)
    app.command()(calibrate)
