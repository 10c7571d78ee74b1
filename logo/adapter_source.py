"""Where adapters come from: resolve an ``--adapters`` spec to named local adapter directories.

Specs:
- ``DIR``: a directory whose subdirectories are PEFT adapters (or a single adapter directory). A subdirectory
  that is no adapter but holds adapter folders (a library inside the library) is an error naming it, not skipped;
- a list of adapter directories;
- ``hub:OWNER/REPO/SUBFOLDER_PREFIX``: every subfolder of a hub repo whose path starts with the prefix,
  e.g. ``hub:archon159/LoGo-loras-collection/Llama-3.1-8B-loras-flanv2/flanv2.`` (downloaded with
  huggingface_hub, which honours ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``). ``hub:OWNER/REPO`` and
  ``hub:OWNER/REPO/FOLDER/`` read a folder like ``DIR`` does (the repo's root, or ``FOLDER``: one adapter, or a
  folder of adapters); so does a prefix that no adapter folder starts with but that names a folder exactly;
- ``embedded:demo``: the demo library shipped inside the package (for the embedded SmolLM2).

An adapter's name is its folder name (for ``.`` the current directory's; for a hub repo's root, the repo's).
"""

from __future__ import annotations

import os
from pathlib import Path

from logo.errors import AdapterError, one_line

CONFIG_FILE = "adapter_config.json"
EMBEDDED_LIBRARIES = {"demo": Path(__file__).parent / "assets" / "demo_library"}


def is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def _check_no_orphan_weights(folders: list[Path]) -> None:
    """A folder holding adapter weights but no config is a broken adapter, not something to skip."""
    for folder in folders:
        weights = sorted(f.name for f in folder.glob("adapter_model.*") if f.is_file())
        if weights and not is_adapter_dir(folder):
            raise AdapterError(
                f"adapter folder {folder} holds {', '.join(weights)} but no {CONFIG_FILE}; copy the adapter's "
                f"{CONFIG_FILE} (written by PEFT's save_pretrained) into it, or remove the folder"
            )


def _adapter_name(path: Path) -> str:
    """The name of the adapter in folder ``path``: the folder's name, also where ``path`` is ``.`` or ends in ``..``
    (made absolute without resolving symlinks, so a linked adapter keeps the link's name)."""
    name = Path(os.path.abspath(path)).name
    if not name:
        raise AdapterError(f"the adapter folder {path} has no name to give the adapter; move it into a named folder")
    return name


def _check_no_nested_libraries(subfolders: list[Path], where: str, spec_for) -> None:
    """A subfolder that is no adapter but holds adapter folders is a library inside the library: it is not searched,
    and passing it over in silence would drop its adapters, so it is an error that says how to load them."""
    for folder in subfolders:
        if is_adapter_dir(folder):
            continue
        inner = sorted(p.name for p in folder.iterdir() if p.is_dir() and is_adapter_dir(p))
        if inner:
            shown = ", ".join(inner[:3]) + (f" and {len(inner) - 3} more" if len(inner) > 3 else "")
            raise AdapterError(
                f"{where} holds {folder.name}, a folder with no {CONFIG_FILE} whose subfolders are adapters "
                f"({shown}); adapters are read one level deep only: to load those, give {spec_for(folder)}"
            )


def _adapter_subfolders(directory: Path, where: str, spec_for) -> list[tuple[str, Path]]:
    """The adapter subfolders of ``directory`` (possibly none), after the checks that nothing in it that looks like an
    adapter is passed over; ``where`` names it in errors, ``spec_for(folder)`` is the spec that loads a subfolder."""
    subfolders = sorted(p for p in directory.iterdir() if p.is_dir())
    _check_no_orphan_weights([directory, *subfolders])
    _check_no_nested_libraries(subfolders, where, spec_for)
    return [(p.name, p) for p in subfolders if is_adapter_dir(p)]


def _from_directory(directory: Path) -> list[tuple[str, Path]]:
    if not directory.exists():
        parts = directory.parts
        hint = (f" (for the hub repository {directory.as_posix()}, write hub:{directory.as_posix()})"
                if len(parts) == 2 and not directory.is_absolute() and not parts[0].startswith(".") else "")
        raise AdapterError(f"adapter directory {directory} does not exist{hint}")
    if not directory.is_dir():
        raise AdapterError(f"{directory} is not a directory; give a directory of PEFT adapters")
    if is_adapter_dir(directory):
        return [(_adapter_name(directory), directory)]
    found = _adapter_subfolders(directory, f"the adapter folder {directory}",
                                lambda folder: f"--adapters {folder} (or move them up into {directory})")
    if not found:
        raise AdapterError(
            f"no adapters in {directory}: expected subdirectories holding {CONFIG_FILE} and "
            "adapter_model.safetensors (as written by PEFT's save_pretrained)"
        )
    return found


def _from_hub(spec: str) -> list[tuple[str, Path]]:
    rest = spec[len("hub:") :]
    parts = rest.split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise AdapterError(f"bad hub spec {spec!r}: use hub:OWNER/REPO or hub:OWNER/REPO/SUBFOLDER_PREFIX")
    repo_id = f"{parts[0]}/{parts[1]}"
    prefix = parts[2] if len(parts) == 3 else ""
    if ".." in prefix.split("/"):
        raise AdapterError(f"bad hub spec {spec!r}: a folder of the repo cannot be '..'; use hub:OWNER/REPO, "
                           "hub:OWNER/REPO/FOLDER/ or hub:OWNER/REPO/SUBFOLDER_PREFIX")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    folder_spec = not prefix or prefix.endswith("/")
    pattern = [f"{prefix}*/{CONFIG_FILE}", f"{prefix}*/adapter_model.*"]
    if folder_spec:  # the folder itself may be the adapter (a single-adapter repo, hub:OWNER/REPO)
        pattern += [f"{prefix}{CONFIG_FILE}", f"{prefix}adapter_model.*"]
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=pattern))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set and the cache lacks it)" if offline else ""
        raise AdapterError(
            f"cannot fetch adapters {repo_id}/{prefix}* from the hub{hint}: {one_line(err)}. "
            "Download them once where the hub is reachable (same HF_HOME), or pass a local directory."
        ) from err

    def spec_for(folder: Path) -> str:
        return f"hub:{repo_id}/{folder.relative_to(root).as_posix()}/"

    base = root / prefix
    if not folder_spec:
        parent, stem = base.parent, base.name
        if not parent.is_dir():
            raise AdapterError(f"hub repo {repo_id} has no folder {parent.relative_to(root).as_posix()}")
        folders = sorted(p for p in parent.iterdir() if p.is_dir() and p.name.startswith(stem))
        _check_no_orphan_weights(folders)
        found = [(p.name, p) for p in folders if is_adapter_dir(p)]
        if found or not base.is_dir():
            _check_no_nested_libraries(folders, f"hub repo {repo_id}", spec_for)
            if not found:
                raise AdapterError(f"hub repo {repo_id} has no adapter folders starting with {prefix!r}")
            return found
        # no adapter folder starts with the prefix, but it names a folder exactly: read it as FOLDER/ would
    where = (f"folder {base.relative_to(root).as_posix()} of hub repo {repo_id}" if base != root
             else f"hub repo {repo_id}")
    if not base.is_dir():
        raise AdapterError(f"hub repo {repo_id} has no folder {prefix}")
    if is_adapter_dir(base):
        return [(base.name if base != root else parts[1], base)]
    found = _adapter_subfolders(base, where, spec_for)
    if not found:
        raise AdapterError(f"no adapters in the {where}: expected {CONFIG_FILE} there or in its subfolders (give "
                           f"hub:{repo_id}/FOLDER/ for a folder of adapters, hub:{repo_id}/FOLDER/PREFIX for some)")
    return found


def resolve_adapters(spec: str | Path | list[str | Path]) -> list[tuple[str, Path]]:
    """Resolve an adapters spec to ``[(name, local_dir), ...]`` in a stable order."""
    if isinstance(spec, (list, tuple)):
        if len(spec) == 1:
            return resolve_adapters(spec[0])
        out = []
        for item in spec:
            path = Path(item)
            _check_no_orphan_weights([path])
            if not is_adapter_dir(path):
                raise AdapterError(f"{path} is not a PEFT adapter directory (no {CONFIG_FILE} in it)")
            out.append((_adapter_name(path), path))
        return out
    text = str(spec)
    if text.startswith("hub:"):
        return _from_hub(text)
    if text.startswith("embedded:"):
        key = text.split(":", 1)[1]
        if key not in EMBEDDED_LIBRARIES:
            raise AdapterError(f"unknown embedded library {key!r}; known: {sorted(EMBEDDED_LIBRARIES)}")
        return _from_directory(EMBEDDED_LIBRARIES[key])
    return _from_directory(Path(text))
