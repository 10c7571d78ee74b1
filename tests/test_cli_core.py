"""`logo route` / `logo generate` / `logo calibrate` end to end on a tiny model saved like a hub repo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def run_logo(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "logo.cli", *args], capture_output=True, text=True, input=input_text, timeout=300
    )


@pytest.fixture(scope="module")
def model_and_lib(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.helpers import MIXED_SPECS, make_library

    model_dir = tiny_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lib = tmp_path_factory.mktemp("cli_lib")
    make_library(model, lib, MIXED_SPECS[:4])
    return model_dir, lib


def test_route_json_contract(model_and_lib):
    model_dir, lib = model_and_lib
    res = run_logo("route", "--base-model", str(model_dir), "--adapters", str(lib), "--prompt", "Q: 1+1\\nA:",
                   "--prompt", "hello", "--n-selected-modules", "2", "--selection-strategy", "entropy", "--json")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [rec["prompt"] for rec in lines] == ["Q: 1+1\nA:", "hello"]
    for rec in lines:
        assert len(rec["selected"]) == 2 and set(rec["scores"]) == {"a_r4", "b_r8", "c_r2_rslora", "d_qonly"}
        scores = [s["score"] for s in rec["selected"]]
        assert scores == sorted(scores, reverse=True)
        assert sum(s["weight"] for s in rec["selected"]) == pytest.approx(1.0, abs=1e-5)
        for sel in rec["selected"]:
            assert rec["scores"][sel["name"]] == pytest.approx(sel["score"])
            assert set(sel) == {"name", "index", "score", "weight"}


def test_generate_json_and_table(model_and_lib):
    model_dir, lib = model_and_lib
    res = run_logo("generate", "-m", str(model_dir), "-a", str(lib), "-p", "Q: hi\\nA:", "-k", "1",
                   "--max-new-tokens", "4", "--json")
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert "output" in rec and len(rec["selected"]) == 1
    table = run_logo("generate", "-m", str(model_dir), "-a", str(lib), "-p", "x", "-k", "2", "--max-new-tokens", "2")
    assert table.returncode == 0 and "output:" in table.stdout and "weight" in table.stdout


def test_generate_static_decode_matches_eager(model_and_lib):
    model_dir, lib = model_and_lib
    args = ["generate", "-m", str(model_dir), "-a", str(lib), "-p", "Q: hi\\nA:", "-p", "Sort: b a\\nA:", "-k", "2",
            "--max-new-tokens", "12", "--json"]
    eager, static = run_logo(*args), run_logo(*args, "--decode", "static")
    assert eager.returncode == 0 and static.returncode == 0, eager.stderr + static.stderr
    assert [json.loads(line) for line in static.stdout.splitlines()] == [
        json.loads(line) for line in eager.stdout.splitlines()]


def test_repeated_adapter_paths_and_prompts_file(model_and_lib, tmp_path):
    model_dir, lib = model_and_lib
    prompts = tmp_path / "p.txt"
    prompts.write_text("first\\nline\nsecond\n\n")
    res = run_logo("route", "-m", str(model_dir), "-a", str(lib / "a_r4"), "-a", str(lib / "b_r8"),
                   "--prompts-file", str(prompts), "-k", "1", "--json")
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["prompt"] for r in recs] == ["first\nline", "second"]
    assert set(recs[0]["scores"]) == {"a_r4", "b_r8"}


def test_calibrate_then_route_calibrated(model_and_lib, tmp_path):
    model_dir, lib = model_and_lib
    shutil.copytree(lib, tmp_path / "lib")
    res = run_logo("route", "-m", str(model_dir), "-a", str(tmp_path / "lib"), "-p", "x", "-k", "1",
                   "--calibration", "mean")
    assert res.returncode == 2 and "logo calibrate" in res.stderr and "Traceback" not in res.stderr
    res = run_logo("calibrate", "-m", str(model_dir), "-a", str(tmp_path / "lib"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "lib" / "logo_calibration.json").exists()
    res = run_logo("route", "-m", str(model_dir), "-a", str(tmp_path / "lib"), "-p", "x", "-k", "1",
                   "--calibration", "mean", "--json")
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    stored = json.loads((tmp_path / "lib" / "logo_calibration.json").read_text())
    (entry,) = stored["entries"].values()
    calibrated = {name: record["scores"][name] / mean for name, mean in zip(stored["adapters"], entry["values"])}
    best = max(calibrated, key=calibrated.get)
    assert [s["name"] for s in record["selected"]] == [best]
    assert record["selected"][0]["score"] == pytest.approx(calibrated[best], rel=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-a", "/nonexistent/adapters", "-p", "x"], "does not exist"),
        (["-a", "someorg/loras", "-p", "x"], "write hub:someorg/loras"),
        (["-p", "x", "-k", "0"], "at least 1"),
        (["-p", "x", "-k", "99"], "library holds 4"),
        (["-p", "x", "--selection-strategy", "max"], "selection strategy"),
        ([], "no prompts"),
        (["-p", "x", "--decode", "fast"], "unknown --decode 'fast'"),
        (["-p", ""], "prompt 0 is empty"),
        (["-p", "x", "--max-new-tokens", "-3", "--decode", "eager"], "max_new_tokens must be at least 1, got -3"),
        (["-p", "x", "--device", "tpu"], "unknown device 'tpu'"),
        (["-p", "x", "-m", "smolm2"], "did you mean 'smollm2-135m'?"),
        (["-p", "x", "--temperature", "0.7", "--decode", "eager"], "--temperature only applies when sampling; add "
         "--do-sample"),
        (["-p", "x", "--temperature", "0.7", "--top-p", "0.9", "--decode", "eager"], "--temperature and --top-p "
         "only apply when sampling; add --do-sample"),
        (["-p", "x", "--router", "/nonexistent/routers/"], "--router /nonexistent/routers/: no such router file"),
    ],
)
def test_user_mistakes_are_one_clear_line(model_and_lib, args, message, monkeypatch, capsys):
    """In process (every mistake is caught before a model loads); the process exit path is
    test_bad_model_path_is_a_clear_error's."""
    from logo import cli

    model_dir, lib = model_and_lib
    base = ["generate" if "--decode" in args else "route", "-m", str(model_dir)]
    if "-a" not in args:
        base += ["-a", str(lib)]
    monkeypatch.setattr(sys, "argv", ["logo", *base, *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    stderr = capsys.readouterr().err
    assert exc.value.code == 2
    assert message in stderr and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: ")


def test_bad_model_path_is_a_clear_error(tmp_path, model_and_lib):
    _, lib = model_and_lib
    res = run_logo("route", "-m", str(tmp_path / "no_model"), "-a", str(lib), "-p", "x", "-k", "1")
    assert res.returncode == 2 and "cannot load" in res.stderr and "Traceback" not in res.stderr


def test_prompt_file_and_position_mistakes_are_one_clear_line(model_and_lib, tmp_path, monkeypatch, capsys):
    """A prompts file that is a folder or not UTF-8, and an over-long prompt named by its input position (batches
    are sorted by length, so a batch's position would name another prompt)."""
    from logo import cli

    model_dir, lib = model_and_lib
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    cases = [(["--prompts-file", str(tmp_path)], "is a directory"),
             (["--prompts-file", str(tmp_path / "latin1.txt")], "is not UTF-8 text"),
             (["-p", "short", "-p", "short too", "-p", "word " * 3000], "prompt 2 has")]
    for args, message in cases:
        monkeypatch.setattr(sys, "argv", ["logo", "route", "-m", str(model_dir), "-a", str(lib), "-k", "1", *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        stderr = capsys.readouterr().err
        assert exc.value.code == 2 and message in stderr and "Traceback" not in stderr, stderr


def test_fit_router_refuses_an_out_it_cannot_write_before_fitting(model_and_lib, tmp_path, monkeypatch, capsys):
    from logo import cli

    model_dir, lib = model_and_lib
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a_r4.jsonl").write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    (tmp_path / "a_file").write_text("")
    for out, message in [(tmp_path, "is a directory"), (tmp_path / "a_file" / "r.json", "is a file, not a folder")]:
        monkeypatch.setattr(sys, "argv", ["logo", "fit-router", "-m", str(model_dir), "-a", str(lib),
                                          "--prompts-dir", str(prompts), "--out", str(out)])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        stderr = capsys.readouterr().err
        assert exc.value.code == 2 and message in stderr and "Traceback" not in stderr, stderr


def test_serve_takes_the_router_flags_of_route(model_and_lib, monkeypatch):
    """`logo serve` hands every router flag of `logo route`, the abstain rule included, to the engine it builds."""
    from logo.errors import LogoError
    from logo.serve.cli import serve
    from logo.spec import EngineSpec

    built = []

    def build(spec, progress=False):
        built.append(spec)
        raise LogoError("stopped before the model loads")

    monkeypatch.setattr(EngineSpec, "build", build)
    model_dir, lib = model_and_lib
    with pytest.raises(LogoError, match="stopped before the model loads"):
        serve(base_model=str(model_dir), adapters=str(lib), n_selected_modules=2, abstain="margin",
              abstain_below=0.25, calibration="none", port=0)  # port 0: whatever listens on 8000 here
    assert built[0].router_overrides == {"k": 2, "abstain": "margin", "abstain_below": 0.25, "calibration": "none"}
    with pytest.raises(LogoError, match="use --decode eager"):
        serve(base_model=str(model_dir), adapters=str(lib), decode="static", port=0)
    for flag in ("max_batch_size", "max_queue", "max_prefill_rows"):  # before the model loads, not in its lifespan
        with pytest.raises(LogoError, match=f"--{flag.replace('_', '-')} must be at least 1, got 0"):
            serve(base_model=str(model_dir), adapters=str(lib), port=0, **{flag: 0})
    assert len(built) == 1
    help_text = run_logo("serve", "--help").stdout
    assert "--abstain-below" in help_text


def test_another_librarys_multi_line_message_prints_as_one_line(monkeypatch, capsys):
    from logo import cli
    from logo.errors import LogoError, one_line

    assert one_line("Got: ConnectError\nPlease check your connection and try again.") == (
        "Got: ConnectError Please check your connection and try again")

    def fail():
        raise LogoError("first line\n  second line")

    monkeypatch.setattr(cli, "app", fail)
    monkeypatch.setattr(cli, "_register", lambda: None)
    with pytest.raises(SystemExit):
        cli.main()
    assert capsys.readouterr().err == "error: first line second line\n"


def test_fit_router_on_some_of_a_folders_adapters_needs_out_before_any_model_loads(model_and_lib, tmp_path,
                                                                                   monkeypatch, capsys):
    """The folder's logo_router.json is the router of all its adapters: fitting two of them does not overwrite it
    (nor do too few example prompts or a duplicate name wait for the model: the base model here does not exist)."""
    from logo import cli

    _, lib = model_and_lib
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("a_r4", "b_r8"):
        (prompts / f"{name}.jsonl").write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    (tmp_path / "other").mkdir()
    shutil.copytree(lib / "a_r4", tmp_path / "other" / "a_r4")
    two = ["-a", str(lib / "a_r4"), "-a", str(lib / "b_r8")]
    for args, message in [(two, "not exactly"), (["-a", str(lib)], "too few for: c_r2_rslora (0), d_qonly (0)"),
                          (["-a", str(lib / "a_r4"), "-a", str(tmp_path / "other" / "a_r4")],
                           "duplicate adapter name 'a_r4'")]:
        monkeypatch.setattr(sys, "argv", ["logo", "fit-router", "-m", "org/not-loaded", *args,
                                          "--prompts-dir", str(prompts)])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        stderr = capsys.readouterr().err
        assert exc.value.code == 2 and message in stderr and "Traceback" not in stderr, stderr
    assert "give --out FILE and route them with --router FILE" in run_logo(
        "fit-router", "-m", "org/not-loaded", *two, "--prompts-dir", str(prompts)).stderr
    assert not (lib / "logo_router.json").exists()


def test_calibrate_reads_the_library_router_file_and_names_layers_as_given(model_and_lib, tmp_path, monkeypatch,
                                                                           capsys):
    """`logo calibrate` with a flag computes the statistics `logo route` reads with the same flags over the
    library's (pooled) fitted router; a missing one is named by its layer as written (-2, not 1). Some of a
    folder's adapters keep their statistics in the cache, not in the folder's file."""
    from transformers import AutoModelForCausalLM

    from logo.calibration import FILE_NAME as CALIBRATION_FILE
    from logo.cli_core import calibrate, route
    from logo.errors import LogoError
    from logo.library import AdapterLibrary
    from logo.router import RouterConfig
    from logo.router_file import FILE_NAME, RouterFile, model_fingerprint

    monkeypatch.setenv("LOGO_CACHE", str(tmp_path / "cache"))
    model_dir, source = model_and_lib
    lib = shutil.copytree(source, tmp_path / "lib")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    pooled = RouterConfig(k=2, layers=(-2, -1), layer=-2, module="v_proj", modules=("v_proj",), strategy="entropy",
                          post_norm=True, weighting="softmax", temperature=0.5)
    names = AdapterLibrary.load(lib, model).names
    RouterFile(pooled, names, model_fingerprint(model), {}, "tiny").save(lib / FILE_NAME)  # calibration none: no stats
    common = {"base_model": str(model_dir), "adapters": [str(lib)], "device": "cpu"}

    def routed(**flags):
        capsys.readouterr()
        route(prompt=["x"], json_out=True, **common, **flags)
        return json.loads(capsys.readouterr().out)

    with pytest.raises(LogoError, match=r"no 'zscore' calibration statistics for signal at layer -2 \(= 1; entropy"):
        routed(signal_layer=-2, calibration="zscore")
    calibrate(**common, signal_layer=-2)
    assert "entropy of v_proj at layer -2 (post-norm, last token)" in capsys.readouterr().out
    assert len(routed(signal_layer=-2, calibration="zscore")["selected"]) == 2
    calibrate(**common)  # the fitted router's own signal: both of its layers
    assert "at layers -2, -1" in capsys.readouterr().out
    assert len(routed(calibration="zscore")["selected"]) == 2
    stored = json.loads((lib / CALIBRATION_FILE).read_text())
    assert len(stored["entries"]) == 2 and all("module=v_proj" in key for key in stored["entries"])
    some = {**common, "adapters": [str(lib / "a_r4"), str(lib / "b_r8")]}
    with pytest.raises(LogoError, match="--router official"):
        calibrate(**some)
    calibrate(**some, router="official")
    assert "logo_calibration.json" not in capsys.readouterr().out.splitlines()[-1]
    assert json.loads((lib / CALIBRATION_FILE).read_text()) == stored, "the folder's file is the whole folder's"


def test_export_output_mistakes_before_any_model_loads(model_and_lib, tmp_path):
    """--output that is a file, under a file, not empty or not writable: one line before the model loads (the base
    model here does not exist, so a later check would have failed on loading it)."""
    from logo.errors import LogoError
    from logo.export import export

    _, lib = model_and_lib
    (tmp_path / "a_file").write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for output, message in [(tmp_path / "a_file", "is a file, not a directory"),
                            (tmp_path / "a_file" / "out", "is a file, not a directory"),
                            (tmp_path / "full", "exists and is not empty"), (Path("/proc/nope"), "cannot")]:
        with pytest.raises(LogoError, match=message):
            export(output=output, base_model="org/not-loaded", adapters=[str(lib)], prompt="x", exact=True)
    with pytest.raises(LogoError, match="cannot load|org/not-loaded"):
        export(output=tmp_path / "new", base_model="org/not-loaded", adapters=[str(lib)], prompt="x", exact=True)
    assert not (tmp_path / "new").exists(), "an output folder made for nothing is removed again"
