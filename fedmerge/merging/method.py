"""A merging method's one declarative record: its rule, its parameters and how they are searched.

Every other layer reads these records instead of restating a rule's parameters: the experiment spec's
``strategy.<method>.<param>`` keys and the Flower strategies (:mod:`fedmerge.strategies`), ``fedmerge merge``'s
flags and checks (:mod:`fedmerge.checkpoints`), and the one-shot search on validation splits
(:mod:`fedmerge.simulations`). Adding a method is its rule's file (:mod:`fedmerge.merging.rules`), with its
record, and one line in :mod:`fedmerge.merging.registry`.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedmerge.errors import FedmergeError
from fedmerge.merging.rule import Rule
from fedmerge.merging.scale import SCALES, scaling_to_server_lr, server_lr_to_scaling
from fedmerge.options import Option

SCOPES = ("both", "strategy", "merge")


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    ``name`` is the rule's keyword and the spec's key; ``option`` gives its default, one-line help and check.
    ``scope``: ``both`` (a spec key and a ``fedmerge merge`` flag), ``strategy`` (a spec key only, used by the
    Flower strategy, e.g. where FedNova's a_t comes from in the replies) or ``merge`` (a flag only, e.g. a_t
    given per model). ``flag`` is its ``fedmerge merge`` flag (default ``--name``); ``per_model`` flags take one
    value per model.
    """

    name: str
    option: Option
    scope: str = "both"
    flag: str | None = None
    per_model: bool = False

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Method:
    """A merging method.

    ``make(weights, **params)`` builds its :class:`Rule` (default: ``rule(**params, weights=weights)``, or
    without weights when the method is not ``weighted``, i.e. ignores p_t). ``tuned`` names the parameter the
    one-shot search chooses on validation alongside λ (reported as ρ), over ``grid(task_vector_norms)``, unless
    the experiment sets it. ``scale`` says what the method's own λ multiplies (:mod:`fedmerge.merging.scale`):
    ``sum`` (θ0 + λ·Σ_t τ_t, Task Arithmetic's convention, β = λ·T) or ``mean`` (θ0 + λ·Δ, TIES's, β = λ).
    ``linear``: Δ = Σ_t c_t τ_t with the c_t known before any tensor is read (what exact stacked LoRA needs).
    ``no_lambda`` says why a method has no λ of its own (its paper defines none and both conventions fit it): it is
    then scaled by β alone, searched over the paper's grid in β (``scale`` "mean"). ``own_step``: the rule sets its
    own step from the updates (FedExP), so the one-shot search applies the experiment's β as given instead of a grid.
    ``num_clients``: the one number of clients (models) the method merges, if it has one (SLERP: two).
    ``statistics``: the client statistics the rule needs beside the task vectors, by their contract keys
    (:data:`fedmerge.contract.MERGING_STATISTICS`: Fisher merging's ``fisher``, RegMean's ``grams``); the rule takes
    each as a keyword argument of that name, one name → tensor mapping per client (:meth:`build`'s ``statistics``).
    """

    name: str
    rule: type[Rule]
    summary: str
    params: tuple[Param, ...] = ()
    weighted: bool = True
    tuned: str | None = None
    grid: Callable[[Sequence[float]], list[float]] | None = None
    make: Callable[..., Rule] | None = None
    scale: str = "sum"
    linear: bool = False
    no_lambda: str = ""
    own_step: bool = False
    num_clients: int | None = None
    statistics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"method {self.name!r}: scale must be one of {SCALES}, got {self.scale!r}")

    def server_lr(self, scaling: float, num_clients: int) -> float:
        """β of this method's own λ over ``num_clients`` task vectors (refused for a method without one)."""
        if self.no_lambda:
            raise FedmergeError(
                f"method {self.name!r} has no λ of its own: {self.no_lambda}, so Task Arithmetic's λ (θ + λ·Σ_t τ_t, "
                "β = λ·T) and TIES's (θ + λ·Δ, β = λ) both fit it. Give the server learning rate β instead (θ + β·Δ, "
                "β = 1 adding the method's update itself)."
            )
        return scaling_to_server_lr(scaling, num_clients, self.scale)

    def scaling(self, server_lr: float, num_clients: int) -> float | None:
        """This method's own λ of the server learning rate β; None for a method without one."""
        return None if self.no_lambda else server_lr_to_scaling(server_lr, num_clients, self.scale)

    def scoped(self, scope: str) -> dict[str, Param]:
        """The parameters of ``scope`` (``strategy`` or ``merge``), those of scope ``both`` included."""
        return {p.name: p for p in self.params if p.scope in ("both", scope)}

    def resolve(self, given: Mapping[str, Any], scope: str, label: str | None = None) -> dict[str, Any]:
        """Every parameter of ``scope``: its default, or the value ``given``, checked; unknown names refused.

        ``label(param)`` names a parameter in messages (default: ``<method>.<name>``); per-model values are
        left to :meth:`build`, which knows the number of models.
        """
        declared = self.scoped(scope)
        label = label or (lambda p: f"{self.name}.{p.name}")
        unknown = sorted(set(given) - set(declared))
        if unknown:
            known = ", ".join(declared) or "none"
            raise FedmergeError(f"method {self.name!r} has no parameter {unknown[0]!r}; its parameters: {known}.")
        resolved = {}
        for name, param in declared.items():
            value = given.get(name, param.option.default)
            if value is not None and not param.per_model:
                value = param.option.check(label(param), value)
            resolved[name] = value
        return resolved

    def build(
        self,
        weights: Sequence[float] | None = None,
        statistics: Mapping[str, Sequence[Mapping]] | None = None,
        **params,
    ) -> Rule:
        """The rule with these (resolved) parameters and client weights, and, for a method that needs them
        (:attr:`statistics`), each client's statistics by key (one mapping per client, in the clients' order)."""
        missing = [key for key in self.statistics if key not in (statistics or {})]
        if missing:
            raise FedmergeError(
                f"method {self.name!r} needs each client's {missing[0]!r} statistics beside its model "
                "(see docs/client-contract.md, Statistics for merging)."
            )
        params = {**params, **{key: statistics[key] for key in self.statistics}}
        if self.make is not None:
            return self.make(weights, **params)
        return self.rule(**params, weights=weights) if self.weighted else self.rule(**params)
