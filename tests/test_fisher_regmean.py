"""Fisher merging and RegMean against their papers' rules written out here in NumPy; the clients' statistics against
their definitions computed independently (softmax regression's Fisher in closed form, Gram matrices by hand); the
reply contract (an extra ArrayRecord per statistic: asked for, required, refused, left out); the ClientApp, the one-shot
search and `fedmerge merge --statistics`."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

from fedmerge import contract
from fedmerge.checkpoints import merge_checkpoints
from fedmerge.cli import main
from fedmerge.clients.merging_statistics import fisher_diagonal, input_grams, sample
from fedmerge.errors import FedmergeError
from fedmerge.merging import METHODS, TaskVector, merge, merged_model
from fedmerge.merging.rules.fisher import FisherRule
from fedmerge.merging.rules.regmean import RegMeanRule
from fedmerge.strategies import FedAvg, FisherMerging, RegMean
from replies import InProcessGrid, arrays_record, reply

SHAPES = {"fc1.weight": (7, 5), "fc1.bias": (7,), "fc2.weight": (3, 7), "fc2.bias": (3,), "norm": (7,)}
LINEAR = ("fc1.weight", "fc2.weight")


def setup(num_clients=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64)
    base = {k: randn(s) for k, s in SHAPES.items()}
    models = [{k: base[k] + 0.3 * randn(s) for k, s in SHAPES.items()} for _ in range(num_clients)]
    fishers = [
        {k: torch.rand(s, generator=gen, dtype=torch.float64) ** 2 for k, s in SHAPES.items() if k != "norm"}
        for _ in range(num_clients)
    ]
    grams = []
    for _ in range(num_clients):
        x1, x2 = randn((40, 5)) * torch.rand(5, generator=gen), randn((40, 7))
        grams.append({"fc1.weight": x1.T @ x1 / 40, "fc2.weight": x2.T @ x2 / 40})
    return base, models, fishers, grams


def np_(tensors):
    return {k: v.numpy() for k, v in tensors.items()}


def fisher_paper(models, fishers, lambdas, floor):
    """Matena & Raffel: θ*_j = Σ_t λ_t F_t,j θ_t,j / Σ_t λ_t F_t,j (F floored by ε), on the models themselves."""
    merged = {}
    for name in SHAPES:
        weights = [
            lam * (f[name] + floor) if name in f else lam * np.ones(SHAPES[name])
            for lam, f in zip(lambdas, map(np_, fishers))
        ]
        merged[name] = sum(w * m[name].numpy() for w, m in zip(weights, models)) / sum(weights)
    return merged


def shrink(gram: np.ndarray, alpha: float) -> np.ndarray:
    return alpha * gram + (1 - alpha) * np.diag(np.diag(gram))


def regmean_paper(models, grams, lambdas, alpha):
    """Jin et al.: W = (Σ_t λ_t W_t G̃_t)(Σ_t λ_t G̃_t)⁻¹ per linear layer (W: out × in), λ-weighted mean elsewhere."""
    merged = {}
    for name in SHAPES:
        if name in LINEAR:
            g = [lam * shrink(gr[name].numpy(), alpha) for lam, gr in zip(lambdas, grams)]
            merged[name] = sum(m[name].numpy() @ gt for m, gt in zip(models, g)) @ np.linalg.inv(sum(g))
        else:
            merged[name] = sum(lam * m[name].numpy() for lam, m in zip(lambdas, models))
    return merged


@pytest.mark.parametrize("weights", [None, [1, 2, 5]])
@pytest.mark.parametrize("floor", [1e-6, 0.1])
def test_fisher_merging_is_the_fisher_weighted_average_of_the_models(weights, floor):
    base, models, fishers, _ = setup()
    lambdas = np.full(3, 1 / 3) if weights is None else np.array(weights) / 8
    merged = merged_model(FisherRule(fishers, floor, weights), base, models)
    expected = fisher_paper(models, fishers, lambdas, floor)  # "norm" has no Fisher: the λ-weighted mean
    for name in SHAPES:
        np.testing.assert_allclose(merged[name].numpy(), expected[name], rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("weights", [None, [1, 2, 5]])
@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.1])
def test_regmean_is_the_closed_form_per_linear_layer(weights, alpha):
    base, models, _, grams = setup()
    lambdas = np.full(3, 1 / 3) if weights is None else np.array(weights) / 8
    merged = merged_model(RegMeanRule(grams, alpha, weights), base, models)
    expected = regmean_paper(models, grams, lambdas, alpha)
    for name in SHAPES:
        np.testing.assert_allclose(merged[name].numpy(), expected[name], rtol=1e-9, atol=1e-11, err_msg=name)


def test_regmean_reduces_to_the_mean_for_equal_grams_and_leaves_unreached_inputs_alone():
    base, models, _, grams = setup()
    same = [grams[0]] * 3
    tvs = [TaskVector(m, base) for m in models]
    mean = {k: sum(tv[k] for tv in tvs) / 3 for k in SHAPES}
    got = merge(RegMeanRule(same, 0.7), tvs)
    assert all(torch.allclose(got[k], mean[k], rtol=1e-10, atol=1e-12) for k in SHAPES)
    for g in grams:  # input feature 2 of fc1 is never nonzero on any client
        g["fc1.weight"][2, :] = 0
        g["fc1.weight"][:, 2] = 0
    delta = merge(RegMeanRule(grams, 1.0), tvs)["fc1.weight"]
    assert float(delta[:, 2].abs().max()) < 1e-14  # unchanged (within rounding of the pseudo-inverse)
    keep = [0, 1, 3, 4]  # the other columns: the closed form of the features reached
    g = [gr["fc1.weight"][keep][:, keep].numpy() for gr in grams]
    expected = sum(tv["fc1.weight"].numpy()[:, keep] @ gt for tv, gt in zip(tvs, g)) @ np.linalg.inv(sum(g))
    np.testing.assert_allclose(delta[:, keep].numpy(), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda f, g: f[1].update({"fc1.weight": torch.ones(5, 7)}),
            r"client 1's diagonal Fisher hold 'fc1.weight' as torch.float32 of shape \(5, 7\), but the model's tensor is "
            r"torch.float64 of shape \(7, 5\): expected a floating tensor of shape \(7, 5\)\.",
        ),
        (
            lambda f, g: f[2].pop("fc2.bias"),
            r"client 2's diagonal Fisher lack tensor 'fc2.bias', unlike the first client's; every client must send them for "
            r"the same tensors\.",
        ),
        (
            lambda f, g: f.pop(),
            r"the diagonal Fishers: 2 given for 3 clients; give one per client, in the clients' order\.",
        ),
        (lambda f, g: [x.clear() for x in f], r"the clients' diagonal Fisher cover none of the merged tensors"),
        (
            lambda f, g: f[0]["fc2.weight"].__setitem__((0, 0), float("nan")),
            r"client 0's diagonal Fisher hold NaN or infinite values in tensor 'fc2.weight'; nothing was merged",
        ),
    ],
)
def test_fisher_statistics_that_do_not_fit_are_refused_naming_the_client_and_tensor(change, message):
    base, models, fishers, grams = setup()
    change(fishers, grams)
    with pytest.raises(FedmergeError, match=message):
        merged_model(FisherRule(fishers), base, models)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda g: g[1].update({"fc1.bias": torch.ones(7, 7)}),
            r"client 1's input Gram matrices hold 'fc1.bias' as torch.float32 of shape \(7, 7\), but the model's tensor is "
            r"torch.float64 of shape \(7,\): no statistic fits it\.",
        ),
        (
            lambda g: g[0].update({"fc2.weight": torch.ones(3, 3, dtype=torch.float64)}),
            r"client 0's input Gram matrices hold 'fc2.weight' as torch.float64 of shape \(3, 3\), but the model's tensor is "
            r"torch.float64 of shape \(3, 7\): expected a floating tensor of shape \(7, 7\)\.",
        ),
        (
            lambda g: g[2]["fc1.weight"].__setitem__((0, 0), float("inf")),
            r"client 2's input Gram matrices hold NaN or infinite values in tensor 'fc1.weight'",
        ),
    ],
)
def test_gram_matrices_that_do_not_fit_are_refused(change, message):
    base, models, _, grams = setup()
    change(grams)
    with pytest.raises(FedmergeError, match=message):
        merged_model(RegMeanRule(grams), base, models)


def test_the_records():
    fisher, regmean = METHODS["fisher"], METHODS["regmean"]
    assert fisher.statistics == (contract.FISHER,) and regmean.statistics == (contract.GRAMS,)
    assert fisher.no_lambda and regmean.no_lambda and fisher.weighted and regmean.weighted
    assert fisher.tuned is None and regmean.tuned == "alpha" and regmean.grid([]) == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert {p.name: (p.option.default, p.scope) for p in regmean.params} == {
        "alpha": (0.9, "both"),
        "examples": (256, "strategy"),
    }
    with pytest.raises(FedmergeError, match=r"method 'fisher' needs each client's 'fisher' statistics"):
        fisher.build(None)
    with pytest.raises(FedmergeError, match=r"'RegMean alpha' must be a number in \[0, 1\], got 1.5"):
        RegMeanRule([], 1.5)


# -- the clients' statistics ----------------------------------------------------------------------------------------
def softmax_regression(seed=0, num_classes=4, width=6, count=30):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(width, num_classes).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(num_classes, width, generator=gen))
        model.bias.copy_(torch.randn(num_classes, generator=gen))
    data = TensorDataset(
        torch.randn(count, width, generator=gen, dtype=torch.float64),
        torch.randint(num_classes, (count,), generator=gen),
    )
    return model, data


def test_the_fisher_of_a_classifier_is_the_expectation_over_its_own_labels():
    """Softmax regression z = W x + b: ∂ log p_c/∂W = (e_c − p) xᵀ, so F_W = mean_n Σ_c p_c ((e_c − p) xᵀ)²; the
    empirical Fisher puts the example's label y in place of the expectation."""
    model, data = softmax_regression()
    names = {"weight", "bias"}
    chosen = sample(data, 20, seed=3)
    x, y = data.tensors[0][chosen].numpy(), data.tensors[1][chosen].numpy()
    w, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    eye = np.eye(4)
    fw = np.mean([sum(p[n, c] * np.outer(eye[c] - p[n], x[n]) ** 2 for c in range(4)) for n in range(20)], axis=0)
    fb = np.mean([sum(p[n, c] * (eye[c] - p[n]) ** 2 for c in range(4)) for n in range(20)], axis=0)
    got = fisher_diagonal(model, data, names, 20, seed=3)
    np.testing.assert_allclose(got["weight"].numpy(), fw, rtol=1e-5)
    np.testing.assert_allclose(got["bias"].numpy(), fb, rtol=1e-5)
    empirical = fisher_diagonal(model, data, names, 20, seed=3, loss=nn.functional.cross_entropy)
    ew = np.mean([np.outer(p[n] - eye[y[n]], x[n]) ** 2 for n in range(20)], axis=0)
    np.testing.assert_allclose(empirical["weight"].numpy(), ew, rtol=1e-5)
    assert model.training and model.weight.grad is None  # mode and gradients as they were


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.heads = nn.Linear(5, 7), nn.ModuleList([nn.Linear(7, 3), nn.Linear(7, 3)])

    def forward(self, x, head):
        return self.heads[head](torch.relu(self.fc1(x)))


def test_input_grams_are_each_linear_layers_inputs_gram_and_zero_where_the_data_never_reaches():
    torch.manual_seed(0)
    model = TwoHeads().double()
    data = TensorDataset(torch.randn(50, 5, dtype=torch.float64), torch.zeros(50, dtype=torch.long))
    names = {"fc1.weight", "heads.0.weight", "heads.1.weight"}
    grams = input_grams(model, data, names, 32, seed=1, head=0, batch_size=7)
    x = data.tensors[0][sample(data, 32, seed=1)].numpy()
    hidden = np.maximum(x @ model.fc1.weight.detach().numpy().T + model.fc1.bias.detach().numpy(), 0)
    np.testing.assert_allclose(grams["fc1.weight"].numpy(), x.T @ x / 32, rtol=1e-5)
    np.testing.assert_allclose(grams["heads.0.weight"].numpy(), hidden.T @ hidden / 32, rtol=1e-5)
    assert torch.equal(grams["heads.1.weight"], torch.zeros(7, 7))
    assert sorted(grams) == sorted(names)


# -- strategies and the reply contract ------------------------------------------------------------------------------
def stats_reply(node, model, **statistics):
    message = reply(node, np_(model), num_examples=10 * node, client_id=node - 1)
    for key, tensors in statistics.items():
        message.content[key] = arrays_record(np_(tensors))
    return message


@pytest.mark.parametrize(
    "strategy, key, make",
    [
        (
            FisherMerging(floor=0.01, server_lr=1.2, weighting="num-examples"),
            contract.FISHER,
            lambda stats: FisherRule(stats, 0.01, [10, 20, 30]),
        ),
        (RegMean(alpha=0.5, server_lr=1.2), contract.GRAMS, lambda stats: RegMeanRule(stats, 0.5)),
    ],
)
def test_each_is_a_flower_strategy_merging_the_statistics_its_replies_carry(strategy, key, make):
    base, models, fishers, grams = setup()
    stats = fishers if key == contract.FISHER else grams
    replies = [stats_reply(t + 1, m, **{key: s}) for t, (m, s) in enumerate(zip(models, stats))]
    arrays, _ = strategy.merge_replies(1, replies[::-1], arrays_record(np_(base)))
    expected = merged_model(make(stats), base, models, 1.2)
    for name in SHAPES:
        np.testing.assert_allclose(arrays[name].numpy(), expected[name].numpy(), rtol=1e-12, atol=1e-14)
    assert strategy.statistics_request() == {key: 256}
    other, _ = FedAvg().merge_replies(1, replies, arrays_record(np_(base)))  # the statistics do not trouble the others
    assert other is not None


def test_a_reply_without_the_statistics_is_refused_and_one_with_non_finite_statistics_left_out():
    base, models, fishers, _ = setup()
    replies = [stats_reply(t + 1, m, fisher=f) for t, (m, f) in enumerate(zip(models, fishers))]
    replies[1] = stats_reply(2, models[1])
    with pytest.raises(
        FedmergeError,
        match=r"node 2: the reply lacks its 'fisher' record, the statistics this strategy "
        r"merges by; the train message asked for it \(config 'fisher'\): send it as an "
        r"ArrayRecord under 'fisher' \(see docs/client-contract.md\)\.",
    ):
        FisherMerging().merge_replies(1, replies, arrays_record(np_(base)))
    fishers[1]["fc1.bias"][3] = float("nan")
    replies[1] = stats_reply(2, models[1], fisher=fishers[1])
    strategy = FisherMerging()
    arrays, _ = strategy.merge_replies(1, replies, arrays_record(np_(base)))
    assert strategy.rounds[0].client_ids == [0, 2]
    assert strategy.rounds[0].excluded[0]["reason"] == "non-finite values in its 'fisher' statistics, tensor 'fc1.bias'"
    expected = merged_model(FisherRule([fishers[0], fishers[2]]), base, [models[0], models[2]])
    np.testing.assert_allclose(arrays["fc1.weight"].numpy(), expected["fc1.weight"].numpy(), rtol=1e-12)
    two = reply(1, np_(models[0]), num_examples=1)
    two.content["more"] = arrays_record(np_(models[0]))
    with pytest.raises(
        FedmergeError,
        match=r"node 1: a train reply must carry exactly one ArrayRecord and one "
        r"MetricRecord, got 2 and 1, besides the statistics for merging asked for "
        r"\(ArrayRecords under 'fisher', 'grams'\)",
    ):
        FedAvg().merge_replies(1, [two], arrays_record(np_(base)))


@pytest.fixture
def server_app(monkeypatch):
    """Flower's task identity, which a running ServerApp has and server messages need."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def test_the_train_messages_ask_for_the_statistics(server_app):
    arrays = arrays_record({"w": np.zeros(3, np.float32)})
    messages = RegMean(examples=64).configure_train(1, arrays, ConfigRecord({"num-rounds": 2}), InProcessGrid(None, 2))
    assert [dict(m.content["config"]) for m in messages] == [{"num-rounds": 2, "grams": 64, "server-round": 1}] * 2
    plain = FedAvg().configure_train(1, arrays, ConfigRecord({"num-rounds": 2}), InProcessGrid(None, 2))
    assert contract.GRAMS not in plain[0].content["config"]


def test_on_digits_the_client_app_sends_them_and_the_one_shot_search_tunes_each_method(server_app):
    from fedmerge.clients.app import client_app
    from fedmerge.simulations.experiment import Experiment
    from fedmerge.simulations.spec import Spec
    from fedmerge.tasks import load_suite

    names, clients = ["fisher", "regmean", "tsv-m", "iso-c", "iso-cts"], 3
    spec = Spec.from_dict(
        {
            "name": "stats",
            "suite": "digits",
            "clients": clients,
            "strategies": names,
            "training": {"steps": 10},
            "strategy": {"fisher": {"examples": 16}, "regmean": {"examples": 24}},
        }
    )
    fed = load_suite(spec.suite, clients, spec.suite_options, spec.seed)
    base = ArrayRecord({name: fed.pretrained[name] for name in fed.trained_names})
    experiment = Experiment(spec, None)
    experiment.fed = fed
    config = experiment._one_shot_config()
    assert config[contract.FISHER] == 16 and config[contract.GRAMS] == 24
    grid = InProcessGrid(client_app(spec.to_flat()), clients)
    sender = spec.build_strategy("fedavg", private=fed.private_names, statistics=fed.statistics_names)
    replies = sorted(
        grid.send_and_receive(sender.configure_train(1, base, config, grid)),
        key=lambda r: r.content["metrics"]["client-id"],
    )
    assert not any(r.has_error() for r in replies)
    for r in replies:
        fisher, grams, weights = r.content[contract.FISHER], r.content[contract.GRAMS], r.content[contract.ARRAYS]
        assert set(fisher) == {n for n in weights if n.endswith(("weight", "bias"))}
        assert all(fisher[n].shape == weights[n].shape for n in fisher)
        assert {n: grams[n].shape for n in grams} == {
            n: (weights[n].shape[1],) * 2 for n in weights if n.endswith("weight")
        }
    runs = {run["strategy"]: run for run in Experiment(spec, None).merge_one_shot(fed, base, replies)["runs"]}
    assert runs["regmean"]["searched"]["alpha"] == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert runs["iso-cts"]["searched"]["common_fraction"] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert len(runs["regmean"]["selection"]) == 5 * 40 and len(runs["fisher"]["selection"]) == 40
    for name in names:
        assert runs[name]["final"]["mean_normalized_accuracy"] > 0.5, name
        assert (runs[name]["selected"]["scaling"] is None) == bool(METHODS[name].no_lambda)
    load_suite.cache_clear()


# -- fedmerge merge -------------------------------------------------------------------------------------------------
def files(tmp_path, base, models, stats):
    """The models and their statistics as float32 safetensors files."""
    f32 = lambda tensors: {k: v.float().contiguous() for k, v in tensors.items()}
    save_file(f32(base), tmp_path / "base.safetensors")
    paths, stat_paths = [], []
    for t, (m, s) in enumerate(zip(models, stats)):
        save_file(f32(m), tmp_path / f"m{t}.safetensors")
        save_file(f32(s), tmp_path / f"s{t}.safetensors")
        paths.append(str(tmp_path / f"m{t}.safetensors"))
        stat_paths.append(str(tmp_path / f"s{t}.safetensors"))
    return str(tmp_path / "base.safetensors"), paths, stat_paths


@pytest.mark.parametrize(
    "method, options, make",
    [
        ("fisher", dict(weights=[1, 2, 3]), lambda s: FisherRule(s, weights=[1, 2, 3])),
        ("regmean", dict(alpha=0.4), lambda s: RegMeanRule(s, 0.4)),
    ],
)
def test_fedmerge_merge_reads_each_models_statistics_from_its_file(tmp_path, method, options, make):
    base, models, fishers, grams = setup()
    stats = fishers if method == "fisher" else grams
    base_path, paths, stat_paths = files(tmp_path, base, models, stats)
    out = merge_checkpoints(
        base_path, paths, tmp_path / "merged.safetensors", method=method, statistics=stat_paths, **options
    )
    f32 = lambda tensors: {k: v.float() for k, v in tensors.items()}
    expected = merged_model(make([f32(s) for s in stats]), f32(base), [f32(m) for m in models])
    merged = load_file(out)
    for name in SHAPES:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6)


def test_fedmerge_merge_refuses_statistics_methods_without_their_files(tmp_path, capsys):
    base, models, fishers, _ = setup()
    base_path, paths, stat_paths = files(tmp_path, base, models, fishers)
    out = tmp_path / "out"
    out.mkdir()

    def failing(*options) -> str:
        assert (
            main(
                [
                    "merge",
                    "--base",
                    base_path,
                    "--models",
                    *paths,
                    "--out",
                    str(out / "m.safetensors"),
                    "--quiet",
                    *options,
                ]
            )
            == 2
        )
        assert list(out.iterdir()) == []
        return capsys.readouterr().err

    assert (
        "fedmerge: error: method 'regmean' merges by each model's linear layers' input Gram matrices, which a "
        "checkpoint does not hold: give --statistics with one safetensors file per model"
        in failing("--method", "regmean")
    )
    assert "--statistics needs one file per model: 3 models, 2 files." in failing(
        "--method", "fisher", "--statistics", *stat_paths[:2]
    )
    assert "--statistics (statistics) is only used by methods 'fisher', 'regmean', not 'tsv-m'; drop it." in failing(
        "--method", "tsv-m", "--statistics", *stat_paths
    )
    assert "--scaling: method 'fisher' has no λ of its own" in failing(
        "--method", "fisher", "--statistics", *stat_paths, "--scaling", "1"
    )
    assert (
        main(
            [
                "merge",
                "--base",
                base_path,
                "--models",
                *paths,
                "--method",
                "fisher",
                "--statistics",
                *stat_paths,
                "--out",
                str(out / "m.safetensors"),
                "--quiet",
            ]
        )
        == 0
    )


@pytest.mark.cuda
@pytest.mark.parametrize("make", [lambda f, g: FisherRule(f, weights=[1, 2, 3]), lambda f, g: RegMeanRule(g, 0.7)])
def test_on_cuda_as_on_the_cpu(make):
    from fedmerge.merging import iter_merged_model

    base, models, fishers, grams = setup()
    on_cpu = merged_model(make(fishers, grams), base, models, 0.8)
    on_gpu = dict(iter_merged_model(make(fishers, grams), base, models, 0.8, device="cuda"))
    for name in SHAPES:
        assert on_gpu[name].device.type == "cuda"
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], rtol=1e-9, atol=1e-10)


# -- the docs' examples ---------------------------------------------------------------------------------------------
def docs_block(page: str, marker: str) -> str:
    """The one fenced python block of ``docs/<page>`` holding ``marker``."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text()
    found = [b for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M) if marker in b]
    assert len(found) == 1, (page, marker)
    return found[0]


def test_the_docs_way_of_making_statistics_files_feeds_fedmerge_merge(tmp_path, monkeypatch):
    model, train_set = softmax_regression(num_classes=3, width=4)
    monkeypatch.chdir(tmp_path)
    exec(
        docs_block("merging-checkpoints.md", "fisher_diagonal(model, train_set"),
        {"model": model, "train_set": train_set},
    )
    fisher, grams = load_file("math.fisher.safetensors"), load_file("math.grams.safetensors")
    assert {k: tuple(v.shape) for k, v in fisher.items()} == {"weight": (3, 4), "bias": (3,)}
    assert {k: tuple(v.shape) for k, v in grams.items()} == {"weight": (4, 4)}
    state = {k: v.float() for k, v in model.state_dict().items()}
    save_file(state, "base.safetensors")
    for name in ("math", "code"):
        save_file({k: v + 0.1 for k, v in state.items()}, f"{name}.safetensors")
    assert (
        main(
            [
                "merge",
                "--base",
                "base.safetensors",
                "--models",
                "math.safetensors",
                "code.safetensors",
                "--method",
                "regmean",
                "--statistics",
                "math.grams.safetensors",
                "math.grams.safetensors",
                "--out",
                "merged.safetensors",
                "--quiet",
            ]
        )
        == 0
    )
    torch.testing.assert_close(load_file("merged.safetensors")["weight"], state["weight"] + 0.1)


def test_the_client_contracts_example_replies_with_the_statistics_asked_for():
    model, trainset = softmax_regression(num_classes=3, width=4)
    body = docs_block("client-contract.md", "from fedmerge.clients.merging_statistics import")
    source = "def answer(msg, model, trainset, trained, metrics, config):\n" + "".join(
        f"    {line}" for line in body.splitlines(keepends=True)
    )
    namespace = {
        "ArrayRecord": ArrayRecord,
        "RecordDict": RecordDict,
        "MetricRecord": MetricRecord,
        "Message": Message,
        "contract": contract,
    }
    exec(source, namespace)
    trained = {k: v.detach().float() for k, v in model.state_dict().items()}
    msg = reply(1, np_(trained), num_examples=1)
    metrics = contract.train_reply_metrics(num_examples=30, num_steps=1, lr_sum=0.1)
    answered = namespace["answer"](msg, model, trainset, trained, metrics, {"fisher": 8, "grams": 8})
    assert set(answered.content.array_records) == {contract.ARRAYS, contract.FISHER, contract.GRAMS}
    expected = fisher_diagonal(model, trainset, {"weight", "bias"}, 8)
    np.testing.assert_allclose(answered.content[contract.FISHER]["weight"].numpy(), expected["weight"].numpy())
    plain = namespace["answer"](msg, model, trainset, trained, metrics, {})
    assert set(plain.content.array_records) == {contract.ARRAYS}


def test_fedmerge_evaluate_refuses_them_before_any_work(tmp_path):
    from fedmerge.simulations.evaluate import evaluate_checkpoints
    from fedmerge.simulations.spec import Spec

    spec = Spec.from_dict({"name": "e", "suite": "digits", "clients": 2, "strategies": ["fedavg", "regmean"]})
    with pytest.raises(
        FedmergeError,
        match=r"strategy 'regmean' merges by statistics of each client's training data "
        r"\(grams\), which checkpoints do not hold: leave it out \(--strategy\), or "
        r"merge with `fedmerge merge --method regmean --statistics \.\.\.`\.",
    ):
        evaluate_checkpoints(spec, tmp_path / "missing", [tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
