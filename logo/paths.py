"""Where logo keeps what it makes: converted models and calibration statistics (no heavy imports here)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The directory where logo keeps converted models and generated files."""
    if os.environ.get("LOGO_CACHE"):
        return Path(os.environ["LOGO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "logo"
