"""Scoring a saved model on canonical rows (held-out test sets, audits)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedcrm.models.artifacts import SavedModel
from fedcrm.models.mlp import TabularMLP, set_flat
from fedcrm.training.local import evaluate
from fedcrm.training.metrics import metrics_from_counts
from fedcrm.training.preprocessing import encode

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["build_module", "score_frame"]


def build_module(saved: SavedModel) -> TabularMLP:
    model = TabularMLP(saved.layout)
    set_flat(model, saved.weights)
    return model


def score_frame(saved: SavedModel, frame: pd.DataFrame) -> dict[str, float | None]:
    """Metrics of the saved model on ``frame`` (canonical columns, target included)."""
    return metrics_from_counts(evaluate(build_module(saved), encode(frame, saved.preprocessing)))
