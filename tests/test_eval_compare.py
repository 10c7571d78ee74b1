"""`logo compare` (and `logo demo`'s output check) on hand-written results: averages, bad files, bad paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from logo.errors import LogoError
from logo.eval.compare import compare


def write_run(root: Path, name: str, results: dict[str, object]) -> Path:
    run = root / name
    for dataset, scores in results.items():
        (run / dataset).mkdir(parents=True)
        (run / dataset / "eval_results.json").write_text(json.dumps(scores))
    return run


def test_averages_are_over_the_datasets_every_run_has(tmp_path):
    write_run(tmp_path / "runs", "X", {"bbh.a": [0, 0], "bbh.b": [1, 1]})
    write_run(tmp_path / "runs", "Y", {"bbh.b": [1, 1]})
    report = compare([tmp_path / "runs"], tmp_path / "cmp")
    assert report.rows == [["method", "bbh.a", "bbh.b", "average of 1 shared"],
                           ["X", "0.00", "100.00", "100.00"],
                           ["Y", "", "100.00", "100.00"]]
    assert report.warnings == ["missing results: Y lacks bbh.a; averages are over the 1 dataset every run has "
                               "(bbh.b)"]
    assert "> warning: missing results: Y lacks bbh.a" in (tmp_path / "cmp" / "compare.md").read_text()


def test_no_shared_dataset_means_no_average(tmp_path):
    write_run(tmp_path / "runs", "X", {"bbh.a": [0, 1]})
    write_run(tmp_path / "runs", "Y", {"bbh.b": [1, 1]})
    report = compare([tmp_path / "runs"], tmp_path / "cmp")
    assert report.rows[1:] == [["X", "50.00", "", ""], ["Y", "", "100.00", ""]]
    assert report.rows[0][-1] == "average of 0 shared"
    assert "X lacks bbh.b; Y lacks bbh.a; no dataset is in every run" in report.warnings[0]


def test_runs_with_the_same_datasets_average_them_all(tmp_path):
    write_run(tmp_path / "runs", "X", {"bbh.a": [0, 1], "gem.c": [{"rouge-1": 0.5, "rouge-2": 0.1, "rouge-L": 0.3}]})
    write_run(tmp_path / "runs", "Y", {"bbh.a": [1, 1], "gem.c": [{"rouge-1": 0.5, "rouge-2": 0.1, "rouge-L": 0.5}]})
    report = compare([tmp_path / "runs"], tmp_path / "cmp")
    assert report.rows == [["method", "bbh.a", "gem.c", "average"], ["X", "50.00", "30.00", "40.00"],
                           ["Y", "100.00", "50.00", "75.00"]]
    assert report.warnings == []


@pytest.mark.parametrize(("content", "message"), [
    ({"a": 1}, r"eval_results.json is not a list of per-instance scores .* but an object"),
    ([None], r"eval_results.json: entry 0 \(null\) is not in a list of per-instance scores"),
    (["1"], r"eval_results.json: entry 0 \(a string '1'\) is not in a list"),
    ([{"rouge-1": 0.5}], r"eval_results.json: entry 0 .* numeric 'rouge-L'"),
    ([{"rouge-L": 0.5}, 1], r"eval_results.json: entry 1 \(a number 1\) is not like entry 0 in"),
    ([1, {"rouge-L": 0.5}], r"eval_results.json: entry 1 .* is not like entry 0 in"),
])
def test_malformed_results_are_one_line_errors_naming_the_file(tmp_path, content, message):
    write_run(tmp_path / "runs", "X", {"bbh.a": content})
    with pytest.raises(LogoError, match=message) as exc:
        compare([tmp_path / "runs"], tmp_path / "cmp")
    assert str(tmp_path / "runs" / "X" / "bbh.a" / "eval_results.json") in str(exc.value)
    assert "\n" not in str(exc.value) and "rerun `logo run`" in str(exc.value)


def test_non_utf8_results_are_named(tmp_path):
    run = write_run(tmp_path / "runs", "X", {"bbh.a": [1]})
    (run / "bbh.a" / "eval_results.json").write_bytes(b"[\xff]")
    with pytest.raises(LogoError, match=r"bbh.a/eval_results.json is not valid JSON"):
        compare([tmp_path / "runs"], tmp_path / "cmp")


def test_output_that_is_a_file_is_refused_before_reading_runs(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    # no runs at all: the output is checked first
    with pytest.raises(LogoError, match=r"^--output .*afile is a file, not a directory; give a directory"):
        compare([tmp_path / "missing"], afile)
    with pytest.raises(LogoError, match=r"^cannot make --output .*afile/sub: .*afile is a file, not a directory"):
        compare([tmp_path / "missing"], afile / "sub")
    assert afile.read_text() == "x"


def test_demo_checks_its_output_before_loading_the_model(tmp_path, monkeypatch):
    from logo.experiments import demo

    def build(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(demo.EngineSpec, "build", build)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(LogoError, match=r"^--output .*afile is a file, not a directory"):
        demo.run_demo(afile, quick=True)


@pytest.mark.parametrize(("content", "message"), [
    ("[[\"a\"], [\"b\"", r"selected_loras.json is not valid JSON"),
    (json.dumps({"a": 1}), r"selected_loras.json is not a list \(one entry per instance\) of lists of adapter names "
                           r"but an object"),
    (json.dumps([["a"], "b"]), r"selected_loras.json: entry 1 \(a string 'b'\) is not a list of adapter names"),
    (json.dumps([["a", 3]]), r"selected_loras.json: entry 0 \(an array \['a', 3\]\) is not a list of adapter names"),
])
def test_damaged_selections_fail_before_any_output_is_written(tmp_path, content, message):
    run = write_run(tmp_path / "runs", "M_seed_0", {"bbh.a": [1, 0]})
    (run / "bbh.a" / "selected_loras.json").write_text(content)
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "compare.md").write_text("earlier comparison")
    with pytest.raises(LogoError, match=message) as exc:
        compare([tmp_path / "runs"], tmp_path / "cmp")
    assert str(run / "bbh.a" / "selected_loras.json") in str(exc.value) and "\n" not in str(exc.value)
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.md"]  # untouched, nothing half-made
    assert (tmp_path / "cmp" / "compare.md").read_text() == "earlier comparison"


def test_a_heatmap_of_an_earlier_comparison_goes_when_nothing_was_selected(tmp_path):
    run = write_run(tmp_path / "runs", "M_selection_norm_n_1_seed_0", {"bbh.a": [1, 0]})
    (run / "bbh.a" / "selected_loras.json").write_text(json.dumps([["x"], ["y"]]))
    write_run(tmp_path / "runs", "M_selection_norm_n_1_seed_0_layer=-2", {"bbh.a": [1, 1]})
    (tmp_path / "runs" / "M_selection_norm_n_1_seed_0_layer=-2" / "bbh.a" / "selected_loras.json").write_text(
        json.dumps([["x"], ["x"]]))
    report = compare([tmp_path / "runs"], tmp_path / "cmp")
    assert [p.name for p in report.files] == ["compare.md", "compare.csv", "selection.png"]
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.csv", "compare.md", "selection.png"]
    for d in (tmp_path / "runs").iterdir():
        (d / "bbh.a" / "selected_loras.json").write_text(json.dumps([[], []]))  # now runs that select nothing
    compare([tmp_path / "runs"], tmp_path / "cmp")
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.csv", "compare.md"]


def test_method_labels_keep_the_router_options():
    from logo.eval.compare import method_label

    assert method_label("Llama-3.1-8B_selection_norm_n_20_seed_0") == "logo"
    assert method_label("Llama-3.1-8B_selection_norm_n_20_seed_0_layer=-8") == "logo_layer=-8"
    assert method_label("Llama-3.1-8B_selection_norm_n_20_seed_0_method_fixed-a") == "fixed-a"
