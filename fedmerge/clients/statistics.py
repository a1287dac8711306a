"""Normalisation statistics re-estimated for a given model on a client's training data: one pass, no gradients.

After a merge, the running means and variances the clients trained with describe none of the merged model's
layers. Each client resets them and runs its training data through the merged model in training mode, with a
cumulative average over the batches (momentum None), as :func:`torch.optim.swa_utils.update_bn` does; the server
averages the clients' estimates weighted by their batch counts (:func:`fedmerge.strategies.statistics.combine`),
which is exactly that pass over all the clients' batches in turn.
"""

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.data import Dataset, Subset

from fedmerge.tasks import forward
from fedmerge.tasks.loading import eval_batches
from fedmerge.threads import single_threaded

MAX_EXAMPLES = 2_000
"""At most this many training examples (a seeded sample) go into a client's estimate."""


@torch.no_grad()
def estimate_statistics(
    model: nn.Module, data: Dataset, batch_size: int, head: int | None, names: Sequence[str], seed: int = 0
) -> tuple[dict[str, torch.Tensor], int]:
    """The statistics ``names`` of ``model`` re-estimated on ``data``, and the number of batches they average.

    Batches of ``batch_size`` in order (a ragged last batch is dropped unless it is the only one, since a batch of
    one has no variance); the model's statistics, momenta and mode are restored afterwards.
    """
    layers = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    saved = {name: t.clone() for name, t in model.state_dict().items() if name in set(names)}
    momenta, was_training = [m.momentum for m in layers], model.training
    if len(data) > MAX_EXAMPLES:
        data = Subset(
            data, torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:MAX_EXAMPLES].tolist()
        )
    device = next(model.parameters()).device
    batches = 0
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # a cumulative average over the batches
        model.train()
        with single_threaded():
            for inputs, targets in eval_batches(data, batch_size, device=device):
                if batches and len(targets) < batch_size:
                    break
                forward(model, inputs, head)
                batches += 1
        state = model.state_dict()
        return {name: state[name].detach().cpu().clone() for name in names}, batches
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.load_state_dict(saved, strict=False)
        model.train(was_training)
