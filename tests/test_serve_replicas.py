"""`logo serve --replicas 2` on Ray Serve (CPU): the same API, answered by the official `openai` client, with the
same greedy output as the single-process engine."""

from __future__ import annotations

import pytest

from logo.router import RouterConfig
from logo.spec import EngineSpec
from tests.helpers import MIXED_SPECS, make_library, make_tiny_model, save_tiny_model
from tests.serve_helpers import ServerProcess

openai = pytest.importorskip("openai")
pytest.importorskip("ray.serve")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    model_dir = save_tiny_model(root / "model")
    make_library(make_tiny_model(), root / "lib", MIXED_SPECS)
    proc = ServerProcess(["--base-model", str(model_dir), "--adapters", str(root / "lib"), "-k", "2", "--device",
                          "cpu", "--replicas", "2", "--threads", "1"], root / "replicas.log").wait(timeout=300)
    yield proc, model_dir, root / "lib"
    proc.stop()


def test_two_replicas_answer_the_openai_client(server):
    proc, model_dir, lib = server
    client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="none")
    prompts = ["apple number 1:", "river number 2:", "stone number 3:", "cloud number 4:"]
    engine = EngineSpec(str(model_dir), str(lib), RouterConfig(k=2), device="cpu").build()
    try:
        expected = [g.text for g in engine.generate(prompts, max_new_tokens=6)]
        routes = engine.route(prompts)
    finally:
        engine.close()
    for prompt, text, route in zip(prompts, expected, routes):
        reply = client.completions.create(model="logo", prompt=prompt, max_tokens=6, temperature=0)
        assert reply.choices[0].text == text
        assert [s["name"] for s in reply.model_extra["logo"]["selected"]] == route.names
    chunks = list(client.completions.create(model="logo", prompt=prompts[0], max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected[0]
