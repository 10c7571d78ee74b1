"""Where logo keeps what it makes (converted models, calibration statistics), and the checks of an output directory
or file before any work (no heavy imports here)."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
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


def check_new_dir(out_dir: Path, option: str = "--output") -> None:
    """Raise a LogoError naming ``option`` unless ``out_dir`` could be made (or, existing, filled) now, without making
    it: for commands that build the whole folder aside and move it into place at the end (:func:`new_folder`), so
    that a failed run leaves no folder, and no parent folders either."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LogoError(f"{option} {out_dir} is a file, not a directory; give a directory (new or existing)")
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise LogoError(f"cannot make {option} {out_dir}: {existing} is a file, not a directory; give another path")
    try:  # what access() cannot tell: a read-only or virtual file system, or root's permissions
        os.rmdir(tempfile.mkdtemp(prefix=".logo-check-", dir=existing))
    except OSError as err:
        raise LogoError(f"cannot make {option} {out_dir}: {existing} is not writable "
                        f"({err.strerror or err}); give another directory") from None


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


def current_umask() -> int:
    """The process's umask. Read from ``/proc/self/status`` where the OS has it (Linux): ``os.umask`` can only read the
    umask by setting it, and another thread that makes a file in between would get the wrong mode."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:  # no /proc (macOS): set and restore, the only portable way
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` give a new file (``0o666``) or directory (``0o777``) under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def use_default_modes(root: Path) -> None:
    """Give ``root`` and every directory and file under it the mode a plain ``mkdir``/``open`` would have: writers
    that make private files (safetensors' ``save_file``: 0600) or folders (``tempfile.mkdtemp``: 0700) would otherwise
    leave results other users cannot read (a vLLM server under another account, a shared cache)."""
    root = Path(root)
    file_mode, dir_mode = default_mode(), default_mode(directory=True)
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        path.chmod(dir_mode if path.is_dir() else file_mode)


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file at ``path`` atomically (see :func:`replacing`), with the mode a plain
    file write gets (``save_file`` alone makes it 0600: unreadable to other users)."""
    from safetensors.torch import save_file  # lazy: this module stays free of heavy imports

    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.chmod(default_mode())


def _make_parents(path: Path) -> list[Path]:
    """Make ``path``'s missing parent directories; the ones made, deepest first (to remove again on a failure)."""
    missing = [p for p in Path(path).absolute().parents if not p.exists()]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(directories: list[Path]) -> None:
    """Remove each of ``directories`` (deepest first) that is still empty; one something else filled meanwhile stays."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


@contextmanager
def new_folder(path: Path) -> Iterator[Path]:
    """A new temporary folder beside ``path`` for the block to fill; when the block ends without an error, it becomes
    ``path`` in one rename, so that ``path`` is never a half-written folder. ``path`` must not exist or be an empty
    directory (else ``OSError``, ENOTEMPTY or EEXIST, and nothing is moved). On an error the temporary folder goes, and
    so do the parent folders made for it. The folder and its files get the modes plain writes give
    (:func:`use_default_modes`)."""
    path = Path(path)
    made = _make_parents(path)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        yield tmp
        use_default_modes(tmp)
        os.rename(tmp, path)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
