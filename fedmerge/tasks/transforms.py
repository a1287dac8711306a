"""Input transforms that turn one data set into distinct tasks: feature permutations with an optional sign flip.

Every transform maps a flattened example x to ``sign · x[perm]``. On inputs centred at zero a sign flip
is an intensity inversion, and rotations, flips, reversals and shifts are permutations of the feature
grid, so one representation covers them all.
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Transform:
    """``sign · x[..., perm]`` on flattened examples; ``name`` labels the task."""

    name: str
    perm: torch.Tensor
    sign: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.sign * x.flatten(1)[:, self.perm]


def _grid_permutations(shape: tuple[int, ...]) -> list[tuple[str, torch.Tensor, float]]:
    grid = torch.arange(int(np.prod(shape))).view(shape)
    if len(shape) == 1:
        n = shape[0]
        return [
            ("identity", grid, 1.0),
            ("reverse", grid.flip(0), 1.0),
            ("negate", grid, -1.0),
            ("reverse-negate", grid.flip(0), -1.0),
            (f"shift-{n // 4}", grid.roll(n // 4), 1.0),
            (f"shift-{n // 2}", grid.roll(n // 2), 1.0),
        ]
    return [
        ("identity", grid, 1.0),
        ("rot90", grid.rot90(1), 1.0),
        ("rot180", grid.rot90(2), 1.0),
        ("rot270", grid.rot90(3), 1.0),
        ("hflip", grid.flip(1), 1.0),
        ("vflip", grid.flip(0), 1.0),
        ("transpose", grid.T, 1.0),
        ("invert", grid, -1.0),
    ]


def task_transforms(shape: tuple[int, ...], count: int, seed: int) -> list[Transform]:
    """``count`` distinct transforms for examples of ``shape`` (1-D signal or 2-D image).

    The named geometric transforms come first (identity, reversal/rotations, flips, sign flips); beyond
    them come random feature permutations drawn from ``seed``.
    """
    named = _grid_permutations(shape)[:count]
    transforms = [Transform(name, perm.flatten(), sign) for name, perm, sign in named]
    rng = np.random.default_rng([seed, 7])
    numel = int(np.prod(shape))
    for k in range(count - len(transforms)):
        transforms.append(Transform(f"permute-{k}", torch.from_numpy(rng.permutation(numel)), 1.0))
    return transforms
