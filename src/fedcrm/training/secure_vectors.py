"""What a participant contributes to each secure sum, laid out identically on both sides.

FIT: ``[examples * clipped delta (one per parameter), examples, training loss sum]``.
The weight travels inside the masked vector, so the aggregator learns only the
total number of examples, and FedAvg (sum of weighted deltas / sum of weights)
is exact up to quantization.

EVALUATE: the evaluation counts of :mod:`fedcrm.training.metrics`, counts
exact and the loss sum scaled.

Bounds come from public numbers only: the total training rows (from the
federated statistics), the validation fraction, the update clip and the
number of participants.
"""

from __future__ import annotations

import math

import numpy as np

from fedcrm.privacy.mechanisms import ClientNoise
from fedcrm.secagg.segments import Segment, SegmentedQuantizer
from fedcrm.training.metrics import BINS

__all__ = ["LOSS_CAP", "client_dp_fit_quantizer", "client_dp_fit_vector", "evaluation_quantizer", "fit_quantizer", "fit_vector", "validation_bound"]

# Per-example loss assumed when bounding loss sums; binary cross-entropy of a
# float32 logit cannot exceed ~104, and sums are a metric, not a parameter.
LOSS_CAP = 120.0


def validation_bound(train_rows: float, validation_fraction: float, participants: int) -> float:
    """Upper bound on the pooled validation rows given the pooled training rows."""
    return math.ceil(train_rows * validation_fraction / (1 - validation_fraction)) + 2 * participants


def fit_quantizer(*, parameters: int, weight_bound: float, clip: float, bits: int) -> SegmentedQuantizer:
    return SegmentedQuantizer(
        [
            Segment("weighted_delta", parameters, weight_bound * clip),
            Segment("examples", 1, weight_bound, integer=True),
            Segment("loss_sum", 1, weight_bound * LOSS_CAP),
        ],
        bits,
    )


def fit_vector(delta: np.ndarray, *, examples: int, loss_sum: float, clip: float) -> np.ndarray:
    """The real-valued FIT contribution: the delta is clipped per element, then weighted."""
    weighted = np.clip(delta.astype(np.float64), -clip, clip) * examples
    return np.concatenate([weighted, [float(examples), min(loss_sum, examples * LOSS_CAP)]])


def client_dp_fit_quantizer(noise: ClientNoise) -> SegmentedQuantizer:
    """Client-level DP: the update is already integers within ``noise.element_bound``; each participant weighs 1."""
    n = noise.contributors_max
    return SegmentedQuantizer(
        [
            Segment("noised_update", noise.dimension, n * noise.element_bound, integer=True),
            Segment("participants", 1, n, integer=True),
            Segment("loss_mean", 1, n * LOSS_CAP),
        ],
        noise.bits,
    )


def client_dp_fit_vector(noised: np.ndarray, *, loss_mean: float) -> np.ndarray:
    """``[noised integer update, 1, mean training loss]``: DP-FedAvg averages participants, not examples."""
    return np.concatenate([noised.astype(np.float64), [1.0, min(max(loss_mean, 0.0), LOSS_CAP)]])


def evaluation_quantizer(*, validation_rows_bound: float, bits: int) -> SegmentedQuantizer:
    v = validation_rows_bound
    return SegmentedQuantizer(
        [
            Segment("examples", 1, v, integer=True),
            Segment("loss_sum", 1, v * LOSS_CAP),
            Segment("confusion", 4, v, integer=True),
            Segment("histograms", 2 * BINS, v, integer=True),
        ],
        bits,
    )
