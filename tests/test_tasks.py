"""Task suites: options, determinism, the θ0 cache, partitions, pretraining and the quadratic's closed form."""

import numpy as np
import pytest
import torch

from fedmerge.clients.trainer import TrainConfig, full_gradient, train
from fedmerge.errors import FedmergeError
from fedmerge.tasks import find_suite, installed, load_suite
from fedmerge.tasks.cache import cache_dir, load_or_build

SMALL_MNIST1D = {"num_samples": 2000}


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fedmerge-cache")


@pytest.fixture(autouse=True)
def cache(shared_cache, monkeypatch):
    """A cache shared by the session (generated data is reused); the in-process cache is cleared."""
    monkeypatch.setenv("FEDMERGE_CACHE", str(shared_cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    load_suite.cache_clear()
    yield shared_cache
    load_suite.cache_clear()


def label_distribution(labels: torch.Tensor) -> np.ndarray:
    return np.bincount(labels.numpy(), minlength=10) / len(labels)


# -- options and errors ----------------------------------------------------------------------------------
def test_registry_lists_every_suite_with_documented_defaults():
    assert set(installed()) >= {"quadratic", "mnist1d", "digits", "vision"}
    for suite in map(find_suite, ("quadratic", "mnist1d", "digits", "vision")):
        assert suite.description
        assert all(option.help for option in suite.options.values())


def test_unknown_suite_names_the_valid_ones():
    with pytest.raises(FedmergeError, match="unknown suite 'cifar'.*quadratic, mnist1d, digits, vision"):
        load_suite("cifar", 2, {}, 0)


def test_unknown_option_is_named_with_the_valid_ones():
    with pytest.raises(FedmergeError, match="no option 'alhpa'.*valid options:.*alpha"):
        load_suite("mnist1d", 2, {"alhpa": 0.1}, 0)


@pytest.mark.parametrize(
    "suite, options, culprit",
    [
        ("mnist1d", {"alpha": 0}, "'alpha' must be a positive number"),
        ("mnist1d", {"partition": "shards"}, "'partition' must be one of iid, dirichlet, pathological, tasks"),
        ("mnist1d", {"hidden": 3.5}, "'hidden' must be a positive integer"),
        ("mnist1d", {"pretrain_fraction": 1.0}, r"'pretrain_fraction' must be a number in \(0, 1\)"),
        ("quadratic", {"zeta2": -1}, "'zeta2' must be a number ≥ 0"),
        ("digits", {"kind": "rotations"}, "'kind' must be one of transforms, labels"),
    ],
)
def test_bad_option_values_name_the_option(suite, options, culprit):
    with pytest.raises(FedmergeError, match=culprit):
        load_suite(suite, 2, options, 0)


def test_bad_requests_that_only_the_builder_can_see():
    with pytest.raises(FedmergeError, match="'zeta2' must be 0 with one client"):
        load_suite("quadratic", 1, {"zeta2": 1.0}, 0)
    with pytest.raises(FedmergeError, match="at most 10 clients or kind='transforms'"):
        load_suite("digits", 11, {"kind": "labels"}, 0)
    with pytest.raises(FedmergeError, match="'classes_per_client' is 11 but the data has 10 classes"):
        load_suite("mnist1d", 2, {**SMALL_MNIST1D, "partition": "pathological", "classes_per_client": 11}, 0)
    with pytest.raises(FedmergeError, match="num_clients must be a positive integer"):
        load_suite("quadratic", 0, {}, 0)


# -- quadratic ------------------------------------------------------------------------------------------
def test_quadratic_heterogeneity_matches_zeta2_at_any_theta():
    fed = load_suite("quadratic", 5, {"dim": 6, "zeta2": 2.5, "noise": 0.3}, seed=1)
    model = fed.build_model()
    with torch.no_grad():
        model.theta.copy_(torch.randn(6, generator=torch.Generator().manual_seed(0)))
    grads = torch.stack([full_gradient(model, task.train, fed.loss)["theta"] for task in fed.tasks])
    zeta2 = float(((grads - grads.mean(0)) ** 2).sum(1).mean())
    assert zeta2 == pytest.approx(2.5, rel=1e-4)
    optimum = fed.optimum()
    assert torch.allclose(torch.stack(optimum["tasks"]).mean(0), optimum["theta"], atol=1e-6)
    assert float(optimum["theta"].norm()) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("lr, steps", [(0.1, 7), (0.5, 3), (1.0, 1)])
def test_quadratic_gradient_descent_gives_the_closed_form_task_vector(lr, steps):
    fed = load_suite("quadratic", 3, {"dim": 4, "zeta2": 1.0, "noise": 0.5, "samples": 16}, seed=2)
    theta0 = fed.pretrained["theta"]
    for task, center in zip(fed.tasks, fed.optimum()["tasks"]):
        model = fed.build_model()
        model.load_state_dict(fed.pretrained)
        train(model, task, fed.loss, TrainConfig(lr=lr, steps=steps, batch_size=16))
        tau = model.theta.detach() - theta0
        expected = (1 - (1 - lr) ** steps) * (center - theta0)
        assert torch.allclose(tau, expected, atol=1e-5)


def test_quadratic_metric_is_loss_and_optimum_is_none_elsewhere():
    fed = load_suite("quadratic", 2, {}, 0)
    assert fed.metric == "loss"
    assert set(fed.evaluate(fed.pretrained, fed.tasks[0])) == {"loss"}
    assert load_suite("digits", 2, {}, 0).optimum() is None


# -- determinism and the θ0 cache ------------------------------------------------------------------------
def test_same_seed_same_partitions_and_theta0_other_seed_differs():
    first = load_suite("mnist1d", 4, SMALL_MNIST1D, seed=3)
    theta_first = first.pretrained
    load_suite.cache_clear()
    second = load_suite("mnist1d", 4, SMALL_MNIST1D, seed=3)
    assert second is not first
    for a, b in zip(first.tasks, second.tasks):
        for split in ("train", "val", "test"):
            assert all(torch.equal(s, t) for s, t in zip(a.split(split).tensors, b.split(split).tensors))
    assert all(torch.equal(theta_first[k], second.pretrained[k]) for k in theta_first)
    other = load_suite("mnist1d", 4, SMALL_MNIST1D, seed=4)
    assert not torch.equal(other.tasks[0].train.tensors[1], first.tasks[0].train.tensors[1])
    assert load_suite("mnist1d", 4, SMALL_MNIST1D, seed=4) is other  # in-process cache


def test_theta0_cache_hit_skips_pretraining_and_is_keyed_by_options(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMERGE_CACHE", str(tmp_path))
    options = {"pretrain_steps": 20}
    theta0 = load_suite("digits", 3, options, 0).pretrained
    files = sorted((tmp_path / "pretrained").glob("*.safetensors"))
    assert len(files) == 1 and cache_dir() == tmp_path
    assert not list((tmp_path / "pretrained").glob("*.tmp"))

    load_suite.cache_clear()

    def no_pretraining(*args, **kwargs):
        raise AssertionError("pretrained again despite a cached θ0")

    monkeypatch.setattr("fedmerge.tasks.classification.pretrain", no_pretraining)
    cached = load_suite("digits", 3, options, 0).pretrained
    assert all(torch.equal(theta0[k], cached[k]) for k in theta0)
    with pytest.raises(FedmergeError, match="making θ0 failed: AssertionError: pretrained again"):
        load_suite("digits", 3, {"pretrain_steps": 21}, 0).pretrained
    monkeypatch.undo()
    monkeypatch.setenv("FEDMERGE_CACHE", str(tmp_path))
    load_suite("digits", 3, {"pretrain_steps": 21}, 0).pretrained
    assert len(list((tmp_path / "pretrained").glob("*.safetensors"))) == 2


def test_corrupted_cache_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMERGE_CACHE", str(tmp_path))
    theta0 = load_suite("digits", 2, {"pretrain_steps": 5}, 0).pretrained
    (path,) = (tmp_path / "pretrained").glob("*.safetensors")
    path.write_bytes(b"garbage")
    load_suite.cache_clear()
    rebuilt = load_suite("digits", 2, {"pretrain_steps": 5}, 0).pretrained
    assert all(torch.equal(theta0[k], rebuilt[k]) for k in theta0)


@pytest.mark.parametrize("module", [torch, np])
def test_theta0_built_by_another_torch_or_numpy_is_not_reused(tmp_path, monkeypatch, module):
    monkeypatch.setenv("FEDMERGE_CACHE", str(tmp_path))
    calls = []
    build = lambda: calls.append(1) or {"w": torch.ones(2)}
    load_or_build("pretrained", {"suite": "x"}, build)
    load_or_build("pretrained", {"suite": "x"}, build)
    assert len(calls) == 1
    monkeypatch.setattr(module, "__version__", module.__version__ + ".other")
    load_or_build("pretrained", {"suite": "x"}, build)
    assert len(calls) == 2 and len(list((tmp_path / "pretrained").glob("*.safetensors"))) == 2
    assert not list((tmp_path / "pretrained").glob(".*"))


def test_global_rng_is_untouched_by_building_and_pretraining():
    state = torch.get_rng_state()
    fed = load_suite("digits", 2, {"pretrain_steps": 5}, 9)
    fed.pretrained
    fed.build_model()
    assert torch.equal(state, torch.get_rng_state())


# -- partitions -------------------------------------------------------------------------------------------
def mean_label_skew(fed) -> float:
    """Mean total-variation distance between each client's train labels and the pool's."""
    labels = torch.cat([task.train.tensors[1] for task in fed.tasks])
    overall = label_distribution(labels)
    return float(np.mean([0.5 * np.abs(label_distribution(t.train.tensors[1]) - overall).sum() for t in fed.tasks]))


def test_label_skew_grows_as_alpha_shrinks():
    skews = [
        mean_label_skew(load_suite("mnist1d", 5, {**SMALL_MNIST1D, "alpha": alpha}, 0)) for alpha in (100.0, 1.0, 0.1)
    ]
    assert skews == sorted(skews)
    assert skews[0] < 0.1 and skews[-1] > 0.5
    assert mean_label_skew(load_suite("mnist1d", 5, {**SMALL_MNIST1D, "partition": "iid"}, 0)) < 0.1


def test_client_eval_sets_follow_the_client_label_distribution():
    fed = load_suite("mnist1d", 4, {**SMALL_MNIST1D, "alpha": 0.3}, 0)
    assert len(fed.global_test) > max(len(t.test) for t in fed.tasks)
    for task in fed.tasks:
        train = label_distribution(task.train.tensors[1])
        for split in (task.val, task.test):
            assert 0.5 * np.abs(label_distribution(split.tensors[1]) - train).sum() < 0.1


def test_pathological_gives_the_asked_classes_per_client():
    fed = load_suite("mnist1d", 5, {**SMALL_MNIST1D, "partition": "pathological", "classes_per_client": 3}, 0)
    for task in fed.tasks:
        classes = set(task.train.tensors[1].tolist())
        assert len(classes) == 3
        assert set(task.test.tensors[1].tolist()) <= classes


def test_clients_never_see_the_pretraining_data():
    fed = load_suite("mnist1d", 3, {**SMALL_MNIST1D, "partition": "iid", "pretrain_fraction": 0.25}, 0)
    seen = torch.cat([task.train.tensors[0] for task in fed.tasks])
    assert len(seen) == 1200  # 80% of 2000 is the pool; a quarter is held out for θ0
    assert len(torch.unique(seen, dim=0)) == len(seen)


# -- multi-task suites -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "suite, options",
    [("digits", {}), ("digits", {"kind": "labels"}), ("mnist1d", {**SMALL_MNIST1D, "partition": "tasks"})],
)
def test_multitask_suites_give_each_client_its_own_task_and_head(suite, options):
    fed = load_suite(suite, 3, options, 0)
    model = fed.build_model()
    assert [t.head for t in fed.tasks] == [0, 1, 2] and len(model.heads) == 3
    assert len({t.name for t in fed.tasks}) == 3
    first, second = (t.train.tensors for t in fed.tasks[:2])
    assert first[0].shape != second[0].shape or not torch.equal(first[0], second[0])


@pytest.mark.parametrize(
    "suite, options, client",
    [
        ("mnist1d", {**SMALL_MNIST1D, "alpha": 0.3}, 0),
        ("digits", {}, 1),
        ("mnist1d", {**SMALL_MNIST1D, "partition": "tasks"}, 2),
    ],
)
def test_pretraining_beats_chance_and_finetuning_improves_the_task(suite, options, client):
    fed = load_suite(suite, 3, options, 0)
    task = fed.tasks[client]
    overall = fed.global_test if fed.global_test is not None else task.test
    assert fed.evaluate_data(fed.pretrained, overall, task.head)["accuracy"] > 0.2  # chance: 0.1
    model = fed.build_model()
    model.load_state_dict(fed.pretrained)
    train(model, task, fed.loss, TrainConfig(optimizer="momentum", lr=0.05, steps=300))
    after = fed.evaluate(model, task)
    assert after["accuracy"] > fed.evaluate(fed.pretrained, task)["accuracy"] + 0.1
    assert after == fed.evaluate(model.state_dict(), task)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_named_with_its_file_wherever_it_is_read(tmp_path, workers):
    """In training, evaluation and the up-front checks alike, in this process or a DataLoader worker."""
    from PIL import Image
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    from fedmerge.tasks.loading import eval_batches, gather, train_batches

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for k in range(3):
            Image.new("RGB", (4, 4), (40 * k, 0, 0)).save(tmp_path / label / f"{k}.png")
    (tmp_path / "dog" / "9-bad.png").write_bytes(b"not an image at all")
    data = ImageFolder(str(tmp_path), transform=transforms.ToTensor())
    bad = next(i for i, (path, _) in enumerate(data.samples) if path.endswith("9-bad.png"))
    message = rf"item {bad} \(.*9-bad.png\) cannot be read \(UnidentifiedImageError: .*\); repair or remove it\.$"
    with pytest.raises(FedmergeError, match=message):
        list(eval_batches(data, 2, num_workers=workers))
    batches = train_batches(data, 1, seed=0, num_workers=workers)
    with pytest.raises(FedmergeError, match=message):
        for _ in range(len(data)):
            next(batches)
    with pytest.raises(FedmergeError, match=message):
        gather(torch.utils.data.Subset(data, list(range(len(data)))), [bad])


def test_a_suite_makes_each_clients_task_when_it_is_asked_for():
    """A worker holds the clients it trains: building the federation of 1,000 clients makes none of their tasks."""
    from fedmerge.tasks import Federation, Task, TaskList, check_federation

    for name, options in (("quadratic", {}), ("mnist1d", {"partition": "iid", "num_samples": 4000})):
        fed = load_suite(name, 1000 if name == "quadratic" else 50, options, 0)
        assert isinstance(fed.tasks, TaskList) and not fed.tasks.made
        task = fed.tasks[7]
        assert set(fed.tasks.made) == {7} and fed.tasks[7] is task and task.name.endswith("-7")
    data = torch.utils.data.TensorDataset(torch.zeros(2, 1), torch.zeros(2, 1))
    empty = torch.utils.data.TensorDataset(torch.zeros(0, 1), torch.zeros(0, 1))
    fed = Federation(
        tasks=TaskList(3, lambda t: Task(f"t{t}", empty if t == 1 else data, data, data)),
        model_fn=lambda: torch.nn.Linear(1, 1),
    )
    check_federation(fed, "mine", 3)  # a TaskList's tasks are checked as each is made
    assert fed.tasks[0].name == "t0"
    with pytest.raises(FedmergeError, match=r"suite 'mine': task 1 \(t1\) train must be a non-empty map-style"):
        fed.tasks[1]
