"""Outputs that appear whole or not at all: every file and directory fedmerge writes goes through here.

Each output is staged beside its target (same file system), then renamed into place; on any error, Ctrl-C
included, the staging path is removed and the target is left as it was. Staged paths are created with
plain ``mkdir``/``open`` so they get the user's umask, as any tool's files do (``tempfile`` would make
them private to the user). A write that fails for want of space becomes a :class:`DiskFull` naming the
output and what it needed. The outputs being written are known, so a process that must exit at once
(:func:`close`) can let them finish, or remove them: it leaves nothing half-written.
"""

import errno
import itertools
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fedmerge.errors import FedmergeError


class Closed(Exception):
    """No output may begin: the process is exiting (:func:`close`)."""


class TargetAppeared(FedmergeError):
    """The target of a staged output was created by someone else while it was being written."""


class DiskFull(FedmergeError):
    """An output could not be written for want of space: a full file system, a used-up quota, a file-size limit."""


DISK_FULL = {
    errno.ENOSPC: "the file system is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f) or the file system allows",
}
"""The errors that mean "no room for this output", and what each means."""

_STAGING = re.compile(r"\.(.+)\.[0-9a-f]{8}\.(?:partial|old)")
_unfinished: set[Path] = set()
_closed = False


def output_path(path: Path) -> Path:
    """``path`` as the user will know it: each staging component replaced by the output it becomes."""
    return Path(*(match.group(1) if (match := _STAGING.fullmatch(part)) else part for part in Path(path).parts))


def disk_full(error: OSError, path: Path, needed: int | None = None) -> DiskFull:
    """The :class:`DiskFull` of ``error`` (in :data:`DISK_FULL`) while writing ``path`` (``needed`` bytes, if known)."""
    target = output_path(path)
    where = next((p for p in target.parents if p.exists()), Path(".")).resolve()
    free = shutil.disk_usage(where).free
    size = f"it needs {_size(needed)}, and " if needed else ""
    return DiskFull(
        f"cannot write {target}: {DISK_FULL[error.errno]} ({error.strerror}); {size}{_size(free)} "
        f"{'is' if free == 1 else 'are'} free on the file system of {where}. Free some space or write "
        "elsewhere; nothing half-written was left."
    )


def _size(count: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def close(seconds: float) -> None:
    """For a process about to exit without unwinding its threads: refuse new outputs, give those being written up to
    ``seconds`` to finish, and remove the rest."""
    global _closed
    _closed = True
    deadline = time.monotonic() + seconds
    while _unfinished and time.monotonic() < deadline:
        time.sleep(0.02)
    for path in list(_unfinished):
        remove(path)


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
def staged(target: Path, directory: bool = False, replace: bool = False, size: int | None = None) -> Iterator[Path]:
    """Yield a fresh staging path beside ``target`` (an empty directory, or a file path to create).

    When the block ends without error the staging path becomes ``target``. An existing ``target`` is
    replaced only when ``replace`` is true (a file atomically; a directory is moved aside first and
    removed after the swap); otherwise it is an error. A write failing for want of space raises
    :class:`DiskFull` (``size``: the bytes the output needs, if known).
    """
    if _closed:
        raise Closed(f"{target} was not written: the process is exiting.")
    target = Path(target)
    staging = _staging_name(target, ".partial")
    created = list(itertools.takewhile(lambda folder: not folder.exists(), (target.parent, *target.parent.parents)))
    _unfinished.add(staging)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            staging.mkdir()
        yield staging
        _move_into_place(staging, target, replace)
    except OSError as error:
        _undo(staging, created)
        if error.errno in DISK_FULL:
            raise disk_full(error, target, size) from None
        raise
    except BaseException:
        _undo(staging, created)
        raise
    finally:
        _unfinished.discard(staging)


def _undo(staging: Path, created: list[Path]) -> None:
    """Remove the staging path and the folders made for it that stayed empty (deepest first)."""
    remove(staging)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty (another output landed there), or gone
            break


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
    data = data.encode() if isinstance(data, str) else data
    with staged(path, replace=replace, size=len(data)) as staging:
        staging.write_bytes(data)
    return Path(path)


def write_safetensors(path: Path, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> Path:
    """Save tensors as a safetensors file atomically, with the user's umask (safetensors alone makes it 0600)."""
    from safetensors.torch import save_file

    size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    with staged(path, replace=True, size=size) as staging:
        staging.touch()  # created as every output is: 0666 less the umask
        mode = staging.stat().st_mode & 0o777
        try:
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, staging, metadata=metadata)
        except Exception as error:  # its Rust writer words an I/O error "... (os error 28)"
            code = re.search(r"\(os error (\d+)\)", str(error))
            if code is None or int(code.group(1)) not in DISK_FULL:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
        os.chmod(staging, mode)
    return Path(path)


def write_tree(target: Path, files: Mapping[str, str | bytes], replace: bool = False) -> Path:
    """Write ``files`` (relative path → text or bytes) as the directory ``target``, atomically."""
    files = {name: data.encode() if isinstance(data, str) else data for name, data in files.items()}
    with staged(target, directory=True, replace=replace, size=sum(map(len, files.values()))) as staging:
        for name, data in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return Path(target)
