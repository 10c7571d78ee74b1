"""`logo compare`: one table of runs (methods) x datasets, plus each run's average, from `logo run` results.

Each cell is the dataset's headline number: accuracy x100 for ``em`` / ``em_multi``, BLEU x100, ROUGE-L x100
(read from ``eval_results.json``; per-instance dicts are ROUGE). Runs evaluated on different numbers of
instances of a dataset are flagged: their numbers are not comparable. The average is over the datasets every
compared run has (the header says how many when some run lacks one, and each missing cell is warned about).
Every input file is read and checked before any output is written, and each output is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from logo.errors import LogoError, json_kind
from logo.paths import check_output_dir, write_atomic
from logo.plots import selection_heatmap


@dataclass
class Report:
    markdown: str
    rows: list[list[str]]
    warnings: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _is_run(path: Path) -> bool:
    return any((d / "eval_results.json").is_file() for d in path.iterdir() if d.is_dir())


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (holding ``<dataset>/eval_results.json``) among or right under the given paths."""
    runs = []
    for path in paths:
        if not path.is_dir():
            raise LogoError(f"{path} is not a directory of `logo run` results")
        runs += [path] if _is_run(path) else sorted(d for d in path.iterdir() if d.is_dir() and _is_run(d))
    if not runs:
        raise LogoError(f"no `logo run` results (*/<dataset>/eval_results.json) under {', '.join(map(str, paths))}")
    return runs


def _is_score(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_scores(file: Path, scores) -> list:
    """``scores`` if it is what `logo run` writes: a list of numbers, or of ROUGE dicts with a numeric 'rouge-L'."""
    expected = "a list of per-instance scores (numbers, or dicts with a numeric 'rouge-L')"
    if not isinstance(scores, list):
        raise LogoError(f"{file} is not {expected} but {json_kind(scores)}; rerun `logo run` for it")
    rouge = bool(scores) and isinstance(scores[0], dict)
    for i, s in enumerate(scores):
        if not (isinstance(s, dict) and _is_score(s.get("rouge-L")) if rouge else _is_score(s)):
            raise LogoError(f"{file}: entry {i} ({json_kind(s)}) is not {'like entry 0 ' if i else ''}"
                            f"in {expected}; rerun `logo run` for it")
    return scores


def read_json(file: Path):
    """The JSON value of a result file, or a one-line LogoError naming it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LogoError(f"{file} is not valid JSON ({err}); rerun `logo run` for it") from err
    except OSError as err:
        raise LogoError(f"cannot read {file}: {err.strerror or err}") from None


def check_selected(file: Path, selected) -> list[list[str]]:
    """``selected`` if it is what `logo run` writes in ``selected_loras.json``: a list (one per instance) of lists
    of adapter names."""
    expected = "a list (one entry per instance) of lists of adapter names"
    if not isinstance(selected, list):
        raise LogoError(f"{file} is not {expected} but {json_kind(selected)}; rerun `logo run` for it")
    for i, row in enumerate(selected):
        if not isinstance(row, list) or not all(isinstance(name, str) for name in row):
            raise LogoError(f"{file}: entry {i} ({json_kind(row)}) is not a list of adapter names, in {expected}; "
                            "rerun `logo run` for it")
    return selected


def headline_value(scores: list) -> float:
    """Mean x100; ROUGE-L F1 for per-instance ROUGE dicts."""
    if not scores:
        return float("nan")
    if isinstance(scores[0], dict):
        return 100 * sum(s["rouge-L"] for s in scores) / len(scores)
    return 100 * sum(scores) / len(scores)


def collect(runs: list[Path]) -> tuple[list[str], dict[str, dict[str, tuple[float, int]]]]:
    """Datasets (first-seen order) and ``{run: {dataset: (value, n_instances)}}``."""
    table: dict[str, dict[str, tuple[float, int]]] = {}
    datasets: list[str] = []
    for run in runs:
        row = {}
        for d in sorted(run.iterdir()):
            file = d / "eval_results.json"
            if not file.is_file():
                continue
            scores = check_scores(file, read_json(file))
            row[d.name] = (headline_value(scores), len(scores))
            if d.name not in datasets:
                datasets.append(d.name)
        label = run.name if run.name not in table else f"{run.parent.name}/{run.name}"
        table[label] = row
    return datasets, table


def shared_datasets(datasets: list[str], table: dict[str, dict[str, tuple[float, int]]]) -> list[str]:
    """The datasets every run has: the only ones the average is over, so that averages compare."""
    return [d for d in datasets if all(d in row for row in table.values())]


def render(datasets: list[str], table: dict[str, dict[str, tuple[float, int]]]) -> tuple[str, list[list[str]]]:
    shared = shared_datasets(datasets, table)
    average = "average" if len(shared) == len(datasets) else f"average of {len(shared)} shared"
    header = ["method", *datasets, average]
    rows = []
    for method, row in table.items():
        values = [row[d][0] if d in row else None for d in datasets]
        avg = sum(row[d][0] for d in shared) / len(shared) if shared else None
        rows.append([method, *["" if v is None else f"{v:.2f}" for v in values], "" if avg is None else f"{avg:.2f}"])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(md), [header, *rows]


def check_same_data(datasets: list[str], table: dict[str, dict[str, tuple[float, int]]]) -> list[str]:
    warnings = []
    missing = {method: [d for d in datasets if d not in row] for method, row in table.items()}
    missing = {method: lacks for method, lacks in missing.items() if lacks}
    if missing:
        shared = shared_datasets(datasets, table)
        cells = "; ".join(f"{m} lacks {', '.join(lacks)}" for m, lacks in missing.items())
        noun = "dataset" if len(shared) == 1 else "datasets"
        scope = (f"averages are over the {len(shared)} {noun} every run has ({', '.join(shared)})" if shared
                 else "no dataset is in every run, so there are no averages")
        warnings.append(f"missing results: {cells}; {scope}")
    for d in datasets:
        sizes = {method: row[d][1] for method, row in table.items() if d in row}
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"{m}: {n}" for m, n in sizes.items())
            warnings.append(f"{d} was evaluated on different numbers of instances ({detail}); not comparable")
    return warnings


FIXED_MIXTURES = ("_method_base", "_method_uniform", "_method_fixed-")  # same mixture for every instance


RUN_NAME = re.compile(r"_seed_-?\d+(?P<rest>.*)$")


def method_label(run_name: str) -> str:
    """``logo`` for an official-named run, ``logo_layer=-8`` for one with router options (see
    :func:`logo.eval.runner.router_suffix`), else its method suffix (``random``, ``arrow``, ...)."""
    if "_method_" in run_name:
        return run_name.split("_method_", 1)[1]
    match = RUN_NAME.search(run_name)
    return "logo" + (match["rest"] if match else "")


def selection_counts(runs: list[Path]) -> dict[str, Counter]:
    """Each (run, dataset)'s count of selections per adapter, from its checked ``selected_loras.json``. Runs whose
    mixture is the same for every instance (base, uniform, fixed) are left out."""
    runs = [r for r in runs if not any(tag in r.name for tag in FIXED_MIXTURES)]
    labels = [method_label(r.name) for r in runs]
    if len(set(labels)) < len(labels):  # e.g. several models: the full run names tell them apart
        labels = [r.name for r in runs]
    counts: dict[str, Counter] = {}
    for run, label in zip(runs, labels):
        for d in sorted(run.iterdir()):
            file = d / "selected_loras.json"
            if file.is_file():
                selected = check_selected(file, read_json(file))
                if any(selected):
                    counts[f"{label} | {d.name}"] = Counter(n for row in selected for n in row)
    return counts


def selection_png(counts: dict[str, Counter], path: Path, top: int = 25) -> bool:
    """Heatmap (written atomically): each (run, dataset)'s share of selections per adapter, for the most selected
    adapters overall. False, and no file, when no run selected adapters."""
    if not counts:
        return False
    overall: Counter = Counter()
    for c in counts.values():
        overall.update(c)
    adapters = [a for a, _ in overall.most_common(top)]
    grid = np.array([[c[a] / max(1, sum(c.values())) for a in adapters] for c in counts.values()])
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix tells matplotlib the format
    selection_heatmap(tmp, grid, list(counts), adapters, "Adapters selected per dataset (share of all selections)",
                      colorbar="share")
    os.replace(tmp, path)
    return True


def compare(paths: list[Path], out_dir: Path) -> Report:
    """Write ``compare.md``, ``compare.csv`` and (if any run selected adapters) ``selection.png`` to ``out_dir``.
    Every input is read and checked first; a ``selection.png`` of an earlier comparison is removed when this one
    has none, so that the folder never mixes two comparisons."""
    check_output_dir(out_dir)
    runs = find_runs(paths)
    datasets, table = collect(runs)
    counts = selection_counts(runs)
    md, rows = render(datasets, table)
    report = Report(md, rows, check_same_data(datasets, table))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "compare.md", md + "\n" + "".join(f"\n> warning: {w}\n" for w in report.warnings))
    table_csv = io.StringIO(newline="")
    csv.writer(table_csv).writerows(rows)
    write_atomic(out_dir / "compare.csv", table_csv.getvalue())
    report.files = [out_dir / "compare.md", out_dir / "compare.csv"]
    if selection_png(counts, out_dir / "selection.png"):
        report.files.append(out_dir / "selection.png")
    else:
        (out_dir / "selection.png").unlink(missing_ok=True)
    return report
