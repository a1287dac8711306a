"""The code a cached cell was made by: a hash of the source files of the fedmerge modules a cell may run.

A study's cells are reused only while this fingerprint is unchanged, so a regenerated page never mixes results of
old code with new. What no cell runs stays out of it: the report layer (it only reads files), the studies layer
(a study adds its own module) and the command line.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import fedmerge

PACKAGE = Path(fedmerge.__file__).resolve().parent
NOT_RUN = ("report", "studies", "cli.py")


def runtime_sources() -> list[Path]:
    """The package's Python files a cell may run, in a fixed order."""
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in NOT_RUN)


def code_fingerprint(*modules: str) -> str:
    """16 hex digits of SHA-256 over the runtime sources and ``modules`` (extra files, relative to the package,
    e.g. ``studies/fednova.py``): each file's path and bytes."""
    digest = hashlib.sha256()
    for path in [*runtime_sources(), *(PACKAGE / m for m in modules)]:
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
