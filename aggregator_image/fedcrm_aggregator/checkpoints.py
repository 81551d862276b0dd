"""What the aggregator keeps on its volume so a restart neither forgets nor repeats.

After every completed round it writes the global weights and the round's
record; before each round it marks the round as in progress. A restarted
aggregator resumes after the last completed round. A round that was in
progress is abandoned: its secure sum is never finished, so no partial sum is
released, and it is re-run under a new incarnation whose round ids (mixed into
every key derivation) differ, so no participant reuses keys or masks.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcrm.files import atomic_write
from fedcrm.models.layout import ModelLayout
from fedcrm.reporting import RoundRecord
from fedcrm.training.preprocessing import Preprocessing

__all__ = ["Checkpoint", "durable_folder", "load_checkpoint", "mark_in_progress", "next_incarnation", "save_checkpoint"]

_FORMAT = "fedcrm.aggregator-checkpoint/v1"


@dataclass
class Checkpoint:
    federation: str
    rounds_completed: int
    weights: np.ndarray
    preprocessing: Preprocessing
    layout: ModelLayout
    history: list[RoundRecord]
    participant_rounds: dict[str, int]
    dropped: dict[str, str] = field(default_factory=dict)
    in_progress: int | None = None
    incarnations: int = 1
    server_state: dict[str, np.ndarray] = field(default_factory=dict)  # the server optimiser's moments


def durable_folder(out_dir: Path) -> Path:
    """Where a run keeps what a restarted aggregator must find again (its checkpoint, the privacy ledger, the
    secure-aggregation member list); a fresh run into the same output folder starts without it."""
    return out_dir / "checkpoint"


def next_incarnation(out_dir: Path, federation: str) -> int:
    """Count this process start, durably, before anything can be released; returns its number (1, 2, ...).

    Privacy releases are keyed by ``round@incarnation``. Kept apart from the round checkpoint, which exists
    only after a completed round: a crash before the first checkpoint, or two crashes within one round, must
    still give the re-run round a new key, or its spend would be counted once for two releases.
    """
    folder = durable_folder(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "incarnation.json"
    previous = 0
    if path.exists():
        state = json.loads(path.read_text())
        if state.get("federation") == federation:
            previous = int(state["incarnation"])
    atomic_write(path, json.dumps({"federation": federation, "incarnation": previous + 1}).encode())
    return previous + 1


def save_checkpoint(out_dir: Path, cp: Checkpoint) -> None:
    folder = durable_folder(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, weights=cp.weights.astype(np.float32), **cp.server_state)
    # Weights first: state.json names a round only once its weights are durable.
    atomic_write(folder / f"weights-{cp.rounds_completed}.npz", buf.getvalue())
    state = {
        "format": _FORMAT,
        "federation": cp.federation,
        "rounds_completed": cp.rounds_completed,
        "weights": f"weights-{cp.rounds_completed}.npz",
        "preprocessing": json.loads(cp.preprocessing.to_json()),
        "layout": cp.layout.to_dict(),
        "history": [asdict(r) for r in cp.history],
        "participant_rounds": cp.participant_rounds,
        "dropped": cp.dropped,
        "in_progress": cp.in_progress,
        "incarnations": cp.incarnations,
    }
    atomic_write(folder / "state.json", json.dumps(state, indent=1).encode())
    for old in folder.glob("weights-*.npz"):
        if old.name != state["weights"]:
            old.unlink(missing_ok=True)


def mark_in_progress(out_dir: Path, round_: int) -> None:
    """Record that ``round_`` started (only meaningful once a checkpoint exists)."""
    path = durable_folder(out_dir) / "state.json"
    if path.exists():
        state = json.loads(path.read_text())
        state["in_progress"] = round_
        atomic_write(path, json.dumps(state, indent=1).encode())


def load_checkpoint(out_dir: Path, federation: str) -> Checkpoint | None:
    path = durable_folder(out_dir) / "state.json"
    if not path.exists():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    if state.get("format") != _FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    if state["federation"] != federation:
        raise ValueError(f"{path} belongs to federation {state['federation']}, not {federation}; use another output folder")
    with np.load(durable_folder(out_dir) / state["weights"]) as npz:
        weights = npz["weights"].astype(np.float32)
        server_state = {k: npz[k] for k in npz.files if k.startswith("server_")}
    return Checkpoint(
        federation=state["federation"],
        rounds_completed=state["rounds_completed"],
        weights=weights,
        preprocessing=Preprocessing.from_json(json.dumps(state["preprocessing"])),
        layout=ModelLayout.from_dict(state["layout"]),
        history=[RoundRecord(**r) for r in state["history"]],
        participant_rounds={k: int(v) for k, v in state["participant_rounds"].items()},
        dropped=dict(state.get("dropped", {})),
        in_progress=state.get("in_progress"),
        incarnations=int(state.get("incarnations", 1)) + 1,
        server_state=server_state,
    )
