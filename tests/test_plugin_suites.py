"""Suites of your own: found by import path beside an experiment file or as an installed plugin, checked
before Ray starts, with θ0 from a weights file; broken plugins named with what is wrong."""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import save_file

from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.simulations.presets import load_experiment
from fedmerge.simulations.runner import check_runnable
from fedmerge.simulations.spec import Spec
from fedmerge.tasks import find_suite, installed, load_suite
from processes import seconds

SUITE = '''
"""Lines: two clients, each a linear regression on its own data."""
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset
from fedmerge.tasks import Federation, Option, Task
from fedmerge.tasks.options import positive_int

DESCRIPTION = "two linear tasks"
OPTIONS = {"features": Option(3, "input width", positive_int)}


class Lazy(Dataset):
    """Items made on demand (a stand-in for files read one by one)."""
    def __init__(self, n, features, shift):
        self.n, self.features, self.shift = n, features, shift
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        x = torch.linspace(-1, 1, self.features) * (i + 1) / self.n
        return x, x.sum(0, keepdim=True) + self.shift


def build(num_clients, options, seed):
    f = options["features"]
    tasks = [Task(f"line{t}", Lazy(8, f, t), Lazy(4, f, t), Lazy(4, f, t)) for t in range(num_clients)]
    return Federation(tasks=tasks, model_fn=lambda: torch.nn.Linear(f, 1), loss_fn=F.mse_loss, metric="loss", {extra})


def wrong_type(num_clients, options, seed):
    return {{"tasks": []}}


def too_few(num_clients, options, seed):
    fed = build(num_clients, options, seed)
    fed.tasks = fed.tasks[:1]
    return fed


def wrong_shape(num_clients, options, seed):
    fed = build(num_clients, options, seed)
    fed.model_fn = lambda: torch.nn.Linear(options["features"] + 1, 1)
    return fed


def raises(num_clients, options, seed):
    raise OSError("images/ is not there")


def bad_model(num_clients, options, seed):
    fed = build(num_clients, options, seed)
    fed.model_fn = lambda: torch.nn.Linear("three", 1)
    return fed


def wrong_theta0(num_clients, options, seed):
    fed = build(num_clients, options, seed)
    fed.theta0 = lambda model: {{"weight": torch.zeros(2, 2)}}
    return fed


def frozen_bias(num_clients, options, seed):
    fed = build(num_clients, options, seed)
    fed.model_fn = lambda: _linear_with_frozen_bias(options["features"])
    return fed


class Corrupt(Lazy):
    """Reads well for the first two items (what the up-front check reads), then fails, as a bad file would."""
    def __getitem__(self, i):
        if i >= 2:
            raise ValueError(f"item {{i}} is corrupt")
        return super().__getitem__(i)


def fails_late(num_clients, options, seed):
    fed = build(num_clients, options, seed)
    fed.tasks[1] = Task("line1", Corrupt(8, options["features"], 1), fed.tasks[1].val, fed.tasks[1].test)
    return fed


def _linear_with_frozen_bias(features):
    model = torch.nn.Linear(features, 1)
    model.bias.requires_grad_(False)
    return model
'''


def write_suite(folder, module="lines", extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(
        textwrap.dedent(SUITE.replace("{extra}", extra).replace("{{", "{").replace("}}", "}"))
    )
    return folder


@pytest.fixture(autouse=True)
def fresh_imports():
    """Each test writes its own module: forget earlier ones and their federations."""
    load_suite.cache_clear()
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name in ("lines", "broken", "theta_lines"):
            del sys.modules[name]
    load_suite.cache_clear()


def experiment(folder, suite, **more):
    text = f'name = "mine"\nsuite = "{suite}"\nclients = 2\nstrategies = ["fedavg"]\n' + "".join(
        f"{k} = {v}\n" for k, v in more.items()
    )
    (folder / "experiment.toml").write_text(text)
    return str(folder / "experiment.toml")


def test_a_suite_beside_the_experiment_file_is_found_and_built(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = Spec.from_dict(load_experiment(experiment(write_suite(tmp_path / "study"), "lines:build")))
    fed = load_suite(spec.suite, 2, {"features": 5}, 0)
    assert (
        fed.suite == "lines:build"
        and fed.options == {"features": 5}
        and [t.name for t in fed.tasks] == ["line0", "line1"]
    )
    assert fed.pretrained["weight"].shape == (1, 5)
    assert fed.evaluate(fed.pretrained, fed.tasks[1])["loss"] > 0
    check_runnable(spec)  # the data fits the model: nothing raised, Ray not started
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    "suite, message",
    [
        ("lines:missing", r"suite 'lines:missing': module lines has no function 'missing'"),
        ("nowhere:build", r"suite 'nowhere:build': no module 'nowhere' on the Python path"),
        ("broken:build", r"suite 'broken:build': importing broken failed: SyntaxError"),
        ("lines:wrong_type", r"suite 'lines:wrong_type' returned a dict; return a fedmerge.tasks.Federation"),
        ("lines:too_few", r"suite 'lines:too_few' returned 1 tasks for 2 clients"),
        ("lines:raises", r"suite 'lines:raises' failed to build its federation: OSError: images/ is not there"),
        (
            "lines:wrong_shape",
            r"suite 'lines:wrong_shape': task 0 \(line0\): its train data does not fit the model and loss",
        ),
        ("lnes", r"unknown suite 'lnes'.*'module:function'"),
        ("lines:bad_model", r"suite 'lines:bad_model': model_fn failed: TypeError"),
        (
            "lines:wrong_theta0",
            r"suite 'lines:wrong_theta0': θ0 from the suite's theta0 does not fit the suite's model",
        ),
    ],
)
def test_a_broken_plugin_fails_before_ray_starts_naming_the_import_path(suite, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = write_suite(tmp_path)
    (folder / "broken.py").write_text("def build(:\n")
    assert main(["run", experiment(folder, suite), "--out", str(tmp_path / "results")]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not ray.is_initialized() and not (tmp_path / "results").exists()


def test_declared_options_are_checked_with_the_suites_own_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = experiment(write_suite(tmp_path), "lines:build")
    assert main(["run", path, "--set", "suite_options.features=0", "--dry-run"]) == 2
    assert "option 'features' must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["run", path, "--set", "suite_options.colour=1", "--dry-run"]) == 2
    assert "suite 'lines:build' has no option 'colour'; valid options: features" in capsys.readouterr().err


def test_an_installed_plugin_is_found_by_name_and_listed(tmp_path, monkeypatch, capsys):
    site = write_suite(tmp_path / "site")
    info = site / "lines_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lines-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[fedmerge.suites]\nlines = lines:build\n")
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    assert installed()["lines"] == "lines:build"
    assert find_suite("lines").description == "two linear tasks"
    assert load_suite("lines", 3, {}, 0).suite == "lines"
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "plugin lines:build" in listing and "two linear tasks" in listing


def test_theta0_from_a_weights_file_and_a_file_of_another_model_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    weights = {"weight": torch.full((1, 3), 0.5), "bias": torch.tensor([0.25])}
    save_file(weights, tmp_path / "theta0.safetensors")
    torch.save(weights, tmp_path / "theta0.pt")
    for name in ("theta0.safetensors", "theta0.pt"):
        write_suite(tmp_path, "theta_lines", extra=f'theta0="{tmp_path / name}"')
        sys.modules.pop("theta_lines", None)
        load_suite.cache_clear()
        fed = load_suite("theta_lines:build", 2, {}, 0)
        assert all(torch.equal(fed.pretrained[k], v) for k, v in weights.items())
    load_suite.cache_clear()
    with pytest.raises(FedmergeError, match=r"θ0 from .*theta0.pt does not fit the suite.s model"):
        load_suite("theta_lines:build", 2, {"features": 4}, 0).pretrained


def test_frozen_parameters_are_neither_sent_nor_sent_back(tmp_path, monkeypatch):
    """The server's model holds only what the clients train; a client replies with exactly those tensors."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from fedmerge.clients.app import local_training
    from replies import _metadata

    monkeypatch.setattr(sys, "path", [str(write_suite(tmp_path)), *sys.path])
    fed = load_suite("lines:frozen_bias", 2, {}, 0)
    assert fed.trained_names == ["weight"] and set(fed.pretrained) == {"weight", "bias"}
    spec = Spec.from_dict(
        {"name": "frozen", "suite": "lines:frozen_bias", "clients": 2, "training": {"steps": 3, "lr": 0.1}}
    )
    sent = ArrayRecord({name: fed.pretrained[name] for name in fed.trained_names})
    message = Message(
        content=RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})}), metadata=_metadata(1)
    )
    reply = local_training(spec.to_flat(), {"partition-id": 1, "num-partitions": 2}, message.content)
    (arrays,) = reply.array_records.values()
    assert list(arrays) == ["weight"]
    assert not torch.equal(torch.from_numpy(arrays["weight"].numpy()), fed.pretrained["weight"])  # it trained


def test_a_fedmerge_folder_beside_the_experiment_does_not_hide_the_package_from_workers(tmp_path, monkeypatch):
    """Ray workers get the driver's sys.path as PYTHONPATH; a clone named fedmerge/ beside the experiment
    file must not be imported there as a (namespace) package in place of the real one."""
    import os
    import subprocess

    import fedmerge

    home = str(Path(fedmerge.__file__).resolve().parents[1])
    # the driver as the `fedmerge` console script starts it: the package's folder is not on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and Path(p).resolve() != Path(home)])
    (tmp_path / "fedmerge").mkdir()  # a clone of the repository, say: no __init__.py at its top
    load_experiment(experiment(write_suite(tmp_path), "lines:build"))
    worker = subprocess.run(
        [sys.executable, "-c", "import fedmerge; print(fedmerge.__file__)"],
        cwd="/",
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        capture_output=True,
        text=True,
        timeout=seconds(60),
    )
    assert worker.stdout.strip() == fedmerge.__file__, worker.stderr


@pytest.mark.slow
def test_a_client_failing_inside_ray_is_named_with_what_it_raised(tmp_path, monkeypatch):
    from fedmerge.simulations.runner import run

    monkeypatch.setattr(sys, "path", [str(write_suite(tmp_path)), *sys.path])
    spec = Spec.from_dict(
        {
            "name": "late",
            "suite": "lines:fails_late",
            "clients": 2,
            "strategies": ["fedavg"],
            "training": {"steps": 3, "lr": 0.1, "batch_size": 4},
        }
    )
    with pytest.raises(
        FedmergeError,
        match=r"a client \(node \d+\) failed: client 1: FedmergeError: task 'line1', its train split: item \d+ cannot be read "
        r"\(ValueError: item \d+ is corrupt\); repair or remove it\. "
        r"Nothing was computed from the failed round",
    ):
        run(spec, tmp_path / "results", show_progress=False)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_a_runs_saved_spec_runs_again_from_any_folder(tmp_path, monkeypatch):
    """spec.toml names a `module:function` suite by its file, so it is found without the experiment's folder."""
    from fedmerge.simulations.results import write_results

    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = Spec.from_dict(load_experiment(experiment(write_suite(tmp_path / "study"), "lines:build")))
    saved = write_results(spec, {"runs": []}, tmp_path / "results") / "spec.toml"
    assert f'suite = "{tmp_path / "study" / "lines.py"}:build"' in saved.read_text()
    sys.modules.pop("lines", None)
    load_suite.cache_clear()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "study" not in p])
    monkeypatch.chdir(tmp_path / "results")
    again = Spec.from_dict(load_experiment(str(saved)))
    assert [t.name for t in load_suite(again.suite, 2, {}, 0).tasks] == ["line0", "line1"]


@pytest.mark.slow
def test_failed_clients_within_the_tolerated_share_are_left_out_and_recorded(tmp_path, monkeypatch):
    from fedmerge.simulations.runner import run

    monkeypatch.setattr(sys, "path", [str(write_suite(tmp_path)), *sys.path])
    spec = Spec.from_dict(
        {
            "name": "tolerant",
            "suite": "lines:fails_late",
            "clients": 2,
            "strategies": ["fedavg"],
            "server": {"max_failed_share": 0.5},
            "training": {"steps": 3, "lr": 0.1, "batch_size": 4},
        }
    )
    results = json.loads((run(spec, tmp_path / "results", show_progress=False) / "results.json").read_text())
    (failed,) = results["failed"]
    assert "item" in failed["reason"] and "cannot be read" in failed["reason"]
    assert [c["id"] for c in results["clients"]] == [0]  # the merge and the diagnostics use client 0 alone
    assert results["runs"][0]["history"][0]["aggregation"]["client_ids"] == [0]
