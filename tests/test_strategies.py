"""fedmerge's Flower strategies on real Flower reply Messages: against Flower's own, and on bad replies."""

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import FedMedian as FlowerFedMedian

from fedmerge import FedmergeError
from fedmerge.merging import scaling_to_server_lr
from fedmerge.strategies import CClip, FedAvg, FedGMA, FedNova, Median
from replies import arrays_record, error_reply, reply

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
    assert strategy.rounds[0].effective_steps_key == "lr-sum"


def test_fednova_uses_the_reported_effective_steps():
    base, clients, replies = federation(3, steps=[1, 2, 4], lr_sums=[0.1, 0.2, 0.4])
    merged, metrics = FedNova(normalize_by="steps").merge_replies(1, replies, arrays_record(base))
    a = np.array([1.0, 2.0, 4.0])
    want = {k: base[k] + a.mean() * sum(((c[k] - base[k]) / at) for c, at in zip(clients, a)) / 3 for k in SHAPES}
    for k in SHAPES:
        np.testing.assert_allclose(merged[k].numpy(), want[k], atol=1e-5)
    assert metrics["effective-weights"] == pytest.approx(list(a / a.sum()))


def test_failed_and_non_finite_clients_are_left_out_and_recorded():
    base, clients, replies = federation(3)
    bad = dict(clients[0])
    bad["fc.weight"] = bad["fc.weight"].copy()
    bad["fc.weight"][0, 0] = np.nan
    all_replies = [*replies[1:], reply(7, bad, num_examples=5, num_steps=1, lr_sum=1.0), error_reply(8, "out of memory")]
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
    merged, metrics = strategy.merge_replies(2, [error_reply(1, "boom"), reply(2, nan, num_examples=1)], arrays_record(base))
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
        (FedAvg(), lambda c: reply(9, {k: v for k, v in c.items() if k != "conv.bias"}, num_examples=1),
         "node 9: reply lacks tensor 'conv.bias'"),
        (FedAvg(), lambda c: reply(9, _with(c, extra=np.zeros(2, np.float32)), num_examples=1),
         "node 9: reply has tensor 'extra'"),
        (FedAvg(), lambda c: reply(9, _with(c, **{"fc.weight": np.zeros((4, 10), np.float32)}), num_examples=1),
         r"node 9: tensor 'fc.weight' has shape \(4, 10\)"),
        (FedAvg(), lambda c: reply(9, _with(c, **{"conv.bias": c["conv.bias"].astype(np.float64)}), num_examples=1),
         "node 9: tensor 'conv.bias' has dtype float64"),
        (FedNova(normalize_by="steps"), lambda c: reply(9, c, num_examples=1, lr_sum=1.0),
         "node 9: reply's metrics lack 'num-steps'"),
        (FedNova(normalize_by="lr-sum"), lambda c: reply(9, c, num_examples=1, num_steps=3, lr_sum=0.0),
         "node 9: metric 'lr-sum' must be a positive number"),
        (FedAvg(weighting="num-examples"), lambda c: reply(9, c, num_examples=-2, num_steps=1),
         "node 9: metric 'num-examples' must be a positive number"),
    ],
)
def test_contract_breaches_stop_the_round_naming_node_and_culprit(strategy, make_bad, message):
    base, clients, replies = federation(3)
    with pytest.raises(FedmergeError, match=message):
        strategy.merge_replies(1, [*replies, make_bad(clients[0])], arrays_record(base))
    assert strategy.rounds == []


def test_a_reply_without_exactly_one_array_record_is_refused():
    from flwr.app import Message, MetricRecord, RecordDict

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
        (lambda: FedGMA(threshold=2), "at most 1"),
        (lambda: Median(even="upper"), "even-count"),
        (lambda: CClip(radius=0), "radius"),
        (lambda: CClip(center="mean"), "center must be one of"),
    ],
)
def test_bad_strategy_parameters_are_refused(make, message):
    with pytest.raises(FedmergeError, match=message):
        make()
