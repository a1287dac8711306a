"""SCAFFOLD's client side: the control variate c_t a client keeps across rounds, and its corrected local steps.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, Algorithm 1 with option II. A train message carrying the server's control variate c (an ArrayRecord under
:data:`fedmerge.contract.CONTROL`) asks the client to take the steps y ← y − η_k (g_k − c_t + c) from the model x it
received, then to keep c_t ← c_t − c + (x − y_t) / Σ_k η_k, Σ_k η_k being the round's ``lr-sum`` (K·η for the paper's
constant rate). That is plain SGD's: with momentum or Adam, (x − y_t) / Σ_k η_k is no gradient estimate, so SCAFFOLD
takes ``optimizer = "sgd"``.

c_t lives in the node's ``Context.state``, which Flower keeps per node across the rounds of a run, under a key of its
own per client: with ``engine.clients_per_call`` > 1 one node trains several clients. The server names its SCAFFOLD
run (:data:`fedmerge.contract.CONTROL_RUN`): a c_t kept for another run (an earlier strategy of the same experiment)
counts as 0, as a client's first does.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedmerge import contract
from fedmerge.errors import FedmergeError


def take_control(content: RecordDict) -> tuple[RecordDict, ArrayRecord | None]:
    """A train message's content without SCAFFOLD's control variate c, and c (None when the message has none)."""
    if contract.CONTROL not in content.array_records:
        return content, None
    rest = RecordDict({key: record for key, record in content.items() if key != contract.CONTROL})
    return rest, content.array_records[contract.CONTROL]


@dataclass
class ControlVariates:
    """This round's c (the server's) and c_t (this client's), float32 CPU tensors by name."""

    client_id: int
    run: str
    server: dict[str, torch.Tensor]
    own: dict[str, torch.Tensor]

    @classmethod
    def load(
        cls, control: ArrayRecord, config: Mapping, state: RecordDict | None, client_id: int, optimizer: str = "sgd"
    ) -> "ControlVariates":
        """c from the message (``control``, ``config`` its ConfigRecord), c_t from ``state`` (0 when it holds none for
        this client and run); ``optimizer`` is the client's local one, which must be ``sgd``."""
        if state is None:
            raise FedmergeError(
                "a SCAFFOLD train message needs the node's Context.state to keep the client's control "
                "variate across rounds: call local_training with the context's state."
            )
        if optimizer != "sgd":
            raise FedmergeError(
                f"SCAFFOLD's control variates (option II) assume plain SGD steps, but client "
                f'{client_id} trains with optimizer = {optimizer!r}; set training.optimizer = "sgd".'
            )
        run = str(config.get(contract.CONTROL_RUN, ""))
        server = {name: torch.from_numpy(array.numpy()).float() for name, array in control.items()}
        kept = state.config_records.get(_key(contract.CONTROL_RUN, client_id))
        if kept is not None and kept[contract.CONTROL_RUN] == run:
            own = {
                name: torch.from_numpy(array.numpy())
                for name, array in state.array_records[_key(contract.CONTROL, client_id)].items()
            }
        else:
            own = {name: torch.zeros_like(value) for name, value in server.items()}
        return cls(client_id, run, server, own)

    def correction(self) -> dict[str, torch.Tensor]:
        """c − c_t, added to every local step's gradient."""
        return {name: self.server[name] - self.own[name] for name in self.server}

    def keep(
        self,
        state: RecordDict,
        received: Mapping[str, torch.Tensor],
        trained: Mapping[str, torch.Tensor],
        lr_sum: float,
    ) -> None:
        """Store c_t ← c_t − c + (x − y_t) / Σ_k η_k in ``state`` (x: ``received``, y_t: ``trained``)."""
        updated = {
            name: self.own[name] - self.server[name] + (received[name].float() - trained[name].float()) / lr_sum
            for name in self.server
        }
        state[_key(contract.CONTROL, self.client_id)] = ArrayRecord(
            {name: value.contiguous() for name, value in updated.items()}
        )
        state[_key(contract.CONTROL_RUN, self.client_id)] = ConfigRecord({contract.CONTROL_RUN: self.run})


def _key(what: str, client_id: int) -> str:
    return f"{what}/{client_id}"
