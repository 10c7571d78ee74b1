"""Shared fixtures: tiny random models and PEFT adapter libraries (see tests/helpers.py)."""

from __future__ import annotations

import os

# The tests never reach a hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import MIXED_SPECS, make_library, make_tiny_model, make_tokenizer, save_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir(arch)`` gives a saved tiny model directory (hub-like layout)."""
    cache = {}

    def make(arch: str = "llama"):
        if arch not in cache:
            cache[arch] = save_tiny_model(tmp_path_factory.mktemp(f"model_{arch}"), arch=arch)
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def tiny_library(tmp_path_factory):
    """Factory: ``tiny_library(arch)`` gives (model, library_root) with the MIXED_SPECS adapters."""
    cache = {}

    def make(arch: str = "llama"):
        if arch not in cache:
            model = make_tiny_model(arch)
            root = tmp_path_factory.mktemp(f"lib_{arch}")
            make_library(model, root, MIXED_SPECS)
            cache[arch] = (model, root)
        return cache[arch]

    return make
