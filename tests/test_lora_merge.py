"""LoRA updates merged as factors (A and B apart) or dense (every rule on each layer's s·B·A), exactly."""

import copy

import numpy as np
import pytest
import torch

from fedmerge import FedmergeError
from fedmerge.merging import DareRule, OnDevice, merge
from fedmerge.merging.lora import DenseUpdate, LoraName, adapted_layers, parse_lora_name
from fedmerge.strategies import STRATEGIES, FedAvg, Median
from fedmerge.strategies.arrays import RecordTensors
from fedmerge.strategies.replies import check_replies
from replies import arrays_record, reply

S = 2.0  # α/r
W, A, B = "m.q.base_layer.weight", "m.q.lora_A.default.weight", "m.q.lora_B.default.weight"
# an embedding (vocabulary 7, width 4): peft stores A (r, 7) and B (4, r), and ΔW = s·(B·A)ᵀ
E, EA, EB = "m.emb.base_layer.weight", "m.emb.lora_embedding_A.default", "m.emb.lora_embedding_B.default"


def federation(num_clients=3, seed=0):
    """Global arrays with a linear and an embedding adapter, the clients' trained ones, their replies, and each
    adapted layer's dense updates (T, *shape), written out here."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    base = {
        W: normal(6, 5),
        A: normal(2, 5),
        B: np.zeros((6, 2), np.float32),
        "head.bias": normal(6),
        E: normal(7, 4),
        EA: normal(2, 7),
        EB: normal(4, 2),
    }
    clients = [
        {
            **base,
            A: base[A] + 0.1 * normal(2, 5),
            B: normal(6, 2),
            "head.bias": base["head.bias"] + normal(6),
            EA: base[EA] + 0.1 * normal(2, 7),
            EB: normal(4, 2),
        }
        for _ in range(num_clients)
    ]
    replies = [reply(t + 1, c, num_examples=10, num_steps=5, lr_sum=0.5) for t, c in enumerate(clients)]
    dense = {
        W: np.stack([S * (c[B] @ c[A] - base[B] @ base[A]) for c in clients]),
        E: np.stack([S * (c[EB] @ c[EA] - base[EB] @ base[EA]).T for c in clients]),
    }
    return base, clients, replies, dense


def test_dense_fedavg_is_the_mean_of_the_clients_dense_updates_folded_into_the_base():
    base, clients, replies, dense = federation()
    merged, _ = FedAvg(lora="dense", lora_scaling=S, server_lr=1.5).merge_replies(1, replies, arrays_record(base))
    np.testing.assert_allclose(merged[W].numpy(), base[W] + 1.5 * dense[W].mean(0), rtol=1e-5, atol=1e-6)
    start = S * (base[EB] @ base[EA]).T  # the embedding's adapter folded in too, then restarted
    np.testing.assert_allclose(merged[E].numpy(), base[E] + start + 1.5 * dense[E].mean(0), rtol=1e-5, atol=1e-6)
    assert np.array_equal(merged[A].numpy(), base[A]) and not merged[B].numpy().any()  # adapters restart at B = 0
    assert np.array_equal(merged[EA].numpy(), base[EA]) and not merged[EB].numpy().any()
    bias = np.mean([c["head.bias"] for c in clients], 0)
    np.testing.assert_allclose(
        merged["head.bias"].numpy(), base["head.bias"] + 1.5 * (bias - base["head.bias"]), rtol=1e-5
    )
    assert list(merged) == list(base)


def test_dense_median_is_the_coordinatewise_median_of_the_dense_updates():
    base, _, replies, dense = federation(4)
    merged, _ = Median(lora="dense", lora_scaling=S).merge_replies(1, replies, arrays_record(base))
    np.testing.assert_allclose(merged[W].numpy(), base[W] + np.median(dense[W], 0), rtol=1e-5, atol=1e-6)
    start = S * (base[EB] @ base[EA]).T
    np.testing.assert_allclose(merged[E].numpy(), base[E] + start + np.median(dense[E], 0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fednova", "fedgma", "cclip", "ties", "dare-ties"])
def test_every_rule_merges_the_dense_updates_exactly(name):
    base, clients, replies, dense = federation(4)
    strategy = STRATEGIES[name](lora="dense", lora_scaling=S)
    merged, _ = strategy.merge_replies(1, replies, arrays_record(base))
    updates = [
        {W: torch.tensor(d), "head.bias": torch.tensor(c["head.bias"] - base["head.bias"]), E: torch.tensor(e)}
        for d, e, c in zip(dense[W], dense[E], clients)
    ]
    fresh = STRATEGIES[name](lora="dense", lora_scaling=S)  # CCLIP's center moves after a round: a fresh strategy
    rule = (
        DareRule(0.2, 0, True, clients=[1, 2, 3, 4], draw=1)
        if name == "dare-ties"  # round 1's draws
        else fresh.build_rule(check_replies(replies, arrays_record(base), (), fresh.roles)[0], None)
    )
    delta = merge(rule, updates)
    np.testing.assert_allclose(merged[W].numpy(), base[W] + delta[W].numpy(), rtol=1e-5, atol=1e-6)
    start = S * (base[EB] @ base[EA]).T
    np.testing.assert_allclose(merged[E].numpy(), base[E] + start + delta[E].numpy(), rtol=1e-5, atol=1e-6)


def test_factors_is_not_the_mean_of_the_dense_updates_and_this_is_how_far():
    base, clients, replies, dense = federation()
    merged, _ = FedAvg().merge_replies(1, replies, arrays_record(base))
    factors = S * (merged[B].numpy() @ merged[A].numpy())  # the adapted layer's change after averaging A and B apart
    error = np.linalg.norm(factors - dense[W].mean(0)) / np.linalg.norm(dense[W].mean(0))
    assert error > 0.05  # measured here: averaging the factors misses the mean dense update by this share
    print(f"factors vs dense FedAvg, relative error {error:.3f}")


def test_dense_needs_the_base_weights_and_both_factors():
    base, clients, _, _ = federation()
    without = {k: v for k, v in base.items() if k != W}
    replies = [reply(t + 1, {k: v for k, v in c.items() if k != W}, num_examples=10) for t, c in enumerate(clients)]
    with pytest.raises(FedmergeError, match="LoRA layer 'm.q' lacks its base weight 'm.q.base_layer.weight'"):
        FedAvg(lora="dense").merge_replies(1, replies, arrays_record(without))
    with pytest.raises(FedmergeError, match="lora must be one of"):
        FedAvg(lora="stacked")


@pytest.mark.parametrize("name, options", [("fedavg", {}), ("fednova", {"normalize_by": "steps"})])
def test_stack_equals_dense_for_weighted_sums(name, options):
    base, _, replies, dense = federation(3)
    unequal = [
        reply(
            t + 1,
            {k: v.numpy() for k, v in RecordTensors(r.content["arrays"]).items()},
            num_examples=10,
            num_steps=3 * (t + 1),
            lr_sum=0.5,
        )
        for t, r in enumerate(replies)
    ]
    stacked, metrics = STRATEGIES[name](lora="stack", lora_scaling=S, **options).merge_replies(
        1, unequal, arrays_record(base)
    )
    exact, _ = STRATEGIES[name](lora="dense", lora_scaling=S, **options).merge_replies(1, unequal, arrays_record(base))
    for key in base:
        np.testing.assert_allclose(stacked[key].numpy(), exact[key].numpy(), rtol=1e-5, atol=1e-6)
    if name == "fedavg":
        np.testing.assert_allclose(stacked[W].numpy(), base[W] + dense[W].mean(0), rtol=1e-5, atol=1e-6)
    assert all(n > 0 for n in metrics["task-vector-norms"])


def test_stack_is_refused_for_rules_that_are_not_weighted_sums():
    base, _, replies, _ = federation(3)
    with pytest.raises(FedmergeError, match="lora='stack' is exact only for rules that are weighted sums"):
        Median(lora="stack").merge_replies(1, replies, arrays_record(base))


def test_peft_names_are_read_by_one_parser():
    assert parse_lora_name(A) == LoraName("m.q", "A") and parse_lora_name(W) == LoraName("m.q", "base")
    assert parse_lora_name(EB) == LoraName("m.emb", "B", embedding=True)
    assert parse_lora_name("base_model.model.x.lora_embedding_A") == LoraName("base_model.model.x", "A", embedding=True)
    assert parse_lora_name("base_model.model.x.lora_B.weight") == LoraName("base_model.model.x", "B")  # saved files
    assert [parse_lora_name(n) for n in ("m.q.weight", "m.q.lora_magnitude_vector.default.weight", "lora_A")] == [
        None
    ] * 3


class CountedOnDevice(OnDevice):
    """Tensors copied onto a device when read, as the strategies read the global model, counting those reads."""

    def __init__(self, tensors, device="cpu"):
        super().__init__({k: torch.as_tensor(v) for k, v in tensors.items()}, device)
        self.reads = []

    def __getitem__(self, name):
        self.reads.append(name)
        return super().__getitem__(name)


def test_dense_updates_learn_shapes_from_metadata_and_read_no_base_weight_onto_the_device():
    base, clients, _, dense = federation()
    on_device = CountedOnDevice(base)
    updates = [DenseUpdate(CountedOnDevice(c), on_device, adapted_layers(list(base)), S) for c in clients]
    assert on_device.reads == []  # shapes and dtypes from metadata, for every client
    assert tuple(updates[0].specs[E].shape) == (7, 4) and updates[0].specs[E].dtype == torch.float32
    np.testing.assert_allclose(updates[1][E].numpy(), dense[E][1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates[2][W].numpy(), dense[W][2], rtol=1e-5, atol=1e-6)
    assert set(on_device.reads) == {A, B, EA, EB}  # ΔW from the factors alone


def test_other_lora_tensors_are_refused_by_stack_and_dense_naming_them():
    base, clients, _, _ = federation()
    magnitude = "m.q.lora_magnitude_vector.default.weight"  # DoRA's
    base, clients = (
        {**base, magnitude: np.ones(6, np.float32)},
        [{**c, magnitude: np.ones(6, np.float32)} for c in clients],
    )
    replies = [reply(t + 1, c, num_examples=10) for t, c in enumerate(clients)]
    for mode in ("stack", "dense"):
        with pytest.raises(
            FedmergeError, match=f"tensor '{magnitude}' belongs to a LoRA adapter but is neither a factor"
        ):
            FedAvg(lora=mode, lora_scaling=S).merge_replies(1, replies, arrays_record(base))
    merged, _ = FedAvg().merge_replies(1, replies, arrays_record(base))  # factors: every tensor apart, as asked
    assert np.array_equal(merged[magnitude].numpy(), base[magnitude])


def test_factors_that_do_not_make_the_base_weight_are_refused_naming_the_layer():
    base, clients, _, _ = federation()
    conv1d = {W: base[W].T.copy()}  # a (in, out) weight, as GPT-2's Conv1D stores it (fan_in_fan_out)
    replies = [reply(t + 1, {**c, **conv1d}, num_examples=10) for t, c in enumerate(clients)]
    for mode in ("stack", "dense"):
        with pytest.raises(
            FedmergeError, match=r"LoRA layer 'm.q': factors .* do not make its base weight's shape \[5, 6\]"
        ):
            FedAvg(lora=mode, lora_scaling=S).merge_replies(1, replies, arrays_record({**base, **conv1d}))


@pytest.mark.parametrize("mode", ["dense", "stack"])
def test_fedavg_of_adapters_with_an_embedding_is_the_mean_of_peft_merge_and_unload(mode):
    """Two clients' adapters on a tiny Llama's embedding and q_proj, merged by the strategy, against peft's own
    folding: the merged base weights (B restarting at 0) are the mean of the clients' merge_and_unload()."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    start = {n: v.detach().clone() for n, v in model.state_dict().items()}
    assert any(".lora_embedding_A." in n for n in start)
    clients = [{n: v + 0.1 * torch.randn_like(v) if ".lora_" in n else v for n, v in start.items()} for _ in range(2)]

    def folded(state):
        copied = copy.deepcopy(model)
        copied.load_state_dict(state)
        return {n: v.detach() for n, v in copied.merge_and_unload().state_dict().items()}

    expected = [folded(c) for c in clients]
    numpy = lambda tensors: {n: v.numpy() for n, v in tensors.items()}
    replies = [reply(t + 1, numpy(c), num_examples=10) for t, c in enumerate(clients)]
    merged, _ = FedAvg(lora=mode, lora_scaling=8 / 4).merge_replies(1, replies, arrays_record(numpy(start)))
    for name in (n for n in start if ".lora_" not in n):
        unloaded = name.removeprefix("base_model.model.").replace(".base_layer", "")
        want = (expected[0][unloaded] + expected[1][unloaded]) / 2
        np.testing.assert_allclose(merged[name].numpy(), want.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    assert not merged["base_model.model.model.embed_tokens.lora_embedding_B.default"].numpy().any()


# -- end to end: `fedmerge run` of LoRA clients on the causal-lm suite, each aggregation (real Ray) --------------

STRATEGIES_OF = {"factors": ["fedavg", "median"], "stack": ["fedavg", "fednova"], "dense": ["fedavg", "median"]}


@pytest.fixture(scope="module", params=list(STRATEGIES_OF))
def lora_run(request, tmp_path_factory):
    from test_causal_lm_suite import addition, sevens, tiny_llama, write_jsonl

    from fedmerge.simulations.runner import run
    from fedmerge.simulations.spec import Spec
    from fedmerge.tasks import load_suite

    mode, folder = request.param, tmp_path_factory.mktemp(f"lora-{request.param}")
    tiny_llama(folder / "model")
    tasks = [write_jsonl(folder / "addition.jsonl", addition(40)), write_jsonl(folder / "sevens.jsonl", sevens(40))]
    spec = Spec.from_dict(
        {
            "name": f"lora-{mode}",
            "suite": "causal-lm",
            "clients": 2,
            "strategies": STRATEGIES_OF[mode],
            "rounds": [1, 2],
            "suite_options": {
                "model": str(folder / "model"),
                "tasks": tasks,
                "max_new_tokens": 12,
                "val_fraction": 0.2,
                "test_fraction": 0.2,
                "lora_r": 4,
                "lora_alpha": 8,
            },
            "server": {"lora": mode},
            "training": {"optimizer": "adamw", "lr": 1e-2, "steps": 30, "batch_size": 8},
        }
    )
    with pytest.MonkeyPatch.context() as patch:  # the Ray workers inherit the environment
        patch.setenv("FEDMERGE_CACHE", str(folder / "cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        load_suite.cache_clear()
        run_dir = run(spec, folder / "out", run_dir=folder / "out" / "run", show_progress=False)
        fed = load_suite("causal-lm", 2, spec.suite_options, spec.seed)
    load_suite.cache_clear()
    return mode, run_dir, fed


@pytest.mark.slow
def test_a_lora_run_merges_as_its_aggregation_says(lora_run):
    import json

    from safetensors.torch import load_file

    mode, run_dir, fed = lora_run
    results = json.loads((run_dir / "results.json").read_text())
    assert [(r["strategy"], r["rounds"]) for r in results["runs"]] == [
        (s, r) for r in (1, 2) for s in STRATEGIES_OF[mode]
    ]
    own, pretrained = [c["own"]["test"]["loss"] for c in results["clients"]], results["pretrained"]["tasks"]
    assert all(o < p["loss"] for o, p in zip(own, pretrained))  # the adapters learn their tasks
    model = load_file(run_dir / "models" / f"{STRATEGIES_OF[mode][0]}-r2.safetensors")
    factors_b = [n for n in fed.trained_names if ".lora_B." in n]
    weights = [n.replace("lora_B.default.weight", "base_layer.weight") for n in factors_b]
    if mode == "factors":  # the adapters hold the update; the base weights never left θ0
        assert all(model[n].any() for n in factors_b) and all(torch.equal(model[n], fed.pretrained[n]) for n in weights)
    else:  # folded into the base weights; B restarts at 0
        assert all(not model[n].any() for n in factors_b)
        assert all(not torch.equal(model[n], fed.pretrained[n]) for n in weights)
    untouched = [n for n in fed.pretrained if "embed_tokens" in n]
    assert untouched and all(torch.equal(model[n], fed.pretrained[n]) for n in untouched)  # frozen, never adapted
