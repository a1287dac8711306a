"""Run a reference implementation (mergekit, FusionBench) in its own scratch environment on tensors the test made."""

import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from processes import seconds


def outputs_of(python: Path, runner: str, work: Path, inputs: dict[str, torch.Tensor], jobs: dict) -> dict:
    """``runner`` (a script reading argv: inputs.safetensors, jobs.json, outputs.safetensors) run by ``python`` on
    ``inputs`` and ``jobs``; the tensors it wrote. Fails with the end of its stderr unless it exits 0."""
    save_file(inputs, work / "inputs.safetensors")
    (work / "jobs.json").write_text(json.dumps(jobs))
    files = [str(work / name) for name in ("inputs.safetensors", "jobs.json", "outputs.safetensors")]
    result = subprocess.run([str(python), "-c", runner, *files], capture_output=True, text=True, timeout=seconds(600))
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(work / "outputs.safetensors")
