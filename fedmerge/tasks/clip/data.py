"""The clip suite's data sets from local disk: torchvision's layouts, image folders, or Hugging Face datasets saved
with ``save_to_disk``. Nothing downloads (``download=False`` always).

Under ``root``, a data set called NAME is read from, in this order:

- ``root/NAME/dataset_dict.json``: a Hugging Face ``DatasetDict`` saved with ``save_to_disk`` (splits ``train``
  and, if there is one, ``test``; the first Image column, the label column);
- for the torchvision data sets, torchvision's own layout (:data:`LAYOUTS`);
- otherwise an image folder ``root/NAME/<class>/<image>``, or ``root/NAME/{train,test}/<class>/<image>``.

Splits: the data set's train split trains; its test split is halved (seeded) into val and test
(``val_fraction``). Where there is no test split, a seeded share (:data:`HELD_OUT`) is drawn as one first.
"""

import zlib
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from fedmerge.config import tomllib
from fedmerge.errors import FedmergeError
from fedmerge.threads import single_threaded

TORCHVISION = {
    "Cars": "root/stanford_cars/{devkit/cars_meta.mat, cars_train/, cars_test/, cars_test_annos_withlabels.mat}",
    "DTD": "root/dtd/dtd/{images/<class>/, labels/train1.txt, val1.txt, test1.txt}",
    "EuroSAT": "root/eurosat/2750/<Class>/*.jpg",
    "GTSRB": "root/gtsrb/GTSRB/Training/<class>/, root/gtsrb/GTSRB/Final_Test/Images/, root/gtsrb/GT-final_test.csv",
    "MNIST": "root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    "SUN397": "root/SUN397/{ClassName.txt, <letter>/<class>/sun_*.jpg} (with Training_01.txt and Testing_01.txt: "
    "the official partition 1)",
    "SVHN": "root/train_32x32.mat and root/test_32x32.mat",
}
"""torchvision's layout of each data set it has (the files its ``download=True`` leaves under ``root``)."""
FOLDERS = {"RESISC45": ("RESISC45", "resisc45", "NWPU-RESISC45")}
"""Folder names tried under ``root`` for an image-folder data set (any other NAME: ``root/NAME``)."""
HELD_OUT = {"EuroSAT": 0.2, "RESISC45": 0.4, "SUN397": 0.5}
"""Share drawn as the test split where a data set has none (Task Arithmetic's 80/10/10, 60/20/20, 50/50)."""
DEFAULT_HELD_OUT = 0.2


@cache
def prompts() -> dict:
    """The shipped class names and templates (``prompts.toml``), by data set."""
    return tomllib.loads(resources.files(__package__).joinpath("prompts.toml").read_text())


def templates(name: str) -> list[str]:
    return prompts().get(name, prompts()["default"])["templates"]


def readable(label: str) -> str:
    """A folder or label name as a prompt reads it: ``apartment_building/outdoor`` → ``apartment building outdoor``."""
    return label.replace("_", " ").replace("/", " ").strip()


class Pixels:
    """CLIP's image processor in two steps: :meth:`crop` (its resize and center crop, as uint8) and
    :meth:`normalize` (its rescale and normalisation); together exactly the processor's pixel values."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.scale = processor.rescale_factor if processor.do_rescale else 1.0
        mean, std = (processor.image_mean, processor.image_std) if processor.do_normalize else (0.0, 1.0)
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (mean, std))

    def crop(self, image) -> torch.Tensor:
        """A PIL image (grayscale too) → ``(3, H, W)`` uint8, single-threaded (:mod:`fedmerge.threads`)."""
        with single_threaded():
            return self.processor(
                images=image.convert("RGB"), do_rescale=False, do_normalize=False, return_tensors="pt"
            )["pixel_values"][0]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() * self.scale - self.mean) / self.std


class Split(Dataset):
    """``(pixel values, label)`` pairs of a data set whose transform is :meth:`Pixels.crop`. With ``keep``, each
    crop is kept (uint8) after its first read: evaluation reads val and test at every λ, decoding them once."""

    def __init__(self, data: Dataset, pixels: Pixels, keep: bool = False) -> None:
        self.data, self.pixels, self.kept = data, pixels, {} if keep else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        item = self.kept.get(index) if self.kept is not None else None
        if item is None:
            item = self.data[index]
            if self.kept is not None:
                self.kept[index] = item
        return self.pixels.normalize(item[0]), item[1]


class Processed(Dataset):
    """A Hugging Face dataset's ``(image, label)`` rows, the image through ``transform``."""

    def __init__(self, data, transform: Callable) -> None:
        from datasets import ClassLabel, Image

        features = data.features
        self.data, self.transform = data, transform
        self.image = next((k for k, f in features.items() if isinstance(f, Image)), "image")
        self.label = next((k for k, f in features.items() if isinstance(f, ClassLabel)), "label")
        if self.image not in features or self.label not in features:
            raise FedmergeError(
                f"a saved Hugging Face dataset needs an image and a label column; it has {list(features)}."
            )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        row = self.data[int(index)]
        return self.transform(row[self.image]), int(row[self.label])


def _saved(path: Path, transform: Callable):
    from datasets import load_from_disk

    return _dataset_dict(load_from_disk(str(path)), str(path), transform)


def _hub(source: str, transform: Callable):
    """A Hugging Face dataset by hub id, from the local cache (nothing downloads with HF_HUB_OFFLINE=1), or a
    local dataset folder ``datasets.load_dataset`` reads (e.g. parquet files named train-*/test-*)."""
    from datasets import load_dataset

    return _dataset_dict(load_dataset(source), source, transform)


def _dataset_dict(data, where: str, transform: Callable):
    if "train" not in data:
        raise FedmergeError(f"the Hugging Face dataset {where} has no 'train' split (it has {list(data)}).")
    train = Processed(data["train"], transform)
    names = getattr(data["train"].features[train.label], "names", None)
    return train, Processed(data["test"], transform) if "test" in data else None, names


def _torchvision(name: str, root: Path, transform: Callable):
    import torchvision.datasets as tvd

    options = {"transform": transform, "download": False}
    if name == "MNIST":
        train = tvd.MNIST(root, train=True, **options)
        return train, tvd.MNIST(root, train=False, **options), None
    if name in ("SVHN", "GTSRB"):
        data = getattr(tvd, name)
        return data(root, split="train", **options), data(root, split="test", **options), None
    if name == "Cars":
        train = tvd.StanfordCars(root, split="train", **options)
        return train, tvd.StanfordCars(root, split="test", **options), train.classes
    if name == "DTD":
        train = ConcatDataset([tvd.DTD(root, split=split, **options) for split in ("train", "val")])
        return train, tvd.DTD(root, split="test", **options), train.datasets[0].classes
    if name == "EuroSAT":
        data = tvd.EuroSAT(root, **options)
        return data, None, data.classes
    data = tvd.SUN397(root, **options)
    return *_sun397_partition(data, root / "SUN397"), data.classes


def _sun397_partition(data, folder: Path) -> tuple[Dataset, Dataset | None]:
    """SUN397's official partition 1 (Training_01.txt, Testing_01.txt: 50 + 50 images per class) where present."""
    lists = [folder / "Training_01.txt", folder / "Testing_01.txt"]
    if not all(file.is_file() for file in lists):
        return data, None
    index = {"/" + path.relative_to(folder).as_posix(): i for i, path in enumerate(data._image_files)}
    train, test = ([index[line] for line in file.read_text().split() if line in index] for file in lists)
    return Subset(data, train), Subset(data, test)


def _folder(base: Path, transform: Callable):
    from torchvision.datasets import ImageFolder

    if not (base / "train").is_dir():
        data = ImageFolder(base, transform)
        return data, None, data.classes
    train = ImageFolder(base / "train", transform)
    test = ImageFolder(base / "test", transform) if (base / "test").is_dir() else None
    if test is not None and test.classes != train.classes:
        raise FedmergeError(f"{base}/test has other class folders than {base}/train; give both the same classes.")
    return train, test, train.classes


def expected(name: str) -> str:
    """The files data set ``name`` is looked for as, for error messages."""
    folders = FOLDERS.get(name, (name,))
    layouts = [f"root/{folders[0]}/dataset_dict.json (a Hugging Face dataset saved with save_to_disk)"]
    if name in TORCHVISION:
        layouts.append(f"{TORCHVISION[name]} (torchvision's layout)")
    else:
        layouts.append(
            f"root/{' or root/'.join(folders)} holding <class>/<image> or train/<class>/<image> "
            "(+ test/<class>/<image>)"
        )
    return "; or ".join(layouts)


def read(
    name: str, root: str | None, transform: Callable, hub: str | None = None
) -> tuple[Dataset, Dataset | None, list[str]]:
    """``(train, test or None, class names in label order)`` of data set ``name``: the Hugging Face dataset
    ``hub`` when given, else under ``root``."""
    if hub is not None:
        try:
            train, test, own = _hub(hub, transform)
        except FedmergeError:
            raise
        except Exception as error:  # datasets raises many kinds for a dataset it cannot find offline
            raise FedmergeError(
                f"data set {name!r}: the Hugging Face dataset {hub!r} cannot be read ({type(error).__name__}: {error}); "
                'it must be in the local cache (fetch it once where there is network: python -c "import datasets; '
                f"datasets.load_dataset('{hub}')\") or be a local dataset folder."
            ) from None
        return train, test, _class_names(name, hub, own)
    base = Path(root).expanduser()
    folders = [base / folder for folder in FOLDERS.get(name, (name,))]
    saved = next((f for f in folders if (f / "dataset_dict.json").is_file()), None)
    try:
        if saved is not None:
            train, test, own = _saved(saved, transform)
        elif name in TORCHVISION:
            train, test, own = _torchvision(name, base, transform)
        else:
            folder = next((f for f in folders if f.is_dir()), None)
            if folder is None:
                raise FileNotFoundError(f"no directory {' or '.join(map(str, folders))}")
            train, test, own = _folder(folder, transform)
    except (RuntimeError, OSError) as error:
        reason = str(error).split(". You can use download=True")[0]  # torchvision's advice does not apply
        raise FedmergeError(
            f"data set {name!r} not found under root {str(base)!r} ({reason}); expected {expected(name)}. fedmerge never "
            "downloads: docs/clip.md says where to get each data set, or point option 'root' at it."
        ) from None
    return train, test, _class_names(name, base, own)


def _class_names(name: str, where, own: list[str] | None) -> list[str]:
    """The suite's class names for ``name`` where it lists them (checked against the data's count), else the data's."""
    listed = prompts().get(name, {}).get("classes")
    if listed and own and len(listed) != len(own):
        raise FedmergeError(
            f"data set {name!r} in {where} has {len(own)} classes, but the clip suite's class names "
            f"for {name} are {len(listed)}; is it another data set?"
        )
    return listed or [readable(label) for label in own or ()]


def splits(
    name: str,
    root: str | None,
    pixels: Pixels,
    seed: int,
    val_fraction: float,
    max_examples: int | None,
    hub: str | None = None,
):
    """``(train, val, test, class names)`` of data set ``name``: the test split halved (seeded) into val and
    test, each split cut to ``max_examples`` (seeded) when given; val and test keep their images once read."""
    train, test, classes = read(name, root, pixels.crop, hub)
    if not classes:
        raise FedmergeError(f"data set {name!r} has no class names: its data gives none and the clip suite lists none.")
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if test is None:
        order = rng.permutation(len(train))
        held = round(HELD_OUT.get(name, DEFAULT_HELD_OUT) * len(train))
        train, test = Subset(train, np.sort(order[held:]).tolist()), Subset(train, np.sort(order[:held]).tolist())
    order = rng.permutation(len(test))
    size = round(val_fraction * len(test))
    val, test = Subset(test, np.sort(order[:size]).tolist()), Subset(test, np.sort(order[size:]).tolist())

    def cut(data: Dataset) -> Dataset:
        if max_examples is None or len(data) <= max_examples:
            return data
        return Subset(data, np.sort(rng.permutation(len(data))[:max_examples]).tolist())

    return Split(cut(train), pixels), Split(cut(val), pixels, keep=True), Split(cut(test), pixels, keep=True), classes
