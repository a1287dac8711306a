"""Build real Flower reply Messages for strategy tests (a reply needs explicit Metadata outside an app),
and a Grid that runs a real ClientApp in this process, so a strategy's ``start`` runs without Ray."""

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid


def _metadata(node_id: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"reply-{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"ins-{node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )


def arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def reply(node_id: int, arrays: dict[str, np.ndarray], **metrics) -> Message:
    """A training reply from ``node_id`` with the weights ``arrays`` and the metric keys given."""
    content = RecordDict(
        {"arrays": arrays_record(arrays), "metrics": MetricRecord({k.replace("_", "-"): v for k, v in metrics.items()})}
    )
    return Message(content=content, metadata=_metadata(node_id))


def error_reply(node_id: int, reason: str) -> Message:
    return Message(error=Error(code=0, reason=reason), metadata=_metadata(node_id))


class InProcessGrid(Grid):
    """Delivers each message to ``client_app`` on node 1..N in this process; ``sent`` keeps the messages.

    A ClientApp that raises answers with an error reply, as a SuperNode would. Server messages need
    Flower's task identity: set it first (the ``server_app`` fixture in test_strategies.py does).
    """

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app, self.node_ids, self.sent = client_app, list(range(1, num_nodes + 1)), []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            context = Context(1, node, {"partition-id": node - 1}, RecordDict(), {})
            try:
                replies.append(self.client_app(message, context))
            except Exception as error:  # what a SuperNode sends back
                replies.append(Message(Error(code=0, reason=repr(error)), reply_to=message))
        return replies

    def get_node_ids(self):
        return self.node_ids

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError
