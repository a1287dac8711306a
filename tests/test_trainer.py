"""The local trainer: config validation, schedules, chunked training, reproducibility, full gradients,
any map-style Dataset (tasks/loading.py), frozen parameters, mixed precision, CUDA (skipped without one)."""

import math
import warnings
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset, get_worker_info

from fedmerge.clients.trainer import TrainConfig, full_gradient, learning_rate, total_steps, train
from fedmerge.errors import FedmergeError
from fedmerge.tasks import Task
from fedmerge.tasks.loading import eval_batches
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
@pytest.mark.parametrize(
    "fields, culprit",
    [
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
    ],
)
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
    train(
        model, make_task(head=1), F.cross_entropy, TrainConfig(optimizer=optimizer, lr=0.01, steps=5, weight_decay=0.1)
    )
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


# -- any map-style Dataset (tasks/loading.py) ----------------------------------------------------------------
class LazyToy(Dataset):
    """``make_task``'s data computed item by item, on the fly; ``in_workers`` asserts it is read by DataLoader workers."""

    def __init__(self, n: int = 96, as_dict: bool = False, in_workers: bool = False) -> None:
        self.x, self.y = make_task(n).train.tensors  # the source of truth; items are built from it on each read
        self.as_dict, self.in_workers = as_dict, in_workers

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        assert not self.in_workers or get_worker_info() is not None, "read in the main process, not by a worker"
        x = self.x[i].clone()
        return ({"features": x, "scale": torch.tensor(2.0)} if self.as_dict else x), self.y[i].clone()


class DictModel(torch.nn.Module):
    """Takes one dict input (as a tokenizer's output): ``model(batch)``, no head argument."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.linear(batch["features"] * batch["scale"][:, None])


def lazy_task(**kwargs) -> Task:
    data = LazyToy(**kwargs)
    return Task("lazy", data, data, data, head=None if kwargs.get("as_dict") else 0)


def test_a_lazy_dataset_trains_reproducibly_and_as_its_tensor_dataset_does():
    config = TrainConfig(
        optimizer="momentum", lr=0.05, steps=30, batch_size=10, seed=3
    )  # 9 batches per pass: 3+ passes
    runs = {}
    for name, task, seed in [
        ("lazy", lazy_task(), 3),
        ("again", lazy_task(), 3),
        ("other", lazy_task(), 4),
        ("tensors", make_task(), 3),
    ]:
        model = make_model()
        state = torch.get_rng_state()
        result = train(model, task, F.cross_entropy, TrainConfig(**{**config.__dict__, "seed": seed}))
        assert torch.equal(state, torch.get_rng_state()) and result.num_examples == 96
        runs[name] = weights(model)
    assert not any(torch.equal(runs["lazy"][k], v) for k, v in weights(make_model()).items())  # it trained
    assert all(torch.equal(runs["lazy"][k], runs["again"][k]) for k in runs["lazy"])
    assert not all(torch.equal(runs["lazy"][k], runs["other"][k]) for k in runs["lazy"])
    assert all(torch.equal(runs["lazy"][k], runs["tensors"][k]) for k in runs["lazy"])  # same batches, same order


def test_dataloader_workers_give_the_same_weights_as_the_main_process():
    config = TrainConfig(lr=0.05, steps=25, batch_size=16, seed=1)  # 6 batches per pass: workers span passes
    serial, parallel = make_model(), make_model()
    train(serial, lazy_task(), F.cross_entropy, config)
    workers = TrainConfig(**{**config.__dict__, "num_workers": 2, "pin_memory": True})  # no GPU: nothing pinned
    train(parallel, lazy_task(in_workers=True), F.cross_entropy, workers)
    assert all(torch.equal(v, parallel.state_dict()[k]) for k, v in serial.state_dict().items())
    with pytest.raises(FedmergeError, match="read in the main process"):  # the check above is real
        train(make_model(), lazy_task(in_workers=True), F.cross_entropy, config)


def test_dict_inputs_train_and_head_none_calls_the_model_with_the_input_alone():
    model = DictModel()
    before = weights(model)
    result = train(model, lazy_task(as_dict=True), F.cross_entropy, TrainConfig(lr=0.05, steps=8, batch_size=12))
    assert math.isfinite(result.train_loss) and not torch.equal(before["linear.weight"], model.linear.weight)
    grads = full_gradient(model, LazyToy(as_dict=True), F.cross_entropy)
    x, y = make_task().train.tensors
    expected = torch.autograd.grad(F.cross_entropy(model.linear(2 * x), y), model.linear.weight)[0]
    assert torch.allclose(grads["linear.weight"], expected, atol=1e-6)


def test_head_none_with_tensors_and_a_single_input_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))  # forward(x) only: a head argument would fail
    task = make_task(head=None)
    before = weights(model)
    train(model, task, F.cross_entropy, TrainConfig(lr=0.05, steps=5))
    assert not torch.equal(before["0.weight"], model[0].weight)
    assert full_gradient(model, task.train, F.cross_entropy)["0.weight"].any()


def test_eval_batches_is_one_ordered_pass_and_an_empty_train_set_is_refused():
    lazy = [(b["features"], y) for b, y in eval_batches(LazyToy(10, as_dict=True), 4)]
    tensors = list(eval_batches(make_task(10).train, 4))
    assert [len(y) for _, y in lazy] == [len(y) for _, y in tensors] == [4, 4, 2]
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(lazy, tensors))
    empty = TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(FedmergeError, match="the training set is empty"):
        train(make_model(), Task("empty", empty, empty, empty), F.cross_entropy, TrainConfig(steps=1))


def test_the_models_own_randomness_follows_the_seed():
    def dropout_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4))

    runs = []
    for seed in (2, 2, 5):
        model = dropout_model()
        state = torch.get_rng_state()
        train(model, make_task(head=None), F.cross_entropy, TrainConfig(lr=0.1, steps=5, batch_size=96, seed=seed))
        assert torch.equal(state, torch.get_rng_state())
        runs.append(weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])  # full batch: only dropout differs


def test_frozen_parameters_stay_as_they_were():
    for optimizer in ("sgd", "adamw"):
        model = make_model()
        model.encoder[1].weight.requires_grad_(False)
        before = weights(model)
        config = TrainConfig(optimizer=optimizer, lr=0.05, steps=5, weight_decay=0.1, grad_clip=1.0)
        train(model, make_task(), F.cross_entropy, config)
        assert torch.equal(before["encoder.1.weight"], model.encoder[1].weight)
        assert not torch.equal(before["encoder.1.bias"], model.encoder[1].bias)
    assert not full_gradient(model, make_task().train, F.cross_entropy, head=0)["encoder.1.weight"].any()


# -- precision -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, culprit",
    [
        ({"precision": "fp8"}, "'precision' must be one of fp32, bf16, fp16"),
        ({"num_workers": -1}, "'num_workers' must be a non-negative integer"),
        ({"num_workers": 1.5}, "'num_workers' must be a non-negative integer"),
        ({"pin_memory": "yes"}, "'pin_memory' must be true or false"),
    ],
)
def test_bad_data_and_precision_options_name_the_field(fields, culprit):
    with pytest.raises(FedmergeError, match=culprit):
        TrainConfig(**fields)


def test_bf16_on_the_cpu_trains_reproducibly_in_float32_weights():
    config = TrainConfig(lr=0.05, steps=10, batch_size=16, precision="bf16")
    runs = []
    for _ in range(2):
        model = make_model()
        result = train(model, make_task(), F.cross_entropy, config)
        assert math.isfinite(result.train_loss)
        runs.append(weights(model))
    fp32 = make_model()
    train(fp32, make_task(), F.cross_entropy, TrainConfig(**{**config.__dict__, "precision": "fp32"}))
    initial = weights(make_model())
    assert all(v.dtype == torch.float32 for v in runs[0].values())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not any(torch.equal(runs[0][k], initial[k]) for k in initial)
    assert not all(torch.equal(runs[0][k], v) for k, v in fp32.state_dict().items())  # bf16 did compute in bf16
    assert all(torch.allclose(runs[0][k], v, atol=0.01) for k, v in fp32.state_dict().items())  # moves are ~0.06


def test_fp16_on_the_cpu_trains_with_a_gradient_scaler_or_is_refused_clearly():
    model = make_model()
    before = weights(model)
    try:
        result = train(model, make_task(), F.cross_entropy, TrainConfig(lr=0.05, steps=10, precision="fp16"))
    except FedmergeError as error:  # a torch without fp16 autocast on the CPU
        assert "fp16 needs a GPU; use precision = 'bf16' on the CPU" in str(error)
        return
    assert math.isfinite(result.train_loss) and result.num_steps == 10
    assert not torch.equal(before["encoder.1.weight"], model.encoder[1].weight)
    # a step whose scaled gradients overflow fp16 is skipped (the scaler then lowers its scale), as torch does
    huge = make_task()
    huge = Task("huge", TensorDataset(huge.train.tensors[0] * 1e4, huge.train.tensors[1]), huge.val, huge.test, 0)
    for precision, moved in (("fp16", False), ("fp32", True)):
        model = make_model()
        train(model, huge, F.cross_entropy, TrainConfig(lr=0.01, steps=1, precision=precision))
        assert torch.equal(before["encoder.1.weight"], model.encoder[1].weight) != moved


def test_fp16_refused_by_torch_says_to_use_bf16_on_the_cpu(monkeypatch):
    def refusing_autocast(device_type, dtype):  # what torch does for a dtype a device lacks: warn and disable
        warnings.warn("In CPU autocast, but the target dtype is not supported. Disabling autocast.")
        return nullcontext()

    monkeypatch.setattr(torch, "autocast", refusing_autocast)
    with pytest.raises(
        FedmergeError,
        match=r"'precision' = 'fp16' is not available on cpu \(In CPU autocast.*"
        r"fp16 needs a GPU; use precision = 'bf16' on the CPU",
    ):
        train(make_model(), make_task(), F.cross_entropy, TrainConfig(steps=2, precision="fp16"))


# -- CUDA (skipped without a GPU) ------------------------------------------------------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("task_fn", [make_task, lazy_task])
def test_training_on_cuda_is_close_to_the_cpu(task_fn):
    config = TrainConfig(optimizer="adamw", lr=0.01, steps=20, batch_size=16, num_workers=1, pin_memory=True)
    cpu, gpu = make_model(), make_model().cuda()
    train(cpu, task_fn(), F.cross_entropy, config)
    result = train(gpu, task_fn(), F.cross_entropy, config)
    assert math.isfinite(result.train_loss)
    assert all(t.device.type == "cuda" for t in gpu.state_dict().values())
    assert all(torch.allclose(v, gpu.state_dict()[k].cpu(), atol=1e-4) for k, v in cpu.state_dict().items())
    grads = full_gradient(gpu, task_fn().train, F.cross_entropy, head=0)
    assert all(g.device.type == "cuda" for g in grads.values())


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda_trains_near_fp32(precision):
    config = TrainConfig(lr=0.05, steps=20, batch_size=16, grad_clip=1.0)
    fp32, mixed, again = make_model().cuda(), make_model().cuda(), make_model().cuda()
    train(fp32, make_task(), F.cross_entropy, config)
    low = TrainConfig(**{**config.__dict__, "precision": precision})
    result = train(mixed, make_task(), F.cross_entropy, low)
    train(again, make_task(), F.cross_entropy, low)
    assert math.isfinite(result.train_loss)
    assert all(t.dtype == torch.float32 for t in mixed.state_dict().values())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in mixed.state_dict().items())
    assert all(torch.allclose(v, mixed.state_dict()[k], atol=0.01) for k, v in fp32.state_dict().items())
    if precision == "fp16":  # the scaler skips a step whose scaled gradients overflow fp16
        huge = make_task()
        huge = Task("huge", TensorDataset(huge.train.tensors[0] * 1e4, huge.train.tensors[1]), huge.val, huge.test, 0)
        model = make_model().cuda()
        before = weights(model)
        train(model, huge, F.cross_entropy, TrainConfig(lr=0.01, steps=1, precision="fp16"))
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
