"""`logo fit-router`: fit a router to an adapter library and store it next to the library."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from logo.cli_options import Adapters, BaseModel, BatchSize, Device, Dtype
from logo.errors import LogoError

if TYPE_CHECKING:  # the engine's modules load torch: kept off `--help`'s path
    from logo.engine import LoGoEngine
    from logo.spec import EngineSpec


def fit_router_command(
    base_model: BaseModel = "smollm2-135m",
    adapters: Adapters = None,
    prompts_dir: Annotated[Path | None, typer.Option(
        "--prompts-dir", help="A folder of *.jsonl example prompts, one file per adapter ({\"prompt\": ...} per "
        "line; none.jsonl: prompts no adapter is for). Default: the library manifest's validation templates.")] = None,
    n_per_template: Annotated[int, typer.Option(
        "--n-per-template", help="Example prompts per validation template (manifest prompts only).")] = 8,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Where to write the router file. Default: logo_router.json next to the adapters (when they "
        "are all of their folder's).")] = None,
    no_abstain: Annotated[bool, typer.Option("--no-abstain", help="Never abstain to the base model.")] = False,
    abstain_from: Annotated[str, typer.Option(
        "--abstain-from", help="routing: the abstain rule reads the routing scores (default); any: it may read any "
        "single signal, judged on templates it was not fitted on.")] = "routing",
    device: Device = None,
    dtype: Dtype = "auto",
    batch_size: BatchSize = 16,
) -> None:
    """Fit a router to a library (signal, calibration, k, weighting, abstain rule) on a few example prompts per
    adapter, chosen by precision@1; `logo route/generate/demo`, the lm-eval backend and `logo run --method fitted`
    then use it (router flags override its fields)."""
    from logo.calibration import library_folder  # lazy: fast --help
    from logo.fit import ABSTAIN_FROM, check_examples, examples_from_jsonl, fit_router
    from logo.router import RouterConfig
    from logo.router_file import FILE_NAME
    from logo.spec import EngineSpec
    from logo.train.manifest_examples import examples_from_manifest

    if abstain_from not in ABSTAIN_FROM:
        raise LogoError(f"--abstain-from must be one of {', '.join(ABSTAIN_FROM)}, got {abstain_from!r}")
    if n_per_template < 1:
        raise LogoError(f"--n-per-template must be at least 1, got {n_per_template}")
    spec = EngineSpec(base_model, adapters, RouterConfig(k=1), device, dtype)
    entries, _ = spec.resolved()
    parents = {path.resolve().parent for _, path in entries}
    root = parents.pop() if len(parents) == 1 else None
    if prompts_dir is not None:
        examples, source = examples_from_jsonl(prompts_dir), str(prompts_dir)
    else:
        if root is None or not (root / "manifest.json").is_file():
            raise LogoError("the adapters have no manifest.json to take example prompts from; give --prompts-dir")
        examples = examples_from_manifest(root / "manifest.json", "valid", n_per_template)
        source = f"manifest validation templates, {n_per_template} prompts per template"
    if out is None:
        if root is None:
            raise LogoError("the adapters share no folder to store the router in; give --out FILE")
        if library_folder([path for _, path in entries]) is None:
            raise LogoError(f"the adapters are not exactly {root}'s adapters, so its {FILE_NAME} (the router of "
                            f"`-a {root}`) is not theirs to overwrite; give --out FILE and route them with --router "
                            "FILE")
        out = root / FILE_NAME
    if out.is_dir():
        raise LogoError(f"--out {out} is a directory; give the router file's path, e.g. {out / FILE_NAME}")
    if out.parent.exists() and not out.parent.is_dir():
        raise LogoError(f"cannot write {out}: {out.parent} is a file, not a folder; give --out FILE elsewhere")
    if not os.access(out.parent if out.parent.exists() else out.parent.parent, os.W_OK):
        raise LogoError(f"cannot write {out}; give --out FILE somewhere writable")
    check_examples(examples, [name for name, _ in entries])  # before the model loads, as every check above
    engine = fit_engine(spec)
    try:
        fitted = fit_router(engine, examples, base_model=base_model, batch_size=batch_size, source=source,
                            abstain=not no_abstain, abstain_from=abstain_from)
    finally:
        engine.close()
    try:
        fitted.save(out)
    except OSError as err:
        raise LogoError(f"cannot write the fitted router to {out} ({err.strerror}); give --out FILE elsewhere and "
                        "fit again") from None
    fit = fitted.fit
    abstain = fit.get("abstain") or {}
    print(f"signal: {fit['signal']}; k={fitted.config.k} ({fitted.config.weighting}); "
          f"precision@1 on {fit['n_seen']} example prompts {fit['precision_at_1']:.3f} "
          f"(official signal {official_precision(fit['official_precision_at_1'])})")
    if abstain:
        print(f"abstain: {abstain['rule']} of {abstain['signal']} below {abstain['threshold']:.4g}: "
              f"{abstain['unseen_abstained']:.2f} of "
              f"{fit['n_unseen']} prompts with no adapter abstain, {abstain['seen_abstained']:.2f} of the others")
    elif not no_abstain:
        print("abstain: none fitted (no example prompt is for no adapter: add a none.jsonl, or lines with "
              '"adapter": null, of prompts the library should leave to the base model)')
    print(f"wrote {out}")


def official_precision(value: float | None) -> str:
    """The official signal's precision@1 for the summary line; ``n/a`` when the adapters do not train its module
    (q_proj, last layer). A precision of 0 prints as 0.000."""
    return "n/a" if value is None else f"{value:.3f}"


def fit_engine(spec: EngineSpec) -> LoGoEngine:
    """The engine the fit probes with: the spec's model and adapters, with a router on a module and layer the
    adapters train (:func:`logo.fit.probe_config`). The official router (q_proj, last layer) is refused by a library
    that does not train q_proj there, and the fit reads every signal itself whatever the engine's router (no router
    file is read: the fit writes one)."""
    from logo.fit import probe_config

    return spec.build(progress=True, router_for=probe_config)


def register(app: typer.Typer) -> None:
    app.command(name="fit-router")(fit_router_command)
