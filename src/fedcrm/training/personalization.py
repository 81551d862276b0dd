"""Personalization: a participant fine-tunes the final global model on its own rows, for itself.

The global model is the best one model for everyone; a tenant whose data
differs from the federation's mix may do better with a copy adapted to its
own rows. This runs after the federation has succeeded, inside the
participant: the personalized weights and both sets of metrics stay with it
(its log, and a file of its own), because a per-tenant accuracy is exactly the
kind of per-participant number secure aggregation keeps from the aggregator.

The comparison is on the participant's own validation split, which neither
the federation's training nor this fine-tuning has seen. A fresh module is
built from the layout, so a DP-SGD trainer's hooks on the participant's
training module never touch it; the fine-tuning itself is not private (the
model never leaves its owner, so there is nobody to protect the rows from).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcrm.models.layout import ModelLayout
from fedcrm.models.mlp import TabularMLP, get_flat, set_flat
from fedcrm.training.local import derive_seed, evaluate, train_epochs
from fedcrm.training.metrics import metrics_from_counts
from fedcrm.training.preprocessing import EncodedData

__all__ = ["Personalized", "personalize"]


@dataclass(frozen=True)
class Personalized:
    epochs: int
    validation_rows: int
    global_metrics: dict[str, float | None]  # the federation's final model on this participant's validation rows
    personalized_metrics: dict[str, float | None]  # after fine-tuning on its training rows
    weights: np.ndarray  # the personalized model (float32, wire order); it stays with the participant

    def as_dict(self) -> dict[str, object]:
        return {"epochs": self.epochs, "validation_rows": self.validation_rows,
                "global": self.global_metrics, "personalized": self.personalized_metrics}


def personalize(layout: ModelLayout, weights: np.ndarray, train: EncodedData, validation: EncodedData, *,
                epochs: int, batch_size: int, learning_rate: float, seed: int, identity: str) -> Personalized:
    """Fine-tune ``weights`` for ``epochs`` on ``train`` and compare both models on ``validation``."""
    if epochs < 1:
        raise ValueError(f"personalization needs at least one epoch, got {epochs}")
    model = TabularMLP(layout)
    set_flat(model, weights)
    before = metrics_from_counts(evaluate(model, validation))
    train_epochs(model, train, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                 seed=derive_seed(seed, identity, "personalization"))
    after = metrics_from_counts(evaluate(model, validation))
    return Personalized(epochs=epochs, validation_rows=len(validation), global_metrics=before,
                        personalized_metrics=after, weights=get_flat(model))
