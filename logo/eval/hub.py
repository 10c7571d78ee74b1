"""Hub sources of the evaluation datasets, read with ``datasets.load_dataset``, and their row conversions.

Every source is a parquet repository (``datasets`` >= 4 no longer runs loading scripts). Repositories that
still hold a loading script (``lukaemon/bbh``, the ``GEM/*`` sets) are read from the hub's parquet export,
the ``refs/convert/parquet`` revision, laid out ``<config>/<split>/0000.parquet``.

A local snapshot of a repository at ``DATA_DIR/<owner>/<name>`` is used instead of the hub, e.g.::

    hf download allenai/ai2_arc --repo-type dataset --local-dir DATA_DIR/allenai/ai2_arc
    hf download GEM/dart --repo-type dataset --revision refs/convert/parquet \\
        --local-dir DATA_DIR/GEM/dart
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from logo.errors import LogoError, one_line

PARQUET_EXPORT = "refs/convert/parquet"


@dataclass(frozen=True)
class HubSource:
    """Where a dataset's evaluation split lives on the hub."""

    repo: str
    config: str | None
    split: str
    revision: str | None = None
    data_files: str | None = None  # glob inside the repository, for the parquet export layout

    def describe(self) -> str:
        parts = [self.repo] + [x for x in (self.config, self.data_files or self.split) if x]
        if self.revision:
            parts.append(f"revision {self.revision}")
        return ", ".join(parts)

    def download_hint(self, data_dir: str | Path = "DATA_DIR") -> str:
        revision = f" --revision {self.revision}" if self.revision else ""
        return (f"hf download {self.repo} --repo-type dataset{revision} "
                f"--local-dir {Path(data_dir) / self.repo}")


def load_rows(source: HubSource, data_dir: str | Path | None = None, name: str = "dataset"):
    """``name``'s split rows (a ``datasets.Dataset``) from a local snapshot under ``data_dir`` or else the hub."""
    import datasets

    local = Path(data_dir) / source.repo if data_dir is not None else None
    use_local = local is not None and local.is_dir()
    kwargs: dict = {"split": source.split}
    if source.data_files:
        kwargs["data_files"] = {source.split: source.data_files}
    if source.revision and not use_local:
        kwargs["revision"] = source.revision
    try:
        return datasets.load_dataset(str(local) if use_local else source.repo, source.config, **kwargs)
    except (OSError, ValueError, RuntimeError, ConnectionError) as err:
        where = f"the local snapshot {local}" if use_local else "the hub"
        raise LogoError(
            f"cannot load {name} ({source.describe()}) from {where}: {one_line(err)}. Either run where the hub is "
            f"reachable, or download it on a machine that is and give --data-dir: "
            f"{source.download_hint(data_dir or 'DATA_DIR')}"
        ) from err


# ---------------------------------------------------------------- row conversions: row -> (question, label)
Convert = Callable[[dict], "tuple[str, str | list[str]]"]


def bbh(row: dict) -> tuple[str, str]:
    return row["input"], row["target"]


def translation(src: str, tgt: str) -> Convert:
    def convert(row: dict) -> tuple[str, str]:
        pair = row["translation"]
        return pair[src], pair[tgt]

    return convert


def _gem_label(row: dict) -> str:
    """GEM's ``target``, or its first reference where the split leaves ``target`` empty."""
    if row.get("target"):
        return row["target"]
    refs = row.get("references") or []
    if not refs:
        raise ValueError("neither 'target' nor 'references' holds a reference text")
    return refs[0]


def _triples(triples: Iterable) -> str:
    """DART triples ``[s, p, o]`` or WebNLG strings ``"s | p | o"``, as ``s | p | o; s | p | o``."""
    return "; ".join(" | ".join(t) if isinstance(t, (list, tuple)) else str(t) for t in triples)


def gem(input_fn: Callable[[dict], str]) -> Convert:
    def convert(row: dict) -> tuple[str, str]:
        return input_fn(row), _gem_label(row)

    return convert


GEM_INPUTS: dict[str, Callable[[dict], str]] = {
    "common_gen": lambda r: ", ".join(r["concepts"]),
    "dart": lambda r: _triples(r["tripleset"]),
    "e2e_nlg": lambda r: r["meaning_representation"],
    "web_nlg": lambda r: _triples(r["input"]),
}


def arc(row: dict) -> tuple[str, str]:
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    options = "\n".join(f"- {t}" for t in texts)
    return f"{row['question']}\nOptions:\n{options}", texts[labels.index(row["answerKey"])]


def nq_open(row: dict) -> tuple[str, list[str]]:
    return row["question"], list(row["answer"])


def trivia_qa(row: dict) -> tuple[str, list[str]]:
    """Any alias is right (em_multi); the canonical ``value`` comes first."""
    answer = row["answer"]
    value = answer.get("value")
    head = [value] if value else []
    return row["question"], head + [a for a in answer["aliases"] if a != value]


ANLI_LABELS = ("yes", "it is not possible to tell", "no")  # entailment, neutral, contradiction


def anli(row: dict) -> tuple[str, str]:
    question = (f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\n"
                f"Does the premise entail the hypothesis? Options: {', '.join(ANLI_LABELS)}")
    return question, dict(enumerate(ANLI_LABELS))[row["label"]]  # a KeyError for unlabelled rows (-1)


def qnli(row: dict) -> tuple[str, str]:
    question = f"Does the sentence \"{row['sentence']}\" answer the question \"{row['question']}\"? Options: yes, no"
    return question, {0: "yes", 1: "no"}[row["label"]]  # 0 = entailment, 1 = not_entailment; -1 = unlabelled
