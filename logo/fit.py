"""Fit a router to an adapter library from a few example prompts per adapter (prompts and adapters, no answers).

The fit reads every signal option from a clean probe of the example prompts (one more per other input that
post-norm signals read): each decoder layer, the residual stream or the module's real input (``post_norm``), the
last token or the mean over the prompt, each module the adapters target that can read a probed hidden state
(:func:`fit_modules`; a post-norm signal reads its module's own input and pools only modules that share it),
``norm`` or ``entropy``. Calibration statistics (per signal and adapter: the mean and std of the raw score) come
from the example prompts with their labels dropped. It then chooses,
by precision@1 on the examples:

1. the signal and its calibration (``none``, ``mean``, ``zscore``), single or pooled over layers and modules
   (calibrated scores summed);
2. k and the weighting, by the mean weight the mixture gives the right adapter;
3. an abstain rule (top score or top-1/top-2 margin below a threshold) when examples with no adapter (prompts
   of tasks outside the library) are given: it maximises the number of example prompts handled right (seen
   prompts routed to their adapter, unseen prompts sent to the base model). The rule reads the routing scores;
   with ``abstain_from="any"`` it may read any single signal of the table instead (the one that tells the
   adapters apart best is not always the one that tells an unseen task best), each judged on templates it was
   not fitted on when the examples name their templates. Not the default: on the demo library no such choice
   carried over from the validation templates to the test ones.

The result is a :class:`~logo.router_file.RouterFile`, stored next to the library.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from logo.calibration import apply_statistics, score_statistics
from logo.engine import LoGoEngine
from logo.errors import LogoError
from logo.library import AdapterLibrary
from logo.router import (
    POSITIONS,
    AbstainSignal,
    Router,
    RouterConfig,
    SignalPoint,
    confidence,
    decoder_layers,
    differing_inputs,
    hidden_size,
    ranked,
    score,
    select,
    signal_module_name,
)
from logo.router_file import RouterFile, model_fingerprint

MIN_EXAMPLES = 2
K_CHOICES = (1, 2, 3)
TEMPERATURES = (0.25, 0.5, 1.0, 2.0)
PREFERRED_MODULES = ("q_proj", "k_proj", "v_proj")
"""The paper's signal modules: the fit scores these when the adapters train any of them."""


@dataclass(frozen=True)
class Example:
    """One fit prompt and the adapter it is for (None: no adapter is; the router should abstain)."""

    prompt: str
    adapter: str | None
    template: str | None = None
    """The template (wording) the prompt was written from, if known: the abstain rule is chosen by how well it
    carries over from some templates to others (see :func:`template_folds`)."""


@dataclass(frozen=True)
class Candidate:
    """A signal option: (non-negative) layers and modules summed, input, position, strategy, calibration."""

    layers: tuple[int, ...]
    modules: tuple[str, ...]
    post_norm: bool
    position: str
    strategy: str
    calibration: str

    def config(self, num_layers: int, k: int = 1) -> RouterConfig:
        layers = tuple(layer - num_layers for layer in self.layers)
        pooled = len(layers) * len(self.modules) > 1
        return RouterConfig(strategy=self.strategy, k=k, layer=layers[0], module=self.modules[0],
                            post_norm=self.post_norm, position=self.position, calibration=self.calibration,
                            layers=layers if pooled else None, modules=self.modules if pooled else None,
                            statistics="default" if self.calibration == "none" else "fit",
                            weighting="softmax" if self.calibration == "zscore" and k > 1 else "normalize")

    def describe(self, num_layers: int) -> str:
        if len(self.layers) == 1:
            where = f"layer {self.layers[0] - num_layers}"
        else:
            where = f"layers {self.layers[0] - num_layers}..{self.layers[-1] - num_layers} ({len(self.layers)})"
        return (f"{where}, {'+'.join(self.modules)}, {'post-norm' if self.post_norm else 'residual'}, "
                f"{self.position}, {self.strategy}, {self.calibration}")


def check_examples(examples: list[Example], names: list[str]) -> None:
    """Every adapter needs at least 2 example prompts; every named adapter must be in the library."""
    unknown = sorted({x.adapter for x in examples if x.adapter is not None and x.adapter not in names})
    if unknown:
        raise LogoError(f"example prompts name adapter(s) {unknown} that the library does not have "
                        f"(it has {', '.join(names)})")
    counts = {name: sum(x.adapter == name for x in examples) for name in names}
    short = [f"{name} ({n})" for name, n in counts.items() if n < MIN_EXAMPLES]
    if short:
        raise LogoError(f"fitting a router needs at least {MIN_EXAMPLES} example prompts per adapter; too few for: "
                        f"{', '.join(short)}")


def examples_from_jsonl(folder: Path) -> list[Example]:
    """Example prompts from ``*.jsonl`` files: one ``{"prompt": ...}`` per line, for the adapter the line names
    (``"adapter"``) or else the one the file is named after; ``"adapter": null`` or a file ``none.jsonl``: a
    prompt no adapter is for. An optional ``"template"`` names the wording the prompt was written from."""
    folder = Path(folder)
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not files:
        raise LogoError(f"no *.jsonl files in {folder}; give one file of example prompts per adapter")
    out = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise LogoError(f"{file} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LogoError(f"{file}:{number} is not JSON: {err.msg}") from err
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise LogoError(f'{file}:{number} needs a "prompt" string')
            if not record["prompt"].strip():
                raise LogoError(f"{file}:{number} has an empty prompt; give some text or drop the line")
            if not isinstance(record.get("adapter", ""), (str, type(None))):
                raise LogoError(f'{file}:{number}: "adapter" must be an adapter\'s name or null, got '
                                f'{record["adapter"]!r:.60}')
            default = None if file.stem == "none" else file.stem
            template = record.get("template")
            out.append(Example(record["prompt"], record.get("adapter", default),
                               None if template is None else f"{record.get('adapter', default)}#{template}"))
    return out


def fit_modules(model: torch.nn.Module, library: AdapterLibrary) -> list[str]:
    """The modules (short names) whose adapters a fit scores: the ones of q_proj, k_proj, v_proj the adapters train
    (the paper's signal modules), else every trained module whose input is the hidden state (width
    ``hidden_size``, so a probed hidden state can be fed to its adapters: not ``down_proj``, whose input is the
    MLP's inner state), in name order. A library training no such module cannot be routed: a one-line error."""
    hidden = hidden_size(model)
    widths: dict[str, set[int]] = {}
    for name, stack in library.stacks.items():
        widths.setdefault(name.rsplit(".", 1)[-1], set()).add(stack.in_features)
    fitting = sorted(module for module, found in widths.items() if found == {hidden})
    chosen = [module for module in PREFERRED_MODULES if module in fitting] or fitting
    if not chosen:
        raise LogoError(f"no module the adapters train takes the model's hidden state (width {hidden}); they train "
                        f"{', '.join(sorted(widths)) or 'nothing'}, so no router can be fitted to this library")
    return chosen


def trained_layers(model: torch.nn.Module, library: AdapterLibrary, module: str) -> list[int]:
    """The (non-negative) decoder layers in which some adapter of ``library`` trains ``module`` (a short name)."""
    n = len(decoder_layers(model))
    return [layer for layer in range(n)
            if signal_module_name(model, RouterConfig(layer=layer, module=module)) in library.stacks]


def probe_config(model: torch.nn.Module, library: AdapterLibrary) -> RouterConfig:
    """A router for the engine a fit probes with (``logo fit-router``): the fit reads every signal itself, but an
    engine's router must be one the library can route with, and the official one (q_proj, last layer) is not when
    the adapters do not train q_proj there. The first of :func:`fit_modules` (q_proj, k_proj, v_proj first), in
    the last layer that trains it: chosen from the library alone, so the same library always gets the same one."""
    n = len(decoder_layers(model))
    for module in fit_modules(model, library):
        layers = trained_layers(model, library, module)
        if layers:
            return RouterConfig(k=1, layer=layers[-1] - n, module=module)
    raise LogoError(f"none of the adapters' modules ({', '.join(library.modules[:3])}...) is a module of a decoder "
                    "layer of this model; the adapters belong to another model")


def input_groups(model: torch.nn.Module, modules: list[str], layer: int) -> list[tuple[str, ...]]:
    """``modules`` (short names) grouped by the input they read in decoder layer ``layer``, in order: q_proj,
    k_proj and v_proj read one normed state, up_proj and gate_proj another. A post-norm probe reads one module's
    input, so it scores the modules of that module's group on their own input, and only those may be pooled
    post-norm (the router refuses the others: :meth:`Router._check_inputs`). Decided by running the layer
    (:func:`differing_inputs`), as the router decides it."""
    groups: list[list[str]] = []
    for module in modules:
        full = signal_module_name(model, RouterConfig(layer=layer, module=module))
        for group in groups:
            leader = signal_module_name(model, RouterConfig(layer=layer, module=group[0]))
            if not differing_inputs(model, layer, leader, [full]):
                group.append(module)
                break
        else:
            groups.append([module])
    return [tuple(group) for group in groups]


class SignalTable:
    """Raw scores ``[n, N]`` of every signal option for the example prompts, and their statistics."""

    def __init__(self, engine: LoGoEngine, prompts: list[str], batch_size: int) -> None:
        library, model = engine.library, engine.model
        self.num_layers = engine.num_layers
        points = [SignalPoint(layer, post_norm, position) for layer in range(self.num_layers)
                  for post_norm in (False, True) for position in POSITIONS]
        self.modules = fit_modules(model, library)
        self.groups = input_groups(model, self.modules, self.num_layers - 1)
        found = self._probe(engine, prompts, points, batch_size)
        self.raw: dict[tuple, torch.Tensor] = {}
        self.present: dict[tuple[int, str], torch.Tensor] = {}
        """Per (layer, module): which adapters train it (the others rank last, as the router ranks them)."""
        for point in points:
            for module in self.modules:
                full = signal_module_name(model, RouterConfig(layer=point.layer, module=module))
                if full not in library.stacks:
                    continue  # no adapter targets this module in this layer
                self.present[(point.layer, module)] = library.stacks[full].present.cpu()
                for strategy in ("norm", "entropy"):
                    self.raw[(point.layer, module, point.post_norm, point.position, strategy)] = score(
                        found[(module, point)], library, full, strategy)
        self.stats = {key: score_statistics(raw) for key, raw in self.raw.items()}
        self._calibrated: dict[tuple, torch.Tensor] = {}

    def _probe(self, engine: LoGoEngine, prompts: list[str], points: list[SignalPoint],
               batch_size: int) -> dict[tuple[str, SignalPoint], torch.Tensor]:
        """Signal vectors per ``(module, point)``, each module's post-norm vectors read from its own input, as the
        fitted router will read them: one probe for the residual points (every module's) and the first group's
        post-norm points, one more per other input group (its post-norm points only)."""
        out: dict[tuple[str, SignalPoint], torch.Tensor] = {}
        for i, group in enumerate(self.groups):
            wanted = points if i == 0 else [point for point in points if point.post_norm]
            for point, vectors in engine.signals(prompts, wanted, batch_size, module=group[0]).items():
                for module in group if point.post_norm else self.modules:
                    out[(module, point)] = vectors
        return out

    def shares_input(self, modules: tuple[str, ...]) -> bool:
        """Whether ``modules`` all read one input (one group of :func:`input_groups`): only then may a post-norm
        signal pool them, or a post-norm abstain signal read one of them beside a routing signal on another."""
        return any(set(modules) <= set(group) for group in self.groups)

    def calibrated(self, key: tuple, calibration: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        """One signal's scores calibrated as the router does it (:func:`logo.calibration.apply_statistics`), with
        statistics over every example prompt or, given ``rows`` (a mask), over those only."""
        if rows is not None:
            return apply_statistics(self.raw[key], score_statistics(self.raw[key][rows]), calibration)
        if (key, calibration) not in self._calibrated:
            self._calibrated[(key, calibration)] = apply_statistics(self.raw[key], self.stats[key], calibration)
        return self._calibrated[(key, calibration)]

    def scores(self, candidate: Candidate, rows: torch.Tensor | None = None) -> torch.Tensor:
        total = None
        for layer in candidate.layers:
            for module in candidate.modules:
                key = (layer, module, candidate.post_norm, candidate.position, candidate.strategy)
                part = self.calibrated(key, candidate.calibration, rows)
                total = part if total is None else total + part
        return total

    def eligible(self, layers: tuple[int, ...], modules: tuple[str, ...]) -> torch.Tensor:
        """``[N]`` bool: the adapters that train one of ``modules`` in one of ``layers``, as
        :attr:`logo.router.Router.eligible` (the others rank last: :func:`logo.router.ranked`)."""
        return torch.stack([self.present[(layer, module)] for layer in layers for module in modules]).any(0)

    def ranked(self, candidate: Candidate, rows: torch.Tensor | None = None) -> torch.Tensor:
        """A candidate's scores as the router ranks them (:func:`logo.router.ranked`)."""
        return ranked(self.scores(candidate, rows), self.eligible(candidate.layers, candidate.modules))

    def candidates(self) -> list[Candidate]:
        """Every single signal with every calibration, and pooled ones (layer ranges x module sets) z-scored or
        mean-calibrated."""
        out = []
        for layer, module, post_norm, position, strategy in self.raw:
            for calibration in ("none", "mean", "zscore"):
                out.append(Candidate((layer,), (module,), post_norm, position, strategy, calibration))
        n = self.num_layers
        ranges = {tuple(range(n - depth, n)) for depth in (2, 4, 8, n // 2, (3 * n) // 4, n) if 1 < depth <= n}
        ranges |= {tuple(range(0, n // 2)), tuple(range(n // 4, (3 * n) // 4)), tuple(range(1, n, 2))}
        module_sets = [(m,) for m in self.modules] + ([tuple(self.modules)] if len(self.modules) > 1 else [])
        module_sets += [group for group in self.groups if 1 < len(group) < len(self.modules)]
        for layers in sorted(ranges):
            for modules in module_sets:
                if not all((lay, mod, False, "last", "norm") in self.raw for lay in layers for mod in modules):
                    continue
                for post_norm in (False, True):
                    if post_norm and not self.shares_input(modules):
                        continue  # a post-norm probe reads one input; the router refuses modules reading another
                    for position in POSITIONS:
                        for strategy in ("norm", "entropy"):
                            for calibration in ("mean", "zscore"):
                                out.append(Candidate(layers, modules, post_norm, position, strategy, calibration))
        return out


def precision_at_1(scores: torch.Tensor, targets: torch.Tensor) -> float:
    return (scores.argmax(1) == targets).float().mean().item()


def mean_weight_on_target(scores: torch.Tensor, targets: torch.Tensor, k: int, weighting: str,
                          temperature: float, eligible: torch.Tensor | None = None) -> float:
    _, idx, weights = select(scores, k, weighting, temperature, eligible)
    return (weights * (idx == targets[:, None])).sum(1).mean().item()


def choose_mixture(scores: torch.Tensor, targets: torch.Tensor, calibration: str,
                   eligible: torch.Tensor | None = None) -> tuple[int, str, float, float]:
    """k, weighting and temperature with the largest mean weight on the right adapter (ties: smaller k);
    ``eligible`` as :func:`logo.router.select` takes it."""
    best = (1, "normalize", 1.0, mean_weight_on_target(scores, targets, 1, "normalize", 1.0, eligible))
    for k in K_CHOICES[1:]:
        if k > scores.shape[1]:
            break
        options = [("softmax", t) for t in TEMPERATURES]
        if calibration != "zscore":
            options.insert(0, ("normalize", 1.0))
        for weighting, temperature in options:
            value = mean_weight_on_target(scores, targets, k, weighting, temperature, eligible)
            if value > best[3] + 1e-9:
                best = (k, weighting, temperature, value)
    return best


Scorer = Callable[[torch.Tensor | None], torch.Tensor]
"""Calibrated scores ``[n, N]`` of every example prompt, with statistics over the given rows (None: all)."""


ABSTAIN_FROM = ("routing", "any")


def abstain_options(table: SignalTable, routing: Candidate, source: str = "any"
                    ) -> list[tuple[AbstainSignal | None, Scorer]]:
    """What an abstain rule may read: the routing scores (first: they cost nothing more and win ties), then, with
    ``source="any"``, every single signal of the table with every calibration (a post-norm one only on a module
    that reads the routing's first module's input, which is what the router's post-norm probe reads)."""
    if source not in ABSTAIN_FROM:
        raise LogoError(f"unknown abstain signal source {source!r}; choose one of {', '.join(ABSTAIN_FROM)}")
    out: list[tuple[AbstainSignal | None, Scorer]] = [(None, lambda rows: table.ranked(routing, rows))]
    if source == "routing":
        return out
    for key in table.raw:
        layer, module, post_norm, position, strategy = key
        if post_norm and not table.shares_input((routing.modules[0], module)):
            continue
        for calibration in ("none", "mean", "zscore"):
            signal = AbstainSignal(layer - table.num_layers, module, post_norm, position, strategy, calibration)
            out.append((signal, lambda rows, key=key, calibration=calibration: ranked(
                table.calibrated(key, calibration, rows), table.eligible((key[0],), (key[1],)))))
    return out


def template_folds(examples: list[Example]) -> torch.Tensor | None:
    """Fold 0 or 1 per example prompt, splitting each adapter's templates (and the unseen prompts' templates)
    into two halves; None when some adapter's prompts carry no template or come from a single one."""
    groups: dict[str | None, set[str]] = {}
    for x in examples:
        if x.template is None:
            return None
        groups.setdefault(x.adapter, set()).add(x.template)
    if any(len(templates) < 2 for templates in groups.values()):
        return None
    fold = {(label, t): i % 2 for label, templates in groups.items() for i, t in enumerate(sorted(templates))}
    return torch.tensor([fold[(x.adapter, x.template)] for x in examples])


def best_threshold(conf: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor) -> tuple[int, float]:
    """The threshold on ``conf`` that gets the most prompts right, ``keep`` ones routed (``conf >= t``) plus
    ``drop`` ones abstained (``conf < t``); ties go to the lowest threshold. Returns (prompts right, threshold)."""
    order = torch.argsort(conf)
    values, keep, drop = conf[order], keep[order].long(), drop[order].long()
    # abstaining on the first i prompts (i = 0..n) gets right: drop among them + keep among the rest
    right = torch.cat([torch.zeros(1, dtype=torch.long), drop.cumsum(0)]) + \
        torch.cat([keep.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.long)])
    cut = torch.ones(len(values) + 1, dtype=torch.bool)  # a threshold falls between two different values only
    cut[1:-1] = values[1:] > values[:-1]
    right = torch.where(cut, right, torch.full_like(right, -1))
    i = int(torch.argmax(right))  # first maximum: the fewest abstentions
    if i == 0:
        threshold = values[0].item() - 1.0
    elif i == len(values):
        threshold = values[-1].item() + 1.0
    else:
        threshold = threshold_between(values[i - 1], values[i])
    return int(right[i]), threshold


def threshold_between(below: torch.Tensor, above: torch.Tensor) -> float:
    """A threshold ``t`` that the abstain rule (``conf < t``, compared in the scores' dtype, as the router compares
    them) puts above ``below`` and at or below ``above``: near their midpoint, as few decimals as that allows (it is
    stored in the router file). A float64 midpoint can round to ``below`` in float32 (two neighbouring floats), so
    every candidate is checked in the scores' dtype."""
    mid = below + (above - below) / 2  # in the scores' dtype
    candidates = [mid.item(), above.item()] if bool(below < mid) else [above.item()]
    for value in candidates:
        for digits in range(6, 18):
            rounded = round(value, digits)
            t = torch.tensor(rounded, dtype=below.dtype)
            if bool(below < t) and bool(t <= above):
                return rounded
    return above.item()


def choose_abstain(options: list[tuple[AbstainSignal | None, Scorer]], correct: torch.Tensor, seen: torch.Tensor,
                   folds: torch.Tensor | None = None) -> dict:
    """The signal, rule and threshold that get the most example prompts right: a seen prompt routed to its adapter
    (``correct``: by the routing scores), an unseen prompt sent to the base model. Each prompt counts once, so a
    rule that abstains on many seen prompts to catch a few unseen ones loses; ties keep the earlier option.

    With template ``folds`` (:func:`template_folds`) each option is judged on templates it was not fitted on:
    statistics and threshold from one half of the templates, prompts right counted on the other, both ways. A
    signal that only tells the fit's own wordings apart loses there. The chosen option's threshold is then
    fitted on every example prompt."""
    n_seen, n_unseen = max(1, int(seen.sum())), max(1, int((~seen).sum()))
    keep, drop = correct & seen, ~seen
    best: dict = {}
    for signal, scorer in options:
        scores = scorer(None)
        for rule in ("top", "margin"):
            conf = confidence(scores, rule)
            right, threshold = best_threshold(conf, keep, drop)
            if rule == "margin":
                threshold = max(0.0, threshold)  # margins are >= 0: 0 never abstains too, and a router takes no < 0
            held_out = None
            if folds is not None:
                held_out = 0
                for fold in (0, 1):
                    fit, test = folds != fold, folds == fold
                    fold_conf = confidence(scorer(fit), rule)
                    _, t = best_threshold(fold_conf[fit], keep[fit], drop[fit])
                    routed = fold_conf[test] >= t
                    held_out += int((routed & keep[test]).sum()) + int((~routed & drop[test]).sum())
            rank = (held_out, right) if held_out is not None else (right,)
            if best and rank <= best["rank"]:
                continue
            routed = conf >= threshold
            best = {"rank": rank, "signal": signal, "rule": rule, "threshold": threshold, "prompts_right": right,
                    "prompts_right_on_other_templates": held_out,
                    "seen_routed_right": int((routed & correct & seen).sum()) / n_seen,
                    "unseen_abstained": int((~routed & ~seen).sum()) / n_unseen,
                    "seen_abstained": int((~routed & seen).sum()) / n_seen}
    best.pop("rank", None)
    return best


def fit_router(engine: LoGoEngine, examples: list[Example], base_model: str = "", batch_size: int = 16,
               source: str = "", abstain: bool = True, abstain_from: str = "routing") -> RouterFile:
    """Choose the signal, calibration, k, weighting and abstain rule for ``engine``'s library (see the module doc).

    ``abstain_from``: ``routing`` (default) fits the abstain rule on the routing scores, in-sample; ``any`` lets it
    read any single signal, each judged on templates it was not fitted on when the examples name them. On the demo
    library ``any`` did not carry over from the validation templates to the test ones (``BENCHMARKS.md``)."""
    names = engine.library.names
    check_examples(examples, names)
    table = SignalTable(engine, [x.prompt for x in examples], batch_size)
    seen = torch.tensor([x.adapter is not None for x in examples])
    targets = torch.tensor([names.index(x.adapter) if x.adapter is not None else -1 for x in examples])
    ranking = []
    for candidate in table.candidates():
        scores = table.ranked(candidate)
        # ties go to the signal that pools more evidence (it carries over to new wordings better)
        ranking.append((precision_at_1(scores[seen], targets[seen]), len(candidate.layers) * len(candidate.modules),
                       candidate))
    ranking.sort(key=lambda r: (r[0], r[1]), reverse=True)
    precision, _, best = ranking[0]
    scores, eligible = table.scores(best), table.eligible(best.layers, best.modules)
    k, weighting, temperature, weight_on_target = choose_mixture(scores[seen], targets[seen], best.calibration,
                                                                 eligible)
    config = replace(best.config(table.num_layers, k), weighting=weighting, temperature=temperature)
    abstain_fit = {}
    if abstain and (~seen).any():
        correct = ranked(scores, eligible).argmax(1) == targets
        abstain_fit = choose_abstain(abstain_options(table, best, abstain_from), correct, seen,
                                     template_folds(examples) if abstain_from == "any" else None)
        config = replace(config, abstain=abstain_fit["rule"], abstain_below=abstain_fit["threshold"],
                         abstain_signal=abstain_fit["signal"])
        own = abstain_fit.pop("signal")
        abstain_fit["signal"] = own.describe() if own is not None else "the routing scores"
    router = Router(engine.model, engine.library, config)
    statistics = {}
    if config.calibration != "none":
        for signal in router.signals:
            module = signal.module.rsplit(".", 1)[-1]
            key = (signal.point.layer, module, config.post_norm, config.position, config.strategy)
            statistics[signal.key] = {"method": "fit", **table.stats[key], "source": source or "fit prompts"}
    own = config.abstain_signal
    if own is not None and own.calibration in ("mean", "zscore"):
        key = (own.layer % table.num_layers, own.module, own.post_norm, own.position, own.strategy)
        statistics[own.key(table.num_layers)] = {"method": "fit", **table.stats[key],
                                                 "source": source or "fit prompts"}
    official = Candidate((table.num_layers - 1,), ("q_proj",), False, "last", "norm", "none")
    fit = {
        "source": source, "n_prompts": len(examples), "n_seen": int(seen.sum()), "n_unseen": int((~seen).sum()),
        "precision_at_1": precision, "weight_on_target": weight_on_target,
        "signal": best.describe(table.num_layers),
        "official_precision_at_1": precision_at_1(table.ranked(official)[seen], targets[seen])
        if official.layers[0] < table.num_layers and (official.layers[0], "q_proj", False, "last", "norm") in table.raw
        else None,
        "abstain": abstain_fit,
        "top_candidates": [{"signal": c.describe(table.num_layers), "precision_at_1": p} for p, _, c in ranking[:10]],
        "n_candidates": len(ranking),
    }
    return RouterFile(config, list(names), model_fingerprint(engine.model), statistics, base_model, fit)
