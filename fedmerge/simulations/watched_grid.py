"""A Flower Grid that the experiment can stop, that reports each reply as it lands and watches failures.

Flower's grids wait for replies until a timeout whatever happens around them: after a Ctrl-C or a crash of the
simulation runtime, a ServerApp thread waiting in ``send_and_receive`` would keep the process alive. This wrapper
polls instead, raises :class:`RunStopped` as soon as ``stop`` is set, and ends the run with a
:class:`FedmergeError` when more clients of a round fail than ``max_failed_share`` allows (none, by default):
failed replies within that share are returned for the strategies to leave out and record, and an experiment's
results are never computed from failed clients. Its ``timeout`` is a stall timeout: the round ends in error
when no reply has come for that long, however long the round takes as a whole. With ``clients_per_call`` > 1 it
packs the messages of that many clients into one call (:mod:`fedmerge.clients.packing`).
"""

import itertools
import threading
import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.supercore.run import Run
from flwr.serverapp import Grid

from fedmerge import contract
from fedmerge.errors import FedmergeError
from fedmerge.clients.packing import pack, unpack, virtual_node

POLL_SECONDS = 0.1
POLL_WINDOW = 256
"""Replies asked for per poll: the oldest messages still waiting (replies come back about in the order sent), so
that a poll costs the same whatever the number of clients."""
FLOWER_WRAPPING = "Exception ClientAppException occurred. Message: "
"""What Flower's simulation puts before the message of an exception raised in a ClientApp."""


class RunStopped(Exception):
    """The run was stopped from outside (Ctrl-C, or the simulation runtime ended)."""


def failure_reason(reply: Message) -> str:
    """The last line of what a failed client reported, without the wrapping Flower adds around it."""
    lines = [line.strip(" <>'\"") for line in reply.error.reason.splitlines() if line.strip(" <>'\"")]
    last = lines[-1] if lines else reply.error.reason
    return last.split(FLOWER_WRAPPING, 1)[-1].rstrip(".")


class WatchedGrid(Grid):
    """Delegates to ``grid``; ``send_and_receive`` polls, honours ``stop`` and calls ``on_reply`` per reply."""

    def __init__(
        self,
        grid: Grid,
        stop: threading.Event,
        on_reply: Callable[[Message], None] | None = None,
        max_failed_share: float = 0.0,
        clients_per_call: int = 1,
        num_clients: int | None = None,
    ) -> None:
        self.grid = grid
        self.stop = stop
        self.on_reply = on_reply or (lambda reply: None)
        self.max_failed_share = max_failed_share
        self.clients_per_call, self.num_clients = clients_per_call, num_clients

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        if self.clients_per_call > 1:
            return [virtual_node(client) for client in range(self.num_clients)]
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.check_stopped()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def check_stopped(self) -> None:
        if self.stop.is_set():
            raise RunStopped("the run was stopped")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        calls = self._calls(messages)
        waiting = dict(zip(self.push_messages([call for call, _ in calls]), (sent for _, sent in calls)))  # in order
        allowed = int(self.max_failed_share * len(messages))
        stalled_at = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        failed = 0
        while waiting and (stalled_at is None or time.monotonic() < stalled_at):
            self.check_stopped()
            window = list(itertools.islice(waiting, POLL_WINDOW))
            pulled = list(self.pull_messages(window))
            for call in pulled:
                sent = waiting.pop(call.metadata.reply_to_message_id, None)
                for reply in [call] if sent is None else unpack(call, sent):
                    if reply.has_error():
                        failed += 1
                        if failed > allowed:
                            raise FedmergeError(self._too_many(reply, failed, len(messages), allowed))
                    replies.append(reply)
                    self.on_reply(reply)
            if pulled and timeout is not None:
                stalled_at = time.monotonic() + timeout
            if waiting and len(pulled) < len(window):  # a whole window answered: the next may be too
                self.stop.wait(POLL_SECONDS)
        if waiting:
            missing = sum(1 if sent is None else len(sent) for sent in waiting.values())
            raise FedmergeError(
                f"{missing} of {len(messages)} clients did not reply, and none replied for {timeout:g} s "
                "(engine.stall_timeout); nothing was computed from that round."
            )
        return replies

    def _calls(self, messages: list[Message]) -> list[tuple[Message, dict[int, Message] | None]]:
        """The calls to make: each message itself, or (``clients_per_call`` > 1) packs of that many virtual
        messages, each to a real node in turn, with the messages they carry by client. Messages that make clients keep
        state in their node's Context across rounds (SCAFFOLD's control variates) go by client instead: client t
        always to the same node, beside the clients of its t // clients_per_call, so that its state is there next
        round."""
        if self.clients_per_call == 1:
            return [(message, None) for message in messages]
        nodes, k = self._real_nodes(), self.clients_per_call
        if any(contract.CONTROL in message.content.array_records for message in messages):
            nodes, groups = sorted(nodes), {}
            for message in messages:
                groups.setdefault((message.metadata.dst_node_id - 1) // k, []).append(message)
            packs = [(nodes[g % len(nodes)], group) for g, group in sorted(groups.items())]
        else:
            packs = [
                (nodes[i % len(nodes)], messages[start : start + k])
                for i, start in enumerate(range(0, len(messages), k))
            ]
        return [
            (pack(group, node), {message.metadata.dst_node_id - 1: message for message in group})
            for node, group in packs
        ]

    def _real_nodes(self) -> list[int]:
        """The runtime's nodes, once all of them (N / ``clients_per_call``) have connected."""
        expected = -(-self.num_clients // self.clients_per_call)
        while len(nodes := list(self.grid.get_node_ids())) < expected:
            self.check_stopped()
            self.stop.wait(POLL_SECONDS)
        return nodes

    def _too_many(self, reply: Message, failed: int, sent: int, allowed: int) -> str:
        node, reason = reply.metadata.src_node_id, failure_reason(reply)
        if self.max_failed_share == 0:
            return f"a client (node {node}) failed: {reason}. Nothing was computed from the failed round."
        return (
            f"{failed} of the round's {sent} clients failed, more than server.max_failed_share = "
            f"{self.max_failed_share:g} allows ({allowed}); the last, node {node}: {reason}. Nothing was computed "
            "from the failed round."
        )
