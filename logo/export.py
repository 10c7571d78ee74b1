"""`logo export`: a LoGo mixture as one standard PEFT LoRA adapter, for fleets that already serve with vLLM or PEFT.

A mixture ``sum_i w_i s_i B_i A_i`` of k adapters is itself a LoRA of rank ``sum_i r_i`` per module:

    A = [A_1; ...; A_k]          (rank rows stacked)        [R, d_in]
    B = [c_1 B_1, ..., c_k B_k]  (columns, c_i = w_i s_i)   [d_out, R]

so ``B A`` is the mixture exactly (``--exact``). Rank pairs that are zero in the library's padded stacks
(an adapter's rank below the library's largest, or a module it does not train) are dropped, which changes
nothing. ``--rank R`` compresses each module to its best rank-R approximation in Frobenius norm without ever
forming the ``d_out x d_in`` delta: QR of ``B`` and ``A^T``, SVD of the small ``R x R`` core, keep the top
``R`` singular triplets; the relative error ``||delta - delta_R|| / ||delta||`` is reported per module. ``R``
above the exact rank (the largest module's concatenated rank, what ``--exact`` writes) is refused: it would only
add zero rows.

A prompt's mixture is routed exactly as `logo route` routes it: the library's fitted router (``--router auto``)
or the one ``--router`` names, with the router flags over it. A prompt the router abstains on (sends to the base
model) has no mixture: alone it is an error; in a ``--prompts-file`` it counts as weight 0 for every adapter.

Every module is written with the same rank (zero-padded where a module needs fewer), ``lora_alpha`` equal to
that rank (scaling 1: weights and scalings are folded into B), and ``target_modules`` as the leaf names, which
is what vLLM's ``--lora-modules`` and PEFT's ``PeftModel.from_pretrained`` load.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import typer
from safetensors import SafetensorError

from logo.cli_core import engine_spec, read_prompts
from logo.cli_options import (
    Abstain,
    AbstainBelow,
    Adapters,
    BaseModel,
    BatchSize,
    Calibration,
    Device,
    Dtype,
    K,
    Layer,
    Module,
    Position,
    PostNorm,
    PromptsFile,
    Router,
    Strategy,
    Weighting,
    WeightTemp,
)
from logo.errors import LogoError, one_line
from logo.library import AdapterLibrary
from logo.paths import check_new_dir, new_folder, save_safetensors
from logo.presets import get_preset
from logo.router import router_overrides

WEIGHTS_FILE, CONFIG_FILE, RECORD_FILE = "adapter_model.safetensors", "adapter_config.json", "logo_export.json"


@dataclass
class ExportedMixture:
    """What was written: the mixture, the rank, and each module's relative approximation error."""

    names: list[str]
    weights: list[float]
    rank: int
    exact: bool
    errors: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def average_mixture(weight_rows: list[dict[str, float]]) -> dict[str, float]:
    """The task mixture of several routed prompts: each adapter's mean weight (0 where a prompt did not select it,
    and for every adapter where the router abstained on the prompt: an empty row)."""
    if not weight_rows:
        raise LogoError("no prompts to average a mixture over")
    if not any(weight_rows):
        raise LogoError(f"the router abstained on {'the prompt' if len(weight_rows) == 1 else 'every prompt'} "
                        "(sent it to the base model), so there is no mixture to export; give --abstain none "
                        "to export the routed mixture anyway")
    total: dict[str, float] = {}
    for row in weight_rows:
        for name, weight in row.items():
            total[name] = total.get(name, 0.0) + weight / len(weight_rows)
    return {name: w for name, w in sorted(total.items(), key=lambda item: -item[1]) if w > 0}


def parse_mixture(text: str, names: list[str]) -> dict[str, float]:
    """``NAME=W,NAME=W`` -> ``{name: weight}``; every name must be one of the library's ``names`` and every weight a
    finite number. Takes the names, not the library, so that a typo fails before the model loads."""
    mixture: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        if not sep:
            raise LogoError(f"--mixture entry {part!r} is not NAME=WEIGHT")
        try:
            weight = float(value)
        except ValueError:
            raise LogoError(f"--mixture entry {part!r}: {value!r} is not a number") from None
        if not math.isfinite(weight):
            raise LogoError(f"--mixture entry {part!r}: the weight must be a finite number")
        if name.strip() not in names:
            raise LogoError(f"--mixture entry {part!r}: no adapter named {name.strip()!r} in the library "
                            f"({len(names)} adapters); give one of its names")
        mixture[name.strip()] = mixture.get(name.strip(), 0.0) + weight
    if not mixture or not any(mixture.values()):
        raise LogoError("--mixture names no adapter with a non-zero weight")
    return mixture


def mixture_factors(library: AdapterLibrary, mixture: dict[str, float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, the exact concatenated factors ``(A [R_m, d_in], B [d_out, R_m])`` in fp32 (zero pairs dropped)."""
    idx = torch.tensor([library.index(name) for name in mixture])
    weights = torch.tensor(list(mixture.values()), dtype=torch.float32)
    out = {}
    for module, stack in library.stacks.items():
        a = stack.A[idx.to(stack.A.device)].float().cpu()  # [k, r, d_in]
        b = stack.B[idx.to(stack.B.device)].float().cpu()  # [k, d_out, r]
        coeff = weights * stack.scaling[idx.to(stack.scaling.device)].float().cpu()  # [k]
        a = a.reshape(-1, a.shape[-1])  # [k*r, d_in]
        b = (b * coeff[:, None, None]).permute(1, 0, 2).reshape(b.shape[1], -1)  # [d_out, k*r]
        keep = (a.abs().sum(1) > 0) & (b.abs().sum(0) > 0)
        if bool(keep.any()):
            out[module] = (a[keep].contiguous(), b[:, keep].contiguous())
    if not out:
        raise LogoError("the mixture is empty in every module (all weights or scalings are zero)")
    return out


def compress(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``b @ a`` and the relative Frobenius error, from QR + SVD of a small core."""
    q_b, r_b = torch.linalg.qr(b.double())  # [d_out, K], [K, K]
    q_a, r_a = torch.linalg.qr(a.double().T)  # [d_in, K], [K, K]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    keep = min(rank, s.numel())
    error = (s[keep:].square().sum() / s.square().sum().clamp(min=1e-300)).sqrt().item()
    new_b = (q_b @ u[:, :keep]) * s[:keep]
    new_a = vh[:keep] @ q_a.T
    return new_a.float(), new_b.float(), error


def check_rank(rank: int | None) -> None:
    """``--rank`` is at least 1 (None: ``--exact``)."""
    if rank is not None and rank < 1:
        raise LogoError(f"--rank must be at least 1, got {rank}")


def peft_base_model(spec: str) -> str:
    """The base model an exported adapter names (``base_model_name_or_path``), as PEFT's AutoPeftModelForCausalLM and
    vLLM load it: a preset's hub id (for the embedded model, the hub model its GGUF file was quantized from), a local
    model folder's absolute path, a hub id as given."""
    preset = get_preset(spec)
    if preset is not None and preset.hub_id is not None:
        return preset.hub_id
    if preset is not None:  # the embedded default, the one preset without a hub id
        from logo.models import SMOLLM2_HUB_ID  # lazy: transformers stays out of `logo --help`

        return SMOLLM2_HUB_ID
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def check_empty_output(output: Path) -> None:
    """``output`` is a new or empty directory (a file, or a directory with files, is a one-line error)."""
    if output.exists() and not output.is_dir():
        raise LogoError(f"--output {output} is a file, not a directory; give a new or empty directory")
    if output.exists() and any(output.iterdir()):
        raise LogoError(f"{output} exists and is not empty; choose a new --output directory (nothing was written)")


def export_mixture(library: AdapterLibrary, mixture: dict[str, float], output: Path, rank: int | None = None,
                   base_model: str = "", dtype: torch.dtype | None = None) -> ExportedMixture:
    """Write ``mixture`` as one PEFT LoRA adapter directory: exact (``rank=None``) or compressed to ``rank``.
    ``base_model``: what the adapter config names as its base model (see :func:`peft_base_model`)."""
    check_rank(rank)
    check_empty_output(output)
    factors = mixture_factors(library, mixture)
    exact_rank = max(a.shape[0] for a, _ in factors.values())
    if rank is not None and rank > exact_rank:
        raise LogoError(f"--rank {rank} is above this mixture's exact rank {exact_rank} (it would only add zero "
                        f"rows); give --rank {exact_rank} or less, or --exact (nothing was written)")
    errors: dict[str, float] = {}
    if rank is not None:
        for module, (a, b) in factors.items():
            new_a, new_b, errors[module] = compress(a, b, rank)
            factors[module] = (new_a, new_b)
    width = exact_rank if rank is None else rank
    dtype = dtype or next(iter(library.stacks.values())).dtype
    tensors = {}
    for module, (a, b) in factors.items():
        padded_a = torch.zeros(width, a.shape[1])
        padded_b = torch.zeros(b.shape[0], width)
        padded_a[: a.shape[0]], padded_b[:, : b.shape[1]] = a, b
        tensors[f"base_model.model.{module}.lora_A.weight"] = padded_a.to(dtype).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = padded_b.to(dtype).contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": width,
        "lora_alpha": width, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}), "inference_mode": True,
    }
    record = {"mixture": mixture, "rank": width, "exact": rank is None, "relative_error": errors,
              "library": library.names}
    write_adapter(output, tensors, config, record)
    return ExportedMixture(list(mixture), list(mixture.values()), width, rank is None, errors,
                           [output / WEIGHTS_FILE, output / CONFIG_FILE, output / RECORD_FILE])


def write_adapter(output: Path, tensors: dict[str, torch.Tensor], config: dict, record: dict) -> None:
    """Write the adapter's files into a new folder that becomes ``output`` in one rename (:func:`paths.new_folder`),
    so that a failed write (a full disk, a file-size limit) leaves no half adapter, which a rerun would refuse as not
    empty, and no parent folders made for it; the failure is a one-line error naming --output."""
    try:
        with new_folder(output) as tmp:
            save_safetensors(tensors, tmp / WEIGHTS_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    except (OSError, SafetensorError) as err:
        if output.is_dir() and any(output.iterdir()):  # filled by something else during the run
            raise LogoError(f"{output} was filled during the export; choose a new --output directory "
                            "(nothing was written)") from None
        reason = err.strerror if isinstance(err, OSError) and err.strerror else one_line(err)
        raise LogoError(f"cannot write --output {output}: {reason}; nothing was written (free some space, or "
                        "give another --output)") from None


def export(
    output: Annotated[Path, typer.Option("--output", help="Directory to write the PEFT adapter to (new or empty).")],
    base_model: BaseModel = "smollm2-135m",
    adapters: Adapters = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", help="Export this prompt's routed mixture (routed as `logo route` routes it).")] = None,
    prompts_file: PromptsFile = None,
    mixture: Annotated[str | None, typer.Option(
        "--mixture", help="Export this fixed mixture: NAME=WEIGHT,NAME=WEIGHT,...")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Concatenate the factors: rank = sum of the ranks.")] = False,
    rank: Annotated[int | None, typer.Option(
        "--rank", help="Compress every module to this rank (SVD); at most the exact rank (what --exact writes), "
        "higher is refused.")] = None,
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
) -> None:
    """Write a mixture (one prompt's, a file of prompts' average, or a named one) as a standard PEFT LoRA adapter.

    Prompts are routed as `logo route` routes them: the library's fitted router unless --router says otherwise,
    with the router flags over it. A --prompts-file prompt the router abstains on counts as weight 0."""
    if sum(x is not None for x in (prompt, prompts_file, mixture)) != 1:
        raise LogoError("give exactly one of --prompt, --prompts-file and --mixture")
    if exact == (rank is not None):
        raise LogoError("give exactly one of --exact and --rank R")
    check_rank(rank)
    overrides = router_overrides(selection_strategy, n_selected_modules, signal_layer, signal_module, post_norm,
                                 position, weighting, weight_temperature, calibration, abstain, abstain_below)
    if mixture is not None and (overrides or router != "auto"):
        raise LogoError("--mixture gives the mixture itself: --router and the router flags (-k, --selection-strategy, "
                        "...) only apply to --prompt/--prompts-file; leave them out")
    prompts = read_prompts([prompt] if prompt is not None else None, prompts_file) if mixture is None else []
    if mixture is not None:  # no routing: load the library without its router file (k=1 fits any library)
        spec = engine_spec(base_model, adapters, {"k": 1}, "official", device, dtype)
    else:  # the engine `logo route` builds from the same flags
        spec = engine_spec(base_model, adapters, overrides, router, device, dtype)
    check_empty_output(output)
    check_new_dir(output)  # checked now, before the model loads; made only with the files, in one rename
    # the adapters' names come without the model: a typo in --mixture fails before the slow load
    chosen = parse_mixture(mixture, [name for name, _ in spec.entries()]) if mixture is not None else None
    engine = spec.build(progress=True)
    try:
        if chosen is None:
            engine.check_statistics()
            routes = engine.route(prompts, batch_size=batch_size, progress=len(prompts) > batch_size)
            chosen = average_mixture([dict(zip(r.names, r.weights)) for r in routes])
            abstained = sum(r.abstained for r in routes)
            if abstained:
                print(f"note: the router abstained on {abstained} of {len(routes)} prompts (sent them to the "
                      "base model); they count as weight 0 in the average", file=sys.stderr)
        result = export_mixture(engine.library, chosen, output, rank, peft_base_model(base_model))
    finally:
        engine.close()
    mix = ", ".join(f"{n} {w:.3f}" for n, w in zip(result.names, result.weights))
    print(f"wrote {output} (rank {result.rank}, {'exact' if result.exact else 'SVD'}): {mix}")
    if result.errors:
        print(f"relative error per module: max {result.max_error:.4f}, mean "
              f"{sum(result.errors.values()) / len(result.errors):.4f} (all in {output / 'logo_export.json'})")


def register(app: typer.Typer) -> None:
    """Add the export command to ``app``."""
    app.command()(export)
