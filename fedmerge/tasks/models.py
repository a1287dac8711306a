"""Small models for the suites: a shared encoder with one linear head per task, and the quadratic's point."""

import torch
from torch import nn


class MultiHeadNet(nn.Module):
    """``encoder`` followed by ``heads[head]``; every head is a ``Linear(feature_dim, num_classes)``.

    Task t of a multi-task suite uses head t; single-task suites have one head.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int, num_heads: int = 1) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(nn.Linear(feature_dim, num_classes) for _ in range(num_heads))

    def forward(self, x: torch.Tensor, head: int = 0) -> torch.Tensor:
        return self.heads[head](self.encoder(x))

    @staticmethod
    def head_names(head: int) -> tuple[str, ...]:
        """The state-dict names of head ``head`` (e.g. a task's :attr:`~fedmerge.tasks.Task.private` tensors)."""
        return f"heads.{head}.weight", f"heads.{head}.bias"


def mlp(in_features: int, hidden: int, num_classes: int, num_heads: int = 1, batch_norm: bool = False) -> MultiHeadNet:
    """Two hidden ReLU layers of width ``hidden`` on flattened inputs, each after a BatchNorm if ``batch_norm``."""
    layers: list[nn.Module] = [nn.Flatten()]
    for width in (in_features, hidden):
        layers += [nn.Linear(width, hidden), *([nn.BatchNorm1d(hidden)] if batch_norm else []), nn.ReLU()]
    return MultiHeadNet(nn.Sequential(*layers), hidden, num_classes, num_heads)


def cnn(in_channels: int, width: int, num_classes: int, num_heads: int = 1) -> MultiHeadNet:
    """Two 3×3 conv + ReLU + 2×2 max-pool blocks (``width``, ``2·width`` channels), adaptive average pool
    to 4×4, then a ReLU layer of ``4·width`` features. Works at any input size ≥ 4×4."""
    encoder = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * width, 4 * width),
        nn.ReLU(),
    )
    return MultiHeadNet(encoder, 4 * width, num_classes, num_heads)


class Point(nn.Module):
    """The quadratic suite's model: one parameter vector θ, returned for every example of the batch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, head: int = 0) -> torch.Tensor:
        return self.theta.expand(x.shape[0], -1)
