"""`logo run`: the official evaluation protocol, batched, resumable, for LoGo and the baselines.

Per dataset it writes the official six files to
``OUTPUT/{base_model}_selection_{strategy}_n_{k}_seed_{seed}[_OPTION=VALUE...][_method_X]/{dataset}/``
(``OPTION=VALUE``: each router option of method ``logo`` set away from the official router's, see
:func:`router_suffix`):
``eval_results.json`` (per-instance scores), ``predictions.json`` (the generation stripped and cut at its
first line), ``selected_loras.json`` (names), ``weights.json``, ``metric_dict.json`` (raw selection scores of
all N adapters, ``{strategy: [[N scores], ...]}`` under the strategy that scored them; empty for the
baselines) and ``time_dict.json`` (``loading`` and ``inference`` seconds). Progress is kept as it is made
(:mod:`logo.eval.records`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from tqdm import tqdm

from logo import calibration, router_file
from logo.adapter_source import resolve_adapters
from logo.errors import LogoError
from logo.eval.datasets import PAPER_DATASETS, check_dataset, get_dataset_spec, load_instances
from logo.eval.metrics import headline, score_instance, summary_line
from logo.eval.records import RecordStore, instance_key
from logo.generation import GenerationSettings, first_line
from logo.methods import Method, get_method
from logo.paths import check_output_dir
from logo.presets import default_adapters, get_preset
from logo.router import RouterConfig
from logo.spec import EngineSpec

CHUNK_BATCHES = 4  # batches per checkpoint: the engine sorts a chunk by length, so less padding
SAMPLE_BYTES = 1 << 16  # library_fingerprint reads a large file's header and three samples of this size


@dataclass
class RunConfig:
    base_model: str = "Llama-3.1-8B"
    """A preset, a local directory or a hub id; with ``model_dir``, the name of the folder under it."""
    model_dir: str | None = None
    """The official ``--model_dir``: the base model is read from ``<model_dir>/<base_model>``. The run stays named
    (and its settings keyed) by ``base_model``, so a local copy of a preset resumes the preset's runs."""
    dataset: str = ""  # one name, a comma-separated list, or "" for the paper's 26
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
    decode: str = "eager"  # eager | static | compiled: same greedy tokens, so not part of settings()
    router_options: dict = field(default_factory=dict)
    """Every other :class:`RouterConfig` field (layer, module, post_norm, position, weighting, temperature,
    calibration); strategy and k are the official arguments above."""
    library: str | None = None
    """The library's fingerprint (:func:`library_fingerprint`), taken once by :func:`check_run` for the whole run
    (resolving the adapters again for every dataset would ask the hub each time); None: taken when asked."""
    overwrite: bool = False

    def run_name(self) -> str:
        path = Path(self.model_path())
        model = path.name if path.exists() else self.base_model.replace("/", "--")
        routing = router_suffix(self.router_options) if self.method == "logo" else ""
        return (f"{model}_selection_{self.selection_strategy}_n_{self.n_selected_modules}_seed_{self.seed}"
                f"{routing}{method_suffix(self.method)}")

    def model_path(self) -> str:
        """Where the base model is read from: ``<model_dir>/<base_model>``, or ``base_model`` itself."""
        return str(Path(self.model_dir) / self.base_model) if self.model_dir is not None else self.base_model

    def router(self, k: int | None = None) -> RouterConfig:
        return RouterConfig(strategy=self.selection_strategy, k=self.n_selected_modules if k is None else k,
                            **self.router_options)

    def method_object(self) -> Method:
        return get_method(self.method, k=self.n_selected_modules)

    def generation(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_new_tokens, early_stop=self.generation_early_stop)

    def datasets(self) -> list[str]:
        return [d.strip() for d in self.dataset.split(",") if d.strip()] or list(PAPER_DATASETS)

    def settings(self) -> dict:
        """What decides the predictions (the resumable store refuses to mix results of other settings). The library
        is its content's fingerprint, not the ``adapters`` as typed (a copy of it, or the preset's library named
        explicitly, is the same library); the router options only for ``logo``, the one method that reads them."""
        keep = ("base_model", "method", "selection_strategy", "n_selected_modules", "seed", "generation_early_stop",
                "max_new_tokens", "dtype") + (("router_options",) if self.method == "logo" else ())
        library = self.library or library_fingerprint(self.entries())
        return {k: v for k, v in asdict(self).items() if k in keep} | {"library": library}

    def engine_spec(self, methods: list[str]) -> EngineSpec:
        """The engine for ``methods`` (k only matters to LoGo routing). With ``model_dir`` and no ``adapters``, a
        preset's own library, as without ``model_dir``."""
        router = self.router(None if "logo" in methods else 1)
        adapters = self.adapters
        if not adapters and self.model_dir is not None and get_preset(self.base_model) is not None:
            adapters = [default_adapters(self.base_model)]
        return EngineSpec(self.model_path(), adapters or None, router, self.device, self.dtype, self.decode)

    def entries(self) -> list[tuple[str, Path]]:
        """The library's adapters as ``(name, dir)`` (resolved, no model loaded)."""
        return resolve_adapters(self.engine_spec([self.method]).adapter_spec())


def router_suffix(options: dict) -> str:
    """The run name's mark of the router options set away from the official router's: ``_layer=-8``,
    ``_weighting=softmax_temperature=0.5``, ...; '' for the official router (the official run name)."""
    official = RouterConfig()
    order = [f.name for f in fields(RouterConfig)]
    parts = []
    for key in sorted(options, key=lambda k: order.index(k) if k in order else len(order)):
        value = options[key]
        if key in order and value == getattr(official, key):
            continue
        if isinstance(value, (list, tuple)):
            text = ",".join(map(str, value))
        elif isinstance(value, float):
            text = format(value, "g")
        else:
            text = str(value)
        parts.append(f"_{key}=" + "".join(c if c.isalnum() or c in "-.,+" else "-" for c in text))
    return "".join(parts)


def file_digest(file: Path) -> str:
    """What identifies a file's content without reading all of it: all of a small file; of a large one (adapter
    weights), its safetensors header (names, shapes, dtypes, offsets) and three samples of its bytes (start, middle,
    end), so a retrained adapter of the same shapes differs while hundreds of MB of weights are not read."""
    size = file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with file.open("rb") as f:
        if size <= 4 * SAMPLE_BYTES:
            digest.update(f.read())
            return digest.hexdigest()
        if file.suffix == ".safetensors":
            length = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(length, size - 8)))
        for offset in (0, size // 2, size - SAMPLE_BYTES):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def library_fingerprint(entries: list[tuple[str, Path]]) -> str:
    """What identifies the library's content, cheaply (see :func:`file_digest`; no modification times, so a copied
    library is the same library): each adapter's name and its files' names, sizes and digests, and the bytes of the
    library's router and calibration files."""
    paths = [path for _, path in entries]
    parts: list = []
    for name, path in entries:
        files = sorted(f for f in Path(path).rglob("*") if f.is_file())
        parts.append([name, [[f.relative_to(path).as_posix(), f.stat().st_size, file_digest(f)] for f in files]])
    roots = {Path(p).parent for p in paths}
    side = [router_file.library_router_file(paths), calibration.cache_file([n for n, _ in entries])]
    side += [roots.pop() / calibration.FILE_NAME] if len(roots) == 1 else []
    digest = hashlib.sha256(json.dumps(parts).encode())
    for file in side:
        digest.update(b"\0" + (file.read_bytes() if file is not None and file.is_file() else b""))
    return digest.hexdigest()[:16]


def check_run(config: RunConfig, methods: list[str]) -> tuple[RunConfig, list[Method]]:
    """Every check that needs no model, before any generation: the options, the output directory, the datasets,
    the library, and each method against it (a fixed: adapter name, a fitted router, k). Returns the config with
    the library's fingerprint taken (see ``RunConfig.library``) and the methods, in order."""
    config.generation()
    if config.model_dir is not None and not Path(config.model_path()).is_dir():
        raise LogoError(f"--model-dir {config.model_dir}: {config.model_path()} is not a directory; give the folder "
                        f"that holds {config.base_model}/ (or leave --model-dir out to load {config.base_model} "
                        "as a preset, local path or hub id)")
    if config.batch_size < 1:
        raise LogoError(f"--batch-size must be at least 1, got {config.batch_size}")
    objects = [get_method(m, k=config.n_selected_modules) for m in methods]
    datasets = config.datasets()
    twice = sorted({name for name in datasets if datasets.count(name) > 1})
    if twice:
        raise LogoError(f"--dataset names {', '.join(twice)} more than once; give each dataset once")
    for name in datasets:
        check_dataset(name, config.data_dir)  # every dataset exists, before hours of generation (no hub asked)
    check_output_dir(Path(config.output_dir), "--output-dir")
    entries = config.entries()
    names, paths = [n for n, _ in entries], [p for _, p in entries]
    for method in objects:
        method.check_library(names, paths)
    return replace(config, library=library_fingerprint(entries)), objects


def load_engine(config: RunConfig, methods: list[str], progress: bool = True):
    """The engine for ``methods`` (k only matters to LoGo routing) and the seconds it took to load."""
    start = time.perf_counter()
    engine = config.engine_spec(methods).build(progress)
    return engine, time.perf_counter() - start


class Runner:
    """Runs one method over datasets; loads the model only when something is left to generate."""

    def __init__(self, config: RunConfig, engine_factory: Callable[[], tuple] | None = None,
                 progress: bool = True, checked: bool = False) -> None:
        if not checked:
            config, (self.method,) = check_run(config, [config.method])
        else:
            self.method = config.method_object()
        self.config = config
        self.progress = progress
        self._factory = engine_factory or (lambda: load_engine(config, [config.method], progress))
        self._engine = None
        self.loading_s = 0.0

    @property
    def engine(self):
        if self._engine is None:
            self._engine, self.loading_s = self._factory()
        return self._engine

    def run(self) -> dict[str, float]:
        return {name: self.run_dataset(name) for name in self.config.datasets()}

    def run_dataset(self, name: str) -> float:
        job = DatasetJob.open(self.config, name)
        if job.todo():
            self.engine  # noqa: B018 - load the model (once) before the progress bar starts
        bar = tqdm(total=len(job.instances), initial=len(job.done), desc=name, unit="inst",
                   disable=not (self.progress and job.todo()))
        for chunk in job.shards():
            t0 = time.perf_counter()
            records = self._predict(chunk, job.instances, job.keys, job.metric)
            job.record(records, time.perf_counter() - t0, self.loading_s)
            bar.update(len(chunk))
        bar.close()
        return job.finish(self.loading_s)

    def _predict(self, chunk: list[int], instances, keys: list[str], metric: str) -> list[dict]:
        items = [(i, keys[i], instances[i].prompt, instances[i].label) for i in chunk]
        return predict(self.engine, self.method, self.config, items, metric)


@dataclass
class DatasetJob:
    """One (run, dataset): its instances, its record store, and what is left to generate, in shards."""

    config: RunConfig
    name: str
    metric: str
    instances: list
    keys: list[str]
    store: RecordStore
    done: dict[int, dict]

    @classmethod
    def open(cls, config: RunConfig, name: str) -> DatasetJob:
        metric = get_dataset_spec(name).metric
        instances = load_instances(name, config.data_dir, config.limit)
        keys = [instance_key(x.prompt, x.label) for x in instances]
        store = RecordStore(Path(config.output_dir) / config.run_name() / name, config.settings(), config.overwrite)
        done = store.load(keys)
        print(f"Dataset {name}: {len(instances)} sample" + (f" ({len(done)} already done)" if done else ""))
        return cls(config, name, metric, instances, keys, store, done)

    def todo(self) -> list[int]:
        return [i for i in range(len(self.instances)) if i not in self.done]

    def shards(self) -> list[list[int]]:
        """What is left, in checkpoints of ``CHUNK_BATCHES`` batches (the engine sorts each by length)."""
        todo, step = self.todo(), self.config.batch_size * CHUNK_BATCHES
        return [todo[start : start + step] for start in range(0, len(todo), step)]

    def items(self, shard: list[int]) -> list[tuple[int, str, str, object]]:
        """``(index, key, prompt, label)`` of each instance of a shard: all a worker needs."""
        return [(i, self.keys[i], self.instances[i].prompt, self.instances[i].label) for i in shard]

    def record(self, records: list[dict], inference_s: float, loading_s: float) -> None:
        """Keep a finished shard (on disk at once)."""
        if self.store.meta["loading_s"] is None:
            self.store.set_loading(loading_s)
        self.store.append(records, inference_s)
        self.done.update((r["index"], r) for r in records)

    def finish(self, loading_s: float) -> float:
        """Write the official six files, print the official summary line; the headline score."""
        records = [self.done[i] for i in range(len(self.instances))]
        cfg = self.config
        raw = metric_dict(records, cfg.selection_strategy)
        self.store.write_official(records, raw, self.store.meta["loading_s"] or loading_s)
        scores = [r["score"] for r in records]
        print(summary_line(self.metric, scores))
        print(self.store.dir)
        return headline(self.metric, scores)[1]


def predict(engine, method: Method, config: RunConfig, items: list[tuple[int, str, str, object]],
            metric: str) -> list[dict]:
    """The records of ``items`` (``(index, key, prompt, label)``) under ``method``: prediction, score, mixture."""
    indices = [i for i, _, _, _ in items]
    gens = method.generate(engine, [prompt for _, _, prompt, _ in items], indices, config.seed, config.generation(),
                           config.batch_size)
    out = []
    for (i, key, _, label), gen in zip(items, gens):
        prediction = first_line(gen.text)
        sel = gen.selection
        out.append({
            "index": i,
            "key": key,
            "prediction": prediction,
            "score": score_instance(metric, prediction, label),
            "selected": [engine.library.names[j] for j in sel.indices],
            "weights": [float(w) for w in sel.weights],
            "scores": list(gen.route.all_scores) if gen.route is not None else [],
            "strategy": gen.route.strategy if gen.route is not None else None,
        })
    return out


def metric_dict(records: list[dict], strategy: str) -> dict:
    """The official ``metric_dict``: ``{strategy: every adapter's raw score, per instance}`` for a method that
    routes (``logo``, ``fitted``: the strategy its router scored with; ``strategy`` for records without one),
    else ``{}``."""
    if not records or not any(r["scores"] for r in records):
        return {}
    return {records[0].get("strategy") or strategy: [r["scores"] for r in records]}


def run(config: RunConfig, progress: bool = True) -> dict[str, float]:
    """One method over the configured datasets: ``{dataset: headline score}``."""
    return Runner(config, progress=progress).run()


def method_suffix(method: str) -> str:
    """Suffix of the result directory for non-LoGo methods (LoGo keeps the official name)."""
    return "" if method == "logo" else "_method_" + method.replace(":", "-").replace("/", "-")


def run_methods(config: RunConfig, methods: list[str], progress: bool = True) -> dict[str, dict[str, float]]:
    """Several methods on the same data, sharing one model load (made only if something is left to generate):
    ``{method: {dataset: score}}``. A method that takes over the engine's base model (Arrow) runs last."""
    config, objects = check_run(config, methods)
    takes_over = {m: obj.takes_over_model for m, obj in zip(methods, objects)}
    order = [m for m in methods if not takes_over[m]] + [m for m in methods if takes_over[m]]
    loaded: list[tuple] = []

    def shared() -> tuple:
        if not loaded:
            loaded.append(load_engine(config, order, progress))
        return loaded[0]

    return {m: Runner(replace(config, method=m), shared, progress, checked=True).run() for m in order}
