"""Outputs that appear whole or not at all: every file and directory fedmerge writes goes through here.

Each output is staged beside its target (same file system), then renamed into place; on any error, Ctrl-C
included, the staging path is removed and the target is left as it was. Staged paths are created with
plain ``mkdir``/``open`` so they get the user's umask, as any tool's files do (``tempfile`` would make
them private to the user).
"""

import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fedmerge.errors import FedmergeError


class TargetAppeared(FedmergeError):
    """The target of a staged output was created by someone else while it was being written."""


def check_output_dir(path: Path, what: str) -> None:
    """Refuse a directory output that can never be written: an existing file at ``path`` or above it.

    ``what`` names the option in the message (e.g. ``--out``). Cheap; call it before any long work.
    """
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "is a file" if candidate == path else f"is under {candidate}, which is a file"
                raise FedmergeError(f"{what} {path} {where}; give a directory path.")
            if not os.access(candidate, os.W_OK | os.X_OK):
                raise FedmergeError(f"{what} {path}: {candidate} is not writable; choose another directory.")
            return


def _staging_name(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{suffix}")


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged(target: Path, directory: bool = False, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh staging path beside ``target`` (an empty directory, or a file path to create).

    When the block ends without error the staging path becomes ``target``. An existing ``target`` is
    replaced only when ``replace`` is true (a file atomically; a directory is moved aside first and
    removed after the swap); otherwise it is an error.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_name(target, ".partial")
    if directory:
        staging.mkdir()
    try:
        yield staging
        _move_into_place(staging, target, replace)
    except BaseException:
        remove(staging)
        raise


def _move_into_place(staging: Path, target: Path, replace: bool) -> None:
    if target.exists() or target.is_symlink():
        if not replace:
            raise TargetAppeared(f"{target} appeared while it was being written; nothing was replaced.")
        if staging.is_dir() or target.is_dir():
            aside = _staging_name(target, ".old")
            os.replace(target, aside)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(aside, target)
                raise
            remove(aside)
            return
    os.replace(staging, target)


def write_file(path: Path, data: str | bytes, replace: bool = True) -> Path:
    """Write one file atomically (text as UTF-8)."""
    with staged(path, replace=replace) as staging:
        staging.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_safetensors(path: Path, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> Path:
    """Save tensors as a safetensors file atomically, with the user's umask (safetensors alone makes it 0600)."""
    from safetensors.torch import save_file

    with staged(path, replace=True) as staging:
        staging.touch()  # created as every output is: 0666 less the umask
        mode = staging.stat().st_mode & 0o777
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, staging, metadata=metadata)
        os.chmod(staging, mode)
    return Path(path)


def write_tree(target: Path, files: Mapping[str, str | bytes], replace: bool = False) -> Path:
    """Write ``files`` (relative path → text or bytes) as the directory ``target``, atomically."""
    with staged(target, directory=True, replace=replace) as staging:
        for name, data in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(target)
