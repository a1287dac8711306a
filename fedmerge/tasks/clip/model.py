"""CLIP's image encoder with frozen zero-shot heads, from a local Hugging Face model (never downloaded)."""

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedmerge.errors import FedmergeError
from fedmerge.tasks import hub
from fedmerge.tasks.cache import load_or_build
from fedmerge.tasks.hub import quiet

VERSION = 1  # of the heads' computation, in their cache key
TEXT_BATCH = 256
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
FILES = "config.json, model.safetensors (or pytorch_model.bin), the tokenizer's files and preprocessor_config.json"


class ZeroShotCLIP(nn.Module):
    """CLIP's vision tower and visual projection, and one frozen zero-shot head per task.

    ``forward(pixel_values, head)`` gives the logits of task ``head``'s classes: the normalised image
    embedding times the head (rows: the classes' normalised text embeddings times CLIP's logit scale).
    State-dict names are CLIPModel's (``vision_model.*``, ``visual_projection.weight``) plus ``heads.<t>``;
    the heads are parameters with ``requires_grad=False``, so they stay θ0's and never travel.
    """

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, heads: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.heads = nn.ParameterList([nn.Parameter(head, requires_grad=False) for head in heads])

    def forward(self, pixel_values: torch.Tensor, head: int) -> torch.Tensor:
        features = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        return F.normalize(features, dim=-1) @ self.heads[head].T


def model_dir(model: str) -> Path:
    """The directory of ``model``: itself, or its snapshot in the local Hugging Face cache."""
    return hub.model_dir(model, FILES, "CLIP model")


def load_clip(model: str):
    """``(CLIPModel, tokenizer, image processor, directory)`` of ``model`` in float32, from local files only."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    directory = model_dir(model)
    try:
        with quiet():
            clip = CLIPModel.from_pretrained(directory, local_files_only=True, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise FedmergeError(
            f"CLIP model {model!r} could not be loaded from {directory} ({error}); "
            f"it needs {FILES}, as save_pretrained writes them."
        ) from None
    return clip, tokenizer, processor, directory


@torch.no_grad()
def zero_shot_head(clip, tokenizer, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``(classes, dim)``: per class the mean of its prompts' normalised text embeddings, renormalised, times
    the logit scale (CLIP's zero-shot classifier)."""
    prompts = [template.format(name) for name in classes for template in templates]
    length = clip.config.text_config.max_position_embeddings
    embeddings = []
    for start in range(0, len(prompts), TEXT_BATCH):
        tokens = tokenizer(
            prompts[start : start + TEXT_BATCH], padding=True, truncation=True, max_length=length, return_tensors="pt"
        )
        embeddings.append(F.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1))
    per_class = torch.cat(embeddings).reshape(len(classes), len(templates), -1).mean(1)
    return F.normalize(per_class, dim=-1) * clip.logit_scale.exp()


def cached_head(clip, tokenizer, directory: Path, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """:func:`zero_shot_head`, computed once per model, classes and templates, then read from fedmerge's cache."""
    weights = {
        name: [(directory / name).stat().st_size, (directory / name).stat().st_mtime_ns]
        for name in WEIGHTS
        if (directory / name).exists()
    }
    key = {
        "suite": "clip",
        "version": VERSION,
        "model": str(directory.resolve()),
        "weights": weights,
        "classes": list(classes),
        "templates": list(templates),
    }
    return load_or_build("clip-heads", key, lambda: {"head": zero_shot_head(clip, tokenizer, classes, templates)})[
        "head"
    ]
