"""File writing helpers: safetensors files and whole folders written atomically, with the modes plain writes get
under the umask (not safetensors' 0600 or mkdtemp's 0700), and output checks that make nothing."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file

from logo.errors import LogoError
from logo.paths import check_new_dir, current_umask, new_folder, save_safetensors


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_save_safetensors_is_atomic_and_gets_the_umask_mode(tmp_path, mask, expected):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    with umask(mask):
        assert current_umask() == mask
        save_file(tensors, str(tmp_path / "plain.safetensors"))
        save_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    assert mode(tmp_path / "plain.safetensors") == 0o600  # what the fix is for
    assert mode(tmp_path / "ours.safetensors") == expected
    loaded = load_file(str(tmp_path / "ours.safetensors"))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "plain.safetensors"]


def test_new_folder_appears_whole_with_plain_modes(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with umask(0o027), new_folder(out) as tmp:
        assert tmp.parent == out.parent and not out.exists()
        save_file({"x": torch.zeros(2)}, str(tmp / "w.safetensors"))  # 0600 as written
        (tmp / "c.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["c.json", "w.safetensors"]
    assert (mode(out), mode(out / "w.safetensors"), mode(out / "c.json")) == (0o750, 0o640, 0o640)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary folder left
    (tmp_path / "empty").mkdir()
    with new_folder(tmp_path / "empty") as tmp:  # an existing empty folder is replaced
        (tmp / "c.json").write_text("{}")
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["c.json"]


def test_a_failed_new_folder_leaves_nothing_not_even_parents(tmp_path):
    with pytest.raises(OSError, match="disk full"), new_folder(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "half").write_bytes(b"x")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # a parent that was there stays
    with pytest.raises(OSError), new_folder(tmp_path / "kept" / "new" / "out"):
        raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "theirs").write_text("keep me")
    with pytest.raises(OSError), new_folder(tmp_path / "full") as tmp:  # filled meanwhile: not replaced
        (tmp / "ours").write_text("")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "kept"]


def test_check_new_dir_checks_without_making_anything(tmp_path):
    check_new_dir(tmp_path / "a" / "b" / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    for path, message in ((tmp_path / "file", "--output .*file is a file"),
                          (tmp_path / "file" / "out", "cannot make --output .*file is a file")):
        with pytest.raises(LogoError, match=message):
            check_new_dir(path)
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(LogoError, match=r"cannot make --dir .*ro is not writable \(Permission denied\)"):
            check_new_dir(tmp_path / "ro" / "x" / "out", "--dir")
        assert list((tmp_path / "ro").iterdir()) == []
