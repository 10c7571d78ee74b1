"""Ratios computed within one bench run, and the printed table."""

from __future__ import annotations


def ratios(result: dict) -> dict:
    """Every variant's decode tokens/s over the base's at the same batch size; probe over prefill."""
    decode = result["decode_tok_s"]
    base = decode["base"]
    over_base = {
        variant: {b: round(row[b] / base[b], 3) for b in row if b in base and base[b] > 0}
        for variant, row in decode.items() if variant != "base"
    }
    out: dict = {"decode_over_base": over_base,
                 "probe_over_prefill": round(result["probe_ms"] / result["prefill_ms"], 3)}
    if result.get("probe_mid_layer_ms") is not None:
        out["probe_mid_layer_over_prefill"] = round(result["probe_mid_layer_ms"] / result["prefill_ms"], 3)
    return out


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    r = result["ratios"]
    console.print(f"[bold]logo bench[/bold] {result['shape']} on {result['device_name']} (torch {result['torch']}): "
                  f"N={result['n_adapters']} rank {result['rank']} {','.join(result['targets'])}, k={result['k']}, "
                  f"prompt {result['prompt_len']} tokens, {result['new_tokens']} new tokens, "
                  f"median of {result['repeats']} interleaved runs")
    console.print(f"library load {result['load_s']:.2f} s (written in {result['library_write_s']:.1f} s); "
                  f"plain prefill {result['prefill_ms']:.1f} ms; probe+route {result['probe_ms']:.1f} ms "
                  f"({r['probe_over_prefill']:.2f}x prefill); probe at layer {result['probe_mid_layer']} "
                  f"{result['probe_mid_layer_ms']:.1f} ms ({r['probe_mid_layer_over_prefill']:.2f}x); "
                  f"{result['peak_mem_label']} {result['peak_mem_gb']} GB")
    table = Table(title="decode tokens/s (x base at the same batch) [time to first token, ms]")
    table.add_column("variant")
    batches = list(result["decode_tok_s"]["base"])
    for b in batches:
        table.add_column(f"batch {b}", justify="right")
    for variant, row in result["decode_tok_s"].items():
        cells = []
        for b in batches:
            if b not in row:
                cells.append("")
                continue
            ratio = "" if variant == "base" else f" ({r['decode_over_base'][variant][b]:.2f}x)"
            cells.append(f"{row[b]:.1f}{ratio} [{result['ttft_ms'][variant][b]:.0f}]")
        table.add_row(variant, *cells)
    console.print(table)
    console.print(f"official path: PEFT with the {result['k']} selected adapters attached in "
                  f"{result['official_attach_s']:.2f} s; LoGo rows carry {result['distinct_mixtures']} distinct "
                  "mixtures at the largest batch")
