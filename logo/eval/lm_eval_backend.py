"""An lm-evaluation-harness model backend that routes every request with LoGo.

Usage (lm-eval is an optional extra: ``pip install "lora-on-the-go[lm-eval]"``)::

    import lm_eval
    from logo.eval.lm_eval_backend import LoGoLM
    lm = LoGoLM(base_model="smollm2-135m", adapters="embedded:demo", k=1)
    lm_eval.simple_evaluate(model=lm, tasks=["..."])
    # or by name, once this module is imported: simple_evaluate(model="logo", model_args="base_model=...,k=3")

or lm-eval's own command line with the model registered (``lm_eval --model logo`` alone does not import it)::

    python -m logo.eval.lm_eval_backend --model logo --model_args base_model=smollm2-135m,k=1 --tasks ...

Each request is routed on its context (the prompt's last token, as LoGo does), then scored or generated
with that context's mixture; a batch mixes requests with different mixtures. Requests are encoded as
lm-eval's own ``hf`` model does: a context's trailing spaces move to the continuation, an empty context is the
prefix token (BOS, else EOS) so that every continuation token is scored, a context too long for ``max_length``
is cut from the left (with a warning), and rolling log-likelihoods add up lm-eval's disjoint windows of
``max_length`` tokens.
"""

from __future__ import annotations

import difflib
import inspect
import warnings

import torch
import torch.nn.functional as F

from logo.engine import LoGoEngine
from logo.errors import LogoError, exit_on_error
from logo.generation import MAX_PROMPT_TOKENS, check_prompts
from logo.router import router_overrides
from logo.spec import EngineSpec

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
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
        self.batch_size = 8 if str(batch_size).startswith("auto") else _number("batch_size", batch_size, int, 1)
        self.max_length = _number("max_length", max_length, int, 2)
        if engine is None:
            overrides = router_overrides(
                selection_strategy, _number("k", k, int), _number("layer", layer, int, None), module,
                None if post_norm is None else _flag(post_norm), position, weighting,
                _number("temperature", temperature, float, None), calibration)
            engine = EngineSpec(base_model, adapters, None, device, dtype, decode, fit_k="k" not in overrides,
                                router_file=router, router_overrides=overrides).build()
        self.engine = engine
        self.tokenizer = engine.tokenizer

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> LoGoLM:
        """lm-eval's constructor from ``model_args``; what ``model_args`` sets wins over lm-eval's own options
        (``--device``, ``--batch_size``), which fill in the rest. lm-eval fills in ``cuda:0`` for a ``--device``
        nobody gave; on a machine without CUDA that option is set aside with a warning (as lm-eval's ``hf``
        model does) and the device is chosen as ``auto``; ``device=cuda`` in ``model_args`` still refuses."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            warnings.warn(f"lm-eval's --device {extra.pop('device')} is not available here (no CUDA); the logo "
                          "model runs on the CPU (pass --device or device= in --model_args to choose)", stacklevel=2)
        known = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "engine")]
        unknown = [name for name in arg_dict if name not in known]
        if unknown:
            near = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise LogoError(f"unknown model argument {unknown[0]!r} in --model_args; {hint}known: {', '.join(known)}")
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LoGoLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

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

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes (lm-eval's convention): BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def _split(self, context: str, continuation: str, index: int = 0) -> tuple[list[int], list[int]]:
        """Context and continuation token ids, as lm-eval's ``hf`` model encodes them: the context's trailing
        spaces go to the continuation (a tokenizer merges a space into the next word), and an empty context is
        the prefix token; should the tokenizer still merge across the boundary, each part is encoded alone."""
        if not continuation:
            raise LogoError(f"loglikelihood request {index} has an empty continuation; nothing to score")
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            ctx, cont = [self.prefix_token_id], self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        else:
            whole = self.tokenizer(context + continuation)["input_ids"]
            ctx = self.tokenizer(context)["input_ids"]
            cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx and len(whole) > len(ctx) else \
                self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if len(cont) > self.max_length:
            raise LogoError(f"loglikelihood request {index}'s continuation has {len(cont)} tokens, over max_length="
                            f"{self.max_length}; raise max_length (model_args) or shorten the task's answers")
        return ctx, cont

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
        """Each request's log-likelihood and greediness; a context whose request is over ``max_length`` (+1: the
        last token is not fed) is cut from the left to fit, as lm-eval's ``hf`` model cuts it (with a warning
        counting them), and routed as cut."""
        whole = [self._split(*req.args, index=i) for i, req in enumerate(requests)]
        pairs = [(ctx[max(0, len(ctx) + len(cont) - self.max_length - 1):], cont) for ctx, cont in whole]
        cut = sum(len(ctx) != len(kept) for (ctx, _), (kept, _) in zip(whole, pairs))
        if cut:
            warnings.warn(f"{cut} of {len(requests)} loglikelihood request(s) over max_length={self.max_length} "
                          "tokens (+1): their contexts were cut from the left to fit, as lm-eval's hf model does; "
                          "raise max_length (model_args) to keep them whole", stacklevel=2)
        results: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            results += self._score(chunk, [ctx for ctx, _ in chunk])
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Log-likelihood of each whole string (every token, the first after the prefix token), summed over
        lm-eval's disjoint windows of ``max_length`` tokens; each string is routed once, on its first window
        (there is no separate prompt), and every window is scored under that mixture."""
        results = []
        for req in requests:
            ids = self.tokenizer(req.args[0], add_special_tokens=False)["input_ids"]
            if not ids:
                results.append(0.0)
                continue
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
            route_on = [self.prefix_token_id, *ids][: self.max_length]
            total = 0.0
            for start in range(0, len(windows), self.batch_size):
                chunk = windows[start : start + self.batch_size]
                total += sum(lp for lp, _ in self._score(chunk, [route_on] * len(chunk)))
            results.append(total)
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
            temperature = _number("temperature", kwargs.pop("temperature", None), float, 0.0)
            do_sample = _flag(kwargs.pop("do_sample", False), "do_sample") and temperature != 0.0  # as lm-eval's hf
            top_p = _number("top_p", kwargs.pop("top_p", None), float, 0.0)
            key = (_number("max_gen_toks", kwargs.pop("max_gen_toks", 256), int, 1), do_sample,
                   1.0 if temperature is None else temperature, 1.0 if top_p is None else top_p)
            if kwargs:
                raise LogoError(f"generate_until request {i}: generation setting(s) {sorted(kwargs)} are not "
                                "supported; this backend takes until, max_gen_toks, do_sample, temperature and top_p")
            settings.append(until)
            groups.setdefault(key, []).append(i)
        # checked here, where a prompt's number is its request's index (the engine numbers them within a group)
        contexts = [req.args[0] for req in requests]
        check_prompts(contexts, name="generate_until request")
        lengths = [len(ids) for ids in self.engine.tokenizer(contexts, add_special_tokens=True)["input_ids"]]
        check_prompts(contexts, lengths, MAX_PROMPT_TOKENS, name="generate_until request")
        outputs = [""] * len(requests)
        for (max_new, do_sample, temperature, top_p), rows in groups.items():
            gens = self.engine.generate([requests[i].args[0] for i in rows], max_new_tokens=max_new,
                                        do_sample=do_sample, temperature=temperature if do_sample else 1.0,
                                        top_p=top_p if do_sample else 1.0, batch_size=self.batch_size)
            for i, gen in zip(rows, gens):
                text = gen.text
                for stop in settings[i]:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                outputs[i] = text
        return outputs


def _flag(value: bool | str, name: str = "post_norm") -> bool:
    """A boolean argument, also when lm-eval passes it as a string."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise LogoError(f"{name} must be true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


def _number(name: str, value, kind: type, minimum: float | None = 1):
    """A numeric argument (lm-eval passes model_args as strings) as ``kind``, at least ``minimum`` (None: any);
    None stays None."""
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise LogoError(f"{name} must be {'a whole number' if kind is int else 'a number'}, got {value!r}") from None
    if minimum is not None and not number >= minimum:
        raise LogoError(f"{name} must be at least {minimum}, got {value!r}")
    return number


def main() -> None:
    """lm-eval's command line (``python -m logo.eval.lm_eval_backend``), with ``--model logo`` registered by this
    module's import; a user mistake in the logo model's arguments (a :class:`LogoError`) is one line,
    ``error: ...``, and exit status 2, as the ``logo`` command prints it."""
    from lm_eval.__main__ import cli_evaluate

    exit_on_error(cli_evaluate)


if __name__ == "__main__":
    main()
