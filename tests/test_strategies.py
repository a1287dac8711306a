"""fedmerge's Flower strategies on real Flower reply Messages: against Flower's own, and on bad replies."""

import inspect
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import FedMedian as FlowerFedMedian
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import save_file

from fedmerge import FedmergeError, contract
from fedmerge.merging import scaling_to_server_lr
from fedmerge.strategies import STRATEGIES, CClip, FedAvg, FedGMA, FedNova, MeanDirection, Median
from replies import InProcessGrid, arrays_record, error_reply, reply

SHAPES = {"conv.weight": (4, 3, 3), "conv.bias": (4,), "fc.weight": (10, 4)}


def model(rng, scale=1.0):
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def federation(num_clients, seed=0, steps=None, lr_sums=None, examples=None):
    rng = np.random.default_rng(seed)
    base = model(rng)
    clients = [model(rng) for _ in range(num_clients)]
    replies = [
        reply(
            node_id=100 + t,
            arrays=clients[t],
            num_examples=(examples or [50] * num_clients)[t],
            num_steps=(steps or [10] * num_clients)[t],
            lr_sum=(lr_sums or [1.0] * num_clients)[t],
            train_loss=0.1 * t,
            client_id=t,
        )
        for t in range(num_clients)
    ]
    return base, clients, replies


def as_numpy(record):
    return {k: v.numpy() for k, v in record.items()}


def assert_records_close(a, b, tol=1e-6):
    a, b = as_numpy(a), as_numpy(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=tol, rtol=tol)


def test_fedavg_with_equal_weights_and_unit_server_lr_equals_flowers_fedavg():
    base, _, replies = federation(5)
    ours, _ = FedAvg().merge_replies(1, replies, arrays_record(base))
    theirs, _ = FlowerFedAvg().aggregate_train(1, replies)
    assert_records_close(ours, theirs)


def test_example_weighted_fedavg_equals_flowers_fedavg():
    base, _, replies = federation(4, examples=[10, 20, 30, 140])
    ours, _ = FedAvg(weighting="num-examples").merge_replies(1, replies, arrays_record(base))
    theirs, _ = FlowerFedAvg().aggregate_train(1, replies)
    assert_records_close(ours, theirs)


@pytest.mark.parametrize("num_clients", [5, 6])
def test_median_equals_flowers_fedmedian(num_clients):
    base, _, replies = federation(num_clients, seed=num_clients)
    ours, _ = Median().merge_replies(1, replies, arrays_record(base))
    theirs, _ = FlowerFedMedian().aggregate_train(1, federation(num_clients, seed=num_clients)[2])
    assert_records_close(ours, theirs)


def test_one_round_with_beta_lambda_t_is_task_arithmetic():
    base, clients, replies = federation(4)
    scaling = 0.4
    merged, _ = FedAvg(server_lr=scaling_to_server_lr(scaling, 4)).merge_replies(1, replies, arrays_record(base))
    want = {k: base[k] + scaling * sum(c[k] - base[k] for c in clients) for k in SHAPES}
    for k in SHAPES:
        np.testing.assert_allclose(merged[k].numpy(), want[k], atol=1e-5)


def test_round_metrics_keep_per_client_metadata():
    base, _, replies = federation(4, steps=[10, 20, 40, 80], lr_sums=[1.0, 2.0, 4.0, 8.0])
    strategy = FedAvg()
    _, metrics = strategy.merge_replies(1, reversed(replies), arrays_record(base))
    assert metrics["client-ids"] == [0, 1, 2, 3]  # ordered by client id, whatever the arrival order
    assert metrics["client-weights"] == pytest.approx([0.25] * 4)
    assert metrics["effective-weights"] == pytest.approx([1 / 15, 2 / 15, 4 / 15, 8 / 15])
    assert metrics["chi-square"] > 0.5
    assert metrics["client-train-loss"] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    norms = [np.sqrt(sum(((r.content["arrays"][k].numpy() - base[k]) ** 2).sum() for k in SHAPES)) for r in replies]
    assert metrics["task-vector-norms"] == pytest.approx(norms, rel=1e-5)
    assert strategy.rounds[0].effective_steps_key == "num-steps"  # FedNova's default a_t, also for FedAvg's diagnostics


def test_fednova_uses_the_reported_effective_steps():
    base, clients, replies = federation(3, steps=[1, 2, 4], lr_sums=[0.1, 0.2, 0.4])
    merged, metrics = FedNova(normalize_by="steps").merge_replies(1, replies, arrays_record(base))
    a = np.array([1.0, 2.0, 4.0])
    want = {k: base[k] + a.mean() * sum(((c[k] - base[k]) / at) for c, at in zip(clients, a)) / 3 for k in SHAPES}
    for k in SHAPES:
        np.testing.assert_allclose(merged[k].numpy(), want[k], atol=1e-5)
    assert metrics["effective-weights"] == pytest.approx(list(a / a.sum()))


def test_mean_direction_needs_no_metric_and_rescales_by_the_task_vector_norms():
    base, clients, _ = federation(3)
    replies = [reply(i + 1, c, num_examples=10) for i, c in enumerate(clients)]  # no num-steps, no lr-sum
    merged, metrics = MeanDirection().merge_replies(1, replies, arrays_record(base))
    a = np.array(metrics["task-vector-norms"])
    want = {k: base[k] + a.mean() * sum(((c[k] - base[k]) / at) for c, at in zip(clients, a)) / 3 for k in SHAPES}
    for k in SHAPES:
        np.testing.assert_allclose(merged[k].numpy(), want[k], atol=1e-5)
    assert MeanDirection().required_metrics() == ()


def test_failed_and_non_finite_clients_are_left_out_and_recorded():
    base, clients, replies = federation(3)
    bad = dict(clients[0])
    bad["fc.weight"] = bad["fc.weight"].copy()
    bad["fc.weight"][0, 0] = np.nan
    all_replies = [
        *replies[1:],
        reply(7, bad, num_examples=5, num_steps=1, lr_sum=1.0),
        error_reply(8, "out of memory"),
    ]
    strategy = FedAvg()
    merged, metrics = strategy.merge_replies(1, all_replies, arrays_record(base))
    expected, _ = FedAvg().merge_replies(1, replies[1:], arrays_record(base))
    assert_records_close(merged, expected)
    assert metrics["num-clients"] == 2 and metrics["num-excluded"] == 2
    reasons = {e["node_id"]: e["reason"] for e in strategy.rounds[0].excluded}
    assert "fc.weight" in reasons[7] and "out of memory" in reasons[8]


def test_no_usable_reply_leaves_the_model_unchanged_and_is_recorded():
    base, clients, replies = federation(2)
    nan = {k: np.full_like(v, np.nan) for k, v in clients[0].items()}
    strategy = FedAvg()
    strategy.merge_replies(1, replies, arrays_record(base))
    merged, metrics = strategy.merge_replies(
        2, [error_reply(1, "boom"), reply(2, nan, num_examples=1)], arrays_record(base)
    )
    strategy.merge_replies(3, replies, arrays_record(base))
    assert merged is None and metrics["num-clients"] == 0 and metrics["num-excluded"] == 2
    assert [r.server_round for r in strategy.rounds] == [1, 2, 3]
    empty = strategy.record_for(2)
    assert empty.client_ids == [] and empty.weights == [] and empty.rule == {}
    reasons = {e["node_id"]: e["reason"] for e in empty.excluded}
    assert "boom" in reasons[1] and "non-finite" in reasons[2]
    assert strategy.record_for(3).client_ids == [0, 1] and strategy.record_for(4) is None


def test_cclip_centers_later_rounds_on_the_previous_update():
    base, clients, replies = federation(4)
    strategy = CClip(radius=0.5)
    first, _ = strategy.merge_replies(1, replies, arrays_record(base))
    # Round 2 from the new global model: the center is round 1's Δ, so identical task vectors to round 1's
    # Δ move the model by exactly that Δ again, unclipped.
    delta = {k: first[k].numpy() - base[k] for k in SHAPES}
    new_base = as_numpy(first)
    same = [reply(200 + t, {k: new_base[k] + delta[k] for k in SHAPES}, num_examples=1, client_id=t) for t in range(3)]
    second, _ = strategy.merge_replies(2, same, first)
    for k in SHAPES:
        np.testing.assert_allclose(second[k].numpy(), new_base[k] + delta[k], atol=1e-5)


def _with(arrays, **changes):
    out = dict(arrays)
    out.update(changes)
    return out


@pytest.mark.parametrize(
    "strategy, make_bad, message",
    [
        (
            FedAvg(),
            lambda c: reply(9, {k: v for k, v in c.items() if k != "conv.bias"}, num_examples=1),
            "node 9's reply lacks tensor 'conv.bias'.*sends back exactly the tensors it received",
        ),
        (
            FedAvg(),
            lambda c: reply(9, _with(c, extra=np.zeros(2, np.float32)), num_examples=1),
            "node 9's reply has tensor 'extra', which is not among the global model's",
        ),
        (
            FedAvg(),
            lambda c: reply(9, _with(c, **{"fc.weight": np.zeros((4, 10), np.float32)}), num_examples=1),
            r"node 9's reply: tensor 'fc.weight' has shape \(4, 10\) but the global model's has \(10, 4\)",
        ),
        (
            FedAvg(),
            lambda c: reply(9, _with(c, **{"conv.bias": c["conv.bias"].astype(np.float64)}), num_examples=1),
            "node 9's reply: tensor 'conv.bias' is torch.float64 but the global model's is torch.float32",
        ),
        (
            FedNova(normalize_by="steps"),
            lambda c: reply(9, c, num_examples=1, lr_sum=1.0),
            "node 9: reply's metrics lack 'num-steps'",
        ),
        (
            FedNova(normalize_by="lr-sum"),
            lambda c: reply(9, c, num_examples=1, num_steps=3, lr_sum=0.0),
            "node 9: metric 'lr-sum' must be a positive number",
        ),
        (
            FedAvg(weighting="num-examples"),
            lambda c: reply(9, c, num_examples=-2, num_steps=1),
            "node 9: metric 'num-examples' must be a positive number",
        ),
    ],
)
def test_contract_breaches_stop_the_round_naming_node_and_culprit(strategy, make_bad, message):
    base, clients, replies = federation(3)
    with pytest.raises(FedmergeError, match=message):
        strategy.merge_replies(1, [*replies, make_bad(clients[0])], arrays_record(base))
    assert strategy.rounds == []


def test_a_reply_without_exactly_one_array_record_is_refused():
    base, _, replies = federation(2)
    content = RecordDict({"metrics": MetricRecord({"num-examples": 3})})
    broken = Message(content=content, metadata=replies[0].metadata)
    with pytest.raises(FedmergeError, match="exactly one ArrayRecord and one MetricRecord, got 0 and 1"):
        FedAvg().merge_replies(1, [broken], arrays_record(base))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: FedAvg(server_lr=0), "server_lr"),
        (lambda: FedAvg(weighting="by-loss"), "weighting must be one of"),
        (lambda: FedNova(normalize_by="time"), "normalize_by"),
        (lambda: FedGMA(threshold=2), "'FedGMA.threshold' must be a number ≤ 1"),
        (lambda: Median(even="upper"), "'Median.even' must be one of mean, lower"),
        (lambda: CClip(radius=-1), "'CClip.radius' must be a number ≥ 0"),
        (lambda: CClip(center="mean"), "'CClip.center' must be one of previous, zero"),
        (lambda: STRATEGIES["ties"](density=0), r"'Ties.density' must be a number in \(0, 1\]"),
        (lambda: STRATEGIES["dare-ties"](seed=-1), "'DareTies.seed' must be"),
    ],
)
def test_bad_strategy_parameters_are_refused(make, message):
    with pytest.raises(FedmergeError, match=message):
        make()


# -- Flower's FedAvg keywords, summary, and runs through Flower's own start() --------------------------
FLOWER_KEYWORDS = {
    "fraction_train": 0.5,
    "fraction_evaluate": 0.25,
    "min_train_nodes": 3,
    "min_evaluate_nodes": 4,
    "min_available_nodes": 5,
    "weighted_by_key": "shots",
    "arrayrecord_key": "weights",
    "configrecord_key": "settings",
    "train_metrics_aggr_fn": aggregate_metricrecords,
    "evaluate_metrics_aggr_fn": aggregate_metricrecords,
}


def test_the_keywords_cover_flowers_fedavg():
    assert set(FLOWER_KEYWORDS) == set(inspect.signature(FlowerFedAvg.__init__).parameters) - {"self"}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_takes_every_fedavg_keyword(name):
    strategy = STRATEGIES[name](**FLOWER_KEYWORDS)
    assert {k: getattr(strategy, k) for k in FLOWER_KEYWORDS} == FLOWER_KEYWORDS


def test_weighted_by_key_picks_the_weighting_metric():
    base, clients, _ = federation(3)
    replies = [reply(10 + t, c, shots=s, client_id=t) for t, (c, s) in enumerate(zip(clients, [1, 2, 7]))]
    ours, metrics = FedAvg(weighting="num-examples", weighted_by_key="shots").merge_replies(
        1, replies, arrays_record(base)
    )
    theirs, _ = FlowerFedAvg(weighted_by_key="shots").aggregate_train(1, replies)
    assert_records_close(ours, theirs)
    assert metrics["client-weights"] == pytest.approx([0.1, 0.2, 0.7])
    with pytest.raises(FedmergeError, match="node 100: reply's metrics lack 'shots'"):
        FedAvg(weighting="num-examples", weighted_by_key="shots").merge_replies(
            1, federation(3)[2], arrays_record(base)
        )


def test_train_metrics_aggr_fn_adds_its_metrics_to_the_rounds():
    base, _, replies = federation(3, examples=[10, 30, 60])
    calls = []

    def weighted_loss(contents, key):
        calls.append((len(contents), key))
        return MetricRecord({"train-loss": aggregate_metricrecords(contents, key)["train-loss"], "seen": len(contents)})

    bad = reply(9, {k: np.full(s, np.nan, np.float32) for k, s in SHAPES.items()}, num_examples=5, train_loss=9.0)
    strategy = FedAvg(train_metrics_aggr_fn=weighted_loss)
    _, metrics = strategy.merge_replies(1, [*replies, bad], arrays_record(base))
    assert calls == [(3, "num-examples")]  # the accepted replies only
    assert metrics["train-loss"] == pytest.approx(0.1 * 0.3 + 0.2 * 0.6)  # its keys win
    assert metrics["seen"] == 3 and metrics["client-ids"] == [0, 1, 2]  # beside the per-client metrics
    assert "seen" not in FedAvg().merge_replies(1, replies, arrays_record(base))[1]


def _summary(caplog, strategy):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flwr"):
        strategy.summary()
    assert {r.name for r in caplog.records} == {"flwr"}  # the logger with a handler: the banner shows it
    return caplog.text


def test_summary_tells_the_real_weighting_rule_and_server_lr(caplog):
    text = _summary(caplog, FedNova(server_lr=2.5))
    assert "Merging: FedNova, normalize_by='steps'" in text and "β = 2.5" in text
    assert "Weighted by: nothing: uniform p_t = 1/T" in text and "'num-examples'" not in text
    assert "Weighted by: 'shots' (p_t ∝ shots)" in _summary(
        caplog, FedAvg(weighting="num-examples", weighted_by_key="shots")
    )
    assert "uniform p_t = 1/T (Median is unweighted)" in _summary(caplog, Median(weighting="num-examples"))
    text = _summary(caplog, CClip(radius=0.5, fraction_evaluate=0.5))
    assert "radius=0.5, iterations=1, center='previous'" in text and "evaluate (0.50)" in text
    assert "'num-examples' weighs evaluate metrics only" in text


@pytest.fixture
def server_app(monkeypatch):
    """Flower's task identity, which a running ServerApp has and server messages need."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def train_only_app(shift, fail_in_round=None):
    """A ClientApp with only @app.train: θ + shift·node id, replying under the key it received."""
    app = ClientApp()

    @app.train()
    def train(message, context):
        arrays, config = contract.received(message.content)
        if config["server-round"] == fail_in_round:
            raise RuntimeError("out of memory")
        key = next(iter(message.content.array_records))
        node = context.node_id
        trained = ArrayRecord({k: torch.from_numpy(a.numpy() + shift * node) for k, a in arrays.items()})
        metrics = contract.train_reply_metrics(num_examples=node, num_steps=node, lr_sum=0.1 * node, client_id=node - 1)
        return Message(RecordDict({key: trained, "metrics": MetricRecord(metrics)}), reply_to=message)

    return app


def test_custom_record_keys_round_trip_through_a_run(server_app):
    grid = InProcessGrid(train_only_app(1.0), 2)
    strategy = FedAvg(arrayrecord_key="weights", configrecord_key="settings")
    result = strategy.start(grid=grid, initial_arrays=arrays_record({"w": np.zeros(3, np.float32)}), num_rounds=2)
    assert [sorted(m.content.keys()) for m in grid.sent] == [["settings", "weights"]] * 4
    np.testing.assert_allclose(result.arrays["w"].numpy(), [3.0] * 3)  # two rounds of the mean shift, 1.5


def test_contract_received_names_the_keys_of_a_malformed_message():
    content = RecordDict({"a": ArrayRecord(), "b": ArrayRecord(), "config": ConfigRecord()})
    with pytest.raises(FedmergeError, match=r"one ArrayRecord and one ConfigRecord, got keys \['a', 'b'\]"):
        contract.received(content)


def test_a_round_where_every_client_fails_keeps_records_on_their_rounds(server_app):
    grid = InProcessGrid(train_only_app(1.0, fail_in_round=2), 2)
    strategy = FedAvg()
    history = []
    strategy.start(
        grid=grid,
        initial_arrays=arrays_record({"w": np.zeros(2, np.float32)}),
        num_rounds=3,
        evaluate_fn=lambda r, arrays: history.append((r, float(arrays["w"].numpy()[0]))),
    )
    assert history == [(0, 0.0), (1, 1.5), (2, 1.5), (3, 3.0)]
    assert [r.server_round for r in strategy.rounds] == [1, 2, 3]
    failed = strategy.record_for(2)
    assert failed.client_ids == [] and sorted(e["node_id"] for e in failed.excluded) == [1, 2]
    assert "out of memory" in failed.excluded[0]["reason"]
    assert strategy.record_for(3).client_ids == [0, 1]


def _docs_server_app() -> str:
    text = (Path(__file__).parents[1] / "docs" / "strategies.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return next(b for b in blocks if "ServerApp()" in b)


def test_the_docs_serverapp_runs_as_is_with_a_train_only_clientapp(server_app, tmp_path, capsys):
    save_file({"w": torch.zeros(3), "b": torch.ones(2)}, tmp_path / "base.safetensors")
    namespace = {}
    exec(compile(_docs_server_app(), "docs/strategies.md", "exec"), namespace)
    grid = InProcessGrid(train_only_app(1.0), 2)
    namespace["app"](grid, Context(0, 0, {}, RecordDict(), {"base": str(tmp_path / "base.safetensors")}))
    assert [m.metadata.message_type for m in grid.sent] == [
        "train"
    ] * 4  # no evaluate message, so no error from a ClientApp without @app.evaluate
    out = capsys.readouterr().out
    assert "1 [0, 1]" in out and "2 [0, 1]" in out and "2 tensors merged" in out


def test_by_default_no_evaluate_message_is_sent(server_app):
    grid = InProcessGrid(train_only_app(1.0), 2)
    assert list(FedAvg().configure_evaluate(1, arrays_record({"w": np.zeros(1)}), ConfigRecord(), grid)) == []
    assert (
        len(
            list(
                FedAvg(fraction_evaluate=1.0).configure_evaluate(
                    1, arrays_record({"w": np.zeros(1)}), ConfigRecord(), grid
                )
            )
        )
        == 2
    )


def test_cclip_takes_a_second_round_of_a_model_with_an_integer_buffer():
    """The center CClip keeps holds only floating tensors; round 2 must not look up the integer buffer in it."""
    rng = np.random.default_rng(3)
    base = {**model(rng), "bn.counter": np.array(7, dtype=np.int64)}
    clients = [{**model(rng), "bn.counter": np.array(9, dtype=np.int64)} for _ in range(3)]
    strategy = CClip(radius=0.5, center="previous")
    first, _ = strategy.merge_replies(
        1, [reply(10 + t, c, num_examples=1, client_id=t) for t, c in enumerate(clients)], arrays_record(base)
    )
    second, _ = strategy.merge_replies(
        2, [reply(20 + t, as_numpy(first), num_examples=1, client_id=t) for t in range(3)], first
    )
    assert second["bn.counter"].numpy().item() == first["bn.counter"].numpy().item() == 9
    assert_records_close(second, first)  # every client sent the global model back: nothing moves


def test_a_strategy_on_a_device_this_machine_lacks_is_refused_and_cpu_is_the_default():
    assert FedAvg().device.type == "cpu" and FedAvg(device="auto").device.type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if not torch.cuda.is_available():
        with pytest.raises(FedmergeError, match="device cuda: CUDA is not available"):
            FedAvg(device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_aggregates_on_the_gpu_as_on_the_cpu(name):
    base, _, replies = federation(5)
    rng = np.random.default_rng(1)
    for message in replies:  # the statistics Fisher merging and RegMean read beside the weights
        message.content[contract.FISHER] = arrays_record({k: np.abs(v) for k, v in model(rng).items()})
        message.content[contract.GRAMS] = arrays_record({"fc.weight": np.eye(SHAPES["fc.weight"][1], dtype=np.float32)})
    on_cpu, _ = STRATEGIES[name]().merge_replies(1, replies, arrays_record(base))
    on_gpu, _ = STRATEGIES[name](device="cuda").merge_replies(1, replies, arrays_record(base))
    assert_records_close(on_gpu, on_cpu, tol=1e-5)


def test_every_method_has_a_real_strategy_class_of_its_own_file():
    import pickle

    from fedmerge.merging import METHODS

    assert list(STRATEGIES) == list(METHODS)
    for name, strategy in STRATEGIES.items():
        assert strategy.method is METHODS[name] and strategy.__module__.startswith("fedmerge.strategies.")
        assert type(pickle.loads(pickle.dumps(strategy()))) is strategy


def test_two_replies_from_one_client_are_refused_naming_both_nodes():
    base, clients, _ = federation(3)
    replies = [
        reply(5, clients[0], num_examples=1, client_id=1),
        reply(9, clients[1], num_examples=1, client_id=1),
        reply(7, clients[2], num_examples=1, client_id=2),
    ]
    with pytest.raises(FedmergeError, match="nodes 5 and 9 both reply as client 1.*its own partition-id"):
        FedAvg().merge_replies(1, replies, arrays_record(base))


def test_partial_participation_draws_real_node_ids_however_large():
    """Flower's node ids are 64-bit: a draw over ids on both sides of 2**63 must return those ids, not floats."""
    grid = InProcessGrid(ClientApp(), 0)
    grid.node_ids = [3, 2**40 + 1, 2**63 - 25, 2**63 + 1, 2**64 - 59, 17]
    strategy = FedAvg(clients_per_round=3, sample_seed=1, min_available_nodes=6)
    for server_round in range(1, 6):
        chosen = strategy._draw(server_round, grid)
        assert len(set(chosen)) == 3 and set(chosen) <= set(grid.node_ids) and all(type(n) is int for n in chosen)


def test_partial_participation_draws_from_the_seed_and_the_round_alike_for_every_strategy(server_app):
    """clients_per_round: the same clients for every strategy in a round, others in the next, recorded per round."""
    base, clients, _ = federation(6)

    def app_for(shift):
        app = ClientApp()

        @app.train()
        def train(message, context):
            arrays, _ = contract.received(message.content)
            trained = {k: arrays[k].numpy() + shift for k in arrays}
            metrics = contract.train_reply_metrics(1, 1, 1.0, client_id=context.node_config["partition-id"])
            return Message(
                RecordDict({"arrays": arrays_record(trained), "metrics": MetricRecord(metrics)}), reply_to=message
            )

        return app

    draws = []
    for strategy in (
        FedAvg(clients_per_round=2, sample_seed=7, min_available_nodes=6),
        Median(clients_per_round=2, sample_seed=7, min_available_nodes=6),
    ):
        grid = InProcessGrid(app_for(0.1), 6)
        strategy.clients_by_node = {node: node - 1 for node in grid.node_ids}
        strategy.start(grid=grid, initial_arrays=arrays_record(base), num_rounds=3)
        sent = [[m.metadata.dst_node_id - 1 for m in grid.sent[k : k + 2]] for k in (0, 2, 4)]
        assert len(grid.sent) == 6 and [sorted(s) for s in sent] == [strategy.sampled[r] for r in (1, 2, 3)]
        assert [r.sampled for r in strategy.rounds] == [strategy.sampled[r] for r in (1, 2, 3)]
        assert [r.client_ids for r in strategy.rounds] == [strategy.sampled[r] for r in (1, 2, 3)]
        draws.append(strategy.sampled)
    assert draws[0] == draws[1] and len({tuple(d) for d in draws[0].values()}) > 1
    with pytest.raises(FedmergeError, match="clients_per_round must be an integer ≥ 0"):
        FedAvg(clients_per_round=-1)
