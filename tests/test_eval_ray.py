"""`logo run --ray`: the same predictions and files as the plain run; a killed worker is restarted and its shard
retried, and every instance is recorded exactly once. One local Ray (2 CPUs) is shared by the module's tests."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")

from logo.eval.records import RECORDS  # noqa: E402
from logo.eval.runner import run_methods  # noqa: E402
from tests.test_eval_runner import config, read  # noqa: E402
from tests.test_eval_runner import setup as setup  # noqa: E402, F401 - the module fixture

distributed = pytest.importorskip("logo.eval.distributed")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_run_equals_the_plain_run(setup, local_ray, tmp_path):
    methods = ["logo", "base", "random"]
    plain = run_methods(config(setup, tmp_path / "plain", batch_size=2), methods, progress=False)
    spread = distributed.run_methods_ray(config(setup, tmp_path / "ray", batch_size=2), methods, workers=2,
                                         progress=False)
    assert spread == plain
    for method in methods:
        cfg = config(setup, tmp_path, method=method, batch_size=2)
        for name in ("predictions.json", "selected_loras.json", "eval_results.json", "metric_dict.json"):
            ours, theirs = read(tmp_path / "ray", cfg, name), read(tmp_path / "plain", cfg, name)
            if name == "metric_dict.json" and method == "logo":
                assert ours["norm"] == [pytest.approx(row, abs=1e-5) for row in theirs["norm"]]
            else:
                assert ours == theirs


def test_a_killed_worker_is_restarted_and_nothing_is_lost_or_doubled(setup, local_ray, tmp_path):
    killed = []

    def kill_once(actors):
        if not killed:  # after the first recorded shard, kill a worker: Ray restarts it and retries its shard
            ray.kill(actors[0], no_restart=False)
            killed.append(True)

    cfg = config(setup, tmp_path, batch_size=1)  # 9 instances in shards of 4 (batch 1 x 4 batches)
    scores = distributed.run_methods_ray(cfg, ["logo"], workers=2, progress=False, on_shard=kill_once)
    assert killed and set(scores) == {"logo"}
    lines = (tmp_path / cfg.run_name() / "bbh.toy" / RECORDS).read_text().splitlines()
    indices = [json.loads(line)["index"] for line in lines]
    assert sorted(indices) == list(range(9))
    assert len(read(tmp_path, cfg, "predictions.json")) == 9


def test_cli_passes_ray_options(monkeypatch, tmp_path):
    import typer
    from typer.testing import CliRunner

    from logo.eval import cli as eval_cli

    calls = []
    monkeypatch.setattr(distributed, "run_methods_ray", lambda config, methods, **kw: calls.append((methods, kw)))
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    eval_cli.register(app)
    result = CliRunner().invoke(app, ["run", "--method", "logo,base", "--ray", "local", "--workers", "3",
                                      "--gpus-per-worker", "0.5"])
    assert result.exit_code == 0, result.output
    assert calls == [(["logo", "base"], {"address": "local", "workers": 3, "gpus_per_worker": 0.5})]
    assert CliRunner().invoke(app, ["run", "--ray", "local"]).exit_code == 0  # the defaults
    assert calls[-1] == (["logo"], {"address": "local", "workers": 2, "gpus_per_worker": 0.0})


def test_a_users_mistake_on_a_worker_is_one_line():
    from ray.exceptions import RayActorError, RayTaskError

    from logo.errors import LogoError
    from logo.eval.distributed import worker_error

    mistake = RayTaskError("predict", "Traceback (most recent call last): ...", LogoError("fixed:nope: no adapter"))
    assert str(worker_error(mistake)) == "fixed:nope: no adapter"
    assert "run the same command again to resume" in str(worker_error(RayActorError()))
    # the worker's own exception: Ray ran the method once (no retries), so no "failed 4 times"; no colour codes
    crash = RayTaskError("predict", "Traceback ...", RuntimeError("\x1b[36mCUDA out of memory\x1b[39m\nmore"))
    message = str(worker_error(crash))
    assert message.startswith("a Ray worker raised RuntimeError: CUDA out of memory; ") and "times" not in message
    assert "\x1b" not in message and "\n" not in message


def test_ray_run_checks_every_method_before_any_worker(setup, tmp_path, monkeypatch):
    """As the plain run: a fixed: name the library lacks fails before Ray starts or anything is generated."""
    from logo.errors import LogoError

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the methods were checked"))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(LogoError, match="fixed:nope: no adapter of that name"):
        distributed.run_methods_ray(config(setup, tmp_path), ["base", "fixed:nope"], workers=1, progress=False)
    assert not any(tmp_path.rglob(RECORDS))


def test_workers_the_cluster_cannot_place_are_refused():
    """An actor Ray cannot place waits forever (and the shards given to it): more workers than the cluster's CPUs or
    GPUs hold is a one-line error, before any actor is made."""
    from logo.errors import LogoError
    from logo.eval.distributed import check_capacity

    check_capacity({"CPU": 2.0}, 2, 1.0, 0.0)
    check_capacity({"CPU": 4.0, "GPU": 2.0}, 4, 1.0, 0.5)
    with pytest.raises(LogoError, match=r"has 1 CPUs, but --workers 2 x 1 CPU each needs 2: give at most --workers 1"):
        check_capacity({"CPU": 1.0}, 2, 1.0, 0.0)
    with pytest.raises(LogoError, match=r"has 0 GPUs, but --workers 1 x --gpus-per-worker 1 needs 1"):
        check_capacity({"CPU": 8.0}, 1, 1.0, 1.0)
