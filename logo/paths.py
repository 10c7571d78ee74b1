"""Where logo keeps what it makes (converted models, calibration statistics), and the checks of an output directory
or file before any work (no heavy imports here)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
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


def check_output_file(path: Path, option: str, example: str = "result.json") -> None:
    """Raise a LogoError naming ``option`` unless ``path`` can be written as a file: not a directory, not a
    read-only file, in a writable directory (missing parent directories are made now; the file is not)."""
    if path.is_dir():
        raise LogoError(f"{option} {path} is a directory; give a file path, e.g. {path / example}")
    existing = next(p for p in (path.parent, *path.absolute().parent.parents) if p.exists())
    if not existing.is_dir():
        raise LogoError(f"cannot write {option} {path}: {existing} is a file, not a directory; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LogoError(f"cannot write {option} {path}: {existing} is not writable; give another path")
    existed = path.exists()
    try:  # what access() cannot tell: a read-only or virtual file system, root's permissions, a read-only file
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):  # appends nothing: an existing file is left as it is
            pass
    except OSError as err:
        raise LogoError(f"cannot write {option} {path}: {err.strerror or err}; give another path") from None
    if not existed:
        path.unlink(missing_ok=True)


def write_output_file(path: Path, text: str, option: str, kept: str) -> None:
    """Write ``text`` to ``path``; a failure (the path changed during the run, a full disk) is a LogoError that
    says where the result still is (``kept``)."""
    try:
        path.write_text(text)
    except OSError as err:
        raise LogoError(f"cannot write {option} {path}: {err.strerror or err}; {kept}") from None


@contextmanager
def replacing(path: Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path in ``path``'s directory for the block to write; when the block ends without an error, the
    file there replaces ``path`` in one step (``os.replace``), so that ``path`` is always either its old content or
    the whole new one, never a cut-off file. On an error the temporary file goes and ``path`` is left as it was.
    ``fsync``: flush the new file to disk before it replaces the old one (survives a power cut, not just a kill)."""
    path = Path(path)
    # hidden, and ending in path's own suffix (for writers that infer the format from it); made by the block
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        yield tmp
        if fsync:
            with tmp.open("rb+") as file:
                os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes, fsync: bool = False) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically (see :func:`replacing`)."""
    with replacing(path, fsync) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
