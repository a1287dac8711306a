"""Atomic outputs: whole or nothing, the user's umask, existing targets replaced only when asked."""

import errno
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from fedmerge.errors import FedmergeError
from fedmerge.files import (
    DISK_FULL,
    DiskFull,
    check_output_dir,
    output_path,
    staged,
    write_file,
    write_tree,
)
from processes import seconds


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


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_write_without_room_names_the_output_and_its_size_and_leaves_nothing(tmp_path, code):
    def no_room(path, data):
        with open(path, "wb") as f:
            f.write(data[:10])
        raise OSError(code, os.strerror(code), str(path))

    with pytest.raises(DiskFull) as caught:
        with staged(tmp_path / "out", directory=True, size=3_000_000) as staging:
            no_room(staging / "model.bin", b"x" * 100)
    assert str(caught.value).startswith(
        f"cannot write {tmp_path / 'out'}: {DISK_FULL[code]} ({os.strerror(code)}); it needs 3.0 MB, and "
    )
    assert f"free on the file system of {tmp_path}." in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(PermissionError):
        with staged(tmp_path / "out.txt"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert list(tmp_path.iterdir()) == []


def test_a_real_file_size_limit_is_a_disk_full_error(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse a write past the limit (EFBIG), as a full file system would (ENOSPC)."""
    script = textwrap.dedent(f"""
        import resource
        from fedmerge.files import DiskFull, write_file
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            write_file({str(tmp_path / "big.txt")!r}, "x" * 5000)
        except DiskFull as error:
            print(error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=seconds(60))
    assert result.stdout.startswith(
        f"cannot write {tmp_path / 'big.txt'}: the file is larger than this process may write (ulimit -f) or the file "
        "system allows (File too large); it needs 5.0 kB"
    ), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_process_exiting_at_once_lets_quick_writes_finish_and_removes_the_rest(tmp_path):
    """What ``fedmerge`` does after Ctrl-C or SIGTERM, before ``os._exit``: nothing half-written stays behind."""
    script = textwrap.dedent(f"""
        import os, threading, time
        from pathlib import Path
        from fedmerge import files

        out, ready = Path({str(tmp_path)!r}), threading.Barrier(3)

        def write(name, seconds):
            with files.staged(out / name) as staging:
                staging.write_text("half")
                ready.wait()
                time.sleep(seconds)
                staging.write_text("whole")

        for name, seconds in (("quick.txt", 0.2), ("slow.txt", 60)):
            threading.Thread(target=write, args=(name, seconds), daemon=True).start()
        ready.wait()
        files.close(2.0)
        try:
            files.write_file(out / "late.txt", "never")
        except files.Closed:
            print("refused")
        os._exit(0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=seconds(60))
    assert result.stdout == "refused\n", result.stderr
    assert [(p.name, p.read_text()) for p in tmp_path.iterdir()] == [("quick.txt", "whole")]


def test_folders_made_for_an_output_that_failed_are_removed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with staged(tmp_path / "new" / "deeper" / "out.txt") as staging:
            staging.write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_error_messages_name_outputs_not_their_staging_paths(tmp_path):
    assert output_path(tmp_path / ".run-1.0123abcd.partial" / "models" / ".m.safetensors.89abcdef.partial") == (
        tmp_path / "run-1" / "models" / "m.safetensors"
    )
