"""The client contract: what a training reply carries, defined once for strategies and clients.

A reply to a ``train`` message holds one :class:`flwr.app.ArrayRecord` with the locally trained weights
θ_t (same keys, shapes and dtypes as the global model it received; not the task vector) and one
:class:`flwr.app.MetricRecord` with the keys below. ``docs/client-contract.md`` explains them for people
writing their own ClientApp.

Record keys are conventions, not requirements: a strategy may send under its own ``arrayrecord_key`` and
``configrecord_key`` (Flower's names), so read a message's records with :func:`received`, and the
strategies read a reply's one ArrayRecord and one MetricRecord whatever their keys.
"""

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedmerge.errors import FedmergeError
from fedmerge.merging import client_statistics

ARRAYS = "arrays"
"""Default key of the ArrayRecord in messages (both directions)."""
METRICS = "metrics"
"""Key of the MetricRecord in replies (by convention)."""
CONFIG = "config"
"""Default key of the ConfigRecord the server sends."""

NUM_EXAMPLES = "num-examples"
"""int > 0: training examples the client holds. Used when weighting by examples."""
NUM_STEPS = "num-steps"
"""int > 0: local optimizer steps taken this round. FedNova's a_t with ``normalize_by="steps"``."""
LR_SUM = "lr-sum"
"""float > 0: Σ_k η^(k), the sum of the learning rates of those steps. FedNova's a_t with ``lr-sum``."""
TRAIN_LOSS = "train-loss"
"""float: mean training loss over the round's local steps (optional)."""
CLIENT_ID = "client-id"
"""int ≥ 0: a stable id (the partition id in simulation); orders clients in per-client metrics (optional)."""

STATISTICS = "statistics"
"""A ``query`` message whose ConfigRecord holds ``query = "statistics"`` asks a client to re-estimate the received
model's normalisation statistics on its training data; its reply carries them in its ArrayRecord and
``num-batches`` (and ``client-id``) in its MetricRecord."""
QUERY = "query"
"""Config key naming what a ``query`` message asks for."""
NUM_BATCHES = "num-batches"
"""int > 0: the batches a client's re-estimated statistics average (the server's weights when combining them)."""

FISHER = client_statistics.FISHER  # "fisher"
"""Fisher merging's statistics. A train message whose ConfigRecord holds ``fisher = N`` (int > 0) asks the client for
its diagonal Fisher at its trained weights over N of its training examples (fewer if it holds fewer); the reply
carries it as an extra ArrayRecord under this key: for each floating parameter the reply's weights hold, under its
name and in its shape, (1/N) Σ_n E_y[(∂ log p(y | x_n) / ∂θ)²] in float32, y drawn from the model for a classifier
(exactly, over the classes), else the observed target through the suite's loss (the empirical Fisher)."""
GRAMS = client_statistics.GRAMS  # "grams"
"""RegMean's statistics. ``grams = N`` in a train message's ConfigRecord asks for the Gram matrices of the linear layers'
inputs over N training examples; the reply carries them as an extra ArrayRecord under this key: for each linear layer
whose weight (out × in) the reply's weights hold, under that weight's name, XᵀX / n (in × in, float32), X the n rows
(examples × positions) of the layer's input."""
MERGING_STATISTICS = (FISHER, GRAMS)
"""The statistics a train reply may carry beside its weights, each an ArrayRecord under its key; a reply holds
exactly one other ArrayRecord, its weights."""

PROX_MU = "prox-mu"
"""float > 0: FedProx's μ, when the client trained with the proximal term μ/2·‖w − w_global‖² (absent: none)."""
PROXIMAL_MU = "proximal-mu"
"""Config key of μ in the train messages of Flower's FedProx strategy; fedmerge's ClientApp trains with it."""

CONTROL = "control"
"""SCAFFOLD's server control variate c: a train message may carry it as an extra ArrayRecord under this key (a tensor
per shared floating tensor of the model sent, in its name and shape, float32). A client that gets it takes the steps
y ← y − η_k (g_k − c_t + c), updates its own control variate c_t, kept across rounds, by SCAFFOLD's option II,
c_t ← c_t − c + (x − y_t) / Σ_k η_k (x the model received, Σ_k η_k this round's ``lr-sum``), and says so in its reply
(``control-applied``); the server derives Δc_t = −c − τ_t / ``lr-sum`` from the reply, which carries nothing more."""
CONTROL_RUN = "control-run"
"""str: the SCAFFOLD run a train message's ``control`` belongs to (in its ConfigRecord); a c_t kept for another run is
0, as is a client's first."""
CONTROL_APPLIED = "control-applied"
"""1: the client took SCAFFOLD's corrected steps with the ``control`` it was sent and updated its c_t."""

REQUIRED = (NUM_EXAMPLES,)
OPTIONAL = (NUM_STEPS, LR_SUM, TRAIN_LOSS, CLIENT_ID)


def received(content: RecordDict) -> tuple[ArrayRecord, ConfigRecord]:
    """The global model and the config of a server message: its one ArrayRecord and one ConfigRecord."""
    found = (list(content.array_records.values()), list(content.config_records.values()))
    if [len(records) for records in found] != [1, 1]:
        raise FedmergeError(
            f"a message from the server must carry one ArrayRecord and one ConfigRecord, got keys "
            f"{list(content.array_records)} and {list(content.config_records)}."
        )
    return found[0][0], found[1][0]


def train_reply_metrics(
    num_examples: int,
    num_steps: int,
    lr_sum: float,
    train_loss: float | None = None,
    client_id: int | None = None,
    **extra: float,
) -> dict[str, int | float]:
    """The contract's metrics as plain Python numbers, ready for a MetricRecord."""
    metrics: dict[str, int | float] = {
        NUM_EXAMPLES: int(num_examples),
        NUM_STEPS: int(num_steps),
        LR_SUM: float(lr_sum),
    }
    if train_loss is not None:
        metrics[TRAIN_LOSS] = float(train_loss)
    if client_id is not None:
        metrics[CLIENT_ID] = int(client_id)
    metrics.update({k: float(v) for k, v in extra.items()})
    return metrics
