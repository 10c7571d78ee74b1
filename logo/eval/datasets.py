"""The paper's 26 evaluation datasets: names, metrics, sources and the official prompt format.

A dataset ``main.sub`` is read from the first source that has it:

1. the official LoGo jsonl layout: ``DATA_DIR/<main>/<sub>/test.jsonl`` with ``context`` / ``completion``
   (the prompt is ``context`` as it is);
2. for BBH, the original BBH JSON: ``DATA_DIR/<sub>.json`` or ``DATA_DIR/bbh/<sub>.json``
   (``{"examples": [{"input", "target"}]}``);
3. its hub repository through ``datasets.load_dataset``, from a local snapshot ``DATA_DIR/<owner>/<name>``
   if there is one, else from the hub (see :mod:`logo.eval.hub`).

Prompts built from (2) and (3) follow the official format: ``<task description>\\n\\nQ: <input>\\nA:``.
As in the official code, the metric is the dataset family's (``bbh`` -> ``em``, ``wmt16`` -> ``bleu``, ...), so
any ``<main>.<sub>`` of a known family can be evaluated from the official jsonl layout.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from logo.errors import LogoError, json_kind
from logo.eval import hub
from logo.eval.hub import PARQUET_EXPORT, Convert, HubSource


@dataclass
class Instance:
    prompt: str
    label: str | list[str]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    metric: str
    description: str
    source: HubSource | None = None
    convert: Convert | None = None  # hub row -> (question, label)

    def load(self, data_dir: str | Path | None = None, limit: int | None = None) -> list[Instance]:
        return load_instances(self.name, data_dir, limit)


# The official EVAL_METHOD_DICT: the metric of every dataset of a family.
FAMILY_METRICS = {"bbh": "em", "wmt14": "bleu", "wmt16": "bleu", "gem": "rouge", "ai2_arc": "em", "nq": "em_multi",
                  "tqa": "em_multi", "anli": "em", "glue": "em", "code_x_glue": "bleu"}

# One line per task, as in BBH's cot-prompts (the BBH JSON has none); other BBH tasks get GENERIC.
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
GENERIC = "Answer the following question."
# The 27 tasks of BIG-Bench Hard: the configs of the hub's lukaemon/bbh (the paper evaluates the 8 above).
BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)
LANGS = {"en": "English", "fr": "French", "de": "German", "ro": "Romanian"}
GEM_DESCRIPTIONS = {
    "common_gen": "Write a sentence that uses all of the following concepts.",
    "dart": "Write a sentence that describes the following data triples.",
    "e2e_nlg": "Write a sentence that describes the following restaurant attributes.",
    "web_nlg": "Write a text that verbalises the following data triples.",
}


def _bbh_source(task: str) -> HubSource:
    return HubSource("lukaemon/bbh", None, "test", PARQUET_EXPORT, f"{task}/test/*.parquet")


def _build_registry() -> dict[str, DatasetSpec]:
    reg: dict[str, DatasetSpec] = {}

    def add(name: str, description: str, source: HubSource, convert: Convert) -> None:
        reg[name] = DatasetSpec(name, FAMILY_METRICS[name.split(".")[0]], description, source, convert)

    for task, description in BBH_DESCRIPTIONS.items():
        add(f"bbh.{task}", description, _bbh_source(task), hub.bbh)
    for year, pairs in (("wmt14", ["fr-en", "en-fr"]), ("wmt16", ["de-en", "en-de", "ro-en", "en-ro"])):
        for pair in pairs:
            src, tgt = pair.split("-")
            config = f"{src}-en" if tgt == "en" else f"{tgt}-en"  # the hub's configs are xx-en, both directions
            add(f"{year}.{pair}", f"Translate the following sentence from {LANGS[src]} to {LANGS[tgt]}.",
                HubSource(f"wmt/{year}", config, "test"), hub.translation(src, tgt))
    for task, description in GEM_DESCRIPTIONS.items():
        # GEM hides common_gen's test references: its validation split is the evaluation set
        split = "validation" if task == "common_gen" else "test"
        config_dir = "en" if task == "web_nlg" else "*"
        add(f"gem.{task}", description,
            HubSource(f"GEM/{task}", None, split, PARQUET_EXPORT, f"{config_dir}/{split}/*.parquet"),
            hub.gem(hub.GEM_INPUTS[task]))
    for sub in ("ARC-Challenge", "ARC-Easy"):
        add(f"ai2_arc.{sub}", "Answer the following science question.", HubSource("allenai/ai2_arc", sub, "test"),
            hub.arc)
    add("nq.natural-questions", "Answer the following question.",
        HubSource("google-research-datasets/nq_open", "nq_open", "validation"), hub.nq_open)
    # rc.nocontext: the rc questions and answers without their (gigabytes of) evidence documents
    add("tqa.rc", "Answer the following trivia question.",
        HubSource("mandarjoshi/trivia_qa", "rc.nocontext", "validation"), hub.trivia_qa)
    for r in ("r1", "r2", "r3"):
        add(f"anli.{r}", "Determine whether the premise entails the hypothesis.",
            HubSource("facebook/anli", None, f"test_{r}"), hub.anli)
    add("glue.qnli", "Determine whether the sentence answers the question.",
        HubSource("nyu-mll/glue", "qnli", "validation"), hub.qnli)
    return reg


REGISTRY = _build_registry()
PAPER_DATASETS = list(REGISTRY)


def list_datasets() -> list[str]:
    """The paper's 26 datasets, in the official order."""
    return list(REGISTRY)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The dataset's metric, prompt description and hub source. Unregistered ``<family>.<sub>`` names of a
    known family get the family's metric, and a hub source only for the other BBH tasks (:data:`BBH_TASKS`):
    whether such a name exists is :func:`check_dataset`'s question."""
    if name in REGISTRY:
        return REGISTRY[name]
    family, _, sub = name.partition(".")
    if family in FAMILY_METRICS and sub:
        if family == "bbh":
            known = sub in BBH_TASKS
            return DatasetSpec(name, "em", GENERIC, _bbh_source(sub) if known else None, hub.bbh if known else None)
        return DatasetSpec(name, FAMILY_METRICS[family], GENERIC)
    raise LogoError(f"unknown dataset {name!r}{_did_you_mean(name, None)}: give one of {', '.join(REGISTRY)}, or "
                    f"<family>.<name> with a family among {', '.join(FAMILY_METRICS)} and its test.jsonl under "
                    "--data-dir")


def local_datasets(data_dir: str | Path | None) -> list[str]:
    """The dataset names that ``data_dir`` holds files for: ``<family>/<sub>/test.jsonl`` of a known family, and
    BBH JSON ``<task>.json`` / ``bbh/<task>.json`` (BBH JSON files must be named after their task)."""
    if data_dir is None or not Path(data_dir).is_dir():
        return []
    root = Path(data_dir)
    names = [f"{family}.{f.parent.name}" for family in FAMILY_METRICS
             for f in sorted(root.glob(f"{family}/*/test.jsonl"))]
    names += [f"bbh.{f.stem}" for folder in (root, root / "bbh") for f in sorted(folder.glob("*.json"))]
    return list(dict.fromkeys(names))


def _did_you_mean(name: str, data_dir: str | Path | None) -> str:
    """`` (did you mean X or Y?)`` from the known names close to ``name``; '' when none is."""
    candidates = [*REGISTRY, *(f"bbh.{t}" for t in BBH_TASKS), *local_datasets(data_dir)]
    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=3, cutoff=0.75)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def check_dataset(name: str, data_dir: str | Path | None = None) -> DatasetSpec:
    """``name``'s spec once it is known to exist, without loading anything or asking the hub: one of the paper's
    26, another BBH task, or a name whose file is under ``data_dir``; else a LogoError that says so, with the close
    names (did you mean). ``data_dir`` must be a directory when given."""
    spec = get_dataset_spec(name)
    if data_dir is not None:
        root = Path(data_dir)
        if not root.is_dir():
            why = "is a file, not a directory" if root.exists() else "does not exist"
            raise LogoError(f"--data-dir {root} {why}; give the folder holding the datasets' files")
        if local_file(spec, root) is not None:
            return spec
    if spec.source is not None:
        return spec
    family, _, sub = name.partition(".")
    where = Path(data_dir) if data_dir is not None else Path("DATA_DIR")
    files = f"{where / family / sub / 'test.jsonl'} (the official jsonl layout)"
    if family == "bbh":
        files += f" or {where / (sub + '.json')} (BBH JSON)"
    known = "the paper's 26 datasets or the 27 BBH tasks" if family == "bbh" else "the paper's 26 datasets"
    given = "there is no" if data_dir is not None else "no --data-dir was given to hold"
    raise LogoError(f"unknown dataset {name!r}{_did_you_mean(name, data_dir)}: it is not one of {known}, and {given} "
                    f"{files}; check the name (logo.eval.datasets.list_datasets() lists the paper's)")


def format_prompt(description: str, question: str) -> str:
    """The official prompt: task description, blank line, ``Q: ...``, ``A:``."""
    return f"{description}\n\nQ: {question}\nA:"


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = data.count(b"\n", 0, err.start) + 1
        raise LogoError(f"{path}:{lineno} is not UTF-8 text ({err.reason} at byte {err.start}); "
                        "save the file as UTF-8") from err


def _label_ok(metric: str, label) -> bool:
    """A string; for ``em_multi`` (any of several answers) also a non-empty list of strings."""
    if isinstance(label, str):
        return True
    return metric == "em_multi" and isinstance(label, list) and bool(label) and all(isinstance(x, str) for x in label)


def _instance(where: str, prompt, label, metric: str, prompt_key: str, label_key: str) -> Instance:
    """``Instance(prompt, label)`` once their types suit the metric; else a LogoError naming ``where``."""
    if not isinstance(prompt, str):
        raise LogoError(f"{where}: {prompt_key!r} must be a string, got {json_kind(prompt)}")
    if not _label_ok(metric, label):
        wanted = "a string or a list of strings" if metric == "em_multi" else "a string"
        raise LogoError(f"{where}: {label_key!r} must be {wanted} (metric {metric}), got {json_kind(label)}")
    return Instance(prompt, label)


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` of each non-blank line."""
    rows = []
    for lineno, line in enumerate(_decode(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            raise LogoError(f"{path}:{lineno} is not valid JSON ({err})") from err
    return rows


def _from_official(path: Path, spec: DatasetSpec) -> list[Instance]:
    out = []
    for lineno, row in _read_jsonl(path):
        if not isinstance(row, dict) or "context" not in row or "completion" not in row:
            raise LogoError(f"{path}: line {lineno} lacks 'context'/'completion' (the official LoGo jsonl layout)")
        out.append(_instance(f"{path}:{lineno}", row["context"], row["completion"], spec.metric, "context",
                             "completion"))
    return out


def _from_bbh_json(path: Path, spec: DatasetSpec) -> list[Instance]:
    text = _decode(path)
    try:
        examples = json.loads(text)["examples"]
        pairs = [(ex["input"], ex["target"]) for ex in examples]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LogoError(f"{path} is not BBH JSON ({{'examples': [{{'input', 'target'}}]}}): {err!r}") from err
    out = []
    for i, (question, target) in enumerate(pairs):
        where = f"{path}: example {i}"
        if not isinstance(question, str):
            raise LogoError(f"{where}: 'input' must be a string, got {json_kind(question)}")
        out.append(_instance(where, format_prompt(spec.description, question), target, spec.metric, "input",
                             "target"))
    return out


def convert_rows(spec: DatasetSpec, rows) -> list[Instance]:
    """Hub rows (any iterable of dicts) to instances with the official prompt format."""
    if spec.convert is None:
        raise LogoError(f"dataset {spec.name} has no hub source: put its test.jsonl (official layout) under --data-dir")
    out = []
    for i, row in enumerate(rows):
        try:
            question, label = spec.convert(row)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise LogoError(f"{spec.name}: row {i} does not have the expected fields ({err!r}): {row}") from err
        if not isinstance(question, str):
            raise LogoError(f"{spec.name}: row {i}'s question must be a string, got {json_kind(question)}: {row}")
        out.append(_instance(f"{spec.name}: row {i}", format_prompt(spec.description, question), label, spec.metric,
                             "question", "label"))
    return out


def local_file(spec: DatasetSpec, root: Path) -> Path | None:
    """The file under ``root`` that holds ``spec``'s test instances (official jsonl first, then BBH JSON), if any."""
    family, _, sub = spec.name.partition(".")
    candidates = [root / family / sub / "test.jsonl"]
    if family == "bbh":
        candidates += [root / f"{sub}.json", root / "bbh" / f"{sub}.json"]
    return next((c for c in candidates if c.is_file()), None)


def _local_file(spec: DatasetSpec, root: Path) -> list[Instance] | None:
    path = local_file(spec, root)
    if path is None:
        return None
    return _from_official(path, spec) if path.name == "test.jsonl" else _from_bbh_json(path, spec)


def load_instances(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Instance]:
    """Test instances of ``name`` (the first ``limit``) from the first source that has them (module docstring)."""
    spec = check_dataset(name, data_dir)
    if limit is not None and limit < 1:
        raise LogoError(f"--limit must be at least 1, got {limit}")
    instances = _local_file(spec, Path(data_dir)) if data_dir is not None else None
    if instances is None:  # check_dataset: there is a hub source
        rows = hub.load_rows(spec.source, data_dir, name)
        instances = convert_rows(spec, islice(rows, limit) if limit is not None else rows)
    if not instances:
        raise LogoError(f"dataset {name} has no test instances")
    return instances[:limit] if limit is not None else instances
