"""Imports only run downward through ARCHITECTURE.md's layers (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import logo

# ARCHITECTURE.md's diagram, bottom up: a module may import its own layer and the ones below it.
LAYERS = [
    ["errors", "paths"],
    ["generation", "presets"],
    ["adapter_source", "models"],
    ["calibration", "library"],
    ["mixture_ref"],
    ["library_decode"],
    ["mixture_ops"],
    ["mixture", "static_decode"],
    ["router"],
    ["router_file"],
    ["engine"],
    ["spec"],
    ["arrow", "plots"],
    ["fit"],
    ["methods"],
    ["cli_core", "cli_options"],
    ["eval", "train", "bench", "perf", "export", "serve", "fit_cli", "synthetic"],
    ["experiments"],
    ["cli"],
]
# LoGoEngine.from_pretrained is a shortcut that builds an EngineSpec (ARCHITECTURE.md says so).
ALLOWED = {("engine", "spec")}


def imported_areas(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level logo module or package) of every import of logo in a module, lazy ones included."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "logo":
            parts = node.module.split(".")
            found += [(node.lineno, a.name) for a in node.names] if len(parts) == 1 else [(node.lineno, parts[1])]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("logo.")]
    return found


def test_imports_only_run_downward():
    rank = {area: i for i, areas in enumerate(LAYERS) for area in areas}
    root = Path(logo.__file__).parent
    unplaced, upward = set(), []
    for file in sorted(root.rglob("*.py")):
        area = file.relative_to(root).parts[0].removesuffix(".py")
        if area == "__init__":
            continue
        if area not in rank:
            unplaced.add(area)
            continue
        for line, other in imported_areas(ast.parse(file.read_text())):
            if other not in rank:
                unplaced.add(other)
            elif rank[other] > rank[area] and (area, other) not in ALLOWED:
                upward.append(f"{file.relative_to(root)}:{line}: {area} imports {other}, a layer above it")
    assert not unplaced, f"modules missing from ARCHITECTURE.md's layers (and LAYERS here): {sorted(unplaced)}"
    assert not upward, "\n".join(upward)
