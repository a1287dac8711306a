"""Task Arithmetic's scaling λ and the server learning rate β of the mean-scale convention.

Every rule returns a mean-scale update Δ (for FedAvg, Δ = Σ_t p_t τ_t) and the new model is θ + β·Δ.
Task Arithmetic adds λ·Σ_t τ_t, which with uniform p_t = 1/T is β = λ·T.
"""

from fedmerge.errors import FedmergeError


def _check(num_clients: int) -> None:
    if num_clients < 1:
        raise FedmergeError(f"num_clients must be at least 1, got {num_clients}.")


def scaling_to_server_lr(scaling: float, num_clients: int) -> float:
    """β = λ·T: the server learning rate equal to Task Arithmetic's scaling λ over T task vectors."""
    _check(num_clients)
    return scaling * num_clients


def server_lr_to_scaling(server_lr: float, num_clients: int) -> float:
    """λ = β / T: Task Arithmetic's scaling equal to the server learning rate β over T clients."""
    _check(num_clients)
    return server_lr / num_clients
