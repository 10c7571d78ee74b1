"""`logo run` on a tiny model: official files, batch-size invariance, resumability, baselines, Arrow, compare."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from logo.errors import LogoError
from logo.eval import runner as runner_mod
from logo.eval.compare import compare
from logo.eval.records import META, OFFICIAL_FILES, RECORDS
from logo.eval.runner import RunConfig, run, run_methods


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


def test_official_files_and_batch_invariance(setup, tmp_path, capsys):
    one = config(setup, tmp_path / "b1", batch_size=1)
    many = config(setup, tmp_path / "b4", batch_size=4)
    assert run(one, progress=False) == run(many, progress=False)
    out = capsys.readouterr().out
    assert "Dataset bbh.toy: 9 sample" in out and "Accuracy: " in out
    target = tmp_path / "b1" / one.run_name() / "bbh.toy"
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == sorted(OFFICIAL_FILES)
    assert one.run_name() == f"{setup[0].name}_selection_norm_n_2_seed_0"
    for name in ("predictions.json", "selected_loras.json", "eval_results.json"):
        assert read(tmp_path / "b1", one, name) == read(tmp_path / "b4", many, name)
    for w1, w4 in zip(read(tmp_path / "b1", one, "weights.json"), read(tmp_path / "b4", many, "weights.json")):
        assert w1 == pytest.approx(w4, abs=1e-5)  # padded batches round differently in the last digits
    metric = read(tmp_path / "b1", one, "metric_dict.json")
    assert list(metric) == ["norm"] and len(metric["norm"]) == 9 and len(metric["norm"][0]) == 4
    selected = read(tmp_path / "b1", one, "selected_loras.json")
    weights = read(tmp_path / "b1", one, "weights.json")
    for names, w, scores in zip(selected, weights, metric["norm"]):
        top = sorted(range(4), key=lambda j: -scores[j])[:2]  # the official top-k and normalised weights
        assert names == [f"task_{j}" for j in top]
        assert w == pytest.approx([scores[j] / (scores[top[0]] + scores[top[1]]) for j in top], rel=1e-5)
    assert set(read(tmp_path / "b1", one, "time_dict.json")) == {"loading", "inference"}
    predictions = read(tmp_path / "b1", one, "predictions.json")
    assert all("\n" not in p and p == p.strip() for p in predictions)
    assert read(tmp_path / "b1", one, "eval_results.json") == [int(p.lower() == "true") for p in predictions]


def test_resume_after_interruption_and_a_torn_line(setup, tmp_path, monkeypatch):
    cfg = config(setup, tmp_path, batch_size=1)  # checkpoints every 4 instances
    calls = []
    failing = [True]
    original = runner_mod.Runner._predict

    def flaky(self, chunk, *args):
        calls.append(list(chunk))
        if failing[0] and len(calls) == 2:
            raise Interrupted  # the run dies half-way
        return original(self, chunk, *args)

    monkeypatch.setattr(runner_mod.Runner, "_predict", flaky)
    with pytest.raises(Interrupted):
        run(cfg, progress=False)
    records = tmp_path / cfg.run_name() / "bbh.toy" / RECORDS
    lines = records.read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 1, 2, 3]
    records.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])  # the last write was cut short
    calls.clear()
    failing[0] = False
    run(cfg, progress=False)
    assert calls == [[3, 4, 5, 6], [7, 8]]  # only what was not (completely) done
    monkeypatch.setattr(runner_mod.Runner, "_predict", original)
    reference = config(setup, tmp_path / "ref", batch_size=3)
    run(reference, progress=False)
    for name in ("predictions.json", "selected_loras.json"):
        assert read(tmp_path, cfg, name) == read(tmp_path / "ref", reference, name)


def test_finished_runs_are_not_redone_and_settings_are_not_mixed(setup, tmp_path, monkeypatch):
    cfg = config(setup, tmp_path, method="base", limit=4)
    run(cfg, progress=False)
    before = read(tmp_path, cfg, "predictions.json")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although nothing was left to generate")

    monkeypatch.setattr(runner_mod, "load_engine", no_model)
    run(cfg, progress=False)
    assert read(tmp_path, cfg, "predictions.json") == before
    with pytest.raises(AssertionError, match="the model was loaded"):  # a larger --limit has work left
        run(config(setup, tmp_path, method="base", limit=5), progress=False)
    with pytest.raises(LogoError, match=r"other settings \(max_new_tokens differ\).*--overwrite"):
        run(config(setup, tmp_path, method="base", limit=4, max_new_tokens=3), progress=False)
    monkeypatch.undo()
    run(config(setup, tmp_path, method="base", limit=4, max_new_tokens=3, overwrite=True), progress=False)
    meta = json.loads((tmp_path / cfg.run_name() / "bbh.toy" / META).read_text())
    assert meta["settings"]["max_new_tokens"] == 3


def test_baselines_share_one_model_load_and_compare(setup, tmp_path, monkeypatch):
    loads = []
    original = runner_mod.load_engine
    monkeypatch.setattr(runner_mod, "load_engine", lambda *a, **k: loads.append(a[1]) or original(*a, **k))
    methods = ["base", "uniform", "random", "fixed:task_2", "logo"]
    scores = run_methods(config(setup, tmp_path, limit=3), methods, progress=False)
    assert loads == [methods] and set(scores) == set(methods)
    for method in methods:
        cfg = config(setup, tmp_path, method=method, limit=3)
        selected, weights = read(tmp_path, cfg, "selected_loras.json"), read(tmp_path, cfg, "weights.json")
        if method == "logo":
            assert cfg.run_name().endswith("_seed_0")
            continue
        assert cfg.run_name().endswith("_method_" + method.replace(":", "-"))
        assert read(tmp_path, cfg, "metric_dict.json") == {}
        if method == "base":
            assert selected == [[], [], []]
        elif method == "uniform":
            assert selected[0] == [f"task_{i}" for i in range(4)] and weights[0] == [0.25] * 4
        elif method == "random":
            assert all(len(s) == 2 for s in selected) and weights[0] == [0.5, 0.5]
        else:
            assert selected == [["task_2"]] * 3 and weights == [[1.0]] * 3
    base = read(tmp_path, config(setup, tmp_path, method="base"), "predictions.json")
    run(config(setup, tmp_path / "more", method="base", limit=5), progress=False)
    report = compare([tmp_path, tmp_path / "more"], tmp_path / "cmp")
    assert "method_uniform" in report.markdown and "| bbh.toy | average |" in report.markdown
    assert report.warnings == ["bbh.toy was evaluated on different numbers of instances "
                               f"({', '.join(f'{r[0]}: 3' for r in report.rows[1:-1])}, "
                               f"{report.rows[-1][0]}: 5); not comparable"]
    csv_rows = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    assert csv_rows[0] == "method,bbh.toy,average" and len(csv_rows) == 7
    base_row = next(r for r in report.rows if r[0].endswith("_method_base"))
    assert base_row[1] == f"{100 * sum(p.lower() == 'true' for p in base) / 3:.2f}"
    assert (tmp_path / "cmp" / "selection.png").stat().st_size > 1000
    with pytest.raises(LogoError, match="unknown method"):
        run(config(setup, tmp_path, method="best"), progress=False)
    with pytest.raises(LogoError, match="no adapter of that name"):
        run(config(setup, tmp_path, method="fixed:nope"), progress=False)


def test_arrow_matches_peft_arrow_directly(setup, tmp_path):
    import torch
    from peft import ArrowConfig, create_arrow_model

    from logo.models import load_base_model

    cfg = config(setup, tmp_path, method="arrow", limit=4, batch_size=2)
    run(cfg, progress=False)
    predictions = read(tmp_path, cfg, "predictions.json")
    assert read(tmp_path, cfg, "selected_loras.json") == [[]] * 4
    model_dir, lib, data = setup
    model, tok = load_base_model(str(model_dir), device="cpu")
    arrow = create_arrow_model(model, [str(lib / f"task_{i}") for i in range(4)],
                               ArrowConfig(top_k=2, rng_seed=0)).eval()
    prompts = [json.loads(x)["context"] for x in (data / "bbh/toy/test.jsonl").read_text().splitlines()[:4]]
    expected = []
    for prompt in prompts:  # one at a time, no padding
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = arrow.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        expected.append((text.splitlines() or [text])[0])
    assert predictions == expected


def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


def test_a_changed_library_is_not_mixed(setup, tmp_path, monkeypatch):
    import os
    import shutil

    lib = tmp_path / "lib"
    shutil.copytree(setup[1], lib)
    cfg = config(setup, tmp_path / "out", adapters=[str(lib)], method="base", limit=2)
    run(cfg, progress=False)
    monkeypatch.setattr(runner_mod, "load_engine", no_model)
    run(cfg, progress=False)  # the same library: resumed (nothing left to do)
    weights = lib / "task_0" / "adapter_model.safetensors"
    original = weights.read_bytes()
    config_file = lib / "task_1" / "adapter_config.json"
    text = config_file.read_text()

    def retrain_weights():  # another value of the last weight: the same header, shapes and file size
        weights.write_bytes(original[:-4] + bytes(b ^ 0x55 for b in original[-4:]))

    changes = [
        (lambda: (lib / "logo_router.json").write_text("{}"), (lib / "logo_router.json").unlink),
        (lambda: (lib / "logo_calibration.json").write_text("{}"), (lib / "logo_calibration.json").unlink),
        (retrain_weights, lambda: weights.write_bytes(original)),
        (lambda: config_file.write_text(text + " "), lambda: config_file.write_text(text)),
    ]
    for change, undo in changes:
        change()
        with pytest.raises(LogoError, match=r"other settings \(library differ\).*--overwrite"):
            run(cfg, progress=False)
        undo()
        run(cfg, progress=False)  # back as it was (new modification times): accepted again
    os.utime(weights, ns=(0, 10**18))  # only touched
    run(cfg, progress=False)


def test_a_copied_library_resumes_the_run(setup, tmp_path, monkeypatch):
    """The library is its content: a copy elsewhere (new paths, new modification times) resumes the run."""
    import shutil

    lib, copy = tmp_path / "lib", tmp_path / "elsewhere" / "lib_copy"
    shutil.copytree(setup[1], lib)
    run(config(setup, tmp_path / "out", adapters=[str(lib)], method="base", limit=2), progress=False)
    shutil.copytree(lib, copy, copy_function=shutil.copy)  # contents only, not the times
    assert (copy / "task_0" / "adapter_config.json").stat().st_mtime_ns != (
        lib / "task_0" / "adapter_config.json").stat().st_mtime_ns
    monkeypatch.setattr(runner_mod, "load_engine", no_model)
    run(config(setup, tmp_path / "out", adapters=[str(copy)], method="base", limit=2), progress=False)


def test_file_digest_reads_headers_and_samples_of_large_files(tmp_path):
    import os

    from logo.eval.runner import SAMPLE_BYTES, file_digest

    header = json.dumps({"w": {"dtype": "F32", "shape": [300000], "data_offsets": [0, 1200000]}}).encode()
    data = bytes(range(256)) * (1200000 // 256) + bytes(1200000 % 256)
    file = tmp_path / "adapter_model.safetensors"
    file.write_bytes(len(header).to_bytes(8, "little") + header + data)
    before = file_digest(file)
    os.utime(file, ns=(0, 10**18))
    assert file_digest(file) == before  # the time is no part of it
    start, size = 8 + len(header), file.stat().st_size
    for where in (start + 10, size // 2 + 10, size - 1):  # a weight in each sample
        changed = bytearray(file.read_bytes())
        changed[where] ^= 0xFF
        (tmp_path / "changed.safetensors").write_bytes(bytes(changed))
        assert file_digest(tmp_path / "changed.safetensors") != before, where
    wider = header.replace(b"300000", b"300001")
    (tmp_path / "changed.safetensors").write_bytes(len(wider).to_bytes(8, "little") + wider + data[:-1])
    assert file_digest(tmp_path / "changed.safetensors") != before
    assert file.stat().st_size > 4 * SAMPLE_BYTES  # the sampled path was the one tested


def test_model_dir_copy_of_a_preset_is_the_presets_run():
    """--model_dir D --base_model Llama-3.1-8B is the preset read from D: the same run name and settings as the
    preset (the library compared by fingerprint, not as typed), the model read from D, the preset's library."""
    from logo.presets import default_adapters

    plain = RunConfig(library="f1")
    local = RunConfig(model_dir="/no/such/dir", library="f1")
    assert plain.settings() == local.settings() and plain.run_name() == local.run_name()
    spec = local.engine_spec(["logo"])
    assert spec.base_model == "/no/such/dir/Llama-3.1-8B" and spec.adapters == [default_adapters("Llama-3.1-8B")]
    typed = RunConfig(adapters=[default_adapters("Llama-3.1-8B")], library="f1")
    assert typed.settings() == plain.settings()


def test_router_options_name_the_run_of_logo_only(setup, tmp_path, monkeypatch):
    """A logo run with other router options gets its own directory (the official name stays the default's); the
    methods that do not read them keep theirs, and are not refused for them."""
    official = {"layer": -1, "module": "q_proj", "post_norm": False, "position": "last", "weighting": "normalize",
                "temperature": 1.0, "calibration": "none"}
    default = config(setup, tmp_path, limit=2, router_options=official)
    other = config(setup, tmp_path, limit=2, router_options=official | {"layer": -2, "temperature": 0.5})
    assert default.run_name() == f"{setup[0].name}_selection_norm_n_2_seed_0"
    assert other.run_name() == f"{setup[0].name}_selection_norm_n_2_seed_0_layer=-2_temperature=0.5"
    assert replace(other, method="base").run_name() == replace(default, method="base").run_name()
    run_methods(default, ["logo", "base"], progress=False)
    loads = []
    original = runner_mod.load_engine
    monkeypatch.setattr(runner_mod, "load_engine", lambda *a, **k: loads.append(a[1]) or original(*a, **k))
    run_methods(other, ["logo", "base"], progress=False)  # no refusal, and only logo has work left
    assert loads == [["logo", "base"]]
    predicted = {json.loads(line)["index"] for line in
                 (tmp_path / other.run_name() / "bbh.toy" / RECORDS).read_text().splitlines()}
    assert predicted == {0, 1} and (tmp_path / default.run_name() / "bbh.toy" / "eval_results.json").is_file()
    assert read(tmp_path, replace(other, method="base"), "predictions.json") == read(
        tmp_path, replace(default, method="base"), "predictions.json")


def test_a_smaller_limit_keeps_the_records_beyond_it(setup, tmp_path, monkeypatch):
    """A rerun with a smaller --limit reports on its instances and keeps the others' records, so going back to
    the larger limit generates nothing."""
    run(config(setup, tmp_path, method="base", limit=5), progress=False)
    larger = read(tmp_path, config(setup, tmp_path, method="base"), "predictions.json")
    monkeypatch.setattr(runner_mod, "load_engine", no_model)
    run(config(setup, tmp_path, method="base", limit=2), progress=False)
    assert read(tmp_path, config(setup, tmp_path, method="base"), "predictions.json") == larger[:2]
    run(config(setup, tmp_path, method="base", limit=5), progress=False)
    assert read(tmp_path, config(setup, tmp_path, method="base"), "predictions.json") == larger


def test_metric_dict_holds_the_scores_of_the_router_used(setup, tmp_path):
    """``metric_dict.json``: every adapter's raw score per instance under the strategy that scored them, for
    ``logo`` and for ``fitted`` (its router file's strategy); empty for methods that do not route."""
    import shutil

    from transformers import AutoModelForCausalLM

    from logo.library import AdapterLibrary
    from logo.router import RouterConfig
    from logo.router_file import FILE_NAME, RouterFile, model_fingerprint

    model_dir, lib, _data = setup
    own = tmp_path / "lib"
    shutil.copytree(lib, own)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    names = list(AdapterLibrary.load(own, model).names)
    RouterFile(RouterConfig(k=1, strategy="entropy"), names, model_fingerprint(model), {}, "tiny").save(own / FILE_NAME)
    cfg = config(setup, tmp_path / "out", adapters=[str(own)], limit=3)
    run_methods(cfg, ["logo", "fitted", "base"], progress=False)
    logo = read(tmp_path / "out", cfg, "metric_dict.json")
    fitted_cfg = config(setup, tmp_path / "out", adapters=[str(own)], method="fitted")
    fitted = read(tmp_path / "out", fitted_cfg, "metric_dict.json")
    assert list(logo) == ["norm"] and list(fitted) == ["entropy"]
    assert all(len(row) == len(names) for rows in (logo["norm"], fitted["entropy"]) for row in rows)
    picked = [names[max(range(len(names)), key=row.__getitem__)] for row in fitted["entropy"]]
    assert picked == [s[0] for s in read(tmp_path / "out", fitted_cfg, "selected_loras.json")]
    assert read(tmp_path / "out", config(setup, tmp_path / "out", method="base"), "metric_dict.json") == {}


def test_overwrite_and_a_larger_limit_remove_the_old_official_files(setup, tmp_path, monkeypatch):
    target = tmp_path / config(setup, tmp_path, method="base").run_name() / "bbh.toy"

    def official() -> list[str]:
        return sorted(name for name in OFFICIAL_FILES if (target / name).exists())

    def interrupted(self, chunk, *args):
        raise Interrupted

    run(config(setup, tmp_path, method="base", limit=2), progress=False)
    assert official() == sorted(OFFICIAL_FILES)
    with monkeypatch.context() as m:
        m.setattr(runner_mod.Runner, "_predict", interrupted)
        with pytest.raises(Interrupted):  # more instances: the files of 2 are no longer this run's results
            run(config(setup, tmp_path, method="base", limit=3), progress=False)
    assert official() == []
    run(config(setup, tmp_path, method="base", limit=3), progress=False)
    assert len(json.loads((target / "eval_results.json").read_text())) == 3
    with monkeypatch.context() as m:
        m.setattr(runner_mod.Runner, "_predict", interrupted)
        with pytest.raises(Interrupted):
            run(config(setup, tmp_path, method="base", limit=3, max_new_tokens=3, overwrite=True), progress=False)
    assert official() == []


def test_a_bad_output_dir_is_refused_before_the_model_loads(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "load_engine", no_model)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in ((afile, r"--output-dir .*afile is a file"), (afile / "sub", "--output-dir .*afile/sub"),
                         ("/proc/logo_x", "cannot make --output-dir /proc/logo_x")):
        with pytest.raises(LogoError, match=message):
            run(config(setup, out, method="base", limit=2), progress=False)
        with pytest.raises(LogoError, match=message):
            run_methods(config(setup, out, limit=2), ["base", "uniform"], progress=False)


def test_every_method_is_checked_against_the_library_before_any_generation(setup, tmp_path, monkeypatch):
    predicted = []
    monkeypatch.setattr(runner_mod, "load_engine", no_model)
    monkeypatch.setattr(runner_mod.Runner, "_predict", lambda self, chunk, *a: predicted.append(chunk))
    cases = [(["base", "fixed:nope"], {}, r"fixed:nope: no adapter of that name .*task_0, task_1"),
             (["base", "fitted"], {}, "the library has no fitted router"),
             (["base", "random"], {"n_selected_modules": 5}, "k=5 adapters requested but the library holds 4")]
    for methods, kw, message in cases:
        with pytest.raises(LogoError, match=message):
            run_methods(config(setup, tmp_path, limit=2, **kw), methods, progress=False)
    assert predicted == [] and not list(tmp_path.iterdir())
