"""What a participant contributes to each secure sum, laid out identically on both sides.

FIT: ``[examples * clipped delta (one per parameter), examples, training loss sum]``.
The weight travels inside the masked vector, so the aggregator learns only the
total number of examples, and FedAvg (sum of weighted deltas / sum of weights)
is exact up to quantization. With ``secureAggregation.quantizationBits`` = q
the sum is modulo ``2**(q + ceil(log2 n))`` for the ``n`` members of the sum
(:func:`sum_bits`, :func:`fit_quantizer`): the weighted deltas are rounded
stochastically to a shared scale, the examples and loss sum go as digits.
With ``secureAggregation.keepFraction`` below 1 the weighted deltas are only
the round's shared support (:func:`fit_support`, :mod:`fedcrm.secagg.sparsification`):
``[examples * clipped delta[support], examples, training loss sum]``, which the
aggregator scatters back to the model's length (:func:`expand_fit`).

EVALUATE: the evaluation counts of :mod:`fedcrm.training.metrics`, counts
exact and the loss sum scaled.

STATISTICS: the preprocessing statistics vector of
:class:`fedcrm.training.preprocessing.StatisticsLayout`, modulo ``2**62``
(:data:`STATISTICS_BITS`, whatever the update's ``bits``): counts exact, numeric
sums and sums of squares in two-limb fixed point within bounds from each
feature's ``bound`` and :data:`~fedcrm.training.preprocessing.MAX_PARTICIPANT_ROWS`
(:class:`StatisticsEncoding`).

Bounds come from public numbers only: the total training rows (from the
federated statistics), the validation fraction, the update clip and the
number of participants.
"""

from __future__ import annotations

import math

import numpy as np

from fedcrm.privacy.mechanisms import POOLED_BITS, ClientNoise, PooledNoise
from fedcrm.secagg import sparsification
from fedcrm.secagg.quantization import log2_ceil
from fedcrm.secagg.segments import Segment, SegmentedQuantizer
from fedcrm.spec.manifests import FeatureType, FederationSpec
from fedcrm.training.metrics import BINS, LOSS_CAP
from fedcrm.training.preprocessing import MAX_PARTICIPANT_ROWS, StatisticsLayout

__all__ = ["LOSS_CAP", "STATISTICS_BITS", "sum_bits", "StatisticsEncoding", "client_dp_fit_quantizer", "client_dp_fit_vector", "evaluation_quantizer", "expand_fit", "fit_support", "fit_quantizer", "fit_vector", "quantized_fit", "validation_bound"]

#: The modulus of the statistics' secure sum, fixed here so that both sides derive it and neither takes it from the
#: other: the vector is a few dozen values, so 8 bytes each cost nothing, and 62 bits (the most the arithmetic
#: allows) leave the finest resolution for sums of squares bounded by rows x bound^2.
STATISTICS_BITS = 62

def quantized_fit(spec: FederationSpec) -> int | None:
    """``quantizationBits`` when it applies to the training sum: not to client-level or pooled DP, whose
    updates are integers sized by their noise."""
    if spec.privacy.differential_privacy.mode in ("client", "pooled"):
        return None
    return spec.privacy.secure_aggregation.quantization_bits


def fit_support(spec: FederationSpec, *, federation: str, round_: int, parameters: int) -> np.ndarray | None:
    """The coordinates of the model's ``parameters`` that every member's training update carries in ``round_``
    under ``keepFraction`` (None: all of them, as without sparsification). Derived from the federation key, the
    terms' ``training.seed`` and the round number, which both sides hold, never from each other's word; not used by
    client-level or pooled DP (the manifest refuses the combination).

    Under ``rescaleKept`` (the default) the aggregator multiplies the summed kept coordinates by ``d / k``
    (:func:`expand_fit`): each coordinate is kept with probability ``k / d``, so the step is an unbiased estimate of
    the full FedAvg step. Unscaled, the expected step is ``k / d`` of it, a server learning rate of ``k / d``: in
    20 rounds that cost 0.8 points of accuracy at a quarter kept (docs/benchmarks.md; 2 points at a tenth in a
    one-off run), where the rescaled step cost none and stayed stable down to a fiftieth. The rescaled step of one coordinate can reach ``d / k x clip``; a
    server optimiser (``momentum``, ``adam``) damps that if a model needs it."""
    keep = spec.privacy.secure_aggregation.keep_fraction
    if keep >= 1 or spec.privacy.differential_privacy.mode in ("client", "pooled"):
        return None
    return sparsification.support(parameters, keep, federation=federation, seed=spec.training.seed, round_=round_)


def expand_fit(total: np.ndarray, support: np.ndarray | None, parameters: int, *, rescale: bool) -> np.ndarray:
    """A training sum over the support back to the model's layout: ``[summed weighted deltas (zero off the
    support; times ``parameters / len(support)`` with ``rescale``), examples, loss sum]``. ``total`` must be exactly
    ``len(support) + 2`` long."""
    if support is None:
        return total
    if total.shape != (support.size + 2,):
        raise ValueError(f"a training sum of {total.size} values for a support of {support.size} coordinates")
    kept = total[: support.size] * (parameters / support.size if rescale else 1.0)
    return np.concatenate([sparsification.scatter(kept, support, parameters), total[support.size:]])


def sum_bits(spec: FederationSpec, *, statistics: bool = False, fit: bool = False, members: int = 1) -> int:
    """The modulus (in bits) of one secure sum, as both sides derive it from the terms and never take it from each
    other: the statistics' and pooled DP-SGD's training sums are fixed in code, the rest use ``spec.bits``; a
    quantized training sum uses ``q + ceil(log2 n)`` (at least 8) for ``quantizationBits`` q and the ``members`` n of
    the sum's member list, the one every member signed."""
    if statistics:
        return STATISTICS_BITS
    if fit and spec.privacy.differential_privacy.mode == "pooled":
        return POOLED_BITS
    q = quantized_fit(spec) if fit else None
    if q is not None:
        return max(8, q + log2_ceil(max(members, 1)))
    return spec.privacy.secure_aggregation.bits


def validation_bound(train_rows: float, validation_fraction: float, participants: int) -> float:
    """Upper bound on the pooled validation rows given the pooled training rows."""
    return math.ceil(train_rows * validation_fraction / (1 - validation_fraction)) + 2 * participants


def fit_quantizer(*, parameters: int, weight_bound: float, clip: float, bits: int,
                  contributors: int | None = None) -> SegmentedQuantizer:
    """The training sum's layout. Without ``contributors``, today's: every part rounded to nearest at ``bits``.

    With ``contributors`` n (quantized updates, ``bits`` = q + ceil(log2 n) from :func:`sum_bits`), the weighted
    deltas share one scale ``s = (2**(bits-1) - 1 - n) / (weight_bound * clip)`` and are rounded stochastically.
    No wrap: the honest weights sum to at most ``weight_bound`` (W), so the real weighted deltas of one element
    sum to at most ``W * clip`` in magnitude; a stochastically rounded term exceeds its real value by less than
    one step, so the n rounded terms sum to at most ``W * clip * s + n = 2**(bits-1) - 1``, which the signed
    reading modulo ``2**bits`` returns exactly. A participant holding a share ``W / n`` of the weight spans
    ``2**(bits-1) / n >= 2**(q-1)`` steps each side, q bits. The examples (an integer up to W) and the loss sum
    (fixed point) are base ``2**(q-1)`` digits that sum exactly (:class:`SegmentedQuantizer`).
    """
    if contributors is not None:
        return SegmentedQuantizer(
            [
                Segment("weighted_delta", parameters, weight_bound * clip, stochastic=True),
                Segment("examples", 1, weight_bound, integer=True, digits=True),
                Segment("loss_sum", 1, weight_bound * LOSS_CAP, digits=True),
            ],
            bits,
            contributors=contributors,
        )
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


def client_dp_fit_quantizer(noise: ClientNoise | PooledNoise) -> SegmentedQuantizer:
    """Client-level DP: the update is already integers within ``noise.element_bound``; each participant weighs 1.

    Pooled DP-SGD sends the same layout: its noised integer sum of clipped per-record gradients (modulo
    ``2**POOLED_BITS``), a 1 and its training loss (a metric, outside the guarantee like every loss sum)."""
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



#: Bits of the low limb of a real-valued statistic: its sum over up to 2**(STATISTICS_BITS - 1 - 32) participants
#: cannot carry out of the modulus.
_LOW_BITS = 32
#: A real-valued statistic's fixed-point scale puts its bound at 2**_FIXED_BITS (the high limb's sum stays below
#: 2**(_FIXED_BITS - _LOW_BITS) = 2**58 within the 62-bit modulus).
_FIXED_BITS = 90


class StatisticsEncoding:
    """The statistics vector as integers modulo ``2**62`` whose modular sum decodes to the pooled statistics.

    Counts (rows, positives, present, trues, categories) are one exact integer each, bounded by ``N =
    participants x MAX_PARTICIPANT_ROWS``. A numeric feature's values are clipped to ``+-bound`` by the participant
    (:meth:`StatisticsLayout.bounded`), so its sum lies within ``N x bound`` and its sum of squares within
    ``N x bound**2``; each is scaled so that its bound is ``2**90`` and sent as two limbs, ``high x 2**32 + low``
    with ``0 <= low < 2**32``, summed separately: the lows cannot carry out of the modulus for fewer than 2**29
    participants, the highs stay below 2**58 in magnitude. The resolution of a real sum is its bound over 2**90
    (about 1e-27 of it): float64's own rounding in each participant's sum dominates, as in the clear.
    """

    def __init__(self, layout: StatisticsLayout, *, participants: int) -> None:
        n = float(max(participants, 1) * MAX_PARTICIPANT_ROWS)
        bounds: list[tuple[float, bool]] = [(n, True), (n, True)]  # (bound on the pooled sum, whole number)
        for name, kind, _, width in layout.slots:
            if kind is FeatureType.numeric:
                bound = layout.task.feature(name).bound
                bounds += [(n, True), (n * bound, False), (n * bound * bound, False)]
            else:
                bounds += [(n, True)] * width
        self.bits = STATISTICS_BITS
        self.bounds = [b for b, _ in bounds]
        self.whole = [w for _, w in bounds]
        self.scales = [1.0 if w else 2.0 ** _FIXED_BITS / b for b, w in bounds]
        self.size = sum(1 if w else 2 for w in self.whole)
        self.resolution = np.array([0.0 if w else 1.0 / scale for w, scale in zip(self.whole, self.scales)])

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """One participant's vector (each value clipped to its pooled bound) as limbs modulo ``2**62``."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(self.bounds),) or not np.all(np.isfinite(values)):
            raise ValueError(f"statistics must be {len(self.bounds)} finite numbers")
        mask = (1 << self.bits) - 1
        limbs: list[int] = []
        for v, bound, whole, scale in zip(values.tolist(), self.bounds, self.whole, self.scales):
            fixed = int(round(min(max(v, -bound), bound) * scale))
            limbs += [fixed & mask] if whole else [(fixed >> _LOW_BITS) & mask, fixed & ((1 << _LOW_BITS) - 1)]
        return np.array(limbs, dtype=np.uint64)

    def dequantize(self, total: np.ndarray) -> np.ndarray:
        """The pooled statistics from the modular sum of every participant's :meth:`quantize`."""
        mask, half = (1 << self.bits) - 1, 1 << (self.bits - 1)

        def signed(x: int) -> int:
            x &= mask
            return x - (1 << self.bits) if x >= half else x

        limbs = [int(x) for x in np.asarray(total, dtype=np.uint64).tolist()]
        out, i = [], 0
        for whole, scale in zip(self.whole, self.scales):
            if whole:
                out.append(float(signed(limbs[i])))
                i += 1
            else:
                out.append(((signed(limbs[i]) << _LOW_BITS) + signed(limbs[i + 1])) / scale)
                i += 2
        return np.array(out, dtype=np.float64)
