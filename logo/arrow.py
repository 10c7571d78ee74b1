"""PEFT's Arrow router over the same adapters: a training-free per-token routing baseline.

Arrow (Ostapenko et al., 2024; `peft.create_arrow_model`) builds a prototype per adapter and module from
the top right singular vector of ``B A`` and routes every token to its top-k adapters by
``|<prototype, x>|``, softmax-weighted. It runs inside PEFT on its own copy of the base model, so the
LoGo engine's model stays untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteriaList

from logo.engine import NewlineStop, newline_token
from logo.errors import LogoError
from logo.generation import MAX_PROMPT_TOKENS, check_prompts
from logo.router import check_k


class ArrowGenerator:
    """Generate with PEFT Arrow routing over adapter directories."""

    def __init__(self, base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapter_paths: list[Path],
                 top_k: int = 3, temperature: float = 1.0, seed: int = 0) -> None:
        from peft import ArrowConfig, create_arrow_model  # lazy: importing PEFT takes seconds, only Arrow needs it

        check_k(top_k, len(adapter_paths))
        config = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=seed)
        try:
            self.model = create_arrow_model(base_model, [str(p) for p in adapter_paths], config).eval()
        except ValueError as err:  # PEFT refuses libraries with mixed ranks or target modules
            raise LogoError(f"PEFT Arrow cannot combine these adapters: {err}") from err
        self.tokenizer = tokenizer

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 32, early_stop: bool = True,
                 batch_size: int = 16) -> list[str]:
        check_prompts(prompts)
        stopping = StoppingCriteriaList([NewlineStop(newline_token(self.tokenizer))]) if early_stop else None
        self.tokenizer.padding_side = "left"
        device = next(self.model.parameters()).device
        texts = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            batch = self.tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            check_prompts(chunk, batch["attention_mask"].sum(1).tolist(), MAX_PROMPT_TOKENS)
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, top_p=None,
                                      top_k=None, temperature=None, stopping_criteria=stopping,
                                      pad_token_id=self.tokenizer.pad_token_id)
            texts += self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return texts
