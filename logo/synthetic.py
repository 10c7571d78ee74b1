"""Random-weight models of real shapes and random adapter libraries in PEFT format, for benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

from logo.errors import LogoError
from logo.paths import save_safetensors

SHAPES: dict[str, tuple[type, dict]] = {
    "llama-3.1-8b": (LlamaConfig, dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                       rope_theta=500000.0, max_position_embeddings=8192)),
    "qwen2.5-7b": (Qwen2Config, dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                     num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                     max_position_embeddings=8192)),
    "deepseek-7b": (LlamaConfig, dict(hidden_size=4096, num_hidden_layers=30, num_attention_heads=32,
                                      num_key_value_heads=32, intermediate_size=11008, vocab_size=102400,
                                      max_position_embeddings=4096)),
    "smollm2-135m": (LlamaConfig, dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                       num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                       tie_word_embeddings=True, max_position_embeddings=8192)),
    "tiny": (LlamaConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=128, vocab_size=512, max_position_embeddings=1024)),
}


def random_model(shape: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised causal LM with the named model's shape (built directly on ``device``)."""
    if shape not in SHAPES:
        raise LogoError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    cls, kwargs = SHAPES[shape]
    config = cls(**kwargs, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):  # transformers' init draws from the global RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # an impossible EOS keeps every benchmark generation at its full length
    model.generation_config.eos_token_id = None
    return model.eval()


def write_random_library(model: PreTrainedModel, root: Path, n: int, rank: int, targets: list[str],
                         seed: int = 0, alpha: float | None = None) -> list[Path]:
    """Write ``n`` random LoRA adapters (bf16) in PEFT's on-disk layout under ``root/adapter_XXX``."""
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not linears:
        raise LogoError(f"no linear layers named {targets} in the model")
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        tensors = {}
        for name, linear in linears:
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, linear.in_features, generator=gen)
                                               / linear.in_features**0.5).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(linear.out_features, rank, generator=gen)
                                               * 0.01).to(torch.bfloat16)
        out = root / f"adapter_{i:03d}"
        out.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank, "target_modules": targets,
                  "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
                  "task_type": "CAUSAL_LM", "base_model_name_or_path": None}
        (out / "adapter_config.json").write_text(json.dumps(config))
        paths.append(out)
    return paths
