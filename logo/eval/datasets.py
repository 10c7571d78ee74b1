"""The paper's 26 evaluation datasets: names, metrics, sources and the official prompt format.

A dataset ``main.sub`` is read from the first source that has it:
1. the official LoGo jsonl layout: ``DATA_DIR/<main>/<sub>/test.jsonl`` with ``context`` / ``completion``;
2. for BBH, the original BBH JSON: ``DATA_DIR/<sub>.json`` or ``DATA_DIR/bbh/<sub>.json``
   (``{"examples": [{"input", "target"}]}``);
3. the hub through ``datasets.load_dataset`` (honours ``HF_HOME`` / ``HF_DATASETS_OFFLINE``).
Prompts follow the official format: ``<task description>\\n\\nQ: <input>\\nA:``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from logo.errors import LogoError


@dataclass
class Instance:
    prompt: str
    label: str | list[str]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    metric: str
    description: str
    hub: tuple[str, str | None, str] | None = None  # (path, config, split)
    convert: Callable[[dict], tuple[str, str | list[str]]] | None = None  # hub row -> (question, label)


BBH_DESCRIPTIONS = {
    "boolean_expressions": "Evaluate the result of a random Boolean expression.",
    "causal_judgement": "Answer questions about causal attribution.",
    "formal_fallacies": "Distinguish deductively valid arguments from formal fallacies.",
    "navigate": "Given a series of navigation instructions, determine whether one would end up back at the "
                "starting point.",
    "object_counting": "Questions that involve enumerating objects and asking the model to count them.",
    "sports_understanding": "Determine whether an artificially constructed sentence relating to sports is "
                            "plausible or not.",
    "web_of_lies": "Evaluate a random boolean function expressed as a word problem.",
    "word_sorting": "Sort a list of words.",
}
LANGS = {"en": "English", "fr": "French", "de": "German", "ro": "Romanian"}


def _translation(src: str, tgt: str):
    def convert(row: dict) -> tuple[str, str]:
        pair = row["translation"]
        return pair[src], pair[tgt]

    return convert


def _gem(input_fn: Callable[[dict], str]):
    def convert(row: dict) -> tuple[str, str]:
        return input_fn(row), row["target"]

    return convert


def _triples(triples) -> str:
    return " | ".join(" : ".join(t) if isinstance(t, (list, tuple)) else str(t) for t in triples)


def _arc(row: dict) -> tuple[str, str]:
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    options = "\n".join(f"- {t}" for t in texts)
    return f"{row['question']}\nOptions:\n{options}", texts[labels.index(row["answerKey"])]


ANLI_LABELS = ["yes", "it is not possible to tell", "no"]


def _anli(row: dict) -> tuple[str, str]:
    q = (f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\nDoes the premise entail the hypothesis? "
         "Options: yes, it is not possible to tell, no")
    return q, ANLI_LABELS[row["label"]]


def _qnli(row: dict) -> tuple[str, str]:
    q = f"Does the sentence \"{row['sentence']}\" answer the question \"{row['question']}\"? Options: yes, no"
    return q, ["yes", "no"][row["label"]]


def _build_registry() -> dict[str, DatasetSpec]:
    reg: dict[str, DatasetSpec] = {}
    for sub, desc in BBH_DESCRIPTIONS.items():
        reg[f"bbh.{sub}"] = DatasetSpec(f"bbh.{sub}", "em", desc, ("lukaemon/bbh", sub, "test"),
                                        lambda r: (r["input"], r["target"]))
    for year, pairs in (("wmt14", ["fr-en", "en-fr"]), ("wmt16", ["de-en", "en-de", "ro-en", "en-ro"])):
        for pair in pairs:
            src, tgt = pair.split("-")
            config = "-".join(sorted((src, tgt), key=lambda x: x == "en"))  # hub configs are xx-en
            reg[f"{year}.{pair}"] = DatasetSpec(
                f"{year}.{pair}", "bleu", f"Translate the following sentence from {LANGS[src]} to {LANGS[tgt]}.",
                (year, config, "test"), _translation(src, tgt))
    gem = {
        "common_gen": ("Write a sentence that uses all of the following concepts.", "common_gen",
                       lambda r: ", ".join(r["concepts"])),
        "dart": ("Write a sentence that describes the following data triples.", "dart",
                 lambda r: _triples(r["tripleset"])),
        "e2e_nlg": ("Write a sentence that describes the following restaurant attributes.", "e2e_nlg",
                    lambda r: r["meaning_representation"]),
        "web_nlg": ("Write a text that verbalises the following data triples.", "web_nlg",
                    lambda r: _triples(r["input"])),
    }
    for sub, (desc, hub_name, fn) in gem.items():
        config = "en" if sub == "web_nlg" else None
        reg[f"gem.{sub}"] = DatasetSpec(f"gem.{sub}", "rouge", desc, (f"GEM/{hub_name}", config, "test"), _gem(fn))
    for sub in ("ARC-Challenge", "ARC-Easy"):
        reg[f"ai2_arc.{sub}"] = DatasetSpec(f"ai2_arc.{sub}", "em", "Answer the following science question.",
                                            ("allenai/ai2_arc", sub, "test"), _arc)
    reg["nq.natural-questions"] = DatasetSpec(
        "nq.natural-questions", "em_multi", "Answer the following question.",
        ("google-research-datasets/nq_open", None, "validation"), lambda r: (r["question"], list(r["answer"])))
    reg["tqa.rc"] = DatasetSpec(
        "tqa.rc", "em_multi", "Answer the following trivia question.", ("mandarjoshi/trivia_qa", "rc", "validation"),
        lambda r: (r["question"], list(r["answer"]["aliases"])))
    for r in ("r1", "r2", "r3"):
        reg[f"anli.{r}"] = DatasetSpec(f"anli.{r}", "em", "Determine whether the premise entails the hypothesis.",
                                       ("facebook/anli", None, f"test_{r}"), _anli)
    reg["glue.qnli"] = DatasetSpec("glue.qnli", "em", "Determine whether the sentence answers the question.",
                                   ("nyu-mll/glue", "qnli", "validation"), _qnli)
    return reg


REGISTRY = _build_registry()
PAPER_DATASETS = list(REGISTRY)


def list_datasets() -> list[str]:
    return list(REGISTRY)


def get_dataset_spec(name: str) -> DatasetSpec:
    if name in REGISTRY:
        return REGISTRY[name]
    main = name.split(".")[0]
    if main == "bbh":  # any other BBH task, from its JSON, with a generic description
        hub = ("lukaemon/bbh", name.split(".", 1)[1], "test")
        return DatasetSpec(name, "em", "Answer the following question.", hub, lambda r: (r["input"], r["target"]))
    raise LogoError(f"unknown dataset {name!r}; known: {', '.join(REGISTRY)} (and any bbh.<task> given as BBH JSON)")


def format_prompt(description: str, question: str) -> str:
    """The official prompt: task description, blank line, ``Q: ...``, ``A:``."""
    return f"{description}\n\nQ: {question}\nA:"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise LogoError(f"{path}:{lineno} is not valid JSON ({err})") from err
    return rows


def _from_official(path: Path) -> list[Instance]:
    out = []
    for i, row in enumerate(_read_jsonl(path)):
        if "context" not in row or "completion" not in row:
            raise LogoError(f"{path}: line {i + 1} lacks 'context'/'completion' (the official LoGo jsonl layout)")
        out.append(Instance(row["context"], row["completion"]))
    return out


def _from_bbh_json(path: Path, spec: DatasetSpec) -> list[Instance]:
    try:
        data = json.loads(path.read_text())
        examples = data["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LogoError(f"{path} is not BBH JSON ({{'examples': [{{'input', 'target'}}]}}): {err}") from err
    return [Instance(format_prompt(spec.description, ex["input"]), ex["target"]) for ex in examples]


def _from_hub(spec: DatasetSpec) -> list[Instance]:
    if spec.hub is None or spec.convert is None:
        raise LogoError(f"dataset {spec.name} has no hub source; give --data-dir")
    path, config, split = spec.hub
    import datasets

    try:
        data = datasets.load_dataset(path, config, split=split)
    except (OSError, ValueError, ConnectionError) as err:
        raise LogoError(
            f"cannot load {spec.name} from the hub ({path}, {config}, {split}): {err}. Give --data-dir with "
            f"{spec.name.replace('.', '/')}/test.jsonl in the official layout, or run where the hub is reachable."
        ) from err
    return convert_rows(spec, data)


def convert_rows(spec: DatasetSpec, rows) -> list[Instance]:
    """Hub rows (any iterable of dicts) to instances with the official prompt format."""
    out = []
    for i, row in enumerate(rows):
        try:
            question, label = spec.convert(row)  # type: ignore[misc]
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise LogoError(f"{spec.name}: row {i} does not have the expected fields ({err!r}): {row}") from err
        out.append(Instance(format_prompt(spec.description, question), label))
    return out


def load_instances(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Instance]:
    """Test instances of ``name`` from the first source that has them (see module docstring)."""
    spec = get_dataset_spec(name)
    main, _, sub = name.partition(".")
    instances = None
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            raise LogoError(f"data directory {root} does not exist")
        official = root / main / sub / "test.jsonl"
        if official.is_file():
            instances = _from_official(official)
        elif main == "bbh":
            for candidate in (root / f"{sub}.json", root / "bbh" / f"{sub}.json"):
                if candidate.is_file():
                    instances = _from_bbh_json(candidate, spec)
                    break
    if instances is None:
        instances = _from_hub(spec)
    if not instances:
        raise LogoError(f"dataset {name} has no test instances")
    return instances[:limit] if limit is not None else instances
