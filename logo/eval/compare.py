"""`logo compare`: one table of methods x datasets (plus average) from `logo run` result directories."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

from logo.errors import LogoError
from logo.eval.datasets import get_dataset_spec
from logo.eval.metrics import headline


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (holding ``<dataset>/eval_results.json``) under the given paths."""
    runs = []
    for path in paths:
        if not path.is_dir():
            raise LogoError(f"{path} is not a directory of `logo run` results")
        if any((d / "eval_results.json").is_file() for d in path.iterdir() if d.is_dir()):
            runs.append(path)
        else:
            runs += sorted(d for d in path.iterdir() if d.is_dir() and any(
                (x / "eval_results.json").is_file() for x in d.iterdir() if x.is_dir()))
    if not runs:
        raise LogoError(f"no `logo run` results (*/<dataset>/eval_results.json) under {', '.join(map(str, paths))}")
    return runs


def collect(runs: list[Path]) -> tuple[list[str], dict[str, dict[str, float]]]:
    table: dict[str, dict[str, float]] = {}
    datasets: list[str] = []
    for run in runs:
        row = {}
        for d in sorted(run.iterdir()):
            file = d / "eval_results.json"
            if not file.is_file():
                continue
            _, value = headline(get_dataset_spec(d.name).metric, json.loads(file.read_text()))
            row[d.name] = value
            if d.name not in datasets:
                datasets.append(d.name)
        table[run.name] = row
    return datasets, table


def render(datasets: list[str], table: dict[str, dict[str, float]]) -> tuple[str, list[list[str]]]:
    header = ["method", *datasets, "average"]
    rows = []
    for method, row in table.items():
        values = [row.get(d) for d in datasets]
        present = [v for v in values if v is not None]
        avg = sum(present) / len(present) if present else None
        rows.append([method, *["" if v is None else f"{v:.2f}" for v in values], "" if avg is None else f"{avg:.2f}"])
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(md), [header, *rows]


def selection_png(runs: list[Path], path: Path, top: int = 25) -> bool:
    """Heatmap: share of selections per adapter (top adapters overall) for each run's datasets."""
    counts: dict[str, Counter] = {}
    for run in runs:
        for d in sorted(run.iterdir()):
            file = d / "selected_loras.json"
            if file.is_file():
                selected = json.loads(file.read_text())
                if any(selected):
                    counts[f"{run.name[:40]}/{d.name}"] = Counter(n for row in selected for n in row)
    if not counts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    overall = Counter()
    for c in counts.values():
        overall.update(c)
    adapters = [a for a, _ in overall.most_common(top)]
    grid = np.array([[c[a] / max(1, sum(c.values())) for a in adapters] for c in counts.values()])
    fig, ax = plt.subplots(figsize=(2 + 0.35 * len(adapters), 1.5 + 0.35 * len(counts)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(adapters)), adapters, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(counts)), list(counts), fontsize=7)
    fig.colorbar(im, ax=ax, label="share of selections")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare(paths: list[Path], out_dir: Path) -> str:
    runs = find_runs(paths)
    datasets, table = collect(runs)
    md, rows = render(datasets, table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(md + "\n")
    with (out_dir / "compare.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    selection_png(runs, out_dir / "selection.png")
    return md
