"""Each method's own λ, the server learning rate β of the mean-scale convention, and the one-shot search grid.

Every rule returns a mean-scale update Δ and the new model is θ + β·Δ. A method's user-facing λ means what its
paper means (:attr:`fedmerge.merging.method.Method.scale`):

- ``sum`` (Task Arithmetic's convention, for methods whose Δ is a re-weighted average of the task vectors: FedAvg,
  FedNova, FedGMA, DARE-linear, Breadcrumbs, mean-direction): λ multiplies the sum, θ0 + λ·Σ_t τ_t, so β = λ·T;
- ``mean`` (TIES's convention, for disjoint means: TIES, DARE-TIES, DELLA, Breadcrumbs-TIES): λ multiplies the
  update itself, θ0 + λ·Δ, so β = λ.

Methods whose paper defines no λ (robust locations such as the median, CCLIP, Krum; SLERP, Model Stock, the Karcher
mean; FedExP, which sets its own step) are scaled by β alone (``Method.no_lambda``); the one-shot search then
searches β over the paper's grid.
"""

from fedmerge.errors import FedmergeError

SCALES = ("sum", "mean")
CONVENTIONS = {"sum": "θ + λ·Σ_t τ_t, Task Arithmetic's convention", "mean": "θ + λ·Δ, TIES's convention"}
"""What a method's own λ multiplies, by its scale, in words (help, messages, records)."""
PAPER_GRID = tuple(round(0.05 * k, 2) for k in range(1, 41))
"""The paper's λ candidates, 0.05 to 2.00 (Tao et al. 2025, after Ilharco et al. 2023), in each method's own λ."""


def _check(num_clients: int) -> None:
    if num_clients < 1:
        raise FedmergeError(f"num_clients must be at least 1, got {num_clients}.")


def scaling_to_server_lr(scaling: float, num_clients: int, scale: str = "sum") -> float:
    """β of a method's own λ: λ·T for ``sum``-scale methods (Task Arithmetic), λ for ``mean``-scale ones (TIES)."""
    _check(num_clients)
    return scaling * num_clients if scale == "sum" else scaling


def server_lr_to_scaling(server_lr: float, num_clients: int, scale: str = "sum") -> float:
    """A method's own λ of β: β / T for ``sum``-scale methods, β for ``mean``-scale ones."""
    _check(num_clients)
    return server_lr / num_clients if scale == "sum" else server_lr


def search_grid(num_clients: int, scale: str = "sum") -> list[tuple[float, float]]:
    """The one-shot search's (λ, β) candidates: the paper's grid in the method's own λ, and, where that grid misses
    the natural scale β = 1 (the mean of the updates: ``sum``-scale methods once T > 20), the paper's grid in β too,
    so every rule is tried at its own scale at every T. Sorted by β."""
    _check(num_clients)
    grid = {scaling_to_server_lr(scaling, num_clients, scale): scaling for scaling in PAPER_GRID}
    if not min(grid) <= 1.0 <= max(grid):
        grid = {beta: server_lr_to_scaling(beta, num_clients, scale) for beta in PAPER_GRID} | grid
    return [(grid[beta], beta) for beta in sorted(grid)]
