"""PEFT's Arrow router over the same adapters: a training-free per-token routing baseline.

Arrow (Ostapenko et al., 2024; `peft.create_arrow_model`) builds a prototype per adapter and module from
the top right singular vector of ``B A`` and routes every token to its top-k adapters by
``|<prototype, x>|``, softmax-weighted. It runs inside PEFT on its own copy of the base model, so the
LoGo engine's model stays untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from logo.errors import LogoError


class ArrowGenerator:
    """Generate with PEFT Arrow routing over adapter directories."""

    def __init__(self, base_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapter_paths: list[Path],
                 top_k: int = 3, temperature: float = 1.0, seed: int = 0) -> None:
        from peft import ArrowConfig, create_arrow_model

        if not 1 <= top_k <= len(adapter_paths):
            raise LogoError(f"Arrow top_k={top_k} must be between 1 and the number of adapters ({len(adapter_paths)})")
        config = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=seed)
        try:
            self.model = create_arrow_model(base_model, [str(p) for p in adapter_paths], config).eval()
        except ValueError as err:  # PEFT refuses libraries with mixed ranks or target modules
            raise LogoError(f"PEFT Arrow cannot combine these adapters: {err}") from err
        self.tokenizer = tokenizer

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 32, early_stop: bool = True,
                 batch_size: int = 16) -> list[str]:
        from transformers import StoppingCriteriaList

        from logo.engine import MAX_PROMPT_TOKENS, NewlineStop

        stopping = None
        if early_stop:
            stopping = StoppingCriteriaList([NewlineStop(self.tokenizer.encode("\n", add_special_tokens=False)[0])])
        self.tokenizer.padding_side = "left"
        device = next(self.model.parameters()).device
        texts = []
        for start in range(0, len(prompts), batch_size):
            batch = self.tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=MAX_PROMPT_TOKENS).to(device)
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, top_p=None,
                                      top_k=None, temperature=None, stopping_criteria=stopping,
                                      pad_token_id=self.tokenizer.pad_token_id)
            texts += self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return texts
