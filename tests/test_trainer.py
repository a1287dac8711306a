"""The local trainer: config validation, schedules, chunked training, reproducibility, full gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from fedmerge.clients.trainer import TrainConfig, full_gradient, learning_rate, total_steps, train
from fedmerge.errors import FedmergeError
from fedmerge.tasks import Task
from fedmerge.tasks.models import mlp


def make_task(n: int = 96, head: int = 0) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    data = TensorDataset(x, y)
    return Task("toy", data, data, data, head=head)


def make_model(heads: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return mlp(8, 16, 4, heads)


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, culprit", [
    ({"lr": 0}, "'lr' must be a positive number"),
    ({"lr": float("nan")}, "'lr' must be a positive number"),
    ({"batch_size": 0}, "'batch_size' must be a positive integer"),
    ({"steps": 2.5}, "'steps' must be a positive integer"),
    ({"steps": None}, "exactly one of the training options 'steps' and 'epochs'"),
    ({"epochs": 1.0}, "exactly one of the training options 'steps' and 'epochs'"),
    ({"optimizer": "adam"}, "'optimizer' must be one of sgd, momentum, adamw"),
    ({"schedule": "linear"}, "'schedule' must be one of constant, cosine"),
    ({"warmup_steps": -1}, "'warmup_steps' must be a non-negative integer"),
    ({"weight_decay": -0.1}, "'weight_decay' must be a non-negative number"),
    ({"grad_clip": 0}, "'grad_clip' must be a positive number"),
])
def test_bad_config_names_the_field(fields, culprit):
    with pytest.raises(FedmergeError, match=culprit):
        TrainConfig(**fields)


def test_total_steps_from_steps_or_epochs():
    assert total_steps(TrainConfig(steps=17), 1000) == 17
    assert total_steps(TrainConfig(steps=None, epochs=2.5, batch_size=32), 100) == 10  # 4 batches per epoch
    assert total_steps(TrainConfig(steps=None, epochs=0.01, batch_size=32), 100) == 1


# -- schedules ---------------------------------------------------------------------------------------------
def test_constant_schedule_with_warmup():
    config = TrainConfig(lr=0.2, warmup_steps=4)
    assert [learning_rate(config, k, 10) for k in range(6)] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])


def test_cosine_schedule_endpoints_and_shape():
    config = TrainConfig(lr=0.1, schedule="cosine", warmup_steps=5, steps=105)
    lrs = [learning_rate(config, k, 105) for k in range(105)]
    assert lrs[0] == pytest.approx(0.02) and lrs[4] == pytest.approx(0.1)  # linear warm-up to the peak
    assert lrs[5] == pytest.approx(0.1)  # cosine starts at the peak
    assert lrs[55] == pytest.approx(0.05)  # half-way down
    assert 0 < lrs[-1] < 1e-4  # ends near zero, never at zero
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    no_warmup = TrainConfig(lr=0.1, schedule="cosine", steps=10)
    assert learning_rate(no_warmup, 0, 10) == pytest.approx(0.1)
    assert learning_rate(no_warmup, 9, 10) == pytest.approx(0.05 * (1 + math.cos(0.9 * math.pi)))


def test_lr_sum_is_the_sum_of_the_rates_used():
    config = TrainConfig(lr=0.1, schedule="cosine", warmup_steps=3, steps=20)
    result = train(make_model(), make_task(), F.cross_entropy, config)
    assert result.num_steps == 20 and result.num_examples == 96
    assert result.lr_sum == pytest.approx(sum(learning_rate(config, k, 20) for k in range(20)))
    assert math.isfinite(result.train_loss) and result.train_loss > 0


# -- chunked training ------------------------------------------------------------------------------------
def test_two_chunks_follow_the_one_shot_schedule():
    config = TrainConfig(lr=0.1, schedule="cosine", warmup_steps=2, steps=12, batch_size=16)
    one_shot = train(make_model(), make_task(), F.cross_entropy, config)
    model = make_model()
    first = train(model, make_task(), F.cross_entropy, config, first_step=0, num_steps=6)
    second = train(model, make_task(), F.cross_entropy, config, first_step=6)
    assert (first.num_steps, second.num_steps) == (6, 6)
    assert first.lr_sum + second.lr_sum == pytest.approx(one_shot.lr_sum)
    assert first.lr_sum > second.lr_sum  # the second chunk is further down the cosine


def test_full_batch_gradient_descent_in_chunks_equals_one_shot():
    config = TrainConfig(lr=0.1, schedule="cosine", steps=10, batch_size=1000)
    one_shot = make_model()
    train(one_shot, make_task(), F.cross_entropy, config)
    chunked = make_model()
    for start in (0, 4, 7):
        train(chunked, make_task(), F.cross_entropy, config, first_step=start, num_steps={0: 4, 4: 3, 7: 3}[start])
    for name, value in one_shot.state_dict().items():
        assert torch.allclose(value, chunked.state_dict()[name], atol=1e-6)


def test_out_of_schedule_chunks_and_too_long_warmup_are_refused():
    with pytest.raises(FedmergeError, match=r"steps \[8, 12\) are outside the client's schedule of 10 steps"):
        train(make_model(), make_task(), F.cross_entropy, TrainConfig(steps=10), first_step=8, num_steps=4)
    with pytest.raises(FedmergeError, match="'warmup_steps' \\(10\\) must be smaller than the client's total steps"):
        train(make_model(), make_task(), F.cross_entropy, TrainConfig(steps=10, warmup_steps=10))


# -- reproducibility and isolation ---------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adamw"])
def test_same_seed_same_weights_other_seed_differs_global_rng_untouched(optimizer):
    config = TrainConfig(optimizer=optimizer, lr=0.01, steps=15, batch_size=8, seed=3)
    runs = []
    for seed in (3, 3, 4):
        model = make_model()
        state = torch.get_rng_state()
        train(model, make_task(), F.cross_entropy, TrainConfig(**{**config.__dict__, "seed": seed}))
        assert torch.equal(state, torch.get_rng_state())
        runs.append(weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adamw"])
def test_only_the_task_head_and_encoder_move(optimizer):
    model = make_model(heads=3)
    before = weights(model)
    train(model, make_task(head=1), F.cross_entropy, TrainConfig(optimizer=optimizer, lr=0.01, steps=5, weight_decay=0.1))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("heads.0.", "heads.2.")))
    assert not torch.equal(before["heads.1.weight"], after["heads.1.weight"])
    assert not torch.equal(before["encoder.1.weight"], after["encoder.1.weight"])


def test_grad_clip_bounds_each_sgd_step():
    model = make_model()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train(model, make_task(), F.cross_entropy, TrainConfig(lr=1.0, steps=3, grad_clip=1e-3))
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert float(moved.norm()) <= 3 * 1e-3 + 1e-6


# -- full gradient -----------------------------------------------------------------------------------------
def test_full_gradient_is_the_gradient_of_the_mean_loss():
    model = make_model(heads=2)
    task = make_task(n=5000)
    before = weights(model)
    grads = full_gradient(model, task.train, F.cross_entropy, head=1)
    x, y = task.train.tensors
    F.cross_entropy(model(x, 1), y).backward()
    for name, p in model.named_parameters():
        expected = torch.zeros_like(p) if p.grad is None else p.grad  # head 0 is unused
        assert torch.allclose(grads[name], expected, atol=1e-6)
    assert not grads["heads.0.weight"].any() and grads["heads.1.weight"].any()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
