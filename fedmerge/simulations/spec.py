"""The experiment specification: the single source of truth for a run.

A spec is written as TOML (a file, or a preset shipped in the package). ``--set key=value`` on the command
line and a Flower run config use the same dotted keys (``training.lr``, ``strategy.fedgma.threshold``);
a value is read as TOML (``[0.01, 0.1]``, ``{geometric = [50, 800]}``), else as a plain string. Everything
is validated, and suite options resolved, before any process starts.
"""

import difflib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmerge.clients.settings import TRAINING_KEYS, client_table, corruptions
from fedmerge.config import tomllib, unflatten
from fedmerge.clients.trainer import TrainConfig
from fedmerge.errors import FedmergeError
from fedmerge.strategies import STRATEGIES

STRATEGY_OPTIONS = {
    "fedavg": {},
    "fednova": {"normalize_by": "lr-sum"},
    "fedgma": {"threshold": 0.5},
    "median": {"even": "mean"},
    "cclip": {"radius": 0.0, "iterations": 1, "center": "previous"},  # radius 0: median distance each round
}
SERVER = {"server_lr": 1.0, "weighting": "uniform"}
ENGINE = {"client_cpus": 1.0, "client_gpus": 0.0, "ray_address": ""}
TOP = {
    "name": "experiment",
    "description": "",
    "seed": 0,
    "suite": "mnist1d",
    "clients": 4,
    "strategies": list(STRATEGIES),
    "rounds": [1],
    "same_compute": True,
    "select": True,
}
TABLES = ("suite_options", "training", "server", "strategy", "engine")


@dataclass(frozen=True)
class Spec:
    """A validated experiment.

    ``rounds`` lists the round counts to compare on the same clients: 1 is one-shot merging (Task
    Arithmetic), R > 1 federated learning. With ``same_compute`` each client's K_t local steps are split
    over the R rounds, so every round count uses the same local compute. ``select`` chooses Task
    Arithmetic's λ (and FedGMA's and CCLIP's ρ) for one-shot runs on the validation splits.
    ``server_lr`` is β of the mean-scale convention (θ ← θ + β·Δ) for multi-round runs.
    """

    name: str
    description: str
    seed: int
    suite: str
    clients: int
    strategies: tuple[str, ...]
    rounds: tuple[int, ...]
    same_compute: bool
    select: bool
    suite_options: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    server: dict = field(default_factory=lambda: dict(SERVER))
    strategy: dict = field(default_factory=dict)
    engine: dict = field(default_factory=lambda: dict(ENGINE))

    # -- reading ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Spec":
        """Validate a nested mapping (a parsed TOML file); unknown keys are refused with a suggestion."""
        _check_keys(data, [*TOP, *TABLES], "")
        top = {key: data.get(key, default) for key, default in TOP.items()}
        tables = {key: dict(data.get(key, {})) for key in TABLES}
        for key in TABLES:
            if not isinstance(data.get(key, {}), Mapping):
                raise FedmergeError(f"'{key}' must be a table of options, got {data[key]!r}.")
        _check_keys(tables["training"], TRAINING_KEYS, "training.")
        _check_keys(tables["server"], SERVER, "server.")
        _check_keys(tables["engine"], ENGINE, "engine.")
        _check_keys(tables["strategy"], STRATEGY_OPTIONS, "strategy.")
        for name, options in tables["strategy"].items():
            _check_keys(options, STRATEGY_OPTIONS[name], f"strategy.{name}.")
        spec = cls(
            name=str(top["name"]),
            description=str(top["description"]),
            seed=_integer("seed", top["seed"], minimum=0),
            suite=str(top["suite"]),
            clients=_integer("clients", top["clients"], minimum=1),
            strategies=tuple(_list("strategies", top["strategies"])),
            rounds=tuple(_integer("rounds", r, minimum=1) for r in _list("rounds", top["rounds"])),
            same_compute=_boolean("same_compute", top["same_compute"]),
            select=_boolean("select", top["select"]),
            suite_options=tables["suite_options"],
            training=tables["training"],
            server={**SERVER, **tables["server"]},
            strategy={name: {**STRATEGY_OPTIONS[name], **tables["strategy"].get(name, {})} for name in STRATEGY_OPTIONS},
            engine={**ENGINE, **tables["engine"]},
        )
        spec.validate()
        return spec

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> "Spec":
        """A spec from dotted keys (a Flower run config, ``--set`` overrides), over an optional base."""
        return cls.from_dict(unflatten(flat, base))

    def validate(self) -> None:
        """Check what the fields alone cannot: known strategies and suite, client table, strategy options."""
        from fedmerge.tasks import SUITES  # the suite registry; the data is built later, by the runner
        from fedmerge.tasks.options import resolve

        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            problem = f"unknown strategy {unknown[0]!r}{_suggest(unknown[0], STRATEGIES)}" if unknown else "no strategy given"
            raise FedmergeError(f"{problem}; choose from {', '.join(STRATEGIES)}.")
        if self.suite not in SUITES:
            raise FedmergeError(f"unknown suite {self.suite!r}{_suggest(self.suite, SUITES)}; choose one of {', '.join(SUITES)}.")
        resolve(self.suite, SUITES[self.suite].options, dict(self.suite_options))
        if not self.rounds:
            raise FedmergeError("'rounds' is empty; give the round counts to compare, e.g. rounds = [1, 5].")
        self.client_configs()
        corruptions(self.training, self.clients)
        for name in {*self.strategies, *(n for n, o in self.strategy.items() if o != STRATEGY_OPTIONS[n])}:
            self.build_strategy(name)

    # -- using --------------------------------------------------------------------------------------
    def client_configs(self) -> list[TrainConfig]:
        """Each client's training settings (validated)."""
        return client_table(self.training, self.clients, self.seed)

    def build_strategy(self, name: str, **overrides):
        """A fresh strategy object with this spec's server and strategy options."""
        options = {
            "server_lr": float(self.server["server_lr"]),
            "weighting": str(self.server["weighting"]),
            **self.strategy.get(name, {}),
            **overrides,
        }
        if name == "cclip" and not options.get("radius"):
            options["radius"] = None
        flower = logging.getLogger("flwr")
        level = flower.level
        flower.setLevel(logging.ERROR)  # the server evaluates every task itself: no federated-evaluation warning
        try:
            return STRATEGIES[name](
                min_train_nodes=self.clients, min_available_nodes=self.clients, fraction_evaluate=0.0, **options
            )
        finally:
            flower.setLevel(level)

    def to_dict(self) -> dict:
        """Nested plain data (what a TOML file holds)."""
        data = asdict(self)
        data["strategies"], data["rounds"] = list(self.strategies), list(self.rounds)
        return data

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Dotted keys with scalar values (lists and tables as TOML-readable JSON): a Flower run config."""
        flat: dict[str, bool | int | float | str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and prefix.split(".")[0] in TABLES and not _is_spread(value):
                for key, item in value.items():
                    walk(f"{prefix}.{key}", item)
            elif isinstance(value, (list, dict)):
                flat[prefix] = json.dumps(value)
            else:
                flat[prefix] = value

        for key, value in self.to_dict().items():
            walk(key, value)
        return flat


def load_toml(path: str | Path) -> dict:
    """Parse a TOML file, naming the file and the problem on failure."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FedmergeError(f"no such experiment file: {path}; give a preset name (see `fedmerge list`) or a .toml path.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FedmergeError(f"cannot read {path}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise FedmergeError(f"{path} is not valid TOML: {error}") from None


def _is_spread(value: dict) -> bool:
    return len(value) == 1 and next(iter(value)) in ("geometric", "linear")


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(data: Mapping, allowed, prefix: str) -> None:
    for key in data:
        if key not in allowed:
            raise FedmergeError(
                f"unknown key '{prefix}{key}'{_suggest(key, allowed)}; "
                f"the keys here are {', '.join(prefix + a for a in allowed)}."
            )


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FedmergeError(f"'{name}' must be an integer ≥ {minimum}, got {value!r}.")
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise FedmergeError(f"'{name}' must be true or false, got {value!r}.")
    return value


def _list(name: str, value: Any) -> list:
    return value if isinstance(value, list) else [value]
