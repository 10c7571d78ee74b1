"""Tiny random models (Llama / Qwen2 shape), a byte-level tokenizer, and random PEFT adapters saved by PEFT.

Everything here is offline and takes well under a second per object, so the suite runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIALS = ["<pad>", "<s>", "</s>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 3 special tokens + 256 bytes, no merges."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    return fast


def make_tiny_model(arch: str = "llama", seed: int = 0, layers: int = 3) -> PreTrainedModel:
    """A random causal LM of Llama or Qwen2 shape (Qwen2 has a q/k/v bias), fp32, eval mode."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(SPECIALS) + 256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default init so that adapters and positions visibly change the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "bias" in "".join(n for n, q in model.named_parameters() if q is p):
                p.normal_(0, 0.05)
    return model.eval()


def save_tiny_model(directory: Path, arch: str = "llama", seed: int = 0, layers: int = 3) -> Path:
    """Save a tiny model and tokenizer laid out like a hub model repository."""
    model = make_tiny_model(arch, seed, layers)
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def make_adapter(
    model: PreTrainedModel,
    out_dir: Path,
    seed: int,
    r: int = 4,
    alpha: float = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    scale: float = 0.3,
) -> Path:
    """Make a random LoRA adapter with PEFT (both A and B non-zero) and save it with PEFT."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
        init_lora_weights=False, lora_dropout=0.0,
    )
    peft_model = get_peft_model(_fresh_copy(model), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, scale)
    peft_model.save_pretrained(out_dir)
    return out_dir


def _fresh_copy(model: PreTrainedModel) -> PreTrainedModel:
    clone = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def make_library(model: PreTrainedModel, root: Path, specs: list[dict]) -> list[Path]:
    """Save one adapter per spec under ``root/<name>``; a spec holds ``name`` and make_adapter kwargs."""
    paths = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        name = spec.pop("name", f"adapter_{i:02d}")
        paths.append(make_adapter(model, root / name, seed=spec.pop("seed", 100 + i), **spec))
    return paths


def library_in_dtype(root: Path, out: Path, dtype: torch.dtype) -> Path:
    """A copy of the PEFT library at ``root``, every weight file saved in ``dtype`` (as bf16 training saves them)."""
    import shutil

    from safetensors.torch import load_file, save_file

    for adapter in sorted(d for d in root.iterdir() if d.is_dir()):
        shutil.copytree(adapter, out / adapter.name)
        weights = out / adapter.name / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(str(weights)).items()}, str(weights))
    return out


MIXED_SPECS = [
    {"name": "a_r4", "r": 4, "alpha": 8},
    {"name": "b_r8", "r": 8, "alpha": 16},
    {"name": "c_r2_rslora", "r": 2, "alpha": 4, "use_rslora": True},
    {"name": "d_qonly", "r": 4, "alpha": 4, "targets": ("q_proj",)},
    {"name": "e_allattn", "r": 4, "alpha": 8, "targets": ("q_proj", "k_proj", "v_proj", "o_proj")},
    {"name": "f_mlp", "r": 3, "alpha": 6, "targets": ("q_proj", "up_proj", "down_proj")},
]
"""Adapters that differ in rank, alpha, rsLoRA and target modules."""
