"""Example prompts for `logo fit-router` from a library manifest (`logo build-demo-library` writes one): each
adapter's held-out templates, filled with held-out instances of the project's task generators."""

from __future__ import annotations

import json
from pathlib import Path

from logo.errors import LogoError
from logo.fit import Example
from logo.train.tasks import get_task


def examples_from_manifest(manifest_file: Path, split: str = "valid", n_per_template: int = 8,
                           seed: int = 0) -> list[Example]:
    """Example prompts from a library manifest: each adapter's (and each unseen task's) held-out templates of
    ``split`` (``valid``, or ``test``), filled with held-out instances of that split."""
    if split not in ("valid", "test"):
        raise LogoError(f"unknown template split {split!r}; use valid or test")
    try:
        manifest = json.loads(Path(manifest_file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LogoError(f"cannot read the library manifest {manifest_file}: {err}") from err
    if not isinstance(manifest, dict) or not all(isinstance(manifest.get(key, []), list)
                                                 for key in ("adapters", "unseen_tasks")):
        raise LogoError(f"the library manifest {manifest_file} is not a manifest (an object whose \"adapters\" and "
                        "\"unseen_tasks\" are lists); rebuild it or give example prompts with --prompts-dir")
    entries = [(a, a.get("name") if isinstance(a, dict) else None) for a in manifest.get("adapters", [])]
    entries += [(u, None) for u in manifest.get("unseen_tasks", [])]
    for entry, _ in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise LogoError(f"the library manifest {manifest_file} has an entry without a \"name\" ({entry!r:.60}); "
                            "rebuild it or give example prompts with --prompts-dir")
    out = []
    instance_split = "valid" if split == "valid" else "eval"
    for entry, adapter in entries:
        templates = entry.get("held_out_templates", {}).get(split)
        if not templates:
            raise LogoError(f"manifest {manifest_file} lists no {split} templates for {entry.get('name')!r}; "
                            "give example prompts with --prompts-dir instead")
        task = get_task(entry["name"])
        instances = task.make(seed, n_per_template * len(templates), instance_split)
        for i, (fields, _) in enumerate(instances):
            which = i % len(templates)
            out.append(Example(task.prompt(fields, templates[which]), adapter, f"{entry['name']}#{which}"))
    return out
