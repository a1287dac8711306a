"""Offline merging of checkpoints on disk: equality to the in-memory rules, layouts, dtypes, bad input."""

import copy
import json
import os
import stat
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fedmerge.checkpoints.reader as reader_module
import fedmerge.merging.tensors as tensors_module
from fedmerge.checkpoints import Checkpoint, merge_checkpoints
from fedmerge.checkpoints.methods import MERGE_METHODS
from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.merging import (
    CClipRule,
    DareRule,
    FedAvgRule,
    FedGMARule,
    FedNovaRule,
    MeanDirectionRule,
    MedianRule,
    TiesRule,
    iter_merged_model,
    merged_model,
)

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8}


def make_models(num_models: int = 3, seed: int = 0) -> tuple[dict, list[dict]]:
    """A base with float32, bfloat16 and float16 tensors and an integer buffer, and its fine-tunes."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "embed.weight": torch.randn(12, 8, generator=g).to(torch.bfloat16),
        "layers.0.attn.weight": torch.randn(8, 8, generator=g),
        "layers.0.mlp.weight": torch.randn(16, 8, generator=g).to(torch.float16),
        "layers.0.norm.weight": torch.ones(8),
        "num_batches_tracked": torch.tensor(7),
        "lm_head.weight": torch.randn(12, 8, generator=g).to(torch.bfloat16),
    }
    models = []
    for t in range(num_models):
        model = {}
        for name, value in base.items():
            if value.is_floating_point():
                noise = torch.randn(value.shape, generator=g) * (0.1 * (t + 1))
                model[name] = (value.float() + noise).to(value.dtype)
            else:
                model[name] = value + t + 1
        models.append(model)
    return base, models


def save_directory(directory, tensors: dict, shards: int = 1, config: dict | None = CONFIG) -> None:
    """A Hugging Face model directory: model.safetensors, or shards and their index; config, tokenizer."""
    directory.mkdir(parents=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors")
    else:
        weight_map = {}
        for i in range(shards):
            filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({n: tensors[n] for n in part}, directory / filename)
            weight_map.update({n: filename for n in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "tokenizer.json").write_text('{"model": "toy"}')


def save_files(tmp_path, base: dict, models: list[dict]) -> tuple[str, list[str]]:
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for t, model in enumerate(models):
        save_file(model, tmp_path / f"model{t}.safetensors")
        paths.append(str(tmp_path / f"model{t}.safetensors"))
    return str(tmp_path / "base.safetensors"), paths


def read_directory(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same(actual: dict, expected: dict) -> None:
    assert list(sorted(actual)) == list(sorted(expected))
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert torch.equal(actual[name], value), name


CASES = {
    "task-arithmetic": (dict(scaling=0.4), FedAvgRule(), 1.2),
    "fedavg": (dict(weights=[1, 2, 3], server_lr=0.8), FedAvgRule([1, 2, 3]), 0.8),
    "fednova-steps": (dict(method="fednova", steps=[1, 2, 4]), FedNovaRule([1, 2, 4]), 1.0),
    "fednova-lr-sums": (
        dict(method="fednova", lr_sums=[0.5, 0.1, 0.2], scaling=0.5),
        FedNovaRule([0.5, 0.1, 0.2]),
        1.5,
    ),
    "mean-direction": (dict(method="mean-direction"), MeanDirectionRule(), 1.0),
    "fedgma": (dict(method="fedgma", threshold=0.6, weights=[3, 1, 1]), FedGMARule(0.6, [3, 1, 1]), 1.0),
    "median": (dict(method="median"), MedianRule(), 1.0),
    "cclip": (dict(method="cclip", radius=0.5, iterations=2), CClipRule(0.5, 2), 1.0),
    "cclip-median-radius": (dict(method="cclip"), CClipRule(), 1.0),
    "ties": (dict(method="ties", density=0.4, weights=[1, 1, 2]), TiesRule(0.4, [1, 1, 2]), 1.0),
    "dare-linear": (dict(method="dare-linear", density=0.5, seed=3, scaling=0.5), DareRule(0.5, 3, False), 1.5),
    "dare-ties": (dict(method="dare-ties", seed=4), DareRule(0.2, 4, True), 1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_every_method_equals_the_in_memory_rule(tmp_path, case):
    options, rule, server_lr = CASES[case]
    options = {"method": case if case in ("task-arithmetic", "fedavg") else None, **options}
    options = {k: v for k, v in options.items() if v is not None}
    base, models = make_models()
    base_path, model_paths = save_files(tmp_path, base, models)
    out = merge_checkpoints(base_path, model_paths, tmp_path / "merged.safetensors", **options)
    assert_same(load_file(out), merged_model(rule, base, models, server_lr))


def test_median_of_an_even_count_takes_the_lower_value_when_asked(tmp_path):
    base, models = make_models(num_models=4)
    base_path, model_paths = save_files(tmp_path, base, models)
    out = merge_checkpoints(base_path, model_paths, tmp_path / "m.safetensors", method="median", even="lower")
    assert_same(load_file(out), merged_model(MedianRule("lower"), base, models))


def test_sharded_directories_in_and_out_keep_layout_config_and_metadata(tmp_path):
    base, models = make_models()
    save_directory(tmp_path / "base", base, shards=3)
    save_directory(tmp_path / "a", models[0], shards=2)
    save_directory(tmp_path / "b", models[1], shards=1)
    save_file(models[2], tmp_path / "c.safetensors")
    inputs = [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c.safetensors")]
    code = main(
        [
            "merge",
            "--base",
            str(tmp_path / "base"),
            "--models",
            *inputs,
            "--scaling",
            "0.5",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    assert code == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["fedmerge"]["method"] == "task-arithmetic"
    assert index["metadata"]["fedmerge"]["server_lr"] == pytest.approx(1.5)
    assert index["metadata"]["fedmerge"]["scaling"] == pytest.approx(0.5)
    with safe_open(out / "model-00001-of-00003.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and json.loads(metadata["fedmerge"])["rule"] == {"rule": "fedavg"}
    assert (out / "config.json").read_text() == json.dumps(CONFIG)
    assert_same(read_directory(out), merged_model(FedAvgRule(), base, models, 1.5))


def test_max_shard_size_reshards_in_order(tmp_path):
    base, models = make_models()
    save_directory(tmp_path / "base", base)
    base_path, model_paths = str(tmp_path / "base"), save_files(tmp_path, base, models)[1]
    out = merge_checkpoints(base_path, model_paths, tmp_path / "out", max_shard_size=400)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        tensors = load_file(out / shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 400 or len(tensors) == 1
    assert_same(read_directory(out), merged_model(FedAvgRule(), base, models))


def test_pytorch_bin_files_load_with_weights_only(tmp_path):
    base, models = make_models()
    (tmp_path / "base").mkdir()
    names = list(base)
    weight_map = {}
    for i, part in enumerate((names[:2], names[2:]), start=1):
        filename = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({n: base[n] for n in part}, tmp_path / "base" / filename)
        weight_map.update({n: filename for n in part})
    (tmp_path / "base" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    paths = []
    for t, model in enumerate(models):
        torch.save(model, tmp_path / f"model{t}.pt")
        paths.append(str(tmp_path / f"model{t}.pt"))
    out = merge_checkpoints(tmp_path / "base", paths, tmp_path / "out", method="median")
    assert sorted(p.name for p in out.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert_same(read_directory(out), merged_model(MedianRule(), base, models))


def test_a_strided_tensor_of_a_pytorch_file_is_read_a_chunk_at_a_time(tmp_path):
    """A PyTorch file may hold a view (transposed, expanded): a chunk copies its own elements only. This one is a
    4 TB view of 1000 stored floats, which a whole copy per chunk could not even allocate."""
    torch.save({"wide": torch.arange(1000.0).expand(10**9, 1000)}, tmp_path / "views.bin")
    with Checkpoint(tmp_path / "views.bin") as checkpoint:
        start = 10**11 + 900  # from inside row 10^8 into the next
        chunk = tensors_module.read_into(checkpoint.reader("wide"), slice(start, start + 300), torch.empty(300))
    assert torch.equal(chunk, torch.cat([torch.arange(900.0, 1000.0), torch.arange(200.0)]))


def test_strided_tensors_of_pytorch_files_merge_as_their_contiguous_copies(tmp_path, monkeypatch):
    base, models = make_models()
    for t, tensors in enumerate([base, *models]):  # the same values, saved as views of a transposed storage
        torch.save({n: v.T.contiguous().T if v.dim() == 2 else v for n, v in tensors.items()}, tmp_path / f"{t}.bin")
    assert not torch.load(tmp_path / "0.bin")["embed.weight"].is_contiguous()
    monkeypatch.setattr("fedmerge.merging.tensors.CHUNK", 5)  # chunks that start and end inside rows
    out = merge_checkpoints(
        tmp_path / "0.bin",
        [tmp_path / f"{t}.bin" for t in (1, 2, 3)],
        tmp_path / "m.safetensors",
        method="ties",
        density=0.5,
    )
    assert_same(load_file(out), merged_model(TiesRule(0.5), base, models))


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base, models = make_models()
    base_path, model_paths = save_files(tmp_path, base, models)
    torch.save({"embed.weight": Exploit()}, tmp_path / "evil.bin")
    code = main(
        [
            "merge",
            "--base",
            base_path,
            "--models",
            str(tmp_path / "evil.bin"),
            *model_paths[1:],
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    assert code == 2
    assert "evil.bin: refused to load" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_a_trainer_directory_uses_its_model_file_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base, models = make_models()
    save_files(tmp_path, base, models)
    (tmp_path / "trainer").mkdir()
    torch.save(models[0], tmp_path / "trainer" / "pytorch_model.bin")
    torch.save({"args": Exploit()}, tmp_path / "trainer" / "training_args.bin")
    models_paths = [str(tmp_path / "trainer"), str(tmp_path / "model1.safetensors")]
    out = merge_checkpoints(tmp_path / "base.safetensors", models_paths, tmp_path / "m.safetensors")
    assert_same(load_file(out), merged_model(FedAvgRule(), base, models[:2]))
    assert not (tmp_path / "pwned").exists()


def test_command_reports_what_it_wrote(tmp_path, capsys):
    base_path, model_paths = save_files(tmp_path, *make_models())
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--base", base_path, "--models", *model_paths, "--method", "fedgma", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"merged 3 models into {out}" in err
    assert (
        "fedmerge: fedgma: β = 1 (the default: neither --scaling nor --server-lr; θ + β·Δ, Δ the rule's mean-scale "
        "update); λ = 0.333333 (θ + λ·Σ_t τ_t, Task Arithmetic's convention)\n"
    ) in err
    with safe_open(out, "pt") as f:
        record = json.loads(f.metadata()["fedmerge"])
    assert record["rule"] == {"rule": "fedgma", "threshold": 0.5} and record["server_lr"] == 1.0
    assert record["server_lr_from"] == "default" and record["scaling"] == pytest.approx(1 / 3)


# --- each method's own λ ---------------------------------------------------------------------------------------------


def float32_models(num_models: int = 3) -> tuple[dict, list[dict]]:
    """A float32 base and its fine-tunes, for comparisons with NumPy."""
    g = torch.Generator().manual_seed(5)
    base = {"a.weight": torch.randn(6, 10, generator=g), "b.bias": torch.randn(7, generator=g)}
    return base, [
        {n: v + 0.1 * (t + 1) * torch.randn(v.shape, generator=g) for n, v in base.items()} for t in range(num_models)
    ]


def task_vectors(base: dict, models: list[dict], name: str) -> np.ndarray:
    """(T, n) float64 τ_t of tensor ``name``, each difference taken in float32 as a merge takes it."""
    return np.stack([(m[name] - base[name]).numpy().ravel() for m in models]).astype(np.float64)


def ties_paper(base: dict, models: list[dict], density: float, scaling: float) -> dict[str, np.ndarray]:
    """θ0 + λ·τ_m of Yadav et al. 2023, per tensor: keep each τ_t's top-k% magnitudes, elect γ = sgn(Σ_t τ̂_t), and
    average, per coordinate, the τ̂_t that are non-zero with sign γ (the disjoint mean; 0 where none is)."""
    merged = {}
    for name, theta0 in base.items():
        taus = task_vectors(base, models, name)
        keep = max(1, int(density * taus.shape[1]))
        trimmed = np.zeros_like(taus)
        for t, tau in enumerate(taus):
            top = np.argsort(-np.abs(tau), kind="stable")[:keep]
            trimmed[t, top] = tau[top]
        agree = np.sign(trimmed) == np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
        count = agree.sum(0)
        disjoint_mean = np.where(count > 0, (trimmed * agree).sum(0) / np.maximum(count, 1), 0.0)
        merged[name] = theta0.numpy().astype(np.float64) + scaling * disjoint_mean.reshape(theta0.shape)
    return merged


def test_ties_scaling_1_is_the_ties_papers_merge(tmp_path, capsys):
    """TIES's λ = 1 (its paper's and mergekit's default) is θ0 + the disjoint mean, not T times it."""
    base, models = float32_models()
    base_path, paths = save_files(tmp_path, base, models)
    out = tmp_path / "ties.safetensors"
    assert (
        main(
            [
                "merge",
                "--base",
                base_path,
                "--models",
                *paths,
                "--method",
                "ties",
                "--density",
                "0.3",
                "--scaling",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "fedmerge: ties: λ = 1 (θ + λ·Δ, TIES's convention) → β = λ = 1\n" in capsys.readouterr().err
    expected = ties_paper(base, models, 0.3, 1.0)
    for name, value in load_file(out).items():
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=0, atol=1e-6, err_msg=name)
    record = metadata_of(out)
    assert (record["server_lr"], record["scaling"], record["scale"], record["server_lr_from"]) == (
        1.0,
        1.0,
        "mean",
        "scaling",
    )


def test_task_arithmetic_scaling_multiplies_the_sum(tmp_path, capsys):
    base, models = float32_models()
    base_path, paths = save_files(tmp_path, base, models)
    out = tmp_path / "ta.safetensors"
    assert main(["merge", "--base", base_path, "--models", *paths, "--scaling", "0.3", "--out", str(out)]) == 0
    assert (
        "fedmerge: task-arithmetic: λ = 0.3 (θ + λ·Σ_t τ_t, Task Arithmetic's convention) → β = λ·T = 0.9 (T = 3)\n"
        in capsys.readouterr().err
    )
    for name, value in load_file(out).items():
        expected = base[name].numpy().astype(np.float64) + 0.3 * task_vectors(base, models, name).sum(0).reshape(
            value.shape
        )
        np.testing.assert_allclose(value.numpy(), expected, rtol=0, atol=1e-6, err_msg=name)
    record = metadata_of(out)
    assert (
        record["server_lr"] == pytest.approx(0.9)
        and record["scaling"] == pytest.approx(0.3)
        and record["scale"] == "sum"
    )


BETA_PER_LAMBDA = {
    "task-arithmetic": 3,
    "fedavg": 3,
    "fednova": 3,
    "fedgma": 3,
    "dare-linear": 3,
    "mean-direction": 3,
    "breadcrumbs": 3,
    "scaffold": 3,
    "ties": 1,
    "dare-ties": 1,
    "breadcrumbs-ties": 1,
    "della": 1,
    "tsv-m": 1,
    "iso-c": 1,
    "iso-cts": 1,
}
"""β/λ over T = 3 models for each method's own λ: Task Arithmetic's (θ0 + λ·Σ_t τ_t) or TIES's (θ0 + λ·Δ)."""
AMBIGUOUS = (
    "median",
    "cclip",
    "krum",
    "multi-krum",
    "bulyan",
    "trimmed-mean",
    "fedexp",
    "model-stock",
    "slerp",
    "karcher",
)
STATISTICS = ("fisher", "regmean")
"""Methods that need the clients' statistics (--statistics) and have no λ of their own (tests/test_fisher_regmean.py)."""


def test_every_method_takes_a_side_on_scaling():
    assert sorted([*BETA_PER_LAMBDA, *AMBIGUOUS, *STATISTICS]) == sorted(MERGE_METHODS)


@pytest.mark.parametrize("method", BETA_PER_LAMBDA)
def test_scaling_is_each_methods_own_lambda(tmp_path, method):
    base_path, paths = save_files(tmp_path, *make_models())
    options = {"steps": [1, 2, 4]} if method == "fednova" else {}
    out = merge_checkpoints(base_path, paths, tmp_path / "m.safetensors", method=method, scaling=0.4, **options)
    record = metadata_of(out)
    assert record["server_lr"] == pytest.approx(0.4 * BETA_PER_LAMBDA[method]) and record["scaling"] == pytest.approx(
        0.4
    )


@pytest.mark.parametrize("method", AMBIGUOUS)
def test_scaling_is_refused_where_it_is_ambiguous(tmp_path, capsys, method):
    base, models = make_models()
    base_path, paths = save_files(tmp_path, base, models[: MERGE_METHODS[method].num_clients or len(models)])
    err = run_failing(tmp_path, capsys, base_path, paths, "--method", method, "--scaling", "1")
    assert f"fedmerge: error: --scaling: method {method!r} has no λ of its own: " in err and "--server-lr β" in err
    assert "Give --server-lr β instead" in err and "Traceback" not in err
    out = merge_checkpoints(base_path, paths, tmp_path / "m.safetensors", method=method, server_lr=0.5)
    record = metadata_of(out)
    assert (record["server_lr"], record["scaling"], record["server_lr_from"]) == (0.5, None, "server_lr")


def test_checkpoint_reads_lazily(tmp_path):
    base, _ = make_models()
    save_directory(tmp_path / "base", base, shards=2)
    with Checkpoint(tmp_path / "base") as checkpoint:
        assert len(checkpoint) == len(base) and len(checkpoint.files) == 2
        assert "embed.weight" in checkpoint and "missing" not in checkpoint
        assert checkpoint.specs["embed.weight"].dtype == torch.bfloat16
        assert torch.equal(checkpoint["embed.weight"], base["embed.weight"])


# --- bad input: a message naming the file and tensor, exit code 2, nothing left at OUT ------------------


def run_failing(tmp_path, capsys, base_path, model_paths, *options) -> str:
    out_parent = tmp_path / "outputs"
    out_parent.mkdir(exist_ok=True)
    before = sorted(os.listdir(out_parent))
    code = main(
        ["merge", "--base", base_path, "--models", *model_paths, "--out", str(out_parent / "out"), "--quiet", *options]
    )
    assert code == 2
    assert sorted(os.listdir(out_parent)) == before  # no OUT, no temporary left behind
    return capsys.readouterr().err


def broken(tmp_path, edit) -> tuple[str, list[str]]:
    base, models = make_models()
    edit(models[1])
    return save_files(tmp_path, base, models)


def test_missing_tensor(tmp_path, capsys):
    err = run_failing(tmp_path, capsys, *broken(tmp_path, lambda m: m.pop("lm_head.weight")))
    assert "model1.safetensors: tensor 'lm_head.weight' is missing" in err


def test_shape_differs(tmp_path, capsys):
    err = run_failing(
        tmp_path,
        capsys,
        *broken(tmp_path, lambda m: m.update({"embed.weight": torch.zeros(13, 8, dtype=torch.bfloat16)})),
    )
    assert "model1.safetensors: tensor 'embed.weight' has shape [13, 8]" in err


def test_dtype_differs(tmp_path, capsys):
    err = run_failing(
        tmp_path,
        capsys,
        *broken(tmp_path, lambda m: m.update({"layers.0.attn.weight": torch.zeros(8, 8, dtype=torch.float16)})),
    )
    assert "model1.safetensors: tensor 'layers.0.attn.weight' is torch.float16 but the base's" in err


def test_base_of_another_architecture(tmp_path, capsys):
    base, models = make_models()
    other = {name.replace("layers.0", "h.0"): value for name, value in base.items()}
    save_file(other, tmp_path / "other.safetensors")
    model_paths = save_files(tmp_path, base, models)[1]
    err = run_failing(tmp_path, capsys, str(tmp_path / "other.safetensors"), model_paths)
    assert "model0.safetensors: its tensor names differ from the base" in err and "another architecture" in err
    save_directory(tmp_path / "mistral", base, config={**CONFIG, "model_type": "mistral"})
    save_directory(tmp_path / "llama", models[0])
    err = run_failing(tmp_path, capsys, str(tmp_path / "mistral"), [str(tmp_path / "llama")])
    assert "llama: config.json says model_type='llama'" in err


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_or_truncated_file(tmp_path, capsys, damage):
    base_path, model_paths = save_files(tmp_path, *make_models())
    data = open(model_paths[2], "rb").read()
    with open(model_paths[2], "wb") as f:
        f.write(data[:-10] if damage == "truncated" else os.urandom(len(data)))
    err = run_failing(tmp_path, capsys, base_path, model_paths)
    assert "model2.safetensors:" in err and ("truncated" in err or "corrupt" in err)


def test_missing_shard(tmp_path, capsys):
    base, models = make_models()
    save_directory(tmp_path / "base", base, shards=2)
    (tmp_path / "base" / "model-00002-of-00002.safetensors").unlink()
    model_paths = save_files(tmp_path, base, models)[1]
    err = run_failing(tmp_path, capsys, str(tmp_path / "base"), model_paths)
    assert "model.safetensors.index.json: shard 'model-00002-of-00002.safetensors'" in err and "is missing" in err


def test_options_checked_before_reading(tmp_path, capsys):
    base_path, model_paths = save_files(tmp_path, *make_models())
    err = run_failing(tmp_path, capsys, base_path, model_paths, "--method", "fednova", "--steps", "1", "2")
    assert "--steps needs one value per model: 3 models, 2 values" in err
    err = run_failing(tmp_path, capsys, base_path, model_paths, "--method", "fednova", "--steps", "1", "-2", "3")
    assert "'--steps' must be a positive number, got -2.0" in err
    err = run_failing(tmp_path, capsys, base_path, model_paths, "--method", "fednova")
    assert "FedNova needs each model's effective steps a_t: give --steps" in err
    err = run_failing(
        tmp_path,
        capsys,
        base_path,
        model_paths,
        "--method",
        "fednova",
        "--lr-sums",
        "1",
        "2",
        "3",
        "--steps",
        "1",
        "2",
        "3",
    )
    assert "needs the models' effective steps a_t, one way" in err
    err = run_failing(tmp_path, capsys, base_path, model_paths, "--method", "median", "--rho", "0.5")
    assert "--rho is only used by methods 'cclip' or 'fedgma', not 'median'; drop it" in err
    err = run_failing(tmp_path, capsys, base_path, model_paths, "--weights", "1", "1", "1")
    assert "not 'task-arithmetic'" in err
    err = run_failing(tmp_path, capsys, base_path, model_paths, "--method", "ties", "--density", "0")
    assert "'--density' must be a number in (0, 1], got 0.0" in err
    err = run_failing(tmp_path, capsys, base_path, model_paths, "--method", "ties", "--seed", "1")
    assert "--seed is only used by methods 'dare-linear', 'dare-ties' or 'della', not 'ties'" in err
    with pytest.raises(FedmergeError, match="unknown method 'tie' \\(did you mean 'ties'\\?\\)"):
        merge_checkpoints(base_path, model_paths, tmp_path / "m", method="tie")


def test_existing_output_needs_force(tmp_path, capsys):
    base, models = make_models()
    base_path, model_paths = save_files(tmp_path, base, models)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    args = ["merge", "--base", base_path, "--models", *model_paths, "--out", str(out), "--quiet"]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and (out / "old.txt").exists()
    assert main([*args, "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["base.safetensors", "out"] + [f"model{t}.safetensors" for t in range(3)]
    )


def test_output_that_is_or_holds_an_input_is_refused(tmp_path):
    (tmp_path / "inputs").mkdir()
    base_path, model_paths = save_files(tmp_path / "inputs", *make_models())
    with pytest.raises(FedmergeError, match="is or holds the input"):
        merge_checkpoints(base_path, model_paths, model_paths[0], force=True)
    with pytest.raises(FedmergeError, match=r"the output .*inputs is or holds the input .*base.safetensors"):
        merge_checkpoints(base_path, model_paths, tmp_path / "inputs", force=True)
    assert os.path.exists(base_path) and all(os.path.exists(path) for path in model_paths)


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    base, models = make_models()
    save_directory(tmp_path / "base", base, shards=2)
    model_paths = save_files(tmp_path, base, models)[1]
    calls = []

    def fail_on_second_shard(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args)

    import fedmerge.checkpoints.merge as merge_module

    real = merge_module.write_shard
    monkeypatch.setattr(merge_module, "write_shard", fail_on_second_shard)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoints(tmp_path / "base", model_paths, tmp_path / "outputs" / "out")
    assert os.listdir(tmp_path / "outputs") == []


@pytest.mark.parametrize("name", ["out", "merged.safetensors"])
def test_outputs_get_the_users_umask(tmp_path, name):
    base_path, model_paths = save_files(tmp_path, *make_models())
    (tmp_path / name).mkdir()  # replaced with --force: the swap must not change the modes either
    previous = os.umask(0o022)
    try:
        out = merge_checkpoints(base_path, model_paths, tmp_path / name, force=True)
    finally:
        os.umask(previous)
    paths = [out, *out.iterdir()] if out.is_dir() else [out]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths} == {
        p.name: 0o755 if p.is_dir() else 0o644 for p in paths
    }
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["base.safetensors", name] + [f"model{t}.safetensors" for t in range(3)]
    )


def test_an_output_under_a_file_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    base_path, model_paths = save_files(tmp_path, *make_models())
    import fedmerge.checkpoints.merge as merge_module

    monkeypatch.setattr(merge_module, "Checkpoint", None)  # nothing may be opened
    out = tmp_path / "base.safetensors" / "merged"
    assert main(["merge", "--base", base_path, "--models", *model_paths, "--out", str(out), "--quiet"]) == 2
    assert f"its directory {tmp_path / 'base.safetensors'} is a file" in capsys.readouterr().err


# --- non-finite inputs: refused by default, left out when asked; a model of weight 0 is absent ----------------


def nan_in(model: dict, name: str = "layers.0.attn.weight", value: float = float("nan")) -> None:
    model[name] = model[name].clone()
    model[name].view(-1)[5] = value


def metadata_of(path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["fedmerge"])


@pytest.mark.parametrize("method", ["task-arithmetic", "median", "cclip"])
@pytest.mark.parametrize(
    "name, value", [("layers.0.attn.weight", float("nan")), ("layers.0.mlp.weight", float("-inf"))]
)
def test_a_nonfinite_model_is_refused_naming_file_and_tensor(tmp_path, capsys, method, name, value):
    err = run_failing(tmp_path, capsys, *broken(tmp_path, lambda m: nan_in(m, name, value)), "--method", method)
    assert f"model1.safetensors: tensor '{name}' holds NaN or infinite values; nothing was written" in err
    assert "--skip-nonfinite" in err


def test_a_nonfinite_base_is_refused_even_with_skip_nonfinite(tmp_path, capsys):
    base, models = make_models()
    nan_in(base, "lm_head.weight")
    err = run_failing(tmp_path, capsys, *save_files(tmp_path, base, models), "--skip-nonfinite")
    assert "base.safetensors: tensor 'lm_head.weight' of the base holds NaN or infinite values" in err


MEAN_SCALE = "θ + β·Δ, Δ the rule's mean-scale update"


@pytest.mark.parametrize(
    "method, rule, scale, beta, said",
    [
        (
            "task-arithmetic",
            FedAvgRule(),
            ["--scaling", "0.5"],
            1.0,  # Task Arithmetic's λ over the 2 models merged
            "λ = 0.5 (θ + λ·Σ_t τ_t, Task Arithmetic's convention) → β = λ·T = 1 (T = 2)",
        ),
        ("ties", TiesRule(), ["--scaling", "0.5"], 0.5, "λ = 0.5 (θ + λ·Δ, TIES's convention) → β = λ = 0.5"),
        ("median", MedianRule(), ["--server-lr", "0.7"], 0.7, f"β = 0.7 (--server-lr; {MEAN_SCALE})"),
        ("cclip", CClipRule(), [], 1.0, f"β = 1 (the default: neither --scaling nor --server-lr; {MEAN_SCALE})"),
    ],
)
def test_skip_nonfinite_leaves_such_models_out_and_names_them(tmp_path, capsys, method, rule, scale, beta, said):
    base, models = make_models(4)
    nan_in(models[1])
    nan_in(models[3], "lm_head.weight", float("inf"))
    base_path, paths = save_files(tmp_path, base, models)
    out = tmp_path / "m.safetensors"
    assert (
        main(
            [
                "merge",
                "--base",
                base_path,
                "--models",
                *paths,
                "--method",
                method,
                *scale,
                "--skip-nonfinite",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert f"left out {paths[1]}: tensor 'layers.0.attn.weight' in model1.safetensors holds NaN" in err
    assert f"left out {paths[3]}: tensor 'lm_head.weight' in model3.safetensors holds NaN" in err
    assert "merged 2 of 4 models" in err and f"fedmerge: {method}: {said}\n" in err
    assert_same(load_file(out), merged_model(rule, base, [models[0], models[2]], beta))
    record = metadata_of(out)
    assert record["models"] == [paths[0], paths[2]] and record["server_lr"] == beta
    assert [e["model"] for e in record["left_out"]] == [paths[1], paths[3]]


def test_skip_nonfinite_with_every_model_bad_writes_nothing(tmp_path):
    base, models = make_models(1)
    nan_in(models[0])
    base_path, paths = save_files(tmp_path, base, models)
    with pytest.warns(UserWarning, match="left out"), pytest.raises(FedmergeError, match="every model holds NaN"):
        merge_checkpoints(base_path, paths, tmp_path / "out", skip_nonfinite=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "method, rule",
    [("fedavg", FedAvgRule([1, 3])), ("cclip", CClipRule(None, 1, None, [1, 3])), ("fedgma", FedGMARule(0.5, [1, 3]))],
)
def test_a_model_of_weight_zero_is_absent_so_its_nan_cannot_spread(tmp_path, method, rule):
    base, models = make_models()
    nan_in(models[1])
    base_path, paths = save_files(tmp_path, base, models)
    out = merge_checkpoints(base_path, paths, tmp_path / "m.safetensors", method=method, weights=[1, 0, 3])
    assert_same(load_file(out), merged_model(rule, base, [models[0], models[2]]))


def test_a_norm_that_overflows_is_not_taken_for_nonfinite_values(tmp_path):
    base, models = make_models()
    models[1]["layers.0.attn.weight"] = torch.full((8, 8), 1e30)  # ‖τ‖² overflows; every value is finite
    base_path, paths = save_files(tmp_path, base, models)
    out = merge_checkpoints(base_path, paths, tmp_path / "m.safetensors")
    assert_same(load_file(out), merged_model(FedAvgRule(), base, models))


def test_each_input_byte_is_read_once_a_chunk_at_a_time(tmp_path, monkeypatch):
    base, models = make_models()
    base_path, paths = save_files(tmp_path, base, models)
    monkeypatch.setattr("fedmerge.merging.tensors.CHUNK", 7)  # every tensor in several chunks
    bytes_read, reads, real = Counter(), Counter(), reader_module.read_bytes

    def counted(fd, spec, start, buffer):
        bytes_read.update({(spec.file.name, spec.offset): buffer.numel()})
        reads.update([(spec.file.name, spec.offset)])
        return real(fd, spec, start, buffer)

    monkeypatch.setattr(reader_module, "read_bytes", counted)
    merge_checkpoints(base_path, paths, tmp_path / "m.safetensors", method="median")
    specs = {
        (p.name, spec.offset): spec.nbytes
        for p in [Path(base_path), *map(Path, paths)]
        for spec in Checkpoint(p).specs.values()
    }
    assert dict(bytes_read) == specs  # every byte of every input once, no more
    assert max(reads.values()) > 1  # in chunks, never a whole tensor at once


# --- --rho 0 and the summary line ----------------------------------------------------------------------


def test_cclip_rho_zero_means_the_median_norm_as_in_experiment_specs(tmp_path, capsys):
    base, models = make_models()
    base_path, paths = save_files(tmp_path, base, models)
    out = tmp_path / "m.safetensors"
    assert (
        main(["merge", "--base", base_path, "--models", *paths, "--method", "cclip", "--rho", "0", "--out", str(out)])
        == 0
    )
    rule = CClipRule()
    assert_same(load_file(out), merged_model(rule, base, models))
    assert metadata_of(out)["rule"]["radius"] == pytest.approx(rule.radius_used)
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert "(0: the median of the clients' distances to the center) (default 0.0)" in " ".join(
        capsys.readouterr().out.split()
    )


def test_the_summary_counts_one_model_in_the_singular(tmp_path, capsys):
    base_path, paths = save_files(tmp_path, *make_models(1))
    assert main(["merge", "--base", base_path, "--models", *paths, "--out", str(tmp_path / "m.safetensors")]) == 0
    assert "merged 1 model into" in capsys.readouterr().err


# --- devices: --device cpu|cuda|auto ---------------------------------------------------------------------


def method_options(case: str) -> dict:
    options, _, _ = CASES[case]
    return {
        k: v
        for k, v in {"method": case if case in ("task-arithmetic", "fedavg") else None, **options}.items()
        if v is not None
    }


def test_device_cuda_without_cuda_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(Checkpoint, "__init__", lambda *a: pytest.fail("a checkpoint was opened"))
    err = run_failing(tmp_path, capsys, *save_files(tmp_path, *make_models()), "--device", "cuda")
    assert "CUDA is not available on this machine" in err and "use --device cpu" in err


def test_device_auto_without_cuda_merges_on_the_cpu_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base, models = make_models()
    out = merge_checkpoints(
        *save_files(tmp_path, base, models), tmp_path / "m.safetensors", method="median", device="auto"
    )
    assert_same(load_file(out), merged_model(MedianRule(), base, models))
    assert metadata_of(out)["device"] == "cpu"


@pytest.mark.parametrize("device", ["tpu", "mps", "gpu"])
def test_an_unknown_device_is_refused(tmp_path, device):
    with pytest.raises(FedmergeError, match=rf"unknown device '{device}'; choose one of cpu, cuda, auto \(or cuda:N\)"):
        merge_checkpoints(*save_files(tmp_path, *make_models()), tmp_path / "m.safetensors", device=device)


@pytest.mark.parametrize("case", CASES)
def test_no_buffer_of_a_merge_is_made_on_the_default_device(tmp_path, monkeypatch, case):
    """With the default device set to meta, a buffer made without naming the inputs' device would fail (CPU
    stand-in for a buffer made on the CPU beside CUDA inputs; see tests/test_merging.py)."""
    monkeypatch.setattr("fedmerge.merging.rule.available_cores", lambda: 1)  # the device context is per thread
    _, rule, server_lr = CASES[case]
    base, models = make_models()
    paths = save_files(tmp_path, base, models)
    with torch.device("meta"):
        out = merge_checkpoints(*paths, tmp_path / "m.safetensors", **method_options(case))
    assert_same(load_file(out), merged_model(rule, base, models, server_lr))


@pytest.fixture
def read_devices(monkeypatch):
    """The device each chunk is read onto, in order: every pass of the core reads its chunks through read_into."""
    seen = []
    read_into = tensors_module.read_into
    monkeypatch.setattr(
        tensors_module, "read_into", lambda src, s, out: seen.append(out.device) or read_into(src, s, out)
    )
    return seen


@pytest.mark.parametrize("case", CASES)
def test_every_pass_over_files_runs_on_the_device_asked_for(tmp_path, read_devices, case):
    """meta (a device that holds no values) stands in for a GPU beside checkpoints read on the CPU: every chunk of
    every pass up to the first result that must come back (CCLIP's Gram matrix, mean-direction's norms, TIES's
    thresholds, the merged chunks' norms) is read onto it, whatever the first input is (a file reader)."""
    _, rule, server_lr = CASES[case]
    base_path, paths = save_files(tmp_path, *make_models())
    with ExitStack() as stack:
        base, *models = (stack.enter_context(Checkpoint(p)) for p in (base_path, *paths))
        with pytest.raises((NotImplementedError, RuntimeError), match="meta"):  # no value comes back from meta
            list(iter_merged_model(copy.deepcopy(rule), base, models, server_lr, device="meta"))
    assert read_devices and set(read_devices) == {torch.device("meta")}


def assert_near(actual: dict, expected: dict) -> None:
    """Same names and dtypes, integers equal, floating values within float32 rounding (one 16-bit step)."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype and got.device.type == "cpu", name
        if not want.is_floating_point():
            assert torch.equal(got, want), name
            continue
        tol = 1e-5 if want.dtype == torch.float32 else 2**-7
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES)
def test_every_method_on_cuda_equals_the_cpu(tmp_path, case):
    paths = save_files(tmp_path, *make_models())
    cpu = merge_checkpoints(*paths, tmp_path / "cpu.safetensors", **method_options(case))
    cuda = merge_checkpoints(*paths, tmp_path / "cuda.safetensors", device="cuda", **method_options(case))
    assert_near(load_file(cuda), load_file(cpu))
    assert metadata_of(cuda)["device"] == "cuda" and metadata_of(cpu)["device"] == "cpu"


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["task-arithmetic", "median", "cclip"])
def test_the_command_on_cuda_equals_the_cpu_over_shards_and_many_chunks(tmp_path, monkeypatch, method):
    monkeypatch.setattr("fedmerge.merging.tensors.DEVICE_CHUNK", 16)  # every tensor in several chunks
    base, models = make_models(4)
    save_directory(tmp_path / "base", base, shards=3)
    for t, model in enumerate(models):
        save_directory(tmp_path / f"m{t}", model, shards=2)
    command = [
        "merge",
        "--base",
        str(tmp_path / "base"),
        "--models",
        *(str(tmp_path / f"m{t}") for t in range(4)),
        "--method",
        method,
        "--quiet",
    ]
    assert main([*command, "--device", "cpu", "--out", str(tmp_path / "on-cpu")]) == 0
    assert main([*command, "--device", "cuda", "--out", str(tmp_path / "on-gpu")]) == 0
    assert sorted(os.listdir(tmp_path / "on-gpu")) == sorted(os.listdir(tmp_path / "on-cpu"))
    assert_near(read_directory(tmp_path / "on-gpu"), read_directory(tmp_path / "on-cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["cclip", "mean-direction", "ties", "dare-ties"])
def test_every_pass_of_a_cuda_merge_runs_on_cuda(tmp_path, read_devices, case):
    """fedmerge merge --device cuda: CCLIP's Gram matrix and mean-direction's norms (the rules' first pass), TIES's
    thresholds and every chunk are read onto the GPU, and the result equals the CPU's."""
    paths = save_files(tmp_path, *make_models())
    cpu = merge_checkpoints(*paths, tmp_path / "cpu.safetensors", **method_options(case))
    read_devices.clear()
    cuda = merge_checkpoints(*paths, tmp_path / "cuda.safetensors", device="cuda", **method_options(case))
    assert read_devices and {device.type for device in read_devices} == {"cuda"}
    assert_near(load_file(cuda), load_file(cpu))


@pytest.mark.cuda
def test_checkpoints_read_into_pinned_memory_for_cuda(tmp_path):
    base, _ = make_models()
    save_directory(tmp_path / "base", base)
    with Checkpoint(tmp_path / "base", pin_memory=True) as checkpoint:
        tensor = checkpoint["embed.weight"]
        assert tensor.is_pinned() and torch.equal(tensor, base["embed.weight"])


def test_a_weight_0_model_is_left_out_of_t_and_named(tmp_path, capsys):
    base_path, model_paths = save_files(tmp_path, *make_models())
    out = tmp_path / "merged.safetensors"
    args = [
        "merge",
        "--base",
        base_path,
        "--models",
        *model_paths,
        "--method",
        "fedavg",
        "--weights",
        "1",
        "0",
        "1",
        "--scaling",
        "0.5",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"left out {model_paths[1]}: its weight is 0" in err and "merged 2 of 3 models" in err
    meta = metadata_of(out)
    assert meta["server_lr"] == 1.0 and meta["left_out"] == [{"model": model_paths[1], "reason": "weight 0"}]
    assert meta["models"] == [model_paths[0], model_paths[2]]
