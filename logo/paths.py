"""Where logo keeps what it makes (converted models, calibration statistics), and the check of an output directory
before any work (no heavy imports here)."""

from __future__ import annotations

import os
from pathlib import Path

from logo.errors import LogoError


def cache_dir() -> Path:
    """The directory where logo keeps converted models and generated files."""
    if os.environ.get("LOGO_CACHE"):
        return Path(os.environ["LOGO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "logo"


def check_output_dir(out_dir: Path, option: str = "--output") -> None:
    """Make ``out_dir`` now, before any work, or raise a LogoError naming ``option`` and why it cannot be a
    writable directory."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LogoError(f"{option} {out_dir} is a file, not a directory; give a directory (new or existing)")
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise LogoError(f"cannot make {option} {out_dir}: {existing} is a file, not a directory; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LogoError(f"cannot write {option} {out_dir}: {existing} is not writable; give another directory")
    try:  # what access() cannot tell: a read-only or virtual file system, or root's permissions
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LogoError(f"cannot make {option} {out_dir}: {err.strerror or err}; give a writable directory") from None
