"""SLERP as a Flower strategy of exactly two clients: θ ← θ + β·(slerp(θ_1, θ_2; t) − θ).

Shoemake 1985, as mergekit's ``slerp``: per tensor, the two clients' models interpolated along the arc between them.
θ_1 is the client of the lower client id (t = 0 gives it), θ_2 the other. Over rounds, each round interpolates the
two models sent back; SLERP is defined for two models only, so a round that would train any other number of clients
is refused before it starts (set ``min_train_nodes``/``fraction_train`` so that two train), and so is a round where
one of the two replies cannot be merged. For more clients, use :class:`~fedmerge.strategies.karcher.Karcher`.
"""

from fedmerge.errors import FedmergeError
from fedmerge.merging.rules.slerp import METHOD
from fedmerge.strategies.base import MethodStrategy


class Slerp(MethodStrategy):
    """Spherical interpolation between the two clients' models.

    Parameters
    ----------
    t : float (default 0.5)
        The position on the arc: 0 the client of the lower client id, 1 the other.
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD

    def configure_train(self, server_round, arrays, config, grid):
        """As every strategy, refusing a round that would train other than two clients."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if len(messages) != 2:
            raise FedmergeError(
                f"SLERP interpolates between exactly two clients, but round {server_round} would train "
                f"{len(messages)}: run it with two clients (or set fraction_train so that two train), "
                "or use karcher, the spherical mean of any number of clients."
            )
        return messages
