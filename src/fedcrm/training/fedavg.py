"""Federated averaging of participants' contributions.

Sums are taken in a fixed order (by participant identity) in float64, so the
same contributions give bit-identical results however they arrived: the run is
reproducible for a seed even though participants finish in random order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["Contribution", "ordered_sum", "weighted_average"]


@dataclass(frozen=True)
class Contribution:
    identity: str
    weight: float
    vector: np.ndarray


def ordered_sum(vectors: Iterable[tuple[str, np.ndarray]]) -> np.ndarray:
    """Sum of vectors in identity order (float64)."""
    items = sorted(vectors, key=lambda kv: kv[0])
    if not items:
        raise ValueError("nothing to sum")
    total = np.zeros(items[0][1].shape, dtype=np.float64)
    for _, v in items:
        total += v
    return total


def weighted_average(contributions: Iterable[Contribution]) -> np.ndarray:
    """FedAvg: the sample-weighted mean of the contributed vectors (e.g. model deltas)."""
    items = list(contributions)
    total_weight = sum(c.weight for c in items)
    if total_weight <= 0:
        raise ValueError("contributions carry no weight")
    return ordered_sum((c.identity, c.vector.astype(np.float64) * c.weight) for c in items) / total_weight
