"""Typer option declarations shared by every command (one place for each flag's spelling and help).

Commands build an :class:`~logo.spec.EngineSpec` from these with :func:`logo.router.router_overrides` (the flags given,
over the library's fitted router or the official one); the spec does the checking, so every router option
works, and fails, the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

BaseModel = Annotated[
    str,
    typer.Option(
        "--base-model", "--base_model", "-m",
        help="Local path, hub id, or preset: smollm2-135m (embedded), Llama-3.1-8B, Qwen2.5-7B, deepseek-llm-7b-base.",
    ),
]
Adapters = Annotated[
    list[str] | None,
    typer.Option(
        "--adapters", "-a",
        help="A directory of PEFT adapters, repeated adapter paths, hub:OWNER/REPO (one adapter or a folder of "
        "them), hub:OWNER/REPO/FOLDER/, hub:OWNER/REPO/FOLDER/NAME_PREFIX, or embedded:demo. Default: the preset's "
        "library.",
    ),
]
Prompts = Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeat for several).")]
PromptsFile = Annotated[
    Path | None,
    typer.Option("--prompts-file", help="A file with one prompt per line (\\n escapes allowed); - for stdin."),
]
Strategy = Annotated[str | None, typer.Option("--selection-strategy", "--selection_strategy", help="norm | entropy")]
K = Annotated[
    int | None,
    typer.Option("--n-selected-modules", "--n_selected_modules", "-k",
                 help="Adapters per prompt (the fitted router's, else the official 20, or the library size if it "
                 "holds fewer)."),
]
Layer = Annotated[int | None, typer.Option("--signal-layer", help="Signal layer; negative counts from the end.")]
Module = Annotated[str | None, typer.Option("--signal-module", help="Signal module name within the layer.")]
PostNorm = Annotated[bool | None, typer.Option(
    "--post-norm/--residual", help="Probe the module's real input (after the norm) / the residual stream.")]
Position = Annotated[str | None, typer.Option("--position", help="last | mean (over prompt tokens)")]
Weighting = Annotated[str | None, typer.Option("--weighting", help="normalize (official) | softmax")]
WeightTemp = Annotated[float | None, typer.Option("--weight-temperature", help="Temperature for --weighting softmax.")]
Calibration = Annotated[str | None, typer.Option("--calibration", help="none (official) | mean | zscore | weight-norm")]
Abstain = Annotated[str | None, typer.Option(
    "--abstain", help="none | top | margin: run the base model when the top score (or top-1/top-2 margin) is "
    "below --abstain-below")]
AbstainBelow = Annotated[float | None, typer.Option("--abstain-below", help="Threshold of --abstain.")]
Router = Annotated[str, typer.Option(
    "--router", help="auto (the library's fitted router, logo_router.json, if it has one; else the official) | "
    "official (the paper's) | PATH of a router file (or of a folder holding logo_router.json). Router flags "
    "override its fields.")]
Device = Annotated[str | None, typer.Option("--device", help="cpu | cuda (default: cuda if available)")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Prompts per batch.")]
Decode = Annotated[str, typer.Option(
    "--decode", help="eager (transformers generate) | static (static KV cache) | compiled (static cache + "
    "torch.compile; CUDA graphs on GPU; the first batch of each size compiles)")]
Json = Annotated[bool, typer.Option("--json", help="One JSON object per prompt per line.")]
