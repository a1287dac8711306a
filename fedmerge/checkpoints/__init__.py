"""Offline merging of real checkpoints: streaming checkpoint I/O feeding :mod:`fedmerge.merging`. No Flower.

``merge_checkpoints(base, models, out, method=...)`` is the Python API behind ``fedmerge merge``;
:class:`Checkpoint` opens a safetensors or PyTorch checkpoint (file or Hugging Face directory) as a lazy
name → tensor mapping.
"""

from fedmerge.checkpoints.adapters import BaseMismatch
from fedmerge.checkpoints.merge import ModelLeftOut, merge_checkpoints
from fedmerge.checkpoints.methods import METHODS
from fedmerge.checkpoints.reader import Checkpoint

__all__ = ["METHODS", "BaseMismatch", "Checkpoint", "ModelLeftOut", "merge_checkpoints"]
