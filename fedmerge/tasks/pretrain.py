"""Pretraining θ0 on held-out data: Adam over minibatches of every (data set, head) pair at once."""

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from fedmerge.tasks.federation import forward
from fedmerge.tasks.loading import gather
from fedmerge.threads import single_threaded


def pretrain(
    model: nn.Module,
    sets: Sequence[tuple[Dataset, int | None]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Train ``model`` in place and return its state dict.

    Parameters
    ----------
    sets : ``(data, head)`` pairs; each step averages the loss of one minibatch (drawn with
        replacement) from each pair, ``data`` going through ``head`` (:func:`~fedmerge.tasks.federation.forward`).
    steps, lr : Adam steps and learning rate. Few steps give a θ0 that is decent but clearly
        improvable by fine-tuning.
    seed : seeds the minibatch draws (a local generator; the global RNG is untouched).

    Every parameter is pretrained, those the clients will not train (frozen heads) included. Runs on the
    model's device, single-threaded (:mod:`fedmerge.threads`).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with single_threaded():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            for data, head in sets:
                batch = torch.randint(len(data), (min(batch_size, len(data)),), generator=generator)
                inputs, targets = gather(data, batch, device=device)
                loss = loss + loss_fn(forward(model, inputs, head), targets)
            (loss / len(sets)).backward()
            optimizer.step()
    for p in frozen:
        p.requires_grad_(False)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}
