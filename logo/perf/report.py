"""Ratios computed within one bench run, and the printed table."""

from __future__ import annotations

from logo.perf.official import OFFICIAL_BATCHES


def over_base(decode: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Every variant's decode tokens/s over the base's at the same batch size."""
    base = decode["base"]
    return {
        variant: {b: round(row[b] / base[b], 3) for b in row if b in base and base[b] > 0}
        for variant, row in decode.items() if variant != "base"
    }


def ratios(result: dict) -> dict:
    """Decode tokens/s over the base's (eager, and on the fast path); probe over prefill."""
    out: dict = {"decode_over_base": over_base(result["decode_tok_s"]),
                 "probe_over_prefill": round(result["probe_ms"] / result["prefill_ms"], 3)}
    if "fast" in result:
        fast = result["fast"]["decode_tok_s"]
        out["fast_decode_over_base"] = over_base(fast)
        eager_base = result["decode_tok_s"]["base"]
        out["fast_logo_over_eager_base"] = {b: round(v / eager_base[b], 3) for b, v in fast["logo"].items()
                                            if eager_base.get(b)}
    by_layer = result.get("first_token_by_layer")
    if by_layer:
        out["first_token_by_layer_over_prefill"] = {layer: round(ms / by_layer["prefill_ms"], 3)
                                                    for layer, ms in by_layer["by_layer_ms"].items()}
    if result.get("probe_mid_layer_ms") is not None:
        out["probe_mid_layer_over_prefill"] = round(result["probe_mid_layer_ms"] / result["prefill_ms"], 3)
    return out


def print_table(result: dict) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True)
    r = result["ratios"]
    console.print(f"[bold]logo bench[/bold] {result['shape']} on {result['device_name']} (torch {result['torch']}): "
                  f"N={result['n_adapters']} rank {result['rank']} {','.join(result['targets'])}, k={result['k']}, "
                  f"prompt {result['prompt_len']} tokens, {result['new_tokens']} new tokens, "
                  f"median of {result['repeats']} interleaved runs; {result['decode_kernel']}")
    console.print(f"library load {result['load_s']:.2f} s (written in {result['library_write_s']:.1f} s); "
                  f"plain prefill {result['prefill_ms']:.1f} ms; probe+route {result['probe_ms']:.1f} ms "
                  f"({r['probe_over_prefill']:.2f}x prefill); probe+route at layer {result['probe_mid_layer']} "
                  f"{result['probe_mid_layer_ms']:.1f} ms ({r['probe_mid_layer_over_prefill']:.2f}x); "
                  f"{result['peak_mem_label']} {result['peak_mem_gb']} GB")
    if "first_token_by_layer_over_prefill" in r:
        by_layer = result["first_token_by_layer"]
        cells = ", ".join(f"layer {layer} {ms:.1f} ms ({r['first_token_by_layer_over_prefill'][layer]:.2f}x)"
                          for layer, ms in by_layer["by_layer_ms"].items())
        console.print(f"first token at batch 1 by signal layer (route + mixture + prefill, x plain prefill "
                      f"{by_layer['prefill_ms']:.1f} ms): {cells}")
    console.print(_decode_table("decode tokens/s, transformers generate (x base at the same batch) "
                                "[time to first token, ms]", result, r["decode_over_base"]))
    note = unmeasured_official(result)
    if note:
        console.print(note)
    if "fast" in result:
        fast = result["fast"]
        console.print(_decode_table(f"decode tokens/s, fast path: {fast['path']} (x fast base) [time to first "
                                    "token, ms]", fast, r["fast_decode_over_base"]))
        warm = ", ".join(f"{v} b{b} {s:.1f} s" for v, row in fast["warmup_s"].items() for b, s in row.items())
        console.print(f"fast path warm-up runs (compile included): {warm}")
    console.print(f"official path: PEFT with the {result['k']} selected adapters attached in "
                  f"{result['official_attach_s']:.2f} s; LoGo rows carry {result['distinct_mixtures']} distinct "
                  "mixtures at the largest batch")
    union = result.get("union_adapters")
    if union:
        console.print(f"adapters in the union of the largest batch's mixtures: logo {union['logo']}, "
                      f"logo_shared_pool {union['logo_shared_pool']} (of {result['n_adapters']}); "
                      f"logo_mid_signal routes at layer {result['probe_mid_layer']}")


def unmeasured_official(result: dict) -> str | None:
    """A line saying why the decode table has no official row (none of its batch sizes were asked for), else None."""
    if result["decode_tok_s"].get("official") != {}:  # measured, or a table without that variant (the fast one)
        return None
    batches = ", ".join(str(b) for b in OFFICIAL_BATCHES)
    return (f"official (PEFT) path: measured at batch {batches} only; add {batches} to --batch-sizes to "
            "compare with it")


def _decode_table(title: str, result: dict, over: dict):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("variant")
    batches = list(result["decode_tok_s"]["base"])
    for b in batches:
        table.add_column(f"batch {b}", justify="right")
    for variant, row in result["decode_tok_s"].items():
        if not row:  # not measured at any batch size of this run (the official path): said below the table
            continue
        cells = []
        for b in batches:
            if b not in row:
                cells.append("")
                continue
            ratio = "" if variant == "base" else f" ({over[variant][b]:.2f}x)"
            cells.append(f"{row[b]:.1f}{ratio} [{result['ttft_ms'][variant][b]:.0f}]")
        table.add_row(variant, *cells)
    return table
