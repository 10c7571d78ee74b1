"""`logo run`: the official evaluation protocol, batched, resumable, for LoGo and the baselines.

Per dataset it writes the official six files to
``OUTPUT/{base_model}_selection_{strategy}_n_{k}_seed_{seed}[_method_X]/{dataset}/``:
``eval_results.json`` (per-instance scores), ``predictions.json``, ``selected_loras.json`` (names),
``weights.json``, ``metric_dict.json`` (raw selection scores, ``{strategy: [[N scores], ...]}``) and
``time_dict.json`` (``loading`` and ``inference`` seconds). Finished instances are appended to
``partial.jsonl`` as they complete, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from logo.errors import LogoError
from logo.eval.datasets import PAPER_DATASETS, get_dataset_spec, load_instances
from logo.eval.methods import check_method, fixed_selection, method_suffix
from logo.eval.metrics import headline, score_instance
from logo.train.evaluate import first_line

PARTIAL = "partial.jsonl"
OFFICIAL_FILES = ("eval_results.json", "predictions.json", "selected_loras.json", "weights.json", "metric_dict.json",
                  "time_dict.json")


@dataclass
class RunConfig:
    base_model: str = "Llama-3.1-8B"
    dataset: str = ""
    selection_strategy: str = "norm"
    n_selected_modules: int = 20
    seed: int = 0
    generation_early_stop: bool = False
    data_dir: str | None = None
    adapters: list[str] | None = None
    output_dir: str = "results"
    batch_size: int = 1
    limit: int | None = None
    max_new_tokens: int = 256
    method: str = "logo"
    device: str | None = None
    dtype: str = "auto"
    router_options: dict = field(default_factory=dict)

    def run_name(self) -> str:
        model = Path(self.base_model).name if Path(self.base_model).exists() else self.base_model.replace("/", "--")
        return (f"{model}_selection_{self.selection_strategy}_n_{self.n_selected_modules}_seed_{self.seed}"
                f"{method_suffix(self.method)}")


def _read_partial(path: Path) -> dict[int, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by the interruption: redo from there
                done[rec["index"]] = rec
    return done


class Runner:
    """Holds the loaded model/library across datasets."""

    def __init__(self, config: RunConfig, progress: bool = True) -> None:
        from logo.engine import LoGoEngine, default_device
        from logo.models import load_base_model
        from logo.router import RouterConfig

        self.config = config
        self.progress = progress
        check_method(config.method)
        start = time.perf_counter()
        # only LoGo routes; the baselines pick their own mixtures (k matters to `random` and `arrow` only)
        k = config.n_selected_modules if config.method == "logo" else 1
        router = RouterConfig(strategy=config.selection_strategy, k=k, **config.router_options)
        self.engine = LoGoEngine.from_pretrained(config.base_model, config.adapters, router,
                                                 device=config.device or default_device(), dtype=config.dtype,
                                                 progress=progress)
        self.arrow = None
        if config.method == "arrow":
            from logo.eval.arrow import ArrowGenerator

            arrow_base, tokenizer = load_base_model(config.base_model, device=config.device or default_device(),
                                                    dtype=config.dtype)
            self.arrow = ArrowGenerator(arrow_base, tokenizer, self.engine.library.paths,
                                        top_k=config.n_selected_modules, seed=config.seed)
        self.loading_s = time.perf_counter() - start

    def run(self) -> dict[str, float]:
        names = [self.config.dataset] if self.config.dataset else PAPER_DATASETS
        return {name: self.run_dataset(name) for name in names}

    def run_dataset(self, name: str) -> float:
        cfg = self.config
        spec = get_dataset_spec(name)
        instances = load_instances(name, cfg.data_dir, cfg.limit)
        target = Path(cfg.output_dir) / cfg.run_name() / name
        target.mkdir(parents=True, exist_ok=True)
        partial = target / PARTIAL
        done = _read_partial(partial)
        meta_file = target / "partial_meta.json"
        inference_before = json.loads(meta_file.read_text())["inference"] if meta_file.is_file() and done else 0.0
        todo = [i for i in range(len(instances)) if i not in done]
        print(f"Dataset {name}: {len(instances)} sample ({len(done)} already done)")
        start = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(instances), initial=len(done), desc=name, unit="inst")
        with partial.open("a") as sink:
            for chunk_start in range(0, len(todo), cfg.batch_size):
                chunk = todo[chunk_start : chunk_start + cfg.batch_size]
                for rec in self._predict(chunk, instances, spec.metric):
                    sink.write(json.dumps(rec) + "\n")
                    done[rec["index"]] = rec
                sink.flush()
                meta_file.write_text(json.dumps({"inference": inference_before + time.perf_counter() - start}))
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
        inference_s = inference_before + time.perf_counter() - start
        records = [done[i] for i in range(len(instances))]
        scores = [r["score"] for r in records]
        metric_dict = {cfg.selection_strategy: [r["scores"] for r in records]} if cfg.method == "logo" else {}
        outputs = {
            "eval_results.json": scores,
            "predictions.json": [r["prediction"] for r in records],
            "selected_loras.json": [r["selected"] for r in records],
            "weights.json": [r["weights"] for r in records],
            "metric_dict.json": metric_dict,
            "time_dict.json": {"loading": self.loading_s, "inference": inference_s},
        }
        for filename, value in outputs.items():
            (target / filename).write_text(json.dumps(value))
        partial.unlink()
        meta_file.unlink(missing_ok=True)
        label, value = headline(spec.metric, scores)
        print(f"{label}: {value:.2f}")
        print(target)
        return value

    def _predict(self, chunk: list[int], instances, metric: str) -> list[dict]:
        cfg = self.config
        prompts = [instances[i].prompt for i in chunk]
        names = self.engine.library.names
        if self.arrow is not None:
            texts = self.arrow.generate(prompts, cfg.max_new_tokens, cfg.generation_early_stop, cfg.batch_size)
            selections = [None] * len(chunk)
            scores = [[] for _ in chunk]
        else:
            fixed = None
            if cfg.method != "logo":
                fixed = [fixed_selection(cfg.method, names, i, cfg.n_selected_modules, cfg.seed) for i in chunk]
            gens = self.engine.generate(prompts, selections=fixed, max_new_tokens=cfg.max_new_tokens,
                                        early_stop=cfg.generation_early_stop, batch_size=cfg.batch_size)
            texts = [g.text for g in gens]
            selections = [g.selection for g in gens]
            scores = [g.route.all_scores if g.route is not None else [] for g in gens]
        out = []
        for i, text, sel, raw in zip(chunk, texts, selections, scores):
            prediction = first_line(text)
            out.append({
                "index": i,
                "prediction": prediction,
                "score": score_instance(metric, prediction, instances[i].label),
                "selected": [names[j] for j in sel.indices] if sel is not None else [],
                "weights": list(sel.weights) if sel is not None else [],
                "scores": raw,
            })
        return out


def run(config: RunConfig, progress: bool = True) -> dict[str, float]:
    if config.batch_size < 1:
        raise LogoError(f"--batch-size must be at least 1, got {config.batch_size}")
    return Runner(config, progress).run()
