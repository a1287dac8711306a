"""The ``clip`` suite: CLIP's image encoder fine-tuned on one data set per client, classifying through frozen
zero-shot heads (Task Arithmetic's vision experiment: Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN).

The model comes from a local directory or the local Hugging Face cache, the data from local disk
(:mod:`fedmerge.tasks.clip.data`); nothing downloads. Each task's head is CLIP's zero-shot classifier
(class names × prompt templates through the text encoder, run once and cached), frozen; only the vision
tower and visual projection train, travel and merge. θ0 is the model's own pretrained weights. docs/clip.md.
"""

import copy

import torch.nn.functional as F

from fedmerge.errors import FedmergeError
from fedmerge.tasks.clip.data import Pixels, splits, templates
from fedmerge.tasks.clip.model import ZeroShotCLIP, cached_head, load_clip
from fedmerge.tasks.federation import Federation, Task
from fedmerge.options import Option, boolean, fraction, list_of, positive_int, text

DATASETS = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN")
ALIASES = {name.lower(): name for name in DATASETS} | {"stanfordcars": "Cars", "stanford_cars": "Cars"}


def dataset_names(name: str, value) -> list[str]:
    """Data set names (the 8 known ones in any case, others as folder names under root), without repeats."""
    names = [ALIASES.get(item.lower(), item) for item in list_of(text)(name, value)]
    repeated = next((item for item in names if names.count(item) > 1), None)
    if repeated is not None:
        raise FedmergeError(f"option {name!r} lists {repeated!r} twice; list each data set once (one client each).")
    return names


def hub_sources(name: str, value) -> dict[str, str]:
    """A table of data set name → Hugging Face dataset id (or local dataset folder)."""
    if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) and v for k, v in value.items())):
        raise FedmergeError(
            f"option {name!r} must be a table of data set name → Hugging Face dataset id, got {value!r}."
        )
    return {ALIASES.get(k.lower(), k): v for k, v in value.items()}


DESCRIPTION = (
    "CLIP's image encoder, one data set per client, frozen zero-shot heads (Task Arithmetic's 8 vision tasks)."
)
OPTIONS = {
    "model": Option(
        "openai/clip-vit-base-patch32", "a Hugging Face model name (from the local cache) or a directory", text
    ),
    "datasets": Option(
        list(DATASETS),
        "one client per data set, in order: " + ", ".join(DATASETS) + ", or a folder name under root",
        dataset_names,
    ),
    "root": Option(
        None,
        "the directory holding the data sets (docs/clip.md lists the files); not needed for the "
        "data sets given in 'hub'",
        text,
    ),
    "hub": Option(
        {},
        "data set name → a Hugging Face dataset id read from the local cache (or a local dataset "
        'folder), e.g. {EuroSAT = "tanganke/eurosat"}',
        hub_sources,
    ),
    "val_fraction": Option(0.5, "share of each test split drawn (seeded) as the validation split", fraction),
    "max_examples": Option(None, "at most this many images per split and data set (seeded; quick runs)", positive_int),
    "train_projection": Option(True, "train the visual projection with the vision tower (false: keep θ0's)", boolean),
}


def build(num_clients: int, options: dict, seed: int) -> Federation:
    """Client t fine-tunes on ``options["datasets"][t]`` through head t (see :data:`OPTIONS`)."""
    names, root = options["datasets"], options["root"]
    if len(names) != num_clients:
        raise FedmergeError(
            f"option 'datasets' lists {len(names)} data sets for {num_clients} clients; the clip suite "
            f"has one client per data set: set clients = {len(names)}, or list {num_clients} data sets."
        )
    hub = options["hub"]
    if root is None and any(name not in hub for name in names):
        raise FedmergeError(
            "the clip suite needs option 'root', the directory holding the data sets "
            "(e.g. --set suite_options.root=/data), or each data set in option 'hub'; docs/clip.md "
            "lists the files."
        )
    clip, tokenizer, processor, directory = load_clip(options["model"])
    pixels = Pixels(processor)
    tasks, heads = [], []
    for t, name in enumerate(names):
        train, val, test, classes = splits(
            name, root, pixels, seed, options["val_fraction"], options["max_examples"], hub.get(name)
        )
        tasks.append(Task(name, train, val, test, head=t))
        heads.append(cached_head(clip, tokenizer, directory, classes, templates(name)))
    model = ZeroShotCLIP(clip.vision_model, clip.visual_projection, heads)
    model.visual_projection.requires_grad_(options["train_projection"])
    return Federation(tasks=tasks, model_fn=lambda: copy.deepcopy(model), loss_fn=F.cross_entropy, metric="accuracy")
