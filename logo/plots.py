"""The one selection heatmap (``logo demo`` and ``logo compare`` both draw it).

Drawn with matplotlib's object API on an Agg canvas: nothing here changes matplotlib's process-wide backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def selection_heatmap(path: Path, shares: np.ndarray, rows: list[str], adapters: list[str], title: str,
                      ylabel: str = "", colorbar: str = "selection share") -> None:
    """PNG of ``shares [len(rows), len(adapters)]``: how much of each row's selections went to each adapter."""
    width = max(6.0, 2.5 + 0.07 * max(map(len, rows), default=0) + 0.3 * len(adapters))
    fig = Figure(figsize=(width, 2.2 + 0.3 * len(rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="viridis", aspect="auto", vmin=0, vmax=max(1e-9, float(shares.max(initial=0))))
    ax.set_xticks(range(len(adapters)), adapters, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("adapter")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, label=colorbar)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
