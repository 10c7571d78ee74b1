"""`logo bench`: library load time, probe latency and decode throughput of LoGo against the base and PEFT.

Everything is measured in one process on a random-weight model of a real shape with a random adapter
library written to disk in PEFT format. Variants (base, one adapter, LoGo with a different mixture per
row; the same with the signal at the middle layer, ``logo_mid_signal``; LoGo whose rows draw their k
adapters from a pool of 2k, ``logo_shared_pool``: rows that share adapters, as similar prompts do; the
official PEFT path at batch 1) are interleaved within each repeat and each figure is the median over
repeats; ratios (variant / base) are computed within the run, since shared machines are noisy.
Time to the first token per signal layer (a quarter, half, three quarters deep and the last) is measured
at batch 1 apart from ``generate``: route, set the mixture, prefill, against a plain prefill.
Decode tokens/s is the batch over the median decode step of one ``generate`` forced to exactly T
tokens (see ``logo.perf.timing``; the all-steps mean is reported too), so prefill and routing are
excluded: they are in the time to first token.
Progress (the step under way: shape, phase, batch size and variant) goes to stderr; stdout holds the result only.

``--fast static|compiled`` adds a second phase on the fast generation path (``logo.static_decode``:
static KV cache, and a compiled decode step with CUDA graphs on GPU): base, one adapter and LoGo again,
interleaved among themselves, after a warm-up that compiles each batch size (its time is reported). One
adapter runs on its own fast engine with k = 1, so its fixed-width mixture is one adapter wide, not k.
"""

from __future__ import annotations

import json
import platform
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import torch
import typer

from logo.errors import LogoError
from logo.paths import check_output_file, write_output_file
from logo.perf.official import OFFICIAL_BATCHES, OfficialPeft
from logo.perf.progress import Phases
from logo.perf.report import print_table, ratios
from logo.perf.timing import GenerationTiming, time_generate, time_static, timed
from logo.router import RouterConfig, Selection, check_k

if TYPE_CHECKING:
    from logo.engine import LoGoEngine

VARIANTS = ("base", "one_adapter", "logo", "logo_mid_signal", "logo_shared_pool", "official")
FAST_VARIANTS = ("base", "one_adapter", "logo")
FAST_PATHS = ("static", "compiled")


def distinct_picks(n: int, k: int, rows: int, seed: int) -> list[list[int]]:
    """``rows`` selections of k adapters out of n, pairwise different where n choose k allows it."""
    rng = random.Random(seed)
    picks: list[list[int]] = []
    seen: set[frozenset[int]] = set()
    for _ in range(rows):
        for _ in range(100):
            pick = rng.sample(range(n), k)
            if frozenset(pick) not in seen:
                break
        seen.add(frozenset(pick))
        picks.append(pick)
    return picks


def pooled_picks(n: int, k: int, rows: int, seed: int) -> list[list[int]]:
    """As :func:`distinct_picks`, every row drawing from one pool of ``min(n, 2k)`` adapters."""
    pool = random.Random(seed + 1).sample(range(n), min(n, 2 * k))
    return [[pool[i] for i in pick] for pick in distinct_picks(len(pool), k, rows, seed)]


class Bench:
    """A random model, its random adapter library on disk, the LoGo engine and the official PEFT path."""

    SETUP_STEPS = 4
    """Progress steps of :meth:`__init__`: model, library write, library load, official attach."""

    def __init__(self, shape: str, device: str, n_adapters: int, rank: int, k: int, targets: list[str],
                 prompt_len: int, new_tokens: int, max_batch: int, library_dir: Path, seed: int = 0,
                 phases: Phases | None = None) -> None:
        from logo.engine import LoGoEngine
        from logo.library import AdapterLibrary
        from logo.synthetic import random_model, write_random_library

        self.phases = phases or Phases(0, "bench", enabled=False)
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        with self.phases.step(f"random {shape} model"):
            self.model = random_model(shape, self.device, self.dtype, seed)
        with self.phases.step(f"writing {n_adapters} random adapters"):
            start = time.perf_counter()
            self.paths = write_random_library(self.model, library_dir, n_adapters, rank, targets, seed)
            self.write_s = time.perf_counter() - start
        holder: dict[str, AdapterLibrary] = {}
        with self.phases.step("loading the library"):
            self.load_s = timed(lambda: holder.setdefault("lib", AdapterLibrary.load(library_dir, self.model)),
                                self.device)
        self.library = holder["lib"]
        self.engine = LoGoEngine(self.model, None, self.library, RouterConfig(k=k))  # type: ignore[arg-type]
        self.k, self.prompt_len, self.new_tokens = k, prompt_len, new_tokens
        gen = torch.Generator().manual_seed(seed)
        vocab = self.model.config.vocab_size
        self.ids = torch.randint(3, vocab, (max_batch, prompt_len), generator=gen).to(self.device)
        self.picks = distinct_picks(n_adapters, k, max_batch, seed)
        self.pool_picks = pooled_picks(n_adapters, k, max_batch, seed)
        self.mid_engine = self.engine.with_router(RouterConfig(k=k, layer=self.engine.num_layers // 2))
        with self.phases.step(f"attaching {k} adapters with PEFT (official path)"):
            first = self.engine.route_batch(*self.inputs(1))[0]
            self.official = OfficialPeft(self.model, [self.paths[i] for i in self.picks[0]], first.weights)

    def inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.ids[:batch]
        return ids, torch.ones_like(ids)

    def _set_logo(self, engine, ids: torch.Tensor, mask: torch.Tensor, picks: list[list[int]] | None = None) -> None:
        """Route every row (probe, score, select), then give each row its own mixture of k adapters.

        A random model routes similar prompts alike, so each row takes a distinct pick of adapters (from
        ``picks``, default: out of all N) with the weights LoGo computed for it: the measured work is LoGo's,
        the mixtures are all different.
        """
        routes = engine.route_batch(ids, mask)
        picks = picks or self.picks
        engine.set_mixture([Selection(picks[row], r.weights) for row, r in enumerate(routes)])

    def _setup(self, engine, variant: str, batch: int):
        ids, mask = self.inputs(batch)
        return {
            "base": None,
            "one_adapter": lambda: engine.set_mixture([Selection([0], [1.0])] * batch),
            "logo": lambda: self._set_logo(engine, ids, mask),
            "logo_mid_signal": lambda: self._set_logo(self.mid_engine, ids, mask),
            "logo_shared_pool": lambda: self._set_logo(engine, ids, mask, self.pool_picks),
            "official": None,
        }[variant]

    def run(self, variant: str, batch: int, new_tokens: int) -> GenerationTiming:
        ids, mask = self.inputs(batch)
        model = self.official.model if variant == "official" else self.model
        if variant == "official":
            self.official.activate()
        try:
            return time_generate(model, ids, mask, new_tokens, self._setup(self.engine, variant, batch))
        finally:
            self.engine.clear_mixture()
            self.official.deactivate()

    @torch.no_grad()
    def probe_vs_prefill(self, repeats: int) -> dict[str, float]:
        """Batch-1 plain prefill (what generate's prefill computes: logits of the last token only) against
        LoGo's routing (probe, score, select) with the official signal (last layer), ``probe_ms``, and the same
        routing with the signal at the middle layer, ``probe_mid_layer_ms``: like for like, only the layer differs."""
        ids, mask = self.inputs(1)
        jobs = {
            "prefill_ms": lambda: self.prefill(ids, mask),
            "probe_ms": lambda: self.engine.route_batch(ids, mask),
            "probe_mid_layer_ms": lambda: self.mid_engine.route_batch(ids, mask),
        }
        with self.phases.step("probe vs prefill, batch 1"):
            return {**self._median_ms(jobs, repeats), "probe_mid_layer": self.mid_engine.router.config.layer}

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor):
        """One prompt forward as ``generate``'s prefill computes it (logits of the last token only), no cache."""
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    def _median_ms(self, jobs: dict, repeats: int) -> dict[str, float]:
        """Each job's median time in ms over ``max(3, repeats)`` interleaved rounds, after one warm-up round."""
        runs: dict[str, list[float]] = {key: [] for key in jobs}
        for fn in jobs.values():
            fn()
        for _ in range(max(3, repeats)):
            for key, fn in jobs.items():
                runs[key].append(1000 * timed(fn, self.device))
        return {key: round(statistics.median(v), 2) for key, v in runs.items()}

    def signal_layers(self) -> list[int]:
        """The signal layers of the first-token sweep: a quarter, half and three quarters deep, and the last.

        The probe at layer ``i`` runs the ``i`` layers before it, so layer ``n * f`` is ``f`` deep (as the
        middle layer, ``n // 2``, of ``logo_mid_signal``); the last is ``n - 1``, the official signal."""
        n = self.engine.num_layers
        return sorted({n // 4, n // 2, (3 * n) // 4, n - 1})

    @torch.no_grad()
    def first_token_by_layer(self, repeats: int) -> dict:
        """Batch-1 time to the first token's logits per signal layer: route (probe up to the layer, score,
        select), set the row's mixture, prefill under it; against the plain prefill (interleaved, medians)."""
        ids, mask = self.inputs(1)
        engines = {layer: self.engine.with_router(RouterConfig(k=self.k, layer=layer - self.engine.num_layers))
                   for layer in self.signal_layers()}  # they share this engine's mixture hooks: none is closed

        def first_token(engine) -> None:
            self._set_logo(engine, ids, mask)
            try:
                self.prefill(ids, mask)
            finally:
                engine.clear_mixture()

        jobs = {"prefill": lambda: self.prefill(ids, mask)}
        jobs.update({str(layer): (lambda e=engine: first_token(e)) for layer, engine in engines.items()})
        with self.phases.step("first token by signal layer, batch 1"):
            med = self._median_ms(jobs, repeats)
        return {"prefill_ms": med.pop("prefill"), "by_layer_ms": med}

    @staticmethod
    def decode_jobs(batch_sizes: list[int]) -> list[tuple[str, int]]:
        """The (variant, batch size) pairs of the decode phase (the official path only at its batch sizes)."""
        return [(v, b) for b in batch_sizes for v in VARIANTS if v != "official" or b in OFFICIAL_BATCHES]

    def decode(self, batch_sizes: list[int], repeats: int) -> dict[str, dict]:
        """Median decode tokens/s (median step; all-steps mean) and TTFT (ms) per variant and batch size."""
        jobs = self.decode_jobs(batch_sizes)
        for variant, batch in jobs:  # warm-up: first calls allocate and fill caches
            with self.phases.step(f"decode warm-up: batch {batch}, {variant}"):
                self.run(variant, batch, 2)
        samples = self._interleave(jobs, repeats, lambda v, b: self.run(v, b, self.new_tokens), "decode")
        return self._summary(samples, VARIANTS)

    @contextmanager
    def fast_engines(self, path: str) -> Iterator[dict[str, LoGoEngine]]:
        """The fast-path engine of each fast variant, closed (hooks removed) when the block ends: base and LoGo
        share one with the router's k; one adapter has its own with k = 1. A fast engine's mixture is always
        ``k * r`` wide (unused slots hold zeros), so on LoGo's engine one adapter would cost as much as k."""
        with ExitStack() as opened:
            logo = self.engine.with_decode(path)
            opened.callback(logo.close)
            single = self.engine.with_router(replace(self.engine.router.config, k=1)).with_decode(path)
            opened.callback(single.close)
            yield {"base": logo, "one_adapter": single, "logo": logo}

    def fast_decode(self, path: str, batch_sizes: list[int], repeats: int) -> dict:
        """The decode phase again on the fast path (static cache; compiled step), with its own warm-up.

        Both fast engines live through the whole phase, so the variants stay interleaved and each compiled
        graph sees the same hooks from warm-up on; a switched-off hook adds nothing to a compiled step (and a
        Python call per module to a static one), the same for every variant."""
        jobs = [(v, b) for b in batch_sizes for v in FAST_VARIANTS]
        with self.fast_engines(path) as engines:

            def run(variant: str, batch: int, new_tokens: int) -> GenerationTiming:
                ids, mask = self.inputs(batch)
                fast = engines[variant]
                try:
                    return time_static(fast.decoder, ids, mask, new_tokens, self._setup(fast, variant, batch))
                finally:
                    fast.clear_mixture()

            warmup: dict[str, dict[str, float]] = {v: {} for v in FAST_VARIANTS}
            for variant, batch in jobs:  # first runs compile (one graph per batch size and mixture on/off)
                with self.phases.step(f"{path} warm-up: batch {batch}, {variant}"):
                    start = time.perf_counter()
                    run(variant, batch, self.new_tokens)
                    warmup[variant][str(batch)] = round(time.perf_counter() - start, 2)
            samples = self._interleave(jobs, repeats, lambda v, b: run(v, b, self.new_tokens), f"{path} decode")
        return {"path": path, **self._summary(samples, FAST_VARIANTS), "warmup_s": warmup}

    def _interleave(self, jobs: list[tuple[str, int]], repeats: int, run,
                    phase: str) -> dict[tuple[str, int], list[GenerationTiming]]:
        samples: dict[tuple[str, int], list[GenerationTiming]] = {job: [] for job in jobs}
        for rep in range(repeats):
            shift = rep % len(jobs)
            for job in jobs[shift:] + jobs[:shift]:  # rotate so no variant always runs first
                with self.phases.step(f"{phase}: batch {job[1]}, {job[0]}, run {rep + 1}/{repeats}"):
                    samples[job].append(run(*job))
        return samples

    @staticmethod
    def _summary(samples: dict[tuple[str, int], list[GenerationTiming]], variants) -> dict[str, dict]:
        out: dict[str, dict] = {key: {v: {} for v in variants} for key in
                                ("decode_tok_s", "decode_tok_s_mean", "ttft_ms")}
        for (variant, batch), runs in samples.items():
            b = str(batch)
            out["decode_tok_s"][variant][b] = round(statistics.median(t.decode_tok_s for t in runs), 2)
            out["decode_tok_s_mean"][variant][b] = round(statistics.median(t.mean_decode_tok_s for t in runs), 2)
            out["ttft_ms"][variant][b] = round(1000 * statistics.median(t.ttft_s for t in runs), 2)
        return out


def run_bench(shape: str, device: str, n_adapters: int, rank: int, k: int, targets: list[str], prompt_len: int,
              new_tokens: int, batch_sizes: list[int], repeats: int, library_dir: Path | None = None,
              fast: str | None = None, progress: bool = False) -> dict:
    """Build, measure and return the JSON-ready result (see the module docstring); ``progress``: a bar on stderr
    naming the step under way."""
    check_args(shape, device, n_adapters, rank, k, targets, prompt_len, new_tokens, batch_sizes, repeats, fast)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    decode_jobs = len(Bench.decode_jobs(batch_sizes))
    fast_jobs = 0 if fast is None else len(FAST_VARIANTS) * len(batch_sizes)
    total = Bench.SETUP_STEPS + 2 + decode_jobs * (1 + repeats) + fast_jobs * (1 + repeats)
    phases = Phases(total, f"bench {shape}", enabled=progress)
    with phases_closed(phases), tempfile.TemporaryDirectory(prefix="logo-bench-") as tmp:
        bench = Bench(shape, device, n_adapters, rank, k, targets, prompt_len, new_tokens, max(batch_sizes),
                      library_dir or Path(tmp) / "library", phases=phases)
        result: dict = {
            "device": device, "device_name": device_name(device), "torch": torch.__version__, "shape": shape,
            "dtype": str(bench.dtype).removeprefix("torch."), "n_adapters": n_adapters, "rank": rank,
            "targets": targets, "k": k, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "load_s": round(bench.load_s, 3), "library_write_s": round(bench.write_s, 3),
            "decode_kernel": bench.engine.prepare_decode(),
        }
        result.update(bench.probe_vs_prefill(repeats))
        result["first_token_by_layer"] = bench.first_token_by_layer(repeats)
        result.update(bench.decode(batch_sizes, repeats))
        if fast is not None:
            result["fast"] = bench.fast_decode(fast, batch_sizes, repeats)
        result.update({"official_attach_s": round(bench.official.attach_s, 3),
                       "distinct_mixtures": len({frozenset(p) for p in bench.picks}),
                       "union_adapters": {"logo": len({i for p in bench.picks for i in p}),
                                          "logo_shared_pool": len({i for p in bench.pool_picks for i in p})}})
    if device == "cuda":
        result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_mem_label"] = "peak GPU memory allocated"
    else:
        result["peak_mem_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux
        result["peak_mem_label"] = "peak process RSS"
    result["ratios"] = ratios(result)
    return result


@contextmanager
def phases_closed(phases: Phases) -> Iterator[Phases]:
    """Close the progress bar however the run ends, before anything else is printed."""
    try:
        yield phases
    finally:
        phases.close()


def shape_modules(shape: str) -> list[str]:
    """Names of the linear modules in the decoder layers of ``shape`` (what ``--targets`` may name), read from
    the model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    from logo.synthetic import SHAPES

    if shape not in SHAPES:
        raise LogoError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    cls, kwargs = SHAPES[shape]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cls(**{**kwargs, "num_hidden_layers": 1}))
    head = model.get_output_embeddings()
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and m is not head))


def check_args(shape: str, device: str, n_adapters: int, rank: int, k: int, targets: list[str], prompt_len: int,
               new_tokens: int, batch_sizes: list[int], repeats: int, fast: str | None = None) -> None:
    """Every check of the bench's arguments, before any model is built (each a one-line LogoError)."""
    modules = shape_modules(shape)
    unknown = [t for t in targets if t not in modules]
    if unknown:
        raise LogoError(f"--targets names no module of {shape}: {', '.join(unknown)}; choose from "
                        f"{', '.join(modules)} (comma-separated)")
    if fast is not None and fast not in FAST_PATHS:
        raise LogoError(f"--fast must be one of {', '.join(FAST_PATHS)}, got {fast!r}")
    if device not in ("cpu", "cuda"):
        raise LogoError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise LogoError("--device cuda asked for, but no CUDA device is available here")
    if n_adapters < 1 or rank < 1 or prompt_len < 1 or repeats < 1:
        raise LogoError("--n-adapters, --rank, --prompt-len and --repeats must be at least 1")
    check_k(k, n_adapters, flag="--k", holder="the random library (--n-adapters)")
    if "q_proj" not in targets:
        raise LogoError(f"--targets must include q_proj (LoGo's signal module), got {','.join(targets)}")
    if new_tokens < 2:
        raise LogoError("--new-tokens must be at least 2 (decode speed needs more than the first token)")
    if not batch_sizes or min(batch_sizes) < 1:
        raise LogoError("--batch-sizes must list positive integers, e.g. 1,16")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def bench(
    shape: Annotated[str, typer.Option("--shape", help="llama-3.1-8b | qwen2.5-7b | deepseek-7b | smollm2-135m")] = (
        "smollm2-135m"),
    device: Annotated[str, typer.Option("--device", help="cpu | cuda")] = "cpu",
    n_adapters: Annotated[int, typer.Option("--n-adapters", help="Adapters in the random library.")] = 260,
    rank: Annotated[int, typer.Option("--rank")] = 16,
    targets: Annotated[str, typer.Option("--targets", help="Comma-separated target modules.")] = "q_proj,v_proj",
    k: Annotated[int, typer.Option("--k", help="Adapters per mixture.")] = 20,
    prompt_len: Annotated[int, typer.Option("--prompt-len")] = 256,
    new_tokens: Annotated[int, typer.Option("--new-tokens")] = 64,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes")] = "1,16",
    repeats: Annotated[int, typer.Option("--repeats", help="Interleaved runs per figure (median).")] = 3,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads, at least 1 (default: torch's).")] = (
        None),
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    save: Annotated[Path | None, typer.Option("--save", help="Also write the JSON result to this file.")] = None,
    fast: Annotated[str | None, typer.Option("--fast", help="Also measure the fast generation path: static (static "
                                             "KV cache) | compiled (+ torch.compile; CUDA graphs on GPU).")] = None,
) -> None:
    """Measure library load, probe vs prefill, decode tokens/s (base, one adapter, LoGo, official PEFT).

    Progress goes to stderr; stdout holds the table (or, with --json, the JSON object) only."""
    if threads is not None and threads < 1:
        raise LogoError(f"--threads must be at least 1, got {threads}; leave it out for torch's default")
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise LogoError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    modules = list(dict.fromkeys(t.strip() for t in targets.split(",") if t.strip()))
    check_args(shape, device, n_adapters, rank, k, modules, prompt_len, new_tokens, sizes, repeats, fast)
    if save is not None:
        check_output_file(save, "--save", "bench.json")  # before the run, not after it
    if threads is not None:
        torch.set_num_threads(threads)
    result = run_bench(shape, device, n_adapters, rank, k, modules, prompt_len, new_tokens, sizes, repeats,
                       fast=fast, progress=True)
    if json_out:
        print(json.dumps(result), flush=True)
    else:
        print_table(result)
    if save is not None:  # after printing: a failed write loses nothing
        write_output_file(save, json.dumps(result, indent=1) + "\n", "--save",
                          "the result is printed above; run again with another --save to keep it as a file")


def register(app: typer.Typer) -> None:
    """Add the bench command to ``app``."""
    app.command()(bench)
