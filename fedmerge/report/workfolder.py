"""The layout of a findings work folder: what :mod:`fedmerge.studies` writes there and the findings page reads."""

from __future__ import annotations

import json
from pathlib import Path

from fedmerge.errors import FedmergeError

SWEEP_STUDIES = ("quadratic", "training-heterogeneity", "data-heterogeneity", "robustness")
UPDATE_SIZE, HELD_OUT = "fednova-update-size", "fednova-held-out"
FEDNOVA_STUDIES = (UPDATE_SIZE, HELD_OUT)
EXACTNESS = "exactness.json"
"""Claim 1's check: every case's largest difference and its tolerance."""
EVALUATION = "evaluation.json"
"""Per sweep study and setting: the suite, and each client's validation and test examples."""
CODE = "code.json"
"""Study → the fingerprint of the code its cells were made by."""
TIMINGS = "timings.json"
"""Seconds each study took when its cells last ran, and the last run's total."""


def read_json(path: Path) -> dict:
    """A work-folder file, or an error that says how to make it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FedmergeError(f"{path} is missing; run `fedmerge findings` without --no-run to make it.") from None
    except (OSError, ValueError) as error:
        raise FedmergeError(
            f"{path} cannot be read as JSON ({error}); remove it and run `fedmerge findings` again."
        ) from None


def cells_dir(work: Path, study: str) -> Path:
    """Where a FedNova study's cells go: one ``<recipe>-seed<k>.json`` each."""
    return Path(work) / study / "cells"
