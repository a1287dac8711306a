"""Atomic outputs: whole or nothing, the user's umask, existing targets replaced only when asked."""

import os
import stat

import pytest

from fedmerge.errors import FedmergeError
from fedmerge.files import check_output_dir, staged, write_file, write_tree


def test_a_tree_appears_whole_with_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        target = write_tree(tmp_path / "out", {"a.txt": "x", "sub/b.bin": b"\x00"})
    finally:
        os.umask(old)
    assert (target / "a.txt").read_text() == "x" and (target / "sub" / "b.bin").read_bytes() == b"\x00"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "a.txt").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_error_leaves_the_target_as_it_was_and_no_staging(tmp_path):
    target = write_tree(tmp_path / "out", {"keep.txt": "old"})
    with pytest.raises(KeyboardInterrupt):
        with staged(target, directory=True, replace=True) as staging:
            (staging / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_existing_target_is_replaced_only_when_asked(tmp_path):
    target = write_tree(tmp_path / "out", {"old.txt": "old"})
    with pytest.raises(FedmergeError, match="out"):
        write_tree(target, {"new.txt": "new"})
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    write_tree(target, {"new.txt": "new"}, replace=True)
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    write_file(tmp_path / "f.json", "1")
    write_file(tmp_path / "f.json", "2")
    assert (tmp_path / "f.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "out"]


def test_a_directory_output_at_or_under_a_file_is_refused_up_front(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FedmergeError, match=r"--out .*file is a file"):
        check_output_dir(tmp_path / "file", "--out")
    with pytest.raises(FedmergeError, match=r"--out .*under .*file, which is a file"):
        check_output_dir(tmp_path / "file" / "sub", "--out")
    check_output_dir(tmp_path / "new" / "deeper", "--out")
