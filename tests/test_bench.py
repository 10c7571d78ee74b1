"""`logo bench` end to end on a tiny shape: the JSON contract and the table (not a timing assertion)."""

from __future__ import annotations

import json
import subprocess
import sys

from logo.bench import run_bench
from logo.synthetic import SHAPES, random_model, write_random_library


def test_bench_json_contract():
    result = run_bench("tiny", "cpu", n_adapters=4, rank=4, k=2, targets=["q_proj", "v_proj"], prompt_len=8,
                       new_tokens=3, batch_sizes=[1, 2], repeats=1)
    for key in ("device", "shape", "n_adapters", "rank", "k", "load_s", "prefill_ms", "probe_ms", "decode_tok_s",
                "ttft_ms", "peak_mem_gb"):
        assert key in result
    decode = result["decode_tok_s"]
    assert set(decode) == {"base", "one_adapter", "logo", "official"}
    assert set(decode["logo"]) == {"1", "2"} and set(decode["official"]) == {"1"}
    assert all(v > 0 for row in decode.values() for v in row.values())


def test_bench_cli_table_and_errors():
    cmd = [sys.executable, "-m", "logo.cli", "bench", "--shape", "tiny", "--n-adapters", "3", "--rank", "2", "--k",
           "2", "--prompt-len", "8", "--new-tokens", "3", "--batch-sizes", "1", "--repeats", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "decode tokens/s" in res.stdout and "official" in res.stdout
    res = subprocess.run(cmd[:4] + ["--shape", "gpt-9"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "unknown shape" in res.stderr
    res = subprocess.run(cmd + ["--json", "--device", "cuda"], capture_output=True, text=True, timeout=300)
    import torch

    if not torch.cuda.is_available():
        assert res.returncode == 2 and "no CUDA device" in res.stderr


def test_random_library_is_valid_peft_layout(tmp_path):
    from logo.library import AdapterLibrary

    model = random_model("tiny", "cpu", __import__("torch").float32)
    write_random_library(model, tmp_path, n=3, rank=2, targets=["q_proj"])
    assert json.loads((tmp_path / "adapter_000" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lib = AdapterLibrary.load(tmp_path, model)
    assert len(lib) == 3 and all(m.endswith("q_proj") for m in lib.modules)
    assert {"llama-3.1-8b", "qwen2.5-7b", "deepseek-7b", "smollm2-135m"} <= set(SHAPES)
