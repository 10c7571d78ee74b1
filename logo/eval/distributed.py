"""`logo run --ray`: the evaluation spread over Ray actors, each holding one engine.

The unit of work is a (method, dataset shard) pair. Plain actors rather than Ray Data: each worker loads the
model once and keeps it for every shard it is given (a 7-8B model takes a minute to load), a shard's records
must reach the one record store of its dataset as soon as they exist (so a rerun resumes), and the driver
decides what is left from that store. The driver is the only writer: it opens every (method, dataset) record
store, hands out the missing shards through an :class:`ray.util.ActorPool`, appends each finished shard the
moment it returns, and writes the official six files when a dataset is complete, exactly as a single-process
run does. A worker that dies is restarted by Ray (the engine is loaded again) and its shard retried; nothing
already recorded is redone. Methods that take over the engine's model (Arrow) run after all others.

On a cluster, start Ray on every node (``ray start --head`` / ``ray start --address HEAD:6379``) and run
``logo run --ray HEAD:6379 --workers N --gpus-per-worker G`` on the head node: results are written where the
driver runs (``--output-dir``); adapters and the base model must be readable on every node (a shared
filesystem or the same hub cache).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from tqdm import tqdm

from logo.errors import LogoError
from logo.eval.runner import DatasetJob, RunConfig, check_run, load_engine, predict
from logo.methods import get_method

try:
    import ray
    from ray.exceptions import RayError
    from ray.util import ActorPool
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise LogoError('`logo run --ray` needs Ray: pip install "lora-on-the-go[ray]"') from err

MAX_RESTARTS = 3


class EvalWorker:
    """One engine, loaded once; predicts shards of any (method, dataset) of the run."""

    def __init__(self, config: RunConfig, methods: list[str], threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.config = config
        self.engine, self.loading_s = load_engine(config, methods, progress=False)
        self.methods = {m: get_method(m, k=config.n_selected_modules) for m in methods}

    def predict(self, method: str, dataset: str, metric: str, items: list) -> tuple:
        """``(method, dataset, records, seconds, loading seconds)`` of one shard."""
        start = time.perf_counter()
        records = predict(self.engine, self.methods[method], replace(self.config, method=method), items, metric)
        return method, dataset, records, time.perf_counter() - start, self.loading_s


def worker_error(err: Exception) -> LogoError:
    """The one-line error for a failure on a worker: a user's mistake (a LogoError raised there) as it is; another
    exception raised by the worker's code (Ray runs an actor method once: such an error is not retried) by its type
    and first line; a worker process that died more often than Ray restarts it as such. The finished shards are
    recorded either way."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, LogoError):
        return LogoError(str(cause))
    if cause is not None:  # RayTaskError: the method raised; rerunning repeats it unless its cause is fixed
        return LogoError(f"a Ray worker raised {type(cause).__name__}: {_short(cause)}; every finished shard "
                         "is recorded: fix the cause and run the same command again to resume")
    return LogoError(f"a Ray worker failed {MAX_RESTARTS + 1} times ({type(err).__name__}: {_short(err)}); "
                     "every finished shard is recorded: run the same command again to resume")


def _short(err: BaseException) -> str:
    """An exception's message for a one-line error: without terminal colour codes (Ray's tracebacks carry them), its
    first non-blank line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else "no message"


def check_capacity(resources: dict, workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Raise a LogoError unless the cluster's ``resources`` (``ray.cluster_resources()``) can hold every worker at
    once: an actor Ray cannot place waits forever, and the shards handed to it with it."""
    for kind, each, per in (("CPU", cpus_per_worker, "CPU each"), ("GPU", gpus_per_worker, "--gpus-per-worker")):
        have = resources.get(kind, 0.0)
        if workers * each > have + 1e-9:
            what = f"{each:g} {per}" if kind == "CPU" else f"{per} {each:g}"
            raise LogoError(f"the Ray cluster has {have:g} {kind}s, but --workers {workers} x {what} needs "
                            f"{workers * each:g}: give at most --workers {int(have // each + 1e-9)}, or a bigger "
                            "cluster")


def run_methods_ray(config: RunConfig, methods: list[str], address: str = "", workers: int = 2,
                    gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0, progress: bool = True,
                    on_shard: Callable[[list], None] | None = None) -> dict[str, dict[str, float]]:
    """As :func:`logo.eval.runner.run_methods`, on Ray actors.

    ``address`` "" or "local" starts a local Ray (or uses the one this process already started); HOST:PORT joins a
    cluster. ``on_shard(actors)`` is called after every recorded shard (progress hooks, fault-injection tests).
    """
    if workers < 1:
        raise LogoError(f"--workers must be at least 1, got {workers}")
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise LogoError("--gpus-per-worker must be >= 0 and the CPUs per worker > 0")
    config, objects = check_run(config, methods)
    takes_over = {m: method.takes_over_model for m, method in zip(methods, objects)}
    jobs = {(m, name): DatasetJob.open(replace(config, method=m), name) for m in methods for name in config.datasets()}
    units = [(m, name, shard) for (m, name), job in jobs.items() for shard in job.shards()]
    if units:
        if not ray.is_initialized():
            ray.init(address=None if address in ("", "local") else address)
        check_capacity(ray.cluster_resources(), workers, cpus_per_worker, gpus_per_worker)
        remote = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=MAX_RESTARTS,
                            max_task_retries=MAX_RESTARTS)(EvalWorker)
        actors = [remote.remote(config, methods, int(cpus_per_worker)) for _ in range(workers)]
        bar = tqdm(total=sum(len(s) for _, _, s in units), desc="ray", unit="inst", disable=not progress)
        try:
            for phase in (False, True):  # a method that takes over the model runs after every other
                todo = [u for u in units if takes_over[u[0]] == phase]
                _run_phase(todo, jobs, ActorPool(actors), actors, bar, on_shard)
        finally:
            bar.close()
            for actor in actors:
                ray.kill(actor)
    return {m: {name: jobs[(m, name)].finish(jobs[(m, name)].store.meta["loading_s"] or 0.0)
                for name in config.datasets()} for m in methods}


def _run_phase(units: list, jobs: dict, pool: ActorPool, actors: list, bar, on_shard) -> None:
    def submit(actor, unit):
        method, name, shard = unit
        job = jobs[(method, name)]
        return actor.predict.remote(method, name, job.metric, job.items(shard))

    try:
        for method, name, records, seconds, loading_s in pool.map_unordered(submit, units):
            jobs[(method, name)].record(records, seconds, loading_s)
            bar.update(len(records))
            if on_shard is not None:
                on_shard(actors)
    except RayError as err:
        raise worker_error(err) from err
