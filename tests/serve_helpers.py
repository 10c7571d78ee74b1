"""Start `logo serve` as a real uvicorn process on a free loopback port (for the server tests); OpenAI's
penalties written out."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from logo.serve.sampling import Penalties

ROOT = Path(__file__).resolve().parent.parent
TINY_CHAT_TEMPLATE = (  # refuses a system message, as some models' templates do
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``logo serve ARGS`` on 127.0.0.1; :meth:`wait` blocks until /health answers."""

    def __init__(self, args: list[str], log_file: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        env.pop("LOGO_API_KEY", None)
        self.log_file = log_file
        self._log = open(log_file, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "logo.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def wait(self, timeout: float = 120) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"logo serve exited: {self.log_file.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"logo serve did not start in {timeout} s: {self.log_file.read_text()[-2000:]}")

    def alive(self) -> bool:
        return self.process.poll() is None and httpx.get(f"{self.url}/health", timeout=10).status_code == 200

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def penalized_greedy(engine, prompt: str, tokens: int, penalties: Penalties) -> list[int]:
    """The base model's greedy tokens under OpenAI's penalties, one full forward pass per token, no cache."""
    ids, _mask = engine.encode([prompt])
    stops = set(engine.stop_ids(False))
    counts: dict[int, int] = {}
    out: list[int] = []
    for _ in range(tokens):
        logits = engine.model(input_ids=ids).logits[0, -1].float()
        for token, c in counts.items():
            logits[token] -= penalties.frequency * c + penalties.presence
        token = int(logits.argmax())
        if token in stops:
            break
        out.append(token)
        counts[token] = counts.get(token, 0) + 1
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out
