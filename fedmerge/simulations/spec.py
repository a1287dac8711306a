"""The experiment specification: the single source of truth for a run.

A spec is written as TOML (a file, or a preset shipped in the package). ``--set key=value`` on the command
line and a Flower run config use the same dotted keys (``training.lr``, ``strategy.fedgma.threshold``);
a value is read as TOML (``[0.01, 0.1]``, ``{geometric = [50, 800]}``), else as a plain string. Everything
is validated, and suite options resolved, before any process starts.
"""

import difflib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmerge.clients.settings import TRAINING_KEYS, client_table, corruptions, is_spread
from fedmerge.clients.trainer import TrainConfig
from fedmerge.config import parse_value, tomllib, unflatten
from fedmerge.errors import FedmergeError
from fedmerge.merging import METHODS
from fedmerge.strategies import STRATEGIES
from fedmerge.strategies.base import LORA_MODES, WEIGHTINGS
from fedmerge.strategies.server_optimizer import OPTIMIZERS

from fedmerge.options import (
    Option,
    boolean,
    choice,
    list_of,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve,
    share,
    string,
    text,
)

STATISTICS = ("reestimate", "average", "theta0")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def device_name(key: str, value: Any) -> str:
    """auto, cpu, cuda or cuda:N (whether this machine has it is checked when the run starts)."""
    if not (isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value)):
        raise FedmergeError(f"option {key!r} must be auto, cpu, cuda or cuda:N, got {value!r}.")
    return value


def directory_name(key: str, value: Any) -> str:
    """A name fit for a directory: letters, digits, '-', '_', '.', starting with a letter or digit."""
    value = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(value, str) and NAME.fullmatch(value)):
        raise FedmergeError(
            f"option {key!r} names the results directory: give 1 to 100 letters, digits, '-', '_' or '.', "
            f"starting with a letter or digit; got {value!r}."
        )
    return value


# Every key of the spec but the suite's options (declared by each suite) and the training table (one
# value, list or spread per client: fedmerge.clients.settings), with its default and its check.
TOP = {
    "name": Option("experiment", "the run's name; its results directory is <name>-<timestamp>", directory_name),
    "description": Option("", "one line on what the experiment is for", string),
    "seed": Option(0, "every random choice flows from it", non_negative_int),
    "suite": Option("mnist1d", "the task suite (fedmerge list)", text),
    "clients": Option(4, "T, the number of clients", positive_int),
    "strategies": Option(
        ["fedavg", "fednova", "fedgma", "median", "cclip"],
        "the strategies to compare (the paper's five by default; also ties, dare-linear, dare-ties)",
        list_of(text),
    ),
    "rounds": Option([1], "the round counts to compare: 1 is one-shot merging", list_of(positive_int)),
    "same_compute": Option(True, "split each client's local steps over the rounds", boolean),
    "select": Option(True, "one-shot: choose λ (and ρ) on the validation splits", boolean),
    "diagnostics_clients": Option(
        64,
        "the pairwise diagnostics (task-vector cosines, ζ²) over at most this many "
        "clients, a sample drawn from the seed (0: every client); norms cover every client",
        non_negative_int,
    ),
}
SERVER = {
    "server_lr": Option(1.0, "β in θ ← θ + β·Δ (mean-scale) for multi-round runs", positive_float),
    "weighting": Option("uniform", " | ".join(WEIGHTINGS), choice(*WEIGHTINGS)),
    "lora": Option(
        "dense",
        "LoRA adapters merged as dense (each layer's (α/r)·B·A through the rule: exact for every "
        "rule; the default) | stack (the stacked factors: exact for fedavg and fednova, cheaper) | factors "
        "(A and B averaged apart: cheap, inexact, not the merge of the clients' updates); stack and dense "
        "fold the update into the adapted base weights, which then travel too",
        choice(*LORA_MODES),
    ),
    "clients_per_round": Option(
        0,
        "multi-round runs: clients sampled each round from the run's seed (the same "
        "clients for every strategy in a round); 0: every client. The one-shot round trains "
        "every client",
        non_negative_int,
    ),
    "max_failed_share": Option(
        0.0, "the share of a round's clients that may fail: they are left out and recorded; more stops the run", share
    ),
    "statistics": Option(
        "reestimate",
        "normalisation statistics (BatchNorm's) of a merged model: reestimate (the "
        "clients re-estimate them for the merged weights on their training data, averaged exactly) | "
        "average (the clients' own, averaged) | theta0 (θ0's kept); never merged as task vectors",
        choice(*STATISTICS),
    ),
    "server_optimizer": Option(
        "sgd",
        "θ ← θ + β·u, u from every rule's mean-scale Δ: sgd (u = Δ) | momentum "
        "(FedAvgM) | adam (FedAdam) | yogi (FedYogi) | adagrad (FedAdagrad), −Δ their gradient, "
        "β their learning rate, state kept over the rounds of a run",
        choice(*OPTIMIZERS),
    ),
    "server_momentum": Option(0.9, "μ of server_optimizer = momentum", share),
    "server_beta_1": Option(0.9, "β1 of server_optimizer = adam or yogi", share),
    "server_beta_2": Option(0.99, "β2 of server_optimizer = adam or yogi", share),
    "server_tau": Option(1e-3, "τ (adaptivity) of server_optimizer = adam, yogi or adagrad", positive_float),
}
STRATEGY_OPTIONS = {
    name: {p.name: p.option for p in method.scoped("strategy").values()} for name, method in METHODS.items()
}
"""strategy.<method>.<param>: every merging method's record (fedmerge.merging.registry) gives its keys."""
ENGINE = {
    "client_cpus": Option(1.0, "Ray CPUs per client", positive_float),
    "client_gpus": Option(0.0, "Ray GPUs per client (a fraction shares a GPU)", non_negative_float),
    "ray_address": Option("", "an existing Ray cluster to attach to; empty: a fresh local one", string),
    "clients_per_call": Option(
        1,
        "simulation: each worker call trains this many clients in turn and returns their "
        "updates together (N/k Flower nodes; the same numbers, less of Flower's cost per call)",
        positive_int,
    ),
    "stall_timeout": Option(
        600.0,
        "seconds without any client reply after which a round ends in error (a round "
        "takes as long as it needs while replies come)",
        positive_float,
    ),
    "server_device": Option(
        "auto",
        "where the server evaluates, selects λ/ρ and merges: auto (cuda when available) | cpu | cuda | cuda:N",
        device_name,
    ),
}
TABLES = ("suite_options", "training", "server", "strategy", "engine")
STATISTICS_RULE = {"reestimate": "keep", "theta0": "keep", "average": "average"}
"""server.statistics → the strategies' statistics_rule (re-estimation happens after the merge, in the experiment)."""


def _defaults(declared: Mapping[str, Option]) -> dict:
    return {key: option.default for key, option in declared.items()}


@dataclass(frozen=True)
class Spec:
    """A validated experiment.

    ``rounds`` lists the round counts to compare on the same clients: 1 is one-shot merging (Task
    Arithmetic), R > 1 federated learning. With ``same_compute`` each client's K_t local steps are split
    over the R rounds, so every round count uses the same local compute. ``select`` chooses Task
    Arithmetic's λ (and FedGMA's and CCLIP's ρ) for one-shot runs on the validation splits.
    ``server_lr`` is β of the mean-scale convention (θ ← θ + β·Δ) for multi-round runs. ``strategy`` holds the
    strategy options given (checked); the others take their methods' defaults, and a method's tuned parameter
    (FedGMA's and CCLIP's ρ, TIES's and DARE's density) is searched one-shot only when not given.
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
    diagnostics_clients: int = 64
    suite_options: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    server: dict = field(default_factory=lambda: _defaults(SERVER))
    strategy: dict = field(default_factory=dict)
    engine: dict = field(default_factory=lambda: _defaults(ENGINE))

    # -- reading ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Spec":
        """Validate a nested mapping (a parsed TOML file): every key is known and every value checked."""
        _check_keys(data, [*TOP, *TABLES], "")
        top = {key: option.check(key, data.get(key, option.default)) for key, option in TOP.items()}
        training = dict(_table("training", data.get("training", {})))
        _check_keys(training, TRAINING_KEYS, "training.")
        strategy = _table("strategy", data.get("strategy", {}))
        _check_keys(strategy, STRATEGY_OPTIONS, "strategy.")
        spec = cls(
            **{**top, "strategies": tuple(top["strategies"]), "rounds": tuple(top["rounds"])},
            suite_options=dict(_table("suite_options", data.get("suite_options", {}))),
            training=training,
            server=_resolve("server", SERVER, data.get("server", {})),
            strategy={
                name: _given(f"strategy.{name}", declared, strategy[name])
                for name, declared in STRATEGY_OPTIONS.items()
                if strategy.get(name)
            },
            engine=_resolve("engine", ENGINE, data.get("engine", {})),
        )
        spec.validate()
        return spec

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> "Spec":
        """A spec from dotted keys (a Flower run config, ``--set`` overrides), over an optional base.

        When ``flat`` changes the base's suite, the base's suite options are left out: they belong to the
        other suite (give the new suite's as ``suite_options.KEY``).
        """
        base = dict(base or {})
        if "suite" in flat and parse_value(flat["suite"]) != base.get("suite", TOP["suite"].default):
            base.pop("suite_options", None)
        return cls.from_dict(unflatten(flat, base))

    def validate(self) -> None:
        """Check what the keys alone cannot: known strategies and suite, suite options, client table."""
        from fedmerge.tasks import find_suite, installed  # the data is built later, by the runner

        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            problem = (
                f"unknown strategy {unknown[0]!r}{_suggest(unknown[0], STRATEGIES)}" if unknown else "no strategy given"
            )
            raise FedmergeError(f"{problem}; choose from {', '.join(STRATEGIES)}.")
        for key, values in (("strategies", self.strategies), ("rounds", self.rounds)):
            repeated = sorted({v for v in values if list(values).count(v) > 1}, key=str)
            if repeated:
                raise FedmergeError(f"{key!r} names {repeated[0]!r} twice; give each once.")
        if ":" not in self.suite and self.suite not in installed():
            raise FedmergeError(
                f"unknown suite {self.suite!r}{_suggest(self.suite, installed())}; choose one of "
                f"{', '.join(installed())}, or give your own as 'module:function' (docs/suites.md)."
            )
        suite = find_suite(self.suite)
        if suite.options is not None:
            resolve(self.suite, suite.options, dict(self.suite_options))
        if not self.rounds:
            raise FedmergeError("'rounds' is empty; give the round counts to compare, e.g. rounds = [1, 5].")
        configs = self.client_configs()
        corruptions(self.training, self.clients)
        not_sgd = [t for t, config in enumerate(configs) if config.optimizer != "sgd"]
        if "scaffold" in self.strategies and max(self.rounds) > 1 and not_sgd:
            raise FedmergeError(
                f"strategy 'scaffold' over rounds needs plain SGD steps (its control variates, option II), "
                f"but client {not_sgd[0]} trains with optimizer = {configs[not_sgd[0]].optimizer!r}; set "
                'training.optimizer = "sgd", or run scaffold one-shot only (rounds = [1]).'
            )
        fixed = [name for name in self.strategies if METHODS[name].num_clients not in (None, self.clients)]
        if fixed:
            needed = METHODS[fixed[0]].num_clients
            raise FedmergeError(
                f"strategy {fixed[0]!r} merges exactly {needed} clients, but the experiment has "
                f"{self.clients}; set clients = {needed}, or leave {fixed[0]} out (karcher is the "
                "spherical mean of any number of models)."
            )
        if self.server["clients_per_round"] > self.clients:
            raise FedmergeError(
                f"server.clients_per_round = {self.server['clients_per_round']} is more than the "
                f"{self.clients} clients; give at most {self.clients} (0: every client)."
            )
        if self.server["lora"] == "stack":
            inexact = [name for name in self.strategies if not METHODS[name].linear]
            if inexact:
                exact = ", ".join(name for name, method in METHODS.items() if method.linear)
                raise FedmergeError(
                    f'server.lora = "stack" is exact only for rules that are weighted sums ({exact}), not '
                    f'{", ".join(inexact)}; use server.lora = "dense" (exact for every rule) or drop them.'
                )
        for name in {*self.strategies, *self.strategy}:
            self.build_strategy(name, device="cpu")  # its options checked; the device is checked when a run starts

    # -- using --------------------------------------------------------------------------------------
    def client_configs(self) -> list[TrainConfig]:
        """Each client's training settings (validated)."""
        return client_table(self.training, self.clients, self.seed)

    def strategy_options(self, name: str) -> dict:
        """Strategy ``name``'s options: those given, the rest its method's defaults."""
        return {**_defaults(STRATEGY_OPTIONS[name]), **self.strategy.get(name, {})}

    def build_strategy(self, name: str, **overrides):
        """A fresh strategy object with this spec's server and strategy options."""
        server = {key: value for key, value in self.server.items() if key not in ("statistics", "max_failed_share")}
        options = {
            **server,
            "statistics_rule": STATISTICS_RULE[self.server["statistics"]],
            "sample_seed": self.seed,
            **self.strategy_options(name),
            "device": self.engine["server_device"],
            **overrides,
        }
        if "seed" in options:  # a random rule's draws flow from the run's seed too
            options["seed"] += self.seed
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
            if isinstance(value, dict) and prefix.split(".")[0] in TABLES and not is_spread(value):
                for key, item in value.items():
                    walk(f"{prefix}.{key}", item)
            elif isinstance(value, (list, dict)) or isinstance(value, str) and parse_value(value) != value:
                flat[prefix] = json.dumps(value)  # read back as written (a name "true" stays a string)
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
        raise FedmergeError(
            f"no such experiment file: {path}; give a preset name (see `fedmerge list`) or a .toml path."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise FedmergeError(f"cannot read {path}: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise FedmergeError(f"{path} is not valid TOML: {error}") from None


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


def _table(key: str, value: Any) -> Mapping:
    if not isinstance(value, Mapping):
        raise FedmergeError(f"'{key}' must be a table of options, got {value!r}.")
    return value


def _given(key: str, declared: Mapping[str, Option], given: Any) -> dict:
    """The options of table ``key`` that are given, each checked (unknown ones refused)."""
    _check_keys(_table(key, given), declared, f"{key}.")
    return {name: declared[name].check(f"{key}.{name}", value) for name, value in given.items()}


def _resolve(key: str, declared: Mapping[str, Option], given: Any) -> dict:
    """The table ``key``: the declared defaults overridden by ``given``, every value checked."""
    _check_keys(_table(key, given), declared, f"{key}.")
    return {name: option.check(f"{key}.{name}", given.get(name, option.default)) for name, option in declared.items()}
