"""The vision suite on tiny data sets written here in torchvision's on-disk layouts (nothing downloads)."""

import struct

import numpy as np
import pytest
from PIL import Image

from fedmerge.clients.trainer import TrainConfig, train
from fedmerge.errors import FedmergeError
from fedmerge.tasks import load_suite

FAST = {"pretrain_steps": 30, "width": 4}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    load_suite.cache_clear()
    yield
    load_suite.cache_clear()


def digit_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images: label c lights a block whose position encodes c, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    block = size // 5
    for image, label in zip(images, labels):
        row, col = divmod(int(label), 5)
        image[row * block * 2 : row * block * 2 + block, col * block : col * block + block] = 255
    return images, labels


def write_mnist(root, n_train: int = 400, n_test: int = 200) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = digit_images(n, 28, seed)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def write_folder(folder, classes: int = 3, per_class: int = 8, sizes=(16,), suffix: str = "png") -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            size = sizes[i % len(sizes)]
            pixels = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
            pixels[..., c] = 255
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i}.{suffix}")


def test_mnist_layout_loads_partitions_and_finetunes(tmp_path):
    write_mnist(tmp_path)
    options = {**FAST, "dataset": "MNIST", "root": str(tmp_path), "partition": "pathological", "classes_per_client": 2}
    fed = load_suite("vision", 3, options, 0)
    assert fed.global_test is not None and len(fed.global_test) == 100  # val_fraction 0.5 of 200
    for task in fed.tasks:
        x, y = task.train.tensors
        assert x.shape[1:] == (1, 28, 28) and len(set(y.tolist())) == 2
        assert set(task.test.tensors[1].tolist()) <= set(y.tolist())
    assert len(fed.tasks[0].train) + len(fed.tasks[1].train) + len(fed.tasks[2].train) <= 360  # 10% held out
    model = fed.build_model()
    model.load_state_dict(fed.pretrained)
    before = fed.evaluate(model, fed.tasks[0])["accuracy"]
    train(model, fed.tasks[0], fed.loss, TrainConfig(optimizer="adamw", lr=3e-3, steps=60))
    assert fed.evaluate(model, fed.tasks[0])["accuracy"] > max(before, 0.6)


def test_image_size_and_max_examples(tmp_path):
    write_mnist(tmp_path)
    fed = load_suite(
        "vision", 2, {**FAST, "root": str(tmp_path), "image_size": 12, "max_examples": 100, "partition": "iid"}, 0
    )
    assert fed.tasks[0].train.tensors[0].shape[1:] == (1, 12, 12)
    assert sum(len(t.train) for t in fed.tasks) == 90


def test_eurosat_layout_draws_a_test_split(tmp_path):
    write_folder(tmp_path / "eurosat" / "2750", per_class=10, suffix="jpg")
    fed = load_suite(
        "vision",
        2,
        {**FAST, "dataset": "EuroSAT", "root": str(tmp_path), "partition": "iid", "min_partition_size": 1},
        0,
    )
    assert fed.tasks[0].train.tensors[0].shape[1:] == (3, 16, 16)
    assert len(fed.global_test) == 3  # 20% of 30 drawn for evaluation, half of that for test
    assert fed.evaluate(fed.pretrained, fed.tasks[0])["accuracy"] >= 0


def test_image_folder_with_test_split_and_mixed_sizes(tmp_path):
    write_folder(tmp_path / "train", sizes=(16, 20))
    write_folder(tmp_path / "test", per_class=4, sizes=(16, 20))
    options = {**FAST, "dataset": "ImageFolder", "root": str(tmp_path), "partition": "iid", "min_partition_size": 1}
    with pytest.raises(FedmergeError, match="different sizes; set option 'image_size'"):
        load_suite("vision", 2, options, 0)
    fed = load_suite("vision", 2, {**options, "image_size": 8}, 0)
    assert fed.tasks[1].train.tensors[0].shape[1:] == (3, 8, 8)
    assert len(fed.global_test) == 6 and set(fed.global_test.tensors[1].tolist()) <= {0, 1, 2}  # half of test/


def test_missing_data_names_the_root_and_the_layout(tmp_path):
    with pytest.raises(FedmergeError, match="needs option 'root'"):
        load_suite("vision", 2, {"dataset": "CIFAR10"}, 0)
    for dataset, layout in (
        ("MNIST", "MNIST/raw/train-images-idx3-ubyte"),
        ("CIFAR10", "cifar-10-batches-py"),
        ("EuroSAT", "eurosat/2750/<class>"),
        ("ImageFolder", "root/train/<class>"),
    ):
        with pytest.raises(
            FedmergeError, match=f"{dataset!r} not found under root '{tmp_path}'.*{layout}.*never downloads"
        ):
            load_suite("vision", 2, {"dataset": dataset, "root": str(tmp_path)}, 0)


def test_an_image_folder_of_one_class_is_refused(tmp_path):
    write_folder(tmp_path / "train", classes=1)
    options = {**FAST, "dataset": "ImageFolder", "root": str(tmp_path), "partition": "iid", "min_partition_size": 1}
    with pytest.raises(FedmergeError, match=r"holds 1 class folder \(class0\); a classifier needs at least two"):
        load_suite("vision", 2, options, 0)
