"""The clip suite offline: a tiny CLIP saved with save_pretrained, tiny data sets in torchvision's MNIST and EuroSAT
layouts, an image folder and a saved Hugging Face dataset, all written here (nothing downloads)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_vision_suite import write_mnist  # torchvision's MNIST layout
from torch.utils.data import default_collate

from fedmerge.errors import FedmergeError
from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec
from fedmerge.tasks import forward, load_suite
from fedmerge.tasks.clip.data import Pixels, prompts
from fedmerge.tasks.clip.model import load_clip, zero_shot_head

EUROSAT = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)


def tiny_clip(folder) -> None:
    """A 2-layer, width-32 CLIP on 32×32 images with a character-level tokenizer, saved as a model directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 .,:\"'!-/")):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokens = {
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, **tokens, "vocab_size": len(vocab)},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def write_folder(folder, classes, per_class: int, size: int = 40, suffix: str = "jpg") -> None:
    rng = np.random.default_rng(len(classes))
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
            pixels[..., c % 3] = 25 * c
            Image.fromarray(pixels).save(folder / name / f"{i}.{suffix}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(model directory, data root): MNIST, EuroSAT (10 classes × 4), Textures (train/ and test/ folders, 3 classes)."""
    model, root = tmp_path_factory.mktemp("tiny-clip"), tmp_path_factory.mktemp("data")
    tiny_clip(model)
    write_mnist(root, 60, 40)
    write_folder(root / "eurosat" / "2750", EUROSAT, 4)
    write_folder(root / "Textures" / "train", ("dots", "rough_stripes", "waves"), 4, suffix="png")
    write_folder(root / "Textures" / "test", ("dots", "rough_stripes", "waves"), 2, suffix="png")
    return str(model), str(root)


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_suite.cache_clear()
    yield
    load_suite.cache_clear()


def options(assets, *datasets, **more):
    model, root = assets
    return {"model": model, "root": root, "datasets": list(datasets), **more}


def test_heads_are_frozen_and_only_the_image_encoder_travels(assets):
    fed = load_suite("clip", 3, options(assets, "mnist", "EuroSAT", "Textures"), 0)
    model = fed.build_model()
    heads = {name for name, p in model.named_parameters() if name.startswith("heads.")}
    assert heads == {"heads.0", "heads.1", "heads.2"}
    assert not any(p.requires_grad for name, p in model.named_parameters() if name in heads)
    assert not heads & set(fed.trained_names) and "visual_projection.weight" in fed.trained_names
    assert all(name.startswith(("vision_model.", "visual_projection.")) for name in fed.trained_names)
    clip = load_clip(assets[0])[0]
    assert torch.equal(fed.pretrained["visual_projection.weight"], clip.visual_projection.weight)  # θ0: its own
    expected = zero_shot_head(
        clip, load_clip(assets[0])[1], prompts()["MNIST"]["classes"], prompts()["MNIST"]["templates"]
    )
    torch.testing.assert_close(fed.pretrained["heads.0"], expected)
    torch.testing.assert_close(expected.norm(dim=1), clip.logit_scale.exp().expand(10).detach())
    for task, classes in zip(fed.tasks, (10, 10, 3)):
        x = default_collate([task.train[i] for i in range(4)])[0]
        assert x.shape == (4, 3, 32, 32) and forward(model, x, task.head).shape == (4, classes)


def test_splits_follow_the_layouts_and_the_seed(assets):
    fed = load_suite("clip", 3, options(assets, "MNIST", "EuroSAT", "Textures"), 0)
    sizes = [tuple(len(task.split(s)) for s in ("train", "val", "test")) for task in fed.tasks]
    assert sizes == [(60, 20, 20), (32, 4, 4), (12, 3, 3)]  # test halved; EuroSAT: 20% drawn as test first
    again = load_suite("clip", 3, options(assets, "MNIST", "EuroSAT", "Textures", val_fraction=0.25), 0)
    assert [len(task.val) for task in again.tasks] == [10, 2, 2]
    cut = load_suite("clip", 2, options(assets, "MNIST", "EuroSAT", max_examples=5), 1)
    assert [len(task.train) for task in cut.tasks] == [5, 5] and len(cut.tasks[0].test) == 5
    other = load_suite("clip", 2, options(assets, "MNIST", "EuroSAT"), 1)
    assert other.tasks[1].val.data.indices != fed.tasks[1].val.data.indices  # another seed, another draw
    first = fed.tasks[1].test[2]
    assert list(fed.tasks[1].test.kept) == [2] and torch.equal(fed.tasks[1].test[2][0], first[0])  # decoded once


def test_pixels_are_the_image_processors(assets):
    processor = load_clip(assets[0])[2]
    pixels = Pixels(processor)
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 60)).astype(np.uint8))
    crop = pixels.crop(gray)
    assert crop.dtype == torch.uint8 and crop.shape == (3, 32, 32)
    expected = processor(images=gray.convert("RGB"), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels.normalize(crop), expected)


def test_a_saved_hugging_face_dataset_is_read(assets, tmp_path):
    from datasets import ClassLabel, DatasetDict, Features
    from datasets import Dataset as HFDataset
    from datasets import Image as HFImage

    rng = np.random.default_rng(0)
    features = Features({"image": HFImage(), "label": ClassLabel(names=["tabby_cat", "dog"])})

    def split(n):
        images = [Image.fromarray(rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)) for _ in range(n)]
        return HFDataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)

    DatasetDict({"train": split(6), "test": split(4)}).save_to_disk(tmp_path / "Pets")
    fed = load_suite("clip", 1, {"model": assets[0], "root": str(tmp_path), "datasets": ["Pets"]}, 0)
    x, y = fed.tasks[0].train[0]
    assert x.shape == (3, 32, 32) and y in (0, 1) and len(fed.tasks[0].val) == 2
    assert fed.pretrained["heads.0"].shape == (2, 16)


def test_a_hugging_face_dataset_by_id_or_local_folder_is_read_through_load_dataset(assets, tmp_path):
    """Option 'hub': datasets.load_dataset's path, here a local folder of parquet files (a hub id is read the
    same way, from the local cache); the other data set still comes from root."""
    from datasets import ClassLabel, Features
    from datasets import Dataset as HFDataset
    from datasets import Image as HFImage

    rng = np.random.default_rng(1)
    features = Features({"image": HFImage(), "label": ClassLabel(names=list(EUROSAT))})
    folder = tmp_path / "eurosat-parquet"
    folder.mkdir()
    for split, n in (("train", 20), ("test", 10)):
        images = [Image.fromarray(rng.integers(0, 255, (24, 24, 3)).astype(np.uint8)) for _ in range(n)]
        HFDataset.from_dict({"image": images, "label": [i % 10 for i in range(n)]}, features=features).to_parquet(
            folder / f"{split}-00000-of-00001.parquet"
        )
    options = {"model": assets[0], "root": assets[1], "datasets": ["MNIST", "eurosat"], "hub": {"EuroSAT": str(folder)}}
    fed = load_suite("clip", 2, options, 0)
    x, y = fed.tasks[1].train[0]
    assert fed.tasks[1].name == "EuroSAT" and x.shape == (3, 32, 32) and 0 <= y < 10
    assert len(fed.tasks[1].train) == 20 and len(fed.tasks[1].val) + len(fed.tasks[1].test) == 10
    assert fed.pretrained["heads.1"].shape == (10, 16)
    with pytest.raises(FedmergeError, match=r"data set 'EuroSAT': the Hugging Face dataset .*nowhere.* cannot be read"):
        load_suite(
            "clip", 1, {"model": assets[0], "datasets": ["EuroSAT"], "hub": {"EuroSAT": str(tmp_path / "nowhere")}}, 0
        )


def test_sun397_reads_its_class_names_and_its_official_partition(assets, tmp_path):
    sun = tmp_path / "SUN397"
    write_folder(sun / "a", ("abbey",), 4)
    write_folder(sun / "a" / "apartment_building", ("outdoor",), 4)
    for path in sun.rglob("*.jpg"):
        path.rename(path.with_name(f"sun_{path.name}"))
    (sun / "ClassName.txt").write_text("/a/abbey\n/a/apartment_building/outdoor\n")
    drawn = load_suite("clip", 1, {"model": assets[0], "root": str(tmp_path), "datasets": ["SUN397"]}, 0)
    assert [len(drawn.tasks[0].split(s)) for s in ("train", "val", "test")] == [4, 2, 2]  # half drawn as test
    files = sorted("/" + p.relative_to(sun).as_posix() for p in sun.rglob("sun_*.jpg"))
    (sun / "Training_01.txt").write_text("\n".join(files[0:3] + files[4:7]))
    (sun / "Testing_01.txt").write_text("\n".join(files[3:4] + files[7:8]))
    load_suite.cache_clear()
    fed = load_suite("clip", 1, {"model": assets[0], "root": str(tmp_path), "datasets": ["sun397"]}, 0)
    assert [len(fed.tasks[0].split(s)) for s in ("train", "val", "test")] == [6, 1, 1]
    clip, tokenizer = load_clip(assets[0])[:2]
    expected = zero_shot_head(
        clip, tokenizer, ["abbey", "apartment building outdoor"], prompts()["SUN397"]["templates"]
    )
    torch.testing.assert_close(fed.pretrained["heads.0"], expected)


def test_a_data_set_with_other_classes_than_the_suites_is_refused(assets, tmp_path):
    write_folder(tmp_path / "NWPU-RESISC45", ("airplane", "airport"), 2)
    with pytest.raises(FedmergeError, match="has 2 classes, but the clip suite's class names for RESISC45 are 45"):
        load_suite("clip", 1, {"model": assets[0], "root": str(tmp_path), "datasets": ["RESISC45"]}, 0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "/nowhere/tiny-clip"}, "CLIP model: the model directory /nowhere/tiny-clip does not exist"),
        (
            {"model": "someone/no-such-clip"},
            "'someone/no-such-clip' is neither a directory nor in the local Hugging Face cache",
        ),
        ({"datasets": ["MNIST", "SVHN"]}, "data set 'SVHN' not found under root"),
        ({"datasets": ["MNIST", "RESISC45"]}, "NWPU-RESISC45"),
        ({"datasets": ["MNIST"]}, "lists 1 data sets for 2 clients"),
        ({"datasets": ["MNIST", "mnist"]}, "lists 'MNIST' twice"),
    ],
)
def test_mistakes_are_named(assets, change, message):
    with pytest.raises(FedmergeError, match=message):
        load_suite("clip", 2, {**options(assets, "MNIST", "EuroSAT"), **change}, 0)


def test_a_missing_data_set_names_the_files_expected(assets):
    with pytest.raises(FedmergeError) as error:
        load_suite("clip", 1, options(assets, "SVHN"), 0)
    assert (
        assets[1] in str(error.value) and "train_32x32.mat" in str(error.value) and "docs/clip.md" in str(error.value)
    )


@pytest.fixture(scope="module")
def clip_run(assets, tmp_path_factory):
    """One `fedmerge run` on Flower's simulation runtime: MNIST and EuroSAT clients, one-shot and 2 rounds."""
    out = tmp_path_factory.mktemp("runs")
    spec = Spec.from_dict(
        {
            "name": "clip-test",
            "suite": "clip",
            "clients": 2,
            "strategies": ["fedavg", "median"],
            "rounds": [1, 2],
            "suite_options": {"model": assets[0], "root": assets[1], "datasets": ["MNIST", "EuroSAT"]},
            "training": {
                "optimizer": "adamw",
                "lr": 1e-3,
                "weight_decay": 0.1,
                "schedule": "cosine",
                "warmup_steps": 1,
                "grad_clip": 1.0,
                "steps": 4,
                "batch_size": 8,
            },
        }
    )
    with pytest.MonkeyPatch.context() as patch:  # the Ray workers inherit the environment
        patch.setenv("FEDMERGE_CACHE", str(out / "cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        load_suite.cache_clear()
        run_dir = run(spec, out, run_dir=out / "run", show_progress=False)
    load_suite.cache_clear()
    return run_dir


@pytest.mark.slow
def test_fedmerge_run_trains_and_merges_the_image_encoder(clip_run):
    results = json.loads((clip_run / "results.json").read_text())
    assert results["suite"]["tasks"] == ["MNIST", "EuroSAT"] and len(results["clients"]) == 2
    assert [(r["strategy"], r["rounds"]) for r in results["runs"]] == [
        ("fedavg", 1),
        ("median", 1),
        ("fedavg", 2),
        ("median", 2),
    ]
    assert all(0 <= task["accuracy"] <= 1 for run_ in results["runs"] for task in run_["final"]["tasks"])
    models = {path.stem: load_file(path) for path in (clip_run / "models").glob("*.safetensors")}
    first = models["fedavg-r1"]
    assert all(torch.equal(m["heads.1"], first["heads.1"]) for m in models.values())  # frozen heads: θ0's
    assert not torch.equal(models["fedavg-r2"]["visual_projection.weight"], first["visual_projection.weight"])


def test_the_presets_carry_the_papers_recipe():
    from fedmerge.simulations.presets import load_experiment

    paper, spread = (
        Spec.from_dict(load_experiment(name)) for name in ("clip-vit-b32-8task", "clip-vit-b32-8task-heterogeneous")
    )
    assert paper.suite == spread.suite == "clip" and paper.clients == len(paper.suite_options["datasets"]) == 8
    configs = paper.client_configs()
    assert [c.epochs for c in configs] == [35, 76, 12, 11, 5, 15, 14, 4] and {c.steps for c in configs} == {None}
    assert {
        (c.optimizer, c.lr, c.weight_decay, c.batch_size, c.schedule, c.warmup_steps, c.grad_clip) for c in configs
    } == {("adamw", 1e-5, 0.1, 128, "cosine", 500, 1.0)}
    lrs = [c.lr for c in spread.client_configs()]
    assert len(set(lrs)) == 8 and max(lrs) / min(lrs) == pytest.approx(10)
    assert paper.engine["client_gpus"] == 1
