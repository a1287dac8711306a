"""A fedmerge suite of your own: a small torchvision Vision Transformer fine-tuned on image folders.

`fedmerge run experiment.toml` in this folder finds :func:`build` through ``suite = "my_tasks:build"``
(this folder is searched because the experiment file is in it). The images are textures of four kinds,
drawn once into ``data/`` (a few hundred 16×16 PNGs, about 200 KB). Each client fine-tunes on two of the
four kinds (a label skew), starting from θ0, a ViT pretrained briefly on images no client sees. The
patch embedding is frozen: it never leaves θ0, so it is neither sent nor merged.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Subset
from torchvision.datasets import ImageFolder
from torchvision.models import VisionTransformer
from torchvision.transforms import v2

from fedmerge.errors import FedmergeError
from fedmerge.files import staged
from fedmerge.tasks import Federation, Option, Task
from fedmerge.tasks.options import boolean, non_negative_int, positive_int
from fedmerge.tasks.pretrain import pretrain

DATA = Path(__file__).parent / "data"
KINDS = ("checker", "diagonal", "horizontal", "vertical")  # the class folders, in ImageFolder's (sorted) order
SIZE = 16

DESCRIPTION = "Textures in image folders, two kinds per client; a small torchvision ViT (example suite)."
OPTIONS = {
    "images_per_kind": Option(60, "training images of each kind (and a third as many for testing)", positive_int),
    "pretrain_steps": Option(40, "Adam steps pretraining θ0 on the held-out quarter of the training images",
                             non_negative_int),
    "freeze_patch_embedding": Option(True, "keep the ViT's patch embedding at θ0 (it is then never sent)", boolean),
}


def texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One 16×16 RGB image of ``kind`` with a random period, phase and colours, plus noise."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    period, phase = rng.integers(3, 7), rng.integers(0, 6)
    coordinate = {"horizontal": y, "vertical": x, "diagonal": x + y, "checker": x // 2 + y // 2}[kind]
    mask = ((coordinate + phase) // (period if kind != "checker" else 1)) % 2
    colours = rng.integers(0, 256, size=(2, 3))
    image = np.where(mask[..., None] == 1, colours[0], colours[1]) + rng.normal(0, 12, (SIZE, SIZE, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def draw_images(root: Path, per_kind: int) -> Path:
    """``<root>/<per_kind>/{train,test}/<kind>/*.png``, drawn once (the same images every time) and put in
    place whole, so that clients starting together never see half a folder."""
    target = root / str(per_kind)
    if not target.exists():
        rng = np.random.default_rng(0)
        try:
            with staged(target, directory=True) as staging:
                for split, count in (("train", per_kind), ("test", max(1, per_kind // 3))):
                    for kind in KINDS:
                        (staging / split / kind).mkdir(parents=True)
                        for i in range(count):
                            Image.fromarray(texture(kind, rng)).save(staging / split / kind / f"{i:04d}.png")
        except FedmergeError:  # another process put the same images in place first
            pass
    return target


def vit(freeze_patch_embedding: bool) -> torch.nn.Module:
    model = VisionTransformer(image_size=SIZE, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=len(KINDS))
    model.conv_proj.requires_grad_(not freeze_patch_embedding)
    return model


def build(num_clients: int, options: dict, seed: int) -> Federation:
    """Client t learns kinds t and t+1 (mod 4) from its own training images; val and test follow its kinds."""
    root = draw_images(DATA, options["images_per_kind"])
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)])
    train, evaluation = ImageFolder(root / "train", to_tensor), ImageFolder(root / "test", to_tensor)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    held_out, rest = order[: len(order) // 4], order[len(order) // 4:]
    halves = np.array_split(rng.permutation(len(evaluation)), 2)

    def of_kinds(dataset: ImageFolder, indices: np.ndarray, kinds: set[int]) -> Subset:
        return Subset(dataset, [int(i) for i in indices if dataset.targets[i] in kinds])

    tasks = []
    for t in range(num_clients):
        kinds = {t % len(KINDS), (t + 1) % len(KINDS)}
        name = "+".join(KINDS[k] for k in sorted(kinds))
        tasks.append(Task(name, of_kinds(train, rest, kinds), of_kinds(evaluation, halves[0], kinds),
                          of_kinds(evaluation, halves[1], kinds)))

    def pretrained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return pretrain(model, [(Subset(train, held_out.tolist()), None)], F.cross_entropy,
                        options["pretrain_steps"], lr=3e-3, seed=seed, batch_size=32)

    return Federation(
        tasks=tasks,
        model_fn=lambda: vit(options["freeze_patch_embedding"]),
        loss_fn=F.cross_entropy,
        metric="accuracy",
        theta0=pretrained,
        cache_key={"suite": "custom-suite-example", "seed": seed, **options},
        global_test=Subset(evaluation, halves[1].tolist()),
    )
