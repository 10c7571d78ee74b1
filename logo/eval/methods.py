"""Ways to choose each instance's mixture: LoGo and the baselines it is compared against.

- ``logo``: LoGo routing (the engine's router);
- ``base``: no adapter;
- ``uniform``: all N adapters, weight 1/N each;
- ``random``: k adapters drawn per instance (seeded by run seed and instance index), equal weights;
- ``fixed:NAME``: one named adapter, weight 1;
- ``arrow``: PEFT's Arrow router over the same adapters (per token; see ``logo.eval.arrow``).
"""

from __future__ import annotations

import random

from logo.errors import LogoError
from logo.router import Selection

METHODS = ("logo", "base", "uniform", "random", "fixed:NAME", "arrow")


def check_method(method: str) -> str:
    if method in ("logo", "base", "uniform", "random", "arrow") or (method.startswith("fixed:") and len(method) > 6):
        return method
    raise LogoError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def method_suffix(method: str) -> str:
    """Suffix of the result directory for non-LoGo methods (LoGo keeps the official name)."""
    return "" if method == "logo" else "_method_" + method.replace(":", "-").replace("/", "-")


def fixed_selection(method: str, names: list[str], index: int, k: int, seed: int) -> Selection | None:
    """The selection of a non-routing method for instance ``index`` (None = base model)."""
    n = len(names)
    if method == "base":
        return None
    if method == "uniform":
        return Selection(list(range(n)), [1.0 / n] * n)
    if method == "random":
        if not 1 <= k <= n:
            raise LogoError(f"random method: k={k} must be between 1 and the library size {n}")
        rng = random.Random(seed * 1_000_003 + index)
        return Selection(sorted(rng.sample(range(n), k)), [1.0 / k] * k)
    if method.startswith("fixed:"):
        name = method.split(":", 1)[1]
        if name not in names:
            raise LogoError(f"fixed:{name}: no adapter of that name in the library ({n} adapters)")
        return Selection([names.index(name)], [1.0])
    raise LogoError(f"method {method!r} has no fixed selection")
