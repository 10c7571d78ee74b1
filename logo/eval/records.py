"""Per-dataset result store of `logo run`: resumable, and the official six files written from it.

Each finished instance is appended, as one JSON line, to ``<dataset>/.logo_records.jsonl`` the moment its
batch completes; ``<dataset>/.logo_run.json`` holds the run's settings and the seconds spent so far. A run
that stops (crash, Ctrl-C, lost machine) and is started again keeps every complete line and generates only
what is missing; a finished dataset is not generated again. The settings guard against mixing: a rerun with
other generation settings into the same directory is refused; ``overwrite`` starts the dataset afresh. The
official files are written only when a dataset is complete, and removed whenever the records stop covering them
(a store started afresh, or a rerun with more instances), so that a stopped run never leaves old results looking
current.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from logo.errors import LogoError
from logo.paths import write_atomic

RECORDS = ".logo_records.jsonl"
META = ".logo_run.json"
OFFICIAL_FILES = ("eval_results.json", "predictions.json", "selected_loras.json", "weights.json", "metric_dict.json",
                  "time_dict.json")


def instance_key(prompt: str, label) -> str:
    """Identifies an instance's content, so that records never attach to other data."""
    return hashlib.sha1(json.dumps([prompt, label], ensure_ascii=False).encode()).hexdigest()[:16]


class RecordStore:
    """The records of one (run, dataset) directory."""

    def __init__(self, directory: Path, settings: dict, overwrite: bool = False) -> None:
        self.dir = directory
        self.settings = settings
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LogoError(f"cannot make the result directory {directory}: {err.strerror or err}; "
                            "give another --output-dir") from None
        self.records_path = directory / RECORDS
        self.meta_path = directory / META
        meta = json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else None
        if meta is not None and meta.get("settings") != settings and not overwrite:
            before = meta.get("settings", {})
            changed = sorted(k for k in set(settings) | set(before) if settings.get(k) != before.get(k))
            raise LogoError(
                f"{directory} holds results made with other settings ({', '.join(changed)} differ); "
                "give --overwrite to replace them, or another --output-dir")
        if meta is None or overwrite:
            self.remove_official()  # first: a run stopped after this leaves no results of the old records
            self.records_path.unlink(missing_ok=True)
            meta = {"settings": settings, "inference_s": 0.0, "loading_s": None}
            write_atomic(self.meta_path, json.dumps(meta))
        self.meta = meta

    def load(self, keys: list[str]) -> dict[int, dict]:
        """The records already made for these instances (by index and content). The file keeps those and the
        records beyond them (a run with a smaller ``--limit`` leaves a larger run's work for its rerun); it drops
        cut lines and records of instances whose content changed."""
        done: dict[int, dict] = {}
        beyond: dict[int, dict] = {}
        if self.records_path.is_file():
            for line in self.records_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the interruption: that instance is generated again
                i = rec.get("index")
                if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                    continue
                if i >= len(keys):
                    beyond[i] = rec
                elif rec.get("key") == keys[i]:
                    done[i] = rec
        if len(done) < len(keys):
            self.remove_official()  # they describe other instances than the ones this run will finish
        kept = sorted([*done.values(), *beyond.values()], key=lambda r: r["index"])
        write_atomic(self.records_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        return done

    def append(self, records: list[dict], inference_s: float) -> None:
        with self.records_path.open("a", encoding="utf-8") as sink:
            for rec in records:
                sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
        self.meta["inference_s"] += inference_s
        write_atomic(self.meta_path, json.dumps(self.meta))

    def set_loading(self, seconds: float) -> None:
        self.meta["loading_s"] = seconds
        write_atomic(self.meta_path, json.dumps(self.meta))

    def remove_official(self) -> None:
        """Remove the official files (before the records they came from are replaced or extended)."""
        for filename in OFFICIAL_FILES:
            (self.dir / filename).unlink(missing_ok=True)

    def write_official(self, records: list[dict], metric_dict: dict, loading_s: float) -> None:
        """The official six files, in instance order."""
        outputs = {
            "eval_results.json": [r["score"] for r in records],
            "predictions.json": [r["prediction"] for r in records],
            "selected_loras.json": [r["selected"] for r in records],
            "weights.json": [r["weights"] for r in records],
            "metric_dict.json": metric_dict,
            "time_dict.json": {"loading": loading_s, "inference": self.meta["inference_s"]},
        }
        for filename, value in outputs.items():
            write_atomic(self.dir / filename, json.dumps(value, ensure_ascii=False))
