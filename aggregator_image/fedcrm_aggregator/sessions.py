"""One connected participant: its task queue, what it already holds, and its traffic."""

from __future__ import annotations

import queue
from collections import defaultdict
from dataclasses import dataclass, field

from fedcrm.protocol import pb

__all__ = ["Session"]


@dataclass(eq=False)
class Session:
    """A participant's open ``Connect`` stream.

    ``model_version`` and ``has_preprocessing`` record what was already sent,
    so each model version crosses the wire once per participant. Bytes are the
    serialized sizes of the protobuf messages, per round, in each direction.
    """

    identity: str
    connected: bool = True
    failed: str | None = None
    model_version: int | None = None
    has_preprocessing: bool = False
    rounds: int = 0
    outbox: queue.Queue[pb.Task] = field(default_factory=queue.Queue)
    bytes_up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    bytes_down: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def usable(self) -> bool:
        return self.connected and self.failed is None

    def send(self, task: pb.Task) -> None:
        self.outbox.put(task)

    def next_task(self, timeout: float) -> pb.Task | None:
        try:
            return self.outbox.get(timeout=timeout)
        except queue.Empty:
            return None
