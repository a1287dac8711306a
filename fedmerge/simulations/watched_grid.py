"""A Flower Grid that the experiment can stop, that reports each reply as it lands and refuses failed clients.

Flower's grids wait for replies until a timeout (an hour here) whatever happens around them: after a
Ctrl-C or a crash of the simulation runtime, a ServerApp thread waiting in ``send_and_receive`` would keep
the process alive. This wrapper polls instead, raises :class:`RunStopped` as soon as ``stop`` is set, and
ends the run with a :class:`FedmergeError` when a client replies with an error: an experiment's results
are never computed from failed clients.
"""

import itertools
import threading
import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.supercore.run import Run
from flwr.serverapp import Grid

from fedmerge.errors import FedmergeError

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

    def __init__(self, grid: Grid, stop: threading.Event, on_reply: Callable[[Message], None] | None = None) -> None:
        self.grid = grid
        self.stop = stop
        self.on_reply = on_reply or (lambda reply: None)

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
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
        waiting = dict.fromkeys(self.push_messages(messages))  # in the order sent
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            self.check_stopped()
            window = list(itertools.islice(waiting, POLL_WINDOW))
            pulled = list(self.pull_messages(window))
            for reply in pulled:
                waiting.pop(reply.metadata.reply_to_message_id, None)
                node = reply.metadata.src_node_id
                if reply.has_error():
                    raise FedmergeError(f"a client (node {node}) failed: {failure_reason(reply)}. "
                                        "Nothing was computed from the failed round.")
                replies.append(reply)
                self.on_reply(reply)
            if waiting and len(pulled) < len(window):  # a whole window answered: the next may be too
                self.stop.wait(POLL_SECONDS)
        if waiting:
            raise FedmergeError(
                f"{len(waiting)} of {len(replies) + len(waiting)} clients did not reply within {timeout:g} s; "
                "nothing was computed from that round."
            )
        return replies
