"""The experiment spec and `fedmerge run`'s input handling: no Ray is started here."""

import argparse

import pytest

from fedmerge import FedmergeError
from fedmerge.cli import main
from fedmerge.clients.app import round_steps
from fedmerge.clients.settings import per_client, with_node_overrides
from fedmerge.simulations.command import spec_from_args
from fedmerge.simulations.presets import load_experiment, shipped_names
from fedmerge.simulations.spec import Spec

BASE = {
    "suite": "quadratic",
    "clients": 4,
    "strategies": ["fedavg", "fednova"],
    "rounds": [1, 3],
    "training": {"lr": 0.1, "steps": 30, "batch_size": 1000},
}


def spec(**changes):
    return Spec.from_dict({**BASE, **changes})


def args(experiment=None, *overrides, **flags):
    return argparse.Namespace(
        experiment=experiment,
        overrides=list(overrides),
        strategy=flags.get("strategy"),
        rounds=flags.get("rounds"),
        seed=flags.get("seed"),
    )


@pytest.mark.parametrize("name", shipped_names())
def test_every_shipped_preset_is_a_valid_spec(name):
    assert Spec.from_dict(load_experiment(name)).name == name


def test_the_default_preset_compares_one_shot_and_multi_round_for_every_strategy():
    default = Spec.from_dict(load_experiment(None))
    assert default.suite == "digits" and 1 in default.rounds and max(default.rounds) > 1
    assert default.suite_options["heads"] == "private"  # each client's head kept out of the merge
    assert set(default.strategies) == {"fedavg", "fednova", "fedgma", "median", "cclip"}
    lrs = {c.lr for c in default.client_configs()}
    assert len(lrs) == default.clients  # training heterogeneity


def test_flat_run_config_round_trips():
    original = spec(training={"lr": {"geometric": [0.01, 0.1]}, "steps": [10, 20, 40, 80], "optimizer": "adamw"})
    flat = original.to_flat()
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert Spec.from_flat(flat) == original


def test_command_line_overrides_map_onto_the_spec():
    got = spec_from_args(
        args(
            "quadratic",
            "clients=3",
            "training.steps=[5, 10, 20]",
            "strategy.fednova.normalize_by=steps",
            strategy=["fednova"],
            rounds=[1, 4],
            seed=7,
        )
    )
    assert got.clients == 3 and got.strategies == ("fednova",) and got.rounds == (1, 4) and got.seed == 7
    assert [c.steps for c in got.client_configs()] == [5, 10, 20]
    assert got.build_strategy("fednova").normalize_by == "steps"


def test_epochs_replace_steps():
    assert [c.epochs for c in spec(training={"epochs": 2}).client_configs()] == [2] * 4


def test_spreads_give_one_value_per_client():
    assert per_client("steps", {"geometric": [10, 160]}, 5) == [10, 20, 40, 80, 160]
    assert per_client("lr", {"linear": [0.1, 0.3]}, 3) == pytest.approx([0.1, 0.2, 0.3])
    assert per_client("optimizer", "adamw", 2) == ["adamw", "adamw"]


def test_round_steps_split_the_local_steps_over_rounds():
    splits = [round_steps(10, r, 3, True) for r in (1, 2, 3)]
    assert splits == [(0, 3), (3, 3), (6, 4)]
    assert round_steps(10, 2, 3, False) == (0, 10)


def test_a_supernode_overrides_its_own_settings():
    row = spec().client_configs()[0]
    changed = with_node_overrides(row, {"partition-id": 0, "lr": 0.5, "steps": 7})
    assert (changed.lr, changed.steps, changed.batch_size) == (0.5, 7, row.batch_size)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"strategies": ["fedavg", "fedmedian"]}, "unknown strategy 'fedmedian' \\(did you mean 'median'\\?\\)"),
        ({"suite": "mnist"}, "unknown suite 'mnist'"),
        ({"rounds": []}, "'rounds' is empty"),
        ({"clients": 0}, "option 'clients' must be a positive integer, got 0"),
        ({"learning_rate": 0.1}, "unknown key 'learning_rate'"),
        ({"training": {"lr": [0.1, 0.2]}}, "training option 'lr' lists 2 values for 4 clients"),
        ({"training": {"lr": -0.1}}, "^training option 'lr' must be a positive number, got -0.1"),
        ({"training": {"steps": [10, 20, 10, -3]}}, "client 3: training option 'steps' must be a positive integer"),
        ({"training": {"steps": 10, "epochs": 2}}, "give exactly one of the training options 'steps' and 'epochs'"),
        ({"training": {"momentum": 0.9}}, "unknown key 'training.momentum'"),
        ({"training": {"lr": {"exponential": [1, 2]}}}, "geometric = \\[low, high\\]"),
        ({"suite": "mnist1d", "suite_options": {"alpha": 0}}, "alpha"),
        ({"suite": "mnist1d", "suite_options": {"alfa": 0.5}}, "no option 'alfa'"),
        ({"strategy": {"fedgma": {"threshold": 3}}}, "'strategy.fedgma.threshold' must be a number ≤ 1, got 3"),
        ({"strategy": {"fedgma": 0.3}}, "'strategy.fedgma' must be a table of options"),
        ({"strategy": {"fedgma": {"rho": 0.3}}}, "unknown key 'strategy.fedgma.rho'"),
        ({"server": {"server_lr": 0}}, "server_lr"),
        (
            {"server": {"lora": "stack"}, "strategies": ["fedavg", "median", "ties"]},
            'server.lora = "stack" is exact only for rules that are weighted sums \\(fedavg, fednova, scaffold\\), not median, ties',
        ),
        ({"server": {"statistics": "merge"}}, "one of reestimate, average, theta0"),
    ],
)
def test_bad_specs_are_refused_naming_the_culprit(changes, message):
    with pytest.raises(FedmergeError, match=message):
        spec(**changes)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["run", "missing.toml"], "no such experiment file"),
        (["run", "quadratic", "--set", "clients"], "write KEY=VALUE"),
        (["run", "quadratic", "--strategy", "fedsgd"], "unknown strategy 'fedsgd'"),
        (["run", "quadratic", "--set", "training.steps=[1,2]"], "lists 2 values for 4 clients"),
    ],
)
def test_bad_command_lines_exit_non_zero_with_a_message_and_write_nothing(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--out", str(tmp_path / "results")]) == 2
    assert message.replace("\\", "") in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "setting, allowed",
    [
        ("server.server_lr=abc", "a positive number"),
        ("server.weighting=examples", "one of uniform, num-examples"),
        ("strategy.fedgma.threshold=high", "a number ≤ 1"),
        ("strategy.fedgma.threshold=nan", "a number ≤ 1"),
        ("strategy.fednova.normalize_by=epochs", "one of steps, lr-sum"),
        ("strategy.median.even=upper", "one of mean, lower"),
        ("strategy.cclip.radius=-1", "a number ≥ 0"),
        ("strategy.cclip.iterations=0.5", "a positive integer"),
        ("strategy.cclip.center=origin", "one of previous, zero"),
        ("engine.client_cpus=abc", "a positive number"),
        ("engine.client_cpus=0", "a positive number"),
        ("engine.client_gpus=-1", "a number ≥ 0"),
        ("engine.ray_address=6379", "a string"),
        ("seed=-1", "an integer ≥ 0"),
        ("clients=many", "a positive integer"),
        ("rounds=[1, 0]", "a positive integer"),
        ("same_compute=yes", "true or false"),
        ("select=1", "true or false"),
        ("description=[1]", "a string"),
        ("name=../elsewhere", "letters, digits, '-', '_' or '.'"),
        ("name=a/b", "letters, digits, '-', '_' or '.'"),
        ("name=..", "starting with a letter or digit"),
    ],
)
def test_every_spec_value_is_checked_up_front_naming_key_value_and_what_is_allowed(
    setting, allowed, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    key, _, value = setting.partition("=")
    assert main(["run", "quadratic", "--dry-run", "--set", setting]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fedmerge: error: ") and "Traceback" not in error
    assert f"'{key}'" in error and value.strip("[]").split(",")[-1].strip() in error and allowed in error
    assert not list(tmp_path.iterdir())


def test_values_are_stored_in_their_type():
    got = Spec.from_flat(
        {
            "server.server_lr": "2",
            "engine.client_gpus": "0",
            "strategy.cclip.radius": "1",
            "engine.ray_address": "127.0.0.1:6379",
            "name": "2024",
        },
        BASE,
    )
    assert got.server["server_lr"] == 2.0 and isinstance(got.server["server_lr"], float)
    assert got.engine == {
        "client_cpus": 1.0,
        "client_gpus": 0.0,
        "ray_address": "127.0.0.1:6379",
        "server_device": "auto",
        "stall_timeout": 600.0,
        "clients_per_call": 1,
    }
    assert got.strategy["cclip"]["radius"] == 1.0 and got.name == "2024"


def test_changing_the_suite_leaves_the_other_suites_options_behind():
    default = load_experiment("default")
    assert default["suite_options"]
    assert Spec.from_flat({"suite": "quadratic"}, default).suite_options == {}
    got = Spec.from_flat({"suite": "quadratic", "suite_options.zeta2": "2.0"}, default)
    assert got.suite_options == {"zeta2": 2.0}
    kept = Spec.from_flat({"suite": "digits", "clients": 3}, default)
    assert kept.suite_options == default["suite_options"]
    assert main(["run", "--dry-run", "--set", "suite=mnist1d"]) == 0


def test_an_unparsable_experiment_file_is_named(tmp_path, capsys):
    bad = tmp_path / "broken.toml"
    bad.write_text("clients = [1, \n")
    assert main(["run", str(bad)]) == 2
    assert f"{bad} is not valid TOML" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setting, message",
    [
        ('strategies=["fedavg", "fedavg"]', "'strategies' names 'fedavg' twice"),
        ("rounds=[1, 1]", "'rounds' names 1 twice"),
    ],
)
def test_a_strategy_or_round_count_given_twice_is_refused(setting, message, capsys):
    assert main(["run", "quadratic", "--dry-run", "--set", setting]) == 2
    assert message in capsys.readouterr().err


def test_a_random_rules_seed_flows_from_the_runs_seed():
    spec = Spec.from_dict(
        {"seed": 3, "suite": "quadratic", "strategies": ["dare-ties"], "strategy": {"dare-ties": {"seed": 1}}}
    )
    assert spec.build_strategy("dare-ties").params["seed"] == 4
    assert (
        Spec.from_dict({"seed": 5, "suite": "quadratic", "strategies": ["dare-linear"]})
        .build_strategy("dare-linear")
        .seed
        == 5
    )
