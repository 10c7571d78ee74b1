"""What a generation request may ask for, checked once for every front end (CLI, evaluation, server).

:class:`GenerationSettings` validates itself on construction, in the spirit of PEFT's configs; every
message names the setting, the value and what is allowed, so the CLI prints it as one line and the
server answers it with a 400.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from logo.errors import LogoError

MAX_PROMPT_TOKENS = 2048  # as the official code
DECODE_PATHS = ("eager", "static", "compiled")
"""``eager``: transformers' ``generate``; ``static``: static KV cache; ``compiled``: static cache and a
compiled decode step (CUDA graphs on GPU). All three give the same greedy tokens (see logo.static_decode)."""


def check_decode(decode: str) -> str:
    if decode not in DECODE_PATHS:
        raise LogoError(f"unknown decode path {decode!r}: unknown --decode {decode!r}; choose one of "
                        f"{', '.join(DECODE_PATHS)}")
    return decode


SEED_LIMIT = 2**63
"""Seeds are int64, from ``-SEED_LIMIT`` up to (not including) this: what a torch generator (which reads a
negative seed as its 64-bit two's complement, so distinct seeds stay distinct) and the server's per-row seeds
take."""


@dataclass
class GenerationSettings:
    """How to continue each prompt. Greedy by default; ``do_sample`` uses ``temperature`` and ``top_p``."""

    max_new_tokens: int = 256
    """Tokens to generate at most per prompt (at least 1)."""
    early_stop: bool = False
    """Stop each prompt at its first newline (the official ``--generation_early_stop``)."""
    do_sample: bool = False
    temperature: float = 1.0
    """Sampling temperature (> 0); ignored when greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]; ignored when greedy."""
    seed: int | None = None
    """Seeds a generator private to the call (the process-wide RNG is left as it was)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise LogoError(f"max_new_tokens must be a whole number, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise LogoError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise LogoError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LogoError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not (isinstance(self.seed, int) and -SEED_LIMIT <= self.seed < SEED_LIMIT):
            raise LogoError(f"seed must be a whole number from -2**63 to 2**63 - 1 (an int64), got {self.seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def check_sampling_flags(do_sample: bool, flags: dict[str, float | None]) -> None:
    """Sampling options given (not None) without ``--do-sample`` are an error, not ignored: greedy decoding reads
    none of them. ``flags``: each option's spelling and its value."""
    given = [flag for flag, value in flags.items() if value is not None]
    if given and not do_sample:
        raise LogoError(f"{' and '.join(given)} only {'apply' if len(given) > 1 else 'applies'} when sampling; add "
                        f"--do-sample (greedy decoding ignores {'them' if len(given) > 1 else 'it'}), or leave "
                        f"{'them' if len(given) > 1 else 'it'} out")


def check_prompts(prompts: list[str], lengths: list[int] | None = None,
                  max_tokens: int = MAX_PROMPT_TOKENS, name: str = "prompt") -> None:
    """Refuse an empty list, an empty prompt, or (given token ``lengths``) a prompt over ``max_tokens``; errors call
    prompt ``i`` "``name`` i" (a caller whose prompts are numbered otherwise names them its way)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise LogoError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise LogoError("no prompts given")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise LogoError(f"{name} {i} is a {type(prompt).__name__}, not a string")
        if not prompt.strip():
            raise LogoError(f"{name} {i} is empty; give some text to continue")
    for i, length in enumerate(lengths or []):
        if length > max_tokens:
            raise LogoError(f"{name} {i} has {length} tokens, over the limit of {max_tokens}; shorten it")


def first_line(text: str) -> str:
    """The prediction as the official code takes it: stripped, cut at its first line."""
    text = text.strip()
    return (text.splitlines() or [text])[0]
