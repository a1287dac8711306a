"""RegMean as a Flower strategy: each linear layer's update Δ = (Σ_t p_t τ_t G̃_t)(Σ_t p_t G̃_t)⁺, the mean elsewhere.

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023. Each client sends the Gram
matrix of every linear layer's inputs (the reply's ``grams`` record, asked for in every train message: fedmerge's
ClientApp computes them, docs/client-contract.md says how yours can); G̃_t shrinks its off-diagonal entries by α.
"""

from fedmerge.merging.rules.regmean import METHOD
from fedmerge.strategies.client_statistics import StatisticsStrategy


class RegMean(StatisticsStrategy):
    """The regression mean of each linear layer.

    Parameters
    ----------
    alpha : float (default 0.9)
        α, the factor on each Gram's off-diagonal entries, in [0, 1].
    examples : int (default 256)
        How many of its training examples each client's Grams average over (sent in the train message).
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD
