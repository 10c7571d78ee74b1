"""`logo run` on a tiny model: official files, batch-size invariance, resumability, baselines, compare."""

from __future__ import annotations

import json

import pytest

from logo.errors import LogoError
from logo.eval import runner as runner_mod
from logo.eval.compare import compare
from logo.eval.runner import OFFICIAL_FILES, RunConfig, run


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.helpers import make_library

    model_dir = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lib = tmp_path_factory.mktemp("run_lib")
    make_library(model, lib, [{"name": f"task_{i}", "r": 4, "alpha": 8} for i in range(4)])
    data = tmp_path_factory.mktemp("data")
    (data / "bbh" / "toy").mkdir(parents=True)
    rows = [{"context": f"Answer.\n\nQ: item {i} {'x' * (i % 5)}\nA:", "completion": "True"} for i in range(9)]
    (data / "bbh" / "toy" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return model_dir, lib, data


class Interrupted(Exception):
    pass


def config(setup, tmp_path, **kw) -> RunConfig:
    model_dir, lib, data = setup
    base = dict(base_model=str(model_dir), adapters=[str(lib)], dataset="bbh.toy", data_dir=str(data),
                output_dir=str(tmp_path), n_selected_modules=2, max_new_tokens=6, device="cpu")
    return RunConfig(**(base | kw))


def read(tmp_path, cfg: RunConfig, name: str):
    return json.loads((tmp_path / cfg.run_name() / "bbh.toy" / name).read_text())


def test_official_files_and_batch_invariance(setup, tmp_path):
    one = config(setup, tmp_path / "b1", batch_size=1)
    many = config(setup, tmp_path / "b4", batch_size=4)
    run(one, progress=False)
    run(many, progress=False)
    target = tmp_path / "b1" / one.run_name() / "bbh.toy"
    assert sorted(p.name for p in target.iterdir()) == sorted(OFFICIAL_FILES)
    assert one.run_name() == f"{target.parent.name}" and one.run_name().endswith("_selection_norm_n_2_seed_0")
    for name in ("predictions.json", "selected_loras.json", "eval_results.json"):
        assert read(tmp_path / "b1", one, name) == read(tmp_path / "b4", many, name)
    metric = read(tmp_path / "b1", one, "metric_dict.json")
    assert len(metric["norm"]) == 9 and len(metric["norm"][0]) == 4
    weights = read(tmp_path / "b1", one, "weights.json")
    assert all(abs(sum(w) - 1) < 1e-5 and len(w) == 2 for w in weights)
    assert set(read(tmp_path / "b1", one, "time_dict.json")) == {"loading", "inference"}
    assert all("\n" not in p for p in read(tmp_path / "b1", one, "predictions.json"))


def test_resume_after_interruption(setup, tmp_path, monkeypatch):
    cfg = config(setup, tmp_path, batch_size=2)
    calls = []
    failing = [True]
    original = runner_mod.Runner._predict

    def flaky(self, chunk, instances, metric):
        calls.append(list(chunk))
        if failing[0] and len(calls) == 3:
            raise Interrupted  # the run dies half-way
        return original(self, chunk, instances, metric)

    monkeypatch.setattr(runner_mod.Runner, "_predict", flaky)
    with pytest.raises(Interrupted):
        run(cfg, progress=False)
    partial = tmp_path / cfg.run_name() / "bbh.toy" / "partial.jsonl"
    assert [json.loads(x)["index"] for x in partial.read_text().splitlines()] == [0, 1, 2, 3]
    calls.clear()
    failing[0] = False
    run(cfg, progress=False)
    assert calls == [[4, 5], [6, 7], [8]]  # only what was not done
    assert not partial.exists()
    reference = config(setup, tmp_path / "ref", batch_size=2)
    monkeypatch.setattr(runner_mod.Runner, "_predict", original)
    run(reference, progress=False)
    assert read(tmp_path, cfg, "predictions.json") == read(tmp_path / "ref", reference, "predictions.json")


def test_baselines(setup, tmp_path):
    for method in ("base", "uniform", "random", "fixed:task_2"):
        cfg = config(setup, tmp_path, method=method, limit=3)
        run(cfg, progress=False)
        assert cfg.run_name().endswith("_method_" + method.replace(":", "-"))
        selected = read(tmp_path, cfg, "selected_loras.json")
        weights = read(tmp_path, cfg, "weights.json")
        if method == "base":
            assert selected == [[], [], []]
        elif method == "uniform":
            assert selected[0] == [f"task_{i}" for i in range(4)] and weights[0] == [0.25] * 4
        elif method == "random":
            assert all(len(s) == 2 for s in selected) and weights[0] == [0.5, 0.5]
        else:
            assert selected == [["task_2"]] * 3
    md = compare([tmp_path], tmp_path / "cmp")
    assert "method_uniform" in md and "bbh.toy" in md and "average" in md
    assert (tmp_path / "cmp" / "compare.csv").read_text().startswith("method,bbh.toy,average")
    assert (tmp_path / "cmp" / "selection.png").stat().st_size > 0
    with pytest.raises(LogoError, match="unknown method"):
        run(config(setup, tmp_path, method="best"), progress=False)
    with pytest.raises(LogoError, match="no adapter of that name"):
        run(config(setup, tmp_path, method="fixed:nope"), progress=False)
