"""Saving and loading a trained model as plain files (numpy-only).

``model.npz`` holds the flat weights; ``model.json`` holds everything needed to
use them (layout, preprocessing, schema, provenance) and the SHA-256 digest of
the weights, which a reader checks so a truncated or swapped file is caught.
Writes go to a temporary name first and are renamed, so a crash never leaves a
half-written model.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcrm.errors import FedcrmError
from fedcrm.files import atomic_write
from fedcrm.models.layout import ModelLayout
from fedcrm.spec.manifests import Task
from fedcrm.training.preprocessing import Preprocessing

__all__ = ["SavedModel", "load_model", "save_model", "weights_digest"]


def weights_digest(weights: np.ndarray) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(weights, dtype="<f4").tobytes()).hexdigest()


@dataclass(frozen=True)
class SavedModel:
    weights: np.ndarray
    layout: ModelLayout
    preprocessing: Preprocessing
    task: Task
    metadata: dict[str, Any]


def save_model(
    folder: Path,
    *,
    weights: np.ndarray,
    layout: ModelLayout,
    preprocessing: Preprocessing,
    task: Task,
    metadata: dict[str, Any],
) -> str:
    """Write ``model.npz`` and ``model.json``; returns the weights digest."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.asarray(weights, dtype=np.float32)
    digest = weights_digest(weights)
    buf = io.BytesIO()
    np.savez(buf, weights=weights)
    atomic_write(folder / "model.npz", buf.getvalue())
    meta = {
        "format": "fedcrm.model/v1",
        "architecture": "tabular-mlp",
        "digest": digest,
        "layout": layout.to_dict(),
        "preprocessing": json.loads(preprocessing.to_json()),
        "task": task.model_dump(mode="json", by_alias=True),
        **metadata,
    }
    atomic_write(folder / "model.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return digest


def load_model(folder: Path) -> SavedModel:
    folder = Path(folder)
    try:
        meta = json.loads((folder / "model.json").read_text())
        with np.load(folder / "model.npz") as npz:
            weights = npz["weights"].astype(np.float32)
    except FileNotFoundError as err:
        raise FedcrmError(f"{folder}: no saved model here ({Path(err.filename).name} is missing)") from None
    except (ValueError, KeyError, OSError) as err:
        raise FedcrmError(f"{folder}: the saved model is unreadable: {err}") from None
    if weights_digest(weights) != meta.get("digest"):
        raise FedcrmError(f"{folder}: model.npz does not match the digest in model.json; the files are corrupt or mixed up")
    layout = ModelLayout.from_dict(meta["layout"])
    prep = Preprocessing.from_json(json.dumps(meta["preprocessing"]))
    task = Task.model_validate(meta["task"])
    layout.split(weights)  # checks the size
    return SavedModel(weights=weights, layout=layout, preprocessing=prep, task=task, metadata=meta)
