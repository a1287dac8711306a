"""The ``vision`` suite: image classification from torchvision data sets or an image folder on LOCAL disk,
label-skewed clients, a small CNN. Nothing is downloaded (``download=False`` always).

Expected layouts under ``root`` (torchvision's own):

- ``MNIST`` / ``FashionMNIST`` / ``KMNIST``: ``root/<name>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
  (uncompressed; or the ``.gz`` files, which torchvision unpacks).
- ``CIFAR10``: ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (md5-checked).
- ``SVHN``: ``root/{train,test}_32x32.mat`` (md5-checked).
- ``EuroSAT``: ``root/eurosat/2750/<class>/*.jpg`` (no test split: one is drawn).
- ``ImageFolder`` (your own data): ``root/train/<class>/<image>`` and optionally ``root/test/<class>/<image>``
  (without ``test/`` a test split is drawn); without ``train/``, ``root/<class>/<image>``.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedmerge.errors import FedmergeError
from fedmerge.tasks import classification
from fedmerge.tasks.federation import Federation
from fedmerge.tasks.models import cnn
from fedmerge.options import Option, choice, positive_int, text
from fedmerge.tasks.partition import PARTITION_OPTIONS, PARTITIONS, split_indices

VERSION = 1
EVAL_FRACTION = 0.2  # share drawn as the evaluation pool when the data has no test split
DATASETS = ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "SVHN", "EuroSAT", "ImageFolder")
LAYOUTS = {
    "MNIST": "root/MNIST/raw/train-images-idx3-ubyte (+ train-labels-idx1-ubyte, t10k-*)",
    "FashionMNIST": "root/FashionMNIST/raw/train-images-idx3-ubyte (+ train-labels-idx1-ubyte, t10k-*)",
    "KMNIST": "root/KMNIST/raw/train-images-idx3-ubyte (+ train-labels-idx1-ubyte, t10k-*)",
    "CIFAR10": "root/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta (original files)",
    "SVHN": "root/train_32x32.mat and root/test_32x32.mat (original files)",
    "EuroSAT": "root/eurosat/2750/<class>/*.jpg",
    "ImageFolder": "root/train/<class>/<image> (optionally root/test/<class>/<image>)",
}

OPTIONS = {
    "dataset": Option("MNIST", " | ".join(DATASETS), choice(*DATASETS)),
    "root": Option(None, "directory holding the data in torchvision's layout (required)", text),
    "partition": Option("dirichlet", "iid | dirichlet | pathological", choice(*PARTITIONS)),
    **PARTITION_OPTIONS,
    "image_size": Option(None, "resize images to this square size (required for folders of mixed sizes)", positive_int),
    "max_examples": Option(None, "use at most this many training and this many evaluation images", positive_int),
    "width": Option(16, "channels of the CNN's first conv layer (doubled in the second)", positive_int),
    **classification.pretrain_options(0.1, 200),
}
DESCRIPTION = "torchvision data sets or your own image folder from local disk, label-skewed clients; small CNN."


def _missing(dataset: str, root: str, error: Exception) -> FedmergeError:
    return FedmergeError(
        f"vision data set {dataset!r} not found under root {root!r} ({error}); expected {LAYOUTS[dataset]}. "
        "fedmerge never downloads: put the files there, or point option 'root' at them."
    )


def _torchvision(dataset: str, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) and int64 labels of a torchvision data set with a train / test split."""
    import torchvision.datasets as tvd

    if dataset == "SVHN":
        data = tvd.SVHN(root, split="train" if train else "test", download=False)
        return torch.from_numpy(data.data), torch.from_numpy(data.labels).long()
    data = getattr(tvd, dataset)(root, train=train, download=False)
    if dataset == "CIFAR10":
        return torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(data.targets)
    return data.data.unsqueeze(1), data.targets.long()


def _folder(
    path: Path, image_size: int | None, max_examples: int | None, seed: int, classes: dict[str, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """RGB uint8 images (N, 3, H, W), labels and the class → label map of an image folder."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(path))
    if classes is None and len(folder.classes) < 2:
        raise FedmergeError(
            f"{path} holds {len(folder.classes)} class folder ({', '.join(folder.classes)}); a classifier "
            "needs at least two: put each class's images in a folder of its own under it."
        )
    classes = classes or folder.class_to_idx
    unknown = sorted(set(folder.class_to_idx) - set(classes))
    if unknown:
        raise FedmergeError(f"{path} has class folder {unknown[0]!r} that the training folder lacks; remove it.")
    samples = folder.samples
    if max_examples is not None and len(samples) > max_examples:
        keep = np.sort(np.random.default_rng([seed, 5]).permutation(len(samples))[:max_examples])
        samples = [samples[i] for i in keep]
    images, labels = [], []
    for file, label in samples:
        image = folder.loader(file).convert("RGB")
        if image_size is not None:
            image = image.resize((image_size, image_size))
        images.append(np.asarray(image))
        labels.append(classes[folder.classes[label]])
    if len({im.shape for im in images}) > 1:
        raise FedmergeError(f"images under {path} have different sizes; set option 'image_size' to resize them.")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels), classes


def read(dataset: str, root: str, image_size: int | None, max_examples: int | None, seed: int):
    """((train images, labels), (test images, labels) or None), images as uint8 (N, C, H, W)."""
    path = Path(root).expanduser()
    if dataset in ("EuroSAT", "ImageFolder"):
        base = path / "eurosat" / "2750" if dataset == "EuroSAT" else path
        train_dir = base / "train" if (base / "train").is_dir() else base
        if not train_dir.is_dir():
            raise _missing(dataset, root, FileNotFoundError(f"no directory {train_dir}"))
        try:
            x, y, classes = _folder(train_dir, image_size, max_examples, seed)
            test = (
                _folder(base / "test", image_size, max_examples, seed + 1, classes)[:2]
                if (base / "test").is_dir()
                else None
            )
        except (FileNotFoundError, OSError) as error:
            raise _missing(dataset, root, error) from error
        return (x, y), test
    try:
        return _torchvision(dataset, str(path), True), _torchvision(dataset, str(path), False)
    except RuntimeError as error:
        raise _missing(dataset, root, error) from error


def _cap(data: tuple[torch.Tensor, torch.Tensor], max_examples: int | None, seed: int):
    if max_examples is None or len(data[1]) <= max_examples:
        return data
    keep = torch.from_numpy(np.sort(np.random.default_rng([seed, 6]).permutation(len(data[1]))[:max_examples]))
    return data[0][keep], data[1][keep]


def build(num_clients: int, options: dict, seed: int) -> Federation:
    """The federation for resolved ``options`` (see :data:`OPTIONS`)."""
    dataset, root, size, cap = options["dataset"], options["root"], options["image_size"], options["max_examples"]
    if root is None:
        raise FedmergeError(f"the vision suite needs option 'root': the directory holding {LAYOUTS[dataset]}.")
    train, test = read(dataset, root, size, cap, seed)
    if test is None:
        evaluation_index, pool_index = split_indices(len(train[1]), EVAL_FRACTION, seed + 7)
        train, test = (
            (train[0][pool_index], train[1][pool_index]),
            (train[0][evaluation_index], train[1][evaluation_index]),
        )
    train, test = _cap(train, cap, seed), _cap(test, cap, seed + 1)
    x, x_test = train[0].float() / 255, test[0].float() / 255
    if size is not None and x.shape[-1] != size:
        x, x_test = (F.interpolate(t, size=(size, size), mode="bilinear", antialias=True) for t in (x, x_test))
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    x, x_test = (x - mean) / std, (x_test - mean) / std
    num_classes = int(max(train[1].max(), test[1].max())) + 1
    key = {
        "suite": "vision",
        "version": VERSION,
        "seed": seed,
        "root": str(Path(root).expanduser().resolve()),
        **{
            k: options[k]
            for k in (
                "dataset",
                "image_size",
                "max_examples",
                "width",
                "pretrain_fraction",
                "pretrain_steps",
                "pretrain_lr",
            )
        },
    }
    return classification.label_skewed(
        "vision",
        (x, train[1]),
        (x_test, test[1]),
        num_clients,
        options,
        seed,
        lambda: cnn(x.shape[1], options["width"], num_classes),
        key,
    )
