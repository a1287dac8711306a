"""The ``quadratic`` suite: L_t(θ) = ½‖θ − c_t‖² up to a constant, with a known optimum and an exact ζ².

Task t's data are samples x_i = c_t + ε_i whose noise is centred exactly (Σ_i ε_i = 0), and the loss of
θ on a batch is the mean of ½‖θ − x_i‖². On the full training set that is ½‖θ − c_t‖² + const, so
gradient descent with constant η for K steps from θ gives τ_t = (1 − (1 − η)^K)(c_t − θ) exactly, and
the data heterogeneity ζ² = Σ_t p_t ‖∇L_t − ∇L‖² = Σ_t p_t ‖c_t − c̄‖² (uniform p) equals ``zeta2``.
The optimum of the uniform objective is c̄; θ0 is the origin.
"""

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedmerge.errors import FedmergeError
from fedmerge.tasks.federation import Federation, Task, TaskList
from fedmerge.tasks.models import Point
from fedmerge.options import Option, non_negative_float, positive_float, positive_int

OPTIONS = {
    "dim": Option(10, "dimension of θ", positive_int),
    "zeta2": Option(1.0, "data heterogeneity ζ² = (1/T) Σ_t ‖c_t − c̄‖² (0 with one client)", non_negative_float),
    "distance": Option(1.0, "‖c̄ − θ0‖, how far the uniform optimum lies from θ0 = 0", positive_float),
    "noise": Option(0.1, "standard deviation of the samples around c_t (minibatch gradient noise)", non_negative_float),
    "samples": Option(32, "samples per task in each of train / val / test", positive_int),
}
DESCRIPTION = "Analytic tasks L_t(θ) = ½‖θ − c_t‖² with known optimum and exact data heterogeneity ζ²."


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ½‖output − target‖²."""
    return 0.5 * (output - target).pow(2).sum(1).mean()


def centers(num_clients: int, dim: int, zeta2: float, distance: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(c̄, C): a mean c̄ at ``distance`` from the origin and T centres C[t] with (1/T) Σ‖C[t] − c̄‖² = ζ²."""
    rng = np.random.default_rng([seed, 0])
    mean = rng.standard_normal(dim)
    mean *= distance / np.linalg.norm(mean)
    spread = rng.standard_normal((num_clients, dim))
    spread -= spread.mean(0)
    scale = np.mean(np.sum(spread**2, 1))
    return mean, mean + (spread * np.sqrt(zeta2 / scale) if zeta2 > 0 else 0.0)


def build(num_clients: int, options: dict, seed: int) -> Federation:
    """The federation for resolved ``options`` (see :data:`OPTIONS`)."""
    if num_clients == 1 and options["zeta2"] > 0:
        raise FedmergeError("option 'zeta2' must be 0 with one client (a single task has no heterogeneity).")
    dim, n = options["dim"], options["samples"]
    mean, task_centers = centers(num_clients, dim, options["zeta2"], options["distance"], seed)

    def task(t: int) -> Task:  # made when asked for: its samples from its own generator
        rng = np.random.default_rng([seed, 1, t])

        def samples() -> TensorDataset:
            noise = rng.standard_normal((n, dim)) * options["noise"]
            noise -= noise.mean(0)
            return TensorDataset(torch.zeros(n, 1), torch.from_numpy(task_centers[t] + noise).float())

        return Task(f"quadratic:task-{t}", samples(), samples(), samples())

    tasks = TaskList(num_clients, task)

    def optimum() -> dict:
        return {"theta": torch.from_numpy(mean).float(), "tasks": [torch.from_numpy(c).float() for c in task_centers]}

    return Federation(
        suite="quadratic",
        tasks=tasks,
        options=options,
        seed=seed,
        metric="loss",
        model_fn=lambda: Point(dim),
        loss_fn=squared_error,
        theta0=lambda model: {"theta": torch.zeros(dim)},
        optimum_fn=optimum,
        eval_batch_size=n,
    )
