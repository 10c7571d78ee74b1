"""An lm-evaluation-harness model backend that routes every request with LoGo.

Usage (lm-eval is an optional extra: ``pip install "lora-on-the-go[lm-eval]"``)::

    import lm_eval
    from logo.eval.lm_eval_backend import LoGoLM
    lm = LoGoLM(base_model="smollm2-135m", adapters="embedded:demo", k=1)
    lm_eval.simple_evaluate(model=lm, tasks=["..."])
    # or by name, once this module is imported: simple_evaluate(model="logo", model_args="base_model=...,k=3")

Each request is routed on its context (the prompt's last token, as LoGo does), then scored or generated
with that context's mixture; a batch mixes requests with different mixtures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.router import router_overrides
from logo.spec import EngineSpec

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise LogoError('the lm-eval backend needs lm-evaluation-harness: pip install "lora-on-the-go[lm-eval]"') from err


@register_model("logo")
class LoGoLM(LM):
    """lm-eval ``LM`` backed by a :class:`LoGoEngine`."""

    def __init__(self, engine: LoGoEngine | None = None, base_model: str = "smollm2-135m",
                 adapters: str | None = None, k: int | None = None, selection_strategy: str | None = None,
                 calibration: str | None = None, batch_size: int | str = 8, device: str | None = None,
                 dtype: str = "auto", max_length: int = 2048, max_batch_size: int | None = None,
                 layer: int | None = None, module: str | None = None, post_norm: bool | None = None,
                 position: str | None = None, weighting: str | None = None, temperature: float | None = None,
                 decode: str = "eager", router: str = "auto") -> None:
        """Every router option of :class:`RouterConfig` is a model argument (``strategy`` is spelled
        ``selection_strategy``, as in ``logo run``); the ones given override the library's fitted router
        (``router=auto``: its ``logo_router.json`` if it has one, else the official router; ``official``; or a
        router file's path). ``max_batch_size`` is accepted for lm-eval's ``simple_evaluate`` and ignored;
        ``batch_size="auto"`` means 8 (lm-eval's own batch-size search does not apply to a routed model)."""
        super().__init__()
        if engine is None:
            overrides = router_overrides(
                selection_strategy, None if k is None else int(k), None if layer is None else int(layer), module,
                None if post_norm is None else _flag(post_norm), position, weighting,
                None if temperature is None else float(temperature), calibration)
            engine = EngineSpec(base_model, adapters, None, device, dtype, decode, fit_k="k" not in overrides,
                                router_file=router, router_overrides=overrides).build()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length)

    # ---------------------------------------------------------------- helpers
    def _pad_left(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s)
            mask[row, width - len(s) :] = 1
        return ids.to(self.engine.device), mask.to(self.engine.device)

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        whole = self.tokenizer(context + continuation)["input_ids"]
        ctx = self.tokenizer(context)["input_ids"] if context else whole[:1]
        if len(whole) > self.max_length:
            raise LogoError(f"request of {len(whole)} tokens exceeds max_length={self.max_length}")
        return whole[: len(ctx)], whole[len(ctx) :]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]], route_on: list[list[int]]) -> list[tuple[float, bool]]:
        ids, mask = self._pad_left(route_on)
        routes = self.engine.route_batch(ids, mask)
        with self.engine.mixture(routes):
            ids, mask = self._pad_left([(ctx + cont)[:-1] for ctx, cont in pairs])
            logprobs = F.log_softmax(self.engine.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        out = []
        for row, (_, cont) in enumerate(pairs):
            n = len(cont)
            lp = logprobs[row, -n:]
            target = torch.tensor(cont, device=lp.device)
            total = lp.gather(1, target[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == target).all())
            out.append((total, greedy))
        return out

    # ------------------------------------------------------------- LM methods
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._split(*req.args) for req in requests]
        results: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            results += self._score(chunk, [ctx for ctx, _ in chunk])
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of each whole string, routed on the string itself (there is no separate prompt)."""
        results = []
        for req in requests:
            ids = self.tokenizer(req.args[0])["input_ids"]
            if len(ids) < 2:
                results.append(0.0)
                continue
            if len(ids) > self.max_length:
                raise LogoError(f"rolling request of {len(ids)} tokens exceeds max_length={self.max_length}")
            results.append(self._score([(ids[:1], ids[1:])], [ids])[0][0])
        return results

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled) generation per request, batched by identical generation settings."""
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = (until,) if isinstance(until, str) else tuple(until)
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            do_sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
            key = (int(kwargs.pop("max_gen_toks", 256)), do_sample, temperature or 1.0)
            settings.append(until)
            groups.setdefault(key, []).append(i)
        outputs = [""] * len(requests)
        for (max_new, do_sample, temperature), rows in groups.items():
            gens = self.engine.generate([requests[i].args[0] for i in rows], max_new_tokens=max_new,
                                        do_sample=do_sample, temperature=temperature, batch_size=self.batch_size)
            for i, gen in zip(rows, gens):
                text = gen.text
                for stop in settings[i]:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                outputs[i] = text
        return outputs


def _flag(value: bool | str) -> bool:
    """A boolean model argument, also when lm-eval passes it as a string."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise LogoError(f"post_norm must be true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)
