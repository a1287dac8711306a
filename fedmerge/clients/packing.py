"""Several clients per worker call, in simulation: the messages of k clients travel as one, and their replies back.

Flower's runtime costs milliseconds per call, whatever the call does; with many small clients that dominates. With
``engine.clients_per_call = k`` the simulation runs N/k SuperNodes and each call trains k clients in turn:
the server's grid (:class:`~fedmerge.simulations.watched_grid.WatchedGrid`) shows the strategies N virtual nodes (ids 1..N, client
t = node t + 1), packs the messages of k of them into one (each record under ``"<client>/<key>"``, the clients listed
in a ConfigRecord under :data:`PACK`), and unpacks the reply into one reply per client, each as that client's own
ClientApp call would have made it. Every client's call runs the same code on the same inputs, so the numbers are
those of one client per call; only Flower's per-call cost is shared.
"""

import time
from collections.abc import Callable, Sequence

from flwr.app import ConfigRecord, Error, Message, Metadata, RecordDict

PACK = "fedmerge-pack"
"""The ConfigRecord of a packed message (its ``clients``) and of a packed reply (``clients`` and ``errors``)."""
FAILED = "client failed"


def virtual_node(client: int) -> int:
    """The node id the strategies see for ``client`` when clients are packed."""
    return client + 1


def pack(messages: Sequence[Message], node: int) -> Message:
    """One message to real ``node`` carrying every message of ``messages`` (each to a virtual node)."""
    content = RecordDict()
    clients = []
    for message in messages:
        client = message.metadata.dst_node_id - 1
        clients.append(client)
        for key, record in message.content.items():
            content[f"{client}/{key}"] = record
    content[PACK] = ConfigRecord({"clients": clients})
    return Message(content, dst_node_id=node, message_type=messages[0].metadata.message_type)


def is_packed(content: RecordDict) -> bool:
    return PACK in content.config_records


def answer_packed(content: RecordDict, answer: Callable[[int, RecordDict], RecordDict]) -> RecordDict:
    """A packed message's reply content: ``answer(client, its content)`` for each client, in turn; a client that
    raises is recorded as failed with its message, and the others still run."""
    reply = RecordDict()
    clients, errors = list(content[PACK]["clients"]), []
    for client in clients:
        prefix = f"{client}/"
        own = RecordDict({key[len(prefix) :]: record for key, record in content.items() if key.startswith(prefix)})
        try:
            for key, record in answer(client, own).items():
                reply[f"{client}/{key}"] = record
            errors.append("")
        except Exception as error:  # this client failed: say why, as its own call would have
            errors.append(f"{type(error).__name__}: {error}")
    reply[PACK] = ConfigRecord({"clients": clients, "errors": errors})
    return reply


def unpack(reply: Message, sent: dict[int, Message]) -> list[Message]:
    """One reply per client of a packed ``reply`` (``sent``: client → the virtual message it answers); a reply that
    failed as a whole fails for each of its clients."""
    if reply.has_error():
        return [_reply(message, error=reply.error.reason) for message in sent.values()]
    pack_record = reply.content[PACK]
    replies = []
    for client, error in zip(pack_record["clients"], pack_record["errors"]):
        prefix = f"{client}/"
        if error:
            replies.append(_reply(sent[client], error=error))
            continue
        own = RecordDict(
            {key[len(prefix) :]: record for key, record in reply.content.items() if key.startswith(prefix)}
        )
        replies.append(_reply(sent[client], content=own))
    return replies


def _reply(message: Message, content: RecordDict | None = None, error: str | None = None) -> Message:
    """The reply ``message``'s client sent, built outside Flower's runtime (its Metadata made explicitly)."""
    metadata = Metadata(
        run_id=message.metadata.run_id,
        message_id=f"{message.metadata.message_id}-reply",
        src_node_id=message.metadata.dst_node_id,
        dst_node_id=0,
        reply_to_message_id=message.metadata.message_id,
        group_id=message.metadata.group_id,
        created_at=time.time(),
        ttl=message.metadata.ttl,
        message_type=message.metadata.message_type,
    )
    if error is not None:
        return Message(Error(code=0, reason=error), metadata=metadata)
    return Message(content, metadata=metadata)
