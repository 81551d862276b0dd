"""Federated averaging from summed contributions.

Each participant contributes ``[examples * delta, examples, loss sum]``
(:func:`fedcrm.training.secure_vectors.fit_vector`); the aggregator only ever
needs the sum of those vectors, plainly or under secure aggregation, and the
FedAvg step is the weighted mean it implies. Plain sums are taken in a fixed
order (by participant identity) in float64, so the same contributions give
bit-identical results however they arrived: a run is reproducible for a seed
even though participants finish in random order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["FedAvgStep", "fedavg_step", "ordered_sum"]


def ordered_sum(vectors: Iterable[tuple[str, np.ndarray]]) -> np.ndarray:
    """Sum of vectors in identity order (float64)."""
    items = sorted(vectors, key=lambda kv: kv[0])
    if not items:
        raise ValueError("nothing to sum")
    total = np.zeros(items[0][1].shape, dtype=np.float64)
    for _, v in items:
        total += v
    return total


@dataclass(frozen=True)
class FedAvgStep:
    weights: np.ndarray  # the new global model (float32), plain FedAvg
    examples: float  # total training examples behind it
    train_loss: float  # mean training loss over those examples
    delta: np.ndarray  # the weighted mean update (float64): what a server optimiser steps along


def fedavg_step(weights: np.ndarray, fit_total: np.ndarray) -> FedAvgStep:
    """Apply the sample-weighted mean delta in ``fit_total`` (a summed FIT contribution) to ``weights``."""
    size = weights.shape[0]
    if fit_total.shape != (size + 2,):
        raise ValueError(f"summed contribution has shape {fit_total.shape}, expected ({size + 2},)")
    examples = float(fit_total[size])
    if examples <= 0:
        raise ValueError("the contributions carry no training examples")
    delta = fit_total[:size] / examples
    new = (weights.astype(np.float64) + delta).astype(np.float32)
    return FedAvgStep(weights=new, examples=examples, train_loss=float(fit_total[size + 1] / examples), delta=delta)
