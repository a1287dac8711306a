"""PEFT LoRA adapters as models of ``fedmerge merge``, against peft's own merge_and_unload; FedNova's a_t from
trainer_state.json. Real transformers and peft on a tiny Llama (and a tiny GPT-2 for fan_in_fan_out)."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fedmerge.merging.tensors as tensors_module
from fedmerge.checkpoints import BaseMismatch, merge_checkpoints
from fedmerge.checkpoints.adapters import model_names
from fedmerge.checkpoints.trainer_state import effective_steps, from_trainer_state, lr_sum
from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.merging.rules.fednova import DEFAULT_NORMALIZE_BY

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA = dict(
    num_hidden_layers=2,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
)
ADAPTERS = {  # name → LoraConfig options
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "a2": dict(
        r=2,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 3},
        alpha_pattern={"v_proj": 5},
    ),
    "a3": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"], use_rslora=True),
    "emb": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
}


def llama(directory, seed: int = 0, **changes) -> None:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **changes}))
    model.save_pretrained(directory)


def adapter(base_dir, directory, seed: int, **options) -> None:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    config = peft.LoraConfig(init_lora_weights=False, **options)
    peft.get_peft_model(model, config).save_pretrained(directory)


def folded(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """θ_t as peft makes it: the adapter merged into the base by merge_and_unload."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return {name: value.detach().clone() for name, value in merged.state_dict().items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    llama(root / "base")
    for seed, (name, options) in enumerate(ADAPTERS.items()):
        adapter(root / "base", root / name, seed + 1, **options)
    base = load_file(root / "base" / "model.safetensors")
    references = {name: folded(root / "base", root / name) for name in ADAPTERS}
    full = root / "full"  # a full fine-tune: a2 folded and saved as a checkpoint
    full.mkdir()
    save_file({n: references["a2"][n].contiguous() for n in base}, full / "model.safetensors")
    return root, base, references


def merged(path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors") if path.is_dir() else load_file(path)


def assert_close(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6, msg=name)


def run(*args) -> None:
    assert main(["merge", "--quiet", *map(str, args)]) == 0


def test_task_arithmetic_over_adapters_equals_peft_merge_and_unload(world, tmp_path):
    root, base, ref = world
    run(
        "--base",
        root / "base",
        "--models",
        root / "a1",
        root / "a2",
        root / "a3",
        "--scaling",
        0.5,
        "--out",
        tmp_path / "out",
    )
    expected = {n: base[n] + 0.5 * sum(ref[a][n] - base[n] for a in ("a1", "a2", "a3")) for n in base}
    out = merged(tmp_path / "out")
    assert_close(out, expected)
    assert (tmp_path / "out" / "config.json").is_file()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert not torch.equal(out[name], base[name])  # the adapters did change these
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_median_over_adapters_equals_the_median_of_peft_task_vectors(world, tmp_path, monkeypatch):
    root, base, ref = world
    monkeypatch.setattr(tensors_module, "CHUNK", 100)  # chunks that start and end inside rows of ΔW
    run(
        "--base",
        root / "base",
        "--models",
        root / "a1",
        root / "a2",
        root / "a3",
        "--method",
        "median",
        "--out",
        tmp_path / "m.safetensors",
    )
    expected = {
        n: base[n] + torch.stack([ref[a][n] - base[n] for a in ("a1", "a2", "a3")]).median(0).values for n in base
    }
    assert_close(merged(tmp_path / "m.safetensors"), expected)


METHODS = {
    "fedavg": dict(weights=[1, 3]),
    "fednova": dict(steps=[10, 40]),
    "fedgma": dict(threshold=0.9),
    "cclip": dict(radius=0.05, iterations=2),
    "ties": dict(density=0.3),
    "dare-linear": dict(density=0.5, seed=2),
    "dare-ties": dict(density=0.5, seed=3),
}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_merges_adapters_as_their_folded_checkpoints(world, tmp_path, method):
    """An adapter merges as the full checkpoint peft folds it into; an adapter and a full checkpoint mix."""
    root, base, ref = world
    options = dict(method=method, server_lr=0.7, **METHODS[method])
    merge_checkpoints(root / "base", [root / "a1", root / "a2"], tmp_path / "adapters", **options)
    merge_checkpoints(root / "base", [root / "a1", root / "full"], tmp_path / "mixed", **options)
    (tmp_path / "a1full").mkdir()
    save_file({n: ref["a1"][n].contiguous() for n in base}, tmp_path / "a1full" / "model.safetensors")
    merge_checkpoints(root / "base", [tmp_path / "a1full", root / "full"], tmp_path / "full", **options)
    expected = merged(tmp_path / "full")
    assert_close(merged(tmp_path / "adapters"), expected)
    assert_close(merged(tmp_path / "mixed"), expected)


def test_embedding_adapter_with_its_saved_embedding(world, tmp_path):
    root, base, ref = world  # peft saves embed_tokens.base_layer.weight beside lora_embedding_A/B
    run("--base", root / "base", "--models", root / "emb", "--out", tmp_path / "out")
    assert_close(merged(tmp_path / "out"), {n: ref["emb"][n] for n in base})


def test_fan_in_fan_out_on_gpt2_conv1d(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=300, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    adapter(
        tmp_path / "base",
        tmp_path / "lora",
        5,
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
    )
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ref = folded(tmp_path / "base", tmp_path / "lora")
    base = load_file(tmp_path / "base" / "model.safetensors")
    run("--base", tmp_path / "base", "--models", tmp_path / "lora", "--out", tmp_path / "out")
    out = merged(tmp_path / "out")
    assert_close(out, {n: ref[n] for n in base})
    assert not torch.equal(out["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])


# --- adapters refused: one message naming the adapter and the tensor, nothing written --------------------------


def failing(tmp_path, capsys, base, *models) -> str:
    """Run ``fedmerge merge`` expecting a refusal; nothing may appear in tmp_path (no OUT, no temporary)."""
    before = sorted(os.listdir(tmp_path))
    code = main(
        ["merge", "--quiet", "--base", str(base), "--models", *map(str, models), "--out", str(tmp_path / "out")]
    )
    assert code == 2 and sorted(os.listdir(tmp_path)) == before
    return capsys.readouterr().err


def edited(root, tmp_path, name: str, **changes):
    """A copy of adapter ``name`` with its adapter_config.json changed."""
    copy = tmp_path / f"{name}-edited"
    copy.mkdir()
    for file in (root / name).iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return copy


def test_adapters_of_another_base_are_refused(world, tmp_path, capsys):
    root, _, _ = world
    llama(tmp_path / "wide", hidden_size=48, intermediate_size=64)
    adapter(tmp_path / "wide", tmp_path / "wide-lora", 1, r=4, lora_alpha=8, target_modules=["q_proj"])
    err = failing(tmp_path, capsys, root / "base", root / "a1", tmp_path / "wide-lora")
    assert f"adapter {tmp_path / 'wide-lora'}:" in err
    assert (
        "'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight' makes 'model.layers.0.self_attn"
        ".q_proj.weight' of shape [48, 48]"
        in err
        and "[32, 32]" in err
        and "give the base it was trained on" in err
    )

    llama(tmp_path / "deep", num_hidden_layers=3)
    adapter(tmp_path / "deep", tmp_path / "deep-lora", 1, r=4, lora_alpha=8, target_modules=["v_proj"])
    err = failing(tmp_path, capsys, root / "base", tmp_path / "deep-lora")
    assert (
        f"adapter {tmp_path / 'deep-lora'}: tensor 'base_model.model.model.layers.2.self_attn.v_proj.lora_A"
        ".weight' adapts 'model.layers.2.self_attn.v_proj.weight', which the base"
        in err
        and "lacks" in err
    )

    gpt2 = tmp_path / "gpt2-lora"  # a target module the base does not have
    edited_dir = edited(root, tmp_path, "a1")
    tensors = load_file(edited_dir / "adapter_model.safetensors")
    gpt2.mkdir()
    save_file(
        {k.replace("self_attn.q_proj", "attn.c_attn"): v for k, v in tensors.items()},
        gpt2 / "adapter_model.safetensors",
    )
    (gpt2 / "adapter_config.json").write_text((edited_dir / "adapter_config.json").read_text())
    err = failing(tmp_path, capsys, root / "base", gpt2)
    assert "attn.c_attn.weight', which the base" in err


def test_an_adapter_naming_another_base_of_the_same_shapes_merges_with_a_warning(world, tmp_path, capsys):
    """Shapes cannot tell a chat model from its base: the names can, but a path may differ and still name the same
    model, so the merge goes on and says so (a warnings filter makes it an error)."""
    root, base, _ = world
    llama(tmp_path / "other", seed=1)  # another model of identical shapes
    adapter(tmp_path / "other", tmp_path / "other-lora", 1, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.warns(
        BaseMismatch,
        match=rf"adapter {tmp_path / 'other-lora'}: its adapter_config.json names the base "
        rf"'{tmp_path / 'other'}', which is not the base given \({root / 'base'}\)",
    ):
        merge_checkpoints(root / "base", [root / "a1", tmp_path / "other-lora"], tmp_path / "merged")
    assert set(merged(tmp_path / "merged")) == set(base)
    run("--base", root / "base", "--models", tmp_path / "other-lora", "--out", tmp_path / "by-cli")
    err = capsys.readouterr().err
    assert f"fedmerge: warning: adapter {tmp_path / 'other-lora'}: its adapter_config.json names the base" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatch)
        with pytest.raises(BaseMismatch):
            merge_checkpoints(root / "base", [tmp_path / "other-lora"], tmp_path / "strict")
    assert not (tmp_path / "strict").exists()


def test_an_adapter_naming_its_base_by_another_path_merges_silently(world, tmp_path):
    root, _, _ = world
    (tmp_path / "link").symlink_to(root / "base")  # the same directory under another path
    renamed = edited(root, tmp_path, "a1", base_model_name_or_path="org/base")  # a Hub id of the same name
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatch)
        merge_checkpoints(tmp_path / "link", [root / "a1", renamed], tmp_path / "merged")
    snapshot = "/home/u/.cache/huggingface/hub/models--meta-llama--Llama-3.2-1B/snapshots/4e20de3/"
    assert {"meta-llama/llama-3.2-1b", "llama-3.2-1b"} <= model_names(snapshot)
    assert model_names("Meta-Llama/Llama-3.2-1B") & model_names(snapshot)
    assert not model_names("meta-llama/Llama-3.2-1B-Instruct") & model_names(snapshot)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(use_dora=True), "sets use_dora=True, which a low-rank ΔW = s·B·A cannot express (DoRA"),
        (dict(bias="lora_only"), "sets bias='lora_only': it trains the base's biases too"),
        (dict(modules_to_save=["lm_head"]), "sets modules_to_save=['lm_head']"),
        (dict(peft_type="IA3"), "it is a 'IA3' adapter, and fedmerge merges LoRA adapters only"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' changed the base's weights"),
        (dict(r=3), "are not LoRA factors of rank r=3"),
    ],
)
def test_adapters_that_are_more_than_b_a_are_refused(world, tmp_path, capsys, changes, message):
    root, _, _ = world
    err = failing(tmp_path, capsys, root / "base", root / "a1", edited(root, tmp_path, "a1", **changes))
    assert f"adapter {tmp_path / 'a1-edited'}:" in err and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_dora_adapter_saved_by_peft_is_refused(world, tmp_path, capsys):
    root, _, _ = world
    adapter(root / "base", tmp_path / "dora", 1, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    err = failing(tmp_path, capsys, root / "base", tmp_path / "dora")
    assert f"adapter {tmp_path / 'dora'}: adapter_config.json sets use_dora=True" in err


def test_an_adapter_as_base_or_without_weights_is_refused(world, tmp_path, capsys):
    root, _, _ = world
    err = failing(tmp_path, capsys, root / "a1", root / "a2")
    assert f"the base {root / 'a1'} is a PEFT adapter" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_config.json").write_text((root / "a1" / "adapter_config.json").read_text())
    err = failing(tmp_path, capsys, root / "base", empty)
    assert f"adapter {empty}: no adapter_model.safetensors or adapter_model.bin" in err


# --- FedNova's a_t from trainer_state.json --------------------------------------------------------------


def trainer_state(directory, global_step: int, rates: dict[int, float] | None = None) -> None:
    history = [{"step": s, "loss": 1.0, "learning_rate": lr} for s, lr in (rates or {}).items()]
    history.append({"step": global_step, "train_loss": 1.0, "train_runtime": 1.0})
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": global_step, "log_history": history}))


def test_lr_sum_interpolates_between_logging_steps(tmp_path):
    # linear decay 1e-3 → 0 over 10 steps, logged every 3 steps from the first: exact for a linear schedule
    rate = lambda k: 1e-3 * (10 - (k - 1)) / 10  # the rate step k uses
    state = {"global_step": 10, "log_history": [{"step": s, "learning_rate": rate(s)} for s in (1, 4, 7, 10)]}
    assert lr_sum(state, tmp_path) == pytest.approx(sum(rate(k) for k in range(1, 11)))
    # held before the first and after the last logging point; a step logged twice keeps its last value
    state = {
        "global_step": 5,
        "log_history": [
            {"step": 2, "learning_rate": 0.5},
            {"step": 4, "learning_rate": 0.1},
            {"step": 4, "learning_rate": 0.3},
            {"step": 4, "eval_loss": 2.0},
        ],
    }
    assert lr_sum(state, tmp_path) == pytest.approx(0.5 + 0.5 + 0.4 + 0.3 + 0.3)


FROM_STATE = {"steps": "trainer_state.json global_step", "lr-sum": "trainer_state.json log_history learning_rate sum"}
FLAG = {"steps": "--steps", "lr-sum": "--lr-sums"}


def test_fednova_reads_a_t_from_trainer_state(world, tmp_path, capsys):
    root, base, _ = world
    models = [edited(root, tmp_path, name) for name in ("a1", "a2")]
    trainer_state(models[0], 30, {10: 1e-3, 20: 1e-3, 30: 1e-3})
    trainer_state(models[1], 10, {5: 2e-3, 10: 1e-3})
    expected = {"steps": [30.0, 10.0], "lr-sum": [0.03, 5 * 2e-3 + sum(2e-3 - 1e-3 * j / 5 for j in range(1, 6))]}
    for by in ("steps", "lr-sum"):
        read = effective_steps(models, asked=(by, "asked"))
        assert read.values == pytest.approx(expected[by]) and read.source == FROM_STATE[by]
    read = effective_steps(models)  # nothing given: FedNova's one default, as the strategies'
    assert read.normalize_by == DEFAULT_NORMALIZE_BY and read.reason == "FedNova's default"
    capsys.readouterr()
    run("--base", root / "base", "--models", *models, "--method", "fednova", "--out", tmp_path / "read")
    assert (
        f"fedmerge: fednova: a_t by {DEFAULT_NORMALIZE_BY} (FedNova's default) from {FROM_STATE[DEFAULT_NORMALIZE_BY]}"
        in capsys.readouterr().err
    )
    given = expected[DEFAULT_NORMALIZE_BY]
    run(
        "--base",
        root / "base",
        "--models",
        *models,
        "--method",
        "fednova",
        FLAG[DEFAULT_NORMALIZE_BY],
        *given,
        "--out",
        tmp_path / "given",
    )
    assert_close(merged(tmp_path / "read"), merged(tmp_path / "given"))
    record = json.loads(_metadata(tmp_path / "read" / "model.safetensors")["fedmerge"])
    assert record["rule"]["effective_steps"] == pytest.approx(given)
    assert (record["normalize_by"], record["effective_steps_from"]) == (
        DEFAULT_NORMALIZE_BY,
        FROM_STATE[DEFAULT_NORMALIZE_BY],
    )
    for by in ("steps", "lr-sum"):  # --trainer-state asks for either
        run(
            "--base",
            root / "base",
            "--models",
            *models,
            "--method",
            "fednova",
            "--trainer-state",
            by,
            "--out",
            tmp_path / by,
        )
        record = json.loads(_metadata(tmp_path / by / "model.safetensors")["fedmerge"])
        assert record["rule"]["effective_steps"] == pytest.approx(expected[by])
        assert (
            record["normalize_by_reason"] == f"--trainer-state {by}"
            and record["effective_steps_from"] == FROM_STATE[by]
        )
    # values on the command line win over trainer_state.json, and name the normaliser
    run(
        "--base",
        root / "base",
        "--models",
        *models,
        "--method",
        "fednova",
        "--lr-sums",
        1,
        2,
        "--out",
        tmp_path / "cli",
    )
    record = json.loads(_metadata(tmp_path / "cli" / "model.safetensors")["fedmerge"])
    assert record["rule"]["effective_steps"] == [1.0, 2.0] and record["effective_steps_from"] == "--lr-sums"
    assert record["normalize_by"] == "lr-sum" and record["normalize_by_reason"] == "only --lr-sums given"


def _metadata(path) -> dict:
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_fednova_without_a_t_says_what_to_give(world, tmp_path, capsys):
    root, _, _ = world
    models = [edited(root, tmp_path, name) for name in ("a1", "a2")]
    trainer_state(models[0], 30)
    err = failing(tmp_path, capsys, root / "base", *models, "--method", "fednova")
    assert "FedNova needs each model's effective steps a_t: give --steps (local step counts) or --lr-sums" in err
    assert (
        f"a_t by {DEFAULT_NORMALIZE_BY} (FedNova's default) is read from each model directory's trainer_state.json"
        in err
    )
    assert f"but {models[1]} has none (1 of 2 models lack one)" in err
    trainer_state(models[1], 10)
    err = failing(tmp_path, capsys, root / "base", *models, "--method", "fednova", "--trainer-state", "lr-sum")
    assert f"{models[0] / 'trainer_state.json'}: its log_history holds no learning_rate" in err and "--lr-sums" in err
    err = failing(
        tmp_path, capsys, root / "base", *models, "--method", "fednova", "--trainer-state", "steps", "--steps", "1", "2"
    )
    assert "give FedNova's a_t one way: --steps or --trainer-state steps, not both" in err
    err = failing(tmp_path, capsys, root / "base", *models, "--trainer-state", "steps")
    assert "--trainer-state) is only used by method 'fednova', not 'task-arithmetic'" in err
    (models[1] / "trainer_state.json").write_text(json.dumps({"global_step": 0}))
    with pytest.raises(FedmergeError, match="global_step is 0, not a positive step count"):
        merge_checkpoints(root / "base", models, tmp_path / "x", method="fednova", trainer_state="steps")
    (models[1] / "trainer_state.json").write_text(json.dumps({"global_step": float("inf")}))  # JSON's Infinity
    with pytest.raises(FedmergeError, match="global_step is inf, not a positive step count"):
        merge_checkpoints(root / "base", models, tmp_path / "x", method="fednova", trainer_state="steps")


def test_lr_sum_of_a_real_trainer_run(world, tmp_path):
    """What transformers' Trainer logs: the rate each step used, so logging every step sums them exactly."""
    root, _, _ = world
    model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(root / "base"),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]),
    )
    data = [{"input_ids": torch.arange(8) + i, "labels": torch.arange(8) + i} for i in range(6)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    trainer.state.save_to_json(str(tmp_path / "lora" / "trainer_state.json"))
    expected = [1e-3 * k / 2 for k in (0, 1)] + [1e-3 * (6 - k) / 4 for k in (2, 3, 4, 5)]  # the rate step k+1 uses
    lr_sums = from_trainer_state([tmp_path / "lora"], "lr-sum")
    assert lr_sums == pytest.approx([sum(expected)]) and np.isfinite(lr_sums[0])
    assert from_trainer_state([tmp_path / "lora"], "steps") == [6.0]


def test_a_nonfinite_adapter_is_refused_naming_its_file_and_tensor(world, tmp_path, capsys):
    root, _, _ = world
    bad = edited(root, tmp_path, "a1")
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    err = failing(tmp_path, capsys, root / "base", root / "a2", bad, "--method", "cclip")
    assert f"{bad / 'adapter_model.safetensors'}: tensor 'model.layers.1.self_attn.v_proj.weight' holds NaN" in err


@pytest.mark.cuda
def test_adapters_merge_on_cuda_like_on_the_cpu(world, tmp_path):
    """fedmerge merge --device cuda on PEFT adapters equals the CPU's within float rounding."""
    from fedmerge.checkpoints import merge_checkpoints

    root = world[0]
    adapters = [root / name for name in ADAPTERS]
    cpu = merge_checkpoints(root / "base", adapters, tmp_path / "cpu.safetensors", method="median")
    gpu = merge_checkpoints(root / "base", adapters, tmp_path / "gpu.safetensors", method="median", device="cuda")
    want, got = load_file(cpu), load_file(gpu)
    assert set(want) == set(got) and all(torch.allclose(want[n], got[n], rtol=1e-5, atol=1e-6) for n in want)
