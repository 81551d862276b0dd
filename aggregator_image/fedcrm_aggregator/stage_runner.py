"""What a secure sum needs from the round loop, and nothing more.

The coordinator owns sessions, stages and the round's bookkeeping; a secure sum
(:mod:`fedcrm_aggregator.secure_sums`) drives its five stages through this
interface. It is a Protocol so that the secure sum depends on the interface
only, never on the coordinator module: the dependency runs one way (the
import-linter layers contract in pyproject.toml checks it, annotations
included), and a secure sum can be driven by any runner of stages — a test's,
or a benchmark's.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

from fedcrm.models.layout import ModelLayout
from fedcrm.protocol import pb
from fedcrm.spec.manifests import Federation, FederationSpec
from fedcrm.training.preprocessing import Preprocessing
from fedcrm_aggregator.privacy import PrivacyLedger
from fedcrm_aggregator.sessions import Session

__all__ = ["Receiver", "StageRunner"]

#: Handles one participant's answer to a stage: ``(identity, message) -> accepted``.
Receiver = Callable[[str, Any], Any]


class StageRunner(Protocol):
    expected: list[str]  # every member of the federation, in the order that numbers them in secure sums
    out_dir: Path  # the run's outputs and checkpoints
    federation: Federation
    spec: FederationSpec
    layout: ModelLayout | None
    preprocessing: Preprocessing | None
    privacy: PrivacyLedger
    version: int | None  # the global model's version this round trains from

    def emit(self, event: str, **fields: Any) -> None:
        """Record an event in the run's events.jsonl."""

    def run_stage(self, kind: int, round_: int, receiver: Receiver, *, cohort: Collection[str] | None = None,
                  customize: Callable[[Session, pb.Task], None] | None = None) -> dict[str, Any]:
        """Send one task to every usable participant (of ``cohort``), collect the answers ``receiver`` accepts
        until the round timeout; returns identity -> what the receiver returned."""

    def usable(self) -> list[str]:
        """The participants connected and able to take part now, sorted."""

    def count_exposure(self) -> None:
        """Count the round's client-level release now: its noised sum can be seen from here on."""
