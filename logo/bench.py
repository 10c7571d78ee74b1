"""`logo bench`: load time, probe latency and decode throughput of LoGo against the base model and PEFT.

Everything is measured in one process on a random-weight model of a real shape with a random adapter
library written to disk in PEFT format; ratios (LoGo / base) are computed within the run. Decode
tokens/s = ``B * (T - 1) / (t(T tokens) - t(1 token))`` with generation forced to exactly T tokens,
so prefill is excluded; each figure is the median of ``--repeats`` interleaved runs.
"""

from __future__ import annotations

import json
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from logo.errors import LogoError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class Bench:
    def __init__(self, shape: str, device: str, n_adapters: int, rank: int, k: int, targets: list[str],
                 prompt_len: int, new_tokens: int, repeats: int, library_dir: Path, seed: int = 0) -> None:
        from logo.engine import LoGoEngine
        from logo.library import AdapterLibrary
        from logo.router import RouterConfig
        from logo.synthetic import random_model, write_random_library

        if new_tokens < 2:
            raise LogoError("--new-tokens must be at least 2 (decode speed needs more than the first token)")
        if not 1 <= k <= n_adapters:
            raise LogoError(f"--k must be between 1 and --n-adapters ({n_adapters})")
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = random_model(shape, self.device, dtype, seed)
        self.paths = write_random_library(self.model, library_dir, n_adapters, rank, targets, seed)
        self.load_s = _timed(lambda: setattr(self, "library", AdapterLibrary.load(library_dir, self.model)),
                             self.device)
        self.engine = LoGoEngine(self.model, None, self.library, RouterConfig(k=k))  # type: ignore[arg-type]
        self.k, self.prompt_len, self.new_tokens, self.repeats = k, prompt_len, new_tokens, repeats
        self.vocab = self.model.config.vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    def prompts(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(3, self.vocab, (batch, self.prompt_len), generator=self.gen).to(self.device)
        return ids, torch.ones_like(ids)

    def _generate(self, ids, mask, tokens: int, model=None) -> None:
        (model or self.model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                                       min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    @torch.no_grad()
    def decode(self, batch: int, variant: str, model=None) -> tuple[float, float]:
        """(decode tokens/s, time to first token in ms) for one variant at one batch size."""
        from logo.router import Selection

        ids, mask = self.prompts(batch)
        n = len(self.library)

        def setup() -> None:
            if variant == "base" or variant == "official":
                self.engine.mixture.clear()
            elif variant == "one_adapter":
                self.engine._set_mixture([Selection([0], [1.0])] * batch)
            elif variant == "logo":
                routes = self.engine.route_batch(ids, mask)  # probe + score + select, per row
                picks = [Selection(random.Random(row).sample(range(n), self.k), r.weights) for row, r in
                         enumerate(routes)]  # distinct mixtures per row, whatever the random model routes
                self.engine._set_mixture(picks)

        firsts, fulls, ttfts = [], [], []
        for _ in range(self.repeats):
            ttfts.append(_timed(lambda: (setup(), self._generate(ids, mask, 1, model)), self.device))
            firsts.append(_timed(lambda: self._generate(ids, mask, 1, model), self.device))
            fulls.append(_timed(lambda: self._generate(ids, mask, self.new_tokens, model), self.device))
            self.engine.mixture.clear()
        decode_s = statistics.median(fulls) - statistics.median(firsts)
        return batch * (self.new_tokens - 1) / max(decode_s, 1e-9), 1000 * statistics.median(ttfts)

    @torch.no_grad()
    def probe_vs_prefill(self) -> dict[str, float]:
        from logo.router import RouterConfig, probe

        ids, mask = self.prompts(1)
        self.engine.mixture.clear()
        mid = RouterConfig(k=self.k, layer=self.model.config.num_hidden_layers // 2)
        prefill, route, mid_probe = [], [], []
        for _ in range(max(3, self.repeats)):
            prefill.append(_timed(lambda: self.model(input_ids=ids, attention_mask=mask, use_cache=False), self.device))
            route.append(_timed(lambda: self.engine.route_batch(ids, mask), self.device))
            mid_probe.append(_timed(lambda: probe(self.model, ids, mask, mid), self.device))
        return {"prefill_ms": 1000 * statistics.median(prefill), "probe_ms": 1000 * statistics.median(route),
                "probe_mid_layer_ms": 1000 * statistics.median(mid_probe)}

    def official_model(self):
        """The official path: PEFT with the k selected adapters attached, each one's scaling times its weight."""
        from peft import PeftMixedModel
        from peft.tuners.lora.layer import LoraLayer

        self.engine.close()  # our hooks off: the official path runs on the plain model
        names = [p.name for p in self.paths[: self.k]]
        start = time.perf_counter()
        model = PeftMixedModel.from_pretrained(self.model, self.paths[0], adapter_name=names[0])
        for name, path in zip(names[1:], self.paths[1 : self.k]):
            model.load_adapter(path, adapter_name=name)
        model.set_adapter(names)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.scaling = {a: s / self.k for a, s in module.scaling.items()}
        attach_s = time.perf_counter() - start
        return model.eval(), attach_s


def run_bench(shape: str, device: str, n_adapters: int, rank: int, k: int, targets: list[str], prompt_len: int,
              new_tokens: int, batch_sizes: list[int], repeats: int, library_dir: Path | None = None) -> dict:
    if device == "cuda" and not torch.cuda.is_available():
        raise LogoError("--device cuda asked for, but no CUDA device is available here")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="logo-bench-") as tmp:
        bench = Bench(shape, device, n_adapters, rank, k, targets, prompt_len, new_tokens, repeats,
                      library_dir or Path(tmp) / "library")
        result = {"device": device, "device_name": _device_name(device), "torch": torch.__version__, "shape": shape,
                  "n_adapters": n_adapters, "rank": rank, "targets": targets, "k": k, "prompt_len": prompt_len,
                  "new_tokens": new_tokens, "repeats": repeats, "load_s": round(bench.load_s, 3)}
        result.update({key: round(v, 2) for key, v in bench.probe_vs_prefill().items()})
        decode: dict[str, dict[str, float]] = {"base": {}, "one_adapter": {}, "logo": {}}
        ttft: dict[str, dict[str, float]] = {"base": {}, "one_adapter": {}, "logo": {}}
        for batch in batch_sizes:
            for variant in decode:
                tok_s, first_ms = bench.decode(batch, variant)
                decode[variant][str(batch)] = round(tok_s, 2)
                ttft[variant][str(batch)] = round(first_ms, 2)
        official, attach_s = bench.official_model()
        tok_s, first_ms = bench.decode(1, "official", model=official)
        decode["official"] = {"1": round(tok_s, 2)}
        ttft["official"] = {"1": round(first_ms, 2)}
        result.update({"decode_tok_s": decode, "ttft_ms": ttft, "official_attach_s_for_k": round(attach_s, 3)})
    result["ratios"] = {
        "logo_over_base": {b: round(decode["logo"][b] / decode["base"][b], 3) for b in decode["base"]},
        "one_adapter_over_base": {b: round(decode["one_adapter"][b] / decode["base"][b], 3) for b in decode["base"]},
        "official_over_base_b1": round(decode["official"]["1"] / decode["base"]["1"], 3) if "1" in decode["base"]
        else None,
        "probe_over_prefill": round(result["probe_ms"] / result["prefill_ms"], 3),
    }
    if device == "cuda":
        result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        result["peak_mem_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # max RSS
    return result


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]logo bench[/bold] {result['shape']} on {result['device_name']}: N={result['n_adapters']} "
                  f"rank {result['rank']} {','.join(result['targets'])}, k={result['k']}, prompt {result['prompt_len']}"
                  f" tokens, {result['new_tokens']} new tokens, median of {result['repeats']}")
    console.print(f"library load {result['load_s']:.2f} s; prefill {result['prefill_ms']:.1f} ms, probe "
                  f"{result['probe_ms']:.1f} ms ({result['ratios']['probe_over_prefill']:.2f}x), mid-layer probe "
                  f"{result['probe_mid_layer_ms']:.1f} ms; peak memory {result['peak_mem_gb']} GB")
    table = Table(title="decode tokens/s (time to first token, ms)")
    table.add_column("variant")
    batches = list(result["decode_tok_s"]["base"])
    for b in batches:
        table.add_column(f"batch {b}", justify="right")
        table.add_column("x base", justify="right")
    for variant, row in result["decode_tok_s"].items():
        cells = []
        for b in batches:
            if b in row:
                cells += [f"{row[b]:.1f} ({result['ttft_ms'][variant][b]:.0f})",
                          f"{row[b] / result['decode_tok_s']['base'][b]:.2f}"]
            else:
                cells += ["", ""]
        table.add_row(variant, *cells)
    console.print(table)


def bench(
    shape: Annotated[str, typer.Option("--shape", help="llama-3.1-8b | qwen2.5-7b | deepseek-7b | smollm2-135m")] = (
        "smollm2-135m"),
    device: Annotated[str, typer.Option("--device", help="cpu | cuda")] = "cpu",
    n_adapters: Annotated[int, typer.Option("--n-adapters")] = 260,
    rank: Annotated[int, typer.Option("--rank")] = 16,
    targets: Annotated[str, typer.Option("--targets")] = "q_proj,v_proj",
    k: Annotated[int, typer.Option("--k")] = 20,
    prompt_len: Annotated[int, typer.Option("--prompt-len")] = 256,
    new_tokens: Annotated[int, typer.Option("--new-tokens")] = 64,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes")] = "1,16",
    repeats: Annotated[int, typer.Option("--repeats")] = 3,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (default: torch's).")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Measure library load, probe vs prefill, decode tokens/s (base, one adapter, LoGo, official PEFT)."""
    if threads:
        torch.set_num_threads(threads)
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise LogoError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    result = run_bench(shape, device, n_adapters, rank, k, [t.strip() for t in targets.split(",") if t.strip()],
                       prompt_len, new_tokens, sizes, repeats)
    if json_out:
        print(json.dumps(result))
    else:
        print_table(result)


def register(app: typer.Typer) -> None:
    """Add the bench command to ``app``."""
    app.command()(bench)
