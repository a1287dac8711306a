"""The on-disk cache of pretrained weights and generated data: safetensors files named by a hash of their key.

The cache lives under ``$FEDMERGE_CACHE`` (default ``~/.cache/fedmerge``). A key is a JSON-able dict of
everything that determines the tensors (suite, options, seed); the versions of the code that computes
them (fedmerge, torch, numpy) are added to it, so a machine with a cache gives the numbers a machine
without one would. Files are written atomically, so concurrent builders (Ray workers) never see a
half-written file.
"""

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedmerge import __version__
from fedmerge.files import write_safetensors

Tensors = dict[str, torch.Tensor]


def cache_dir() -> Path:
    """``$FEDMERGE_CACHE``, or ``~/.cache/fedmerge``."""
    return Path(os.environ.get("FEDMERGE_CACHE") or Path.home() / ".cache" / "fedmerge").expanduser()


def versions() -> dict[str, str]:
    """The versions of the code that the cached numbers depend on."""
    return {"fedmerge": __version__, "torch": torch.__version__, "numpy": np.__version__}


def cache_path(kind: str, key: dict) -> Path:
    """Where the tensors for ``key`` live: ``<cache>/<kind>/<sha256 of key and versions>.safetensors``."""
    text = json.dumps({"key": key, **versions()}, sort_keys=True)
    return cache_dir() / kind / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.safetensors"


def load_or_build(kind: str, key: dict, build: Callable[[], Tensors]) -> Tensors:
    """The cached tensors for ``key``, or ``build()``'s, written to the cache first.

    A cache file that cannot be read (truncated, corrupted) is rebuilt and replaced.
    """
    path = cache_path(kind, key)
    if path.exists():
        try:
            return load_file(path)
        except (SafetensorError, OSError):
            pass
    tensors = {name: t.detach().contiguous().clone() for name, t in build().items()}
    write_safetensors(path, tensors, metadata={"key": json.dumps(key, sort_keys=True), **versions()})
    return tensors
