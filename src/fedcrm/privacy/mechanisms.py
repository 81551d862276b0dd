"""Client-level DP (DP-FedAvg) with distributed discrete Gaussian noise, in the integer domain of secure aggregation.

Each participant, per round:

1. clips its model update to L2 norm ``C`` (``clippingNorm``);
2. maps it to integers, ``x = rint(s * clipped)``, with a scale ``s`` every
   party derives from public numbers (:class:`ClientNoise`), so
   ``||x||_2 <= s*C + sqrt(d)/2 =: Delta`` (rounding moves each of the ``d``
   elements by at most 1/2);
3. adds discrete Gaussian noise of variance ``sigma^2 * Delta^2 / t_min``
   per element, where ``t_min`` is the smallest cohort whose sum can ever be
   released (the secure-aggregation threshold count, or ``minParticipants``
   without secure aggregation). Any released sum of ``t >= t_min``
   contributions therefore carries noise of variance at least
   ``sigma^2 * Delta^2`` per element: the full noise of the central Gaussian
   mechanism with noise multiplier ``sigma``, and the aggregator never sees a
   less noised sum (Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian
   Mechanism for Federated Learning with Secure Aggregation", ICML 2021).
4. clips each noised element to ``[-M, M]`` with ``M = (2^(bits-1) - 2) // n``
   for at most ``n`` contributions, so the modular sum cannot wrap. ``s`` is
   chosen so that ``s*C`` plus ``TAIL`` standard deviations of noise fits in
   ``M``: clipping then happens with probability below ``1e-15`` per element,
   an event we fold into delta rather than account.

Accounting: the sum is the Gaussian mechanism with noise multiplier
``sigma`` (one release per round, every participant in every round, so the
sampling rate is 1), composed over rounds with RDP
(:mod:`fedcrm.privacy.rdp`). Kairouz et al. show that a sum of discrete
Gaussians of scale ``sigma_i >= 1`` is within a total variation (and Rényi)
distance of a discrete Gaussian that decays like ``exp(-2 pi^2 sigma_i^2)``;
here ``sigma_i`` is in the tens of thousands of integer units at least, so the
gap is far below anything representable and the discrete Gaussian's RDP is
at most the continuous Gaussian's.

Randomness: uniforms come from ``os.urandom`` (the kernel CSPRNG). The
sampler is Canonne, Kamath, Steinke's (NeurIPS 2020) rejection sampler from a
discrete Laplace, run in float64. Mironov ("On Significance of the Least
Significant Bits for Differential Privacy", CCS 2012) showed that textbook
floating-point noise leaks through the low-order bits of its output; here the
output is an integer whose every value is reachable, and only the acceptance
probabilities and the geometric draws are computed in float64 (relative error
about 1e-16), which perturbs the distribution negligibly rather than leaving
holes an attacker could see. The discrete Laplace draws are truncated at
about 36 of its scales (the smallest uniform is 2^-53).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["POOLED_BITS", "POOLED_RESOLUTION", "STATISTICS_LATTICE_BITS", "TAIL", "ClientNoise", "PooledNoise",
           "StatisticsNoise", "clip_l2", "discrete_gaussian", "secure_uniform", "takes_part"]

# Headroom, in noise standard deviations, between the clipped update and the quantization range.
TAIL = 8.0
# Fewer integer steps than this per clipping norm would make rounding dominate the update.
_MIN_RESOLUTION = 256.0


def secure_uniform(n: int) -> np.ndarray:
    """``n`` uniforms in (0, 1) with 53 random bits each, from the operating system's CSPRNG."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (raw.astype(np.float64) + 0.5) / float(1 << 53)


def _discrete_laplace(scale: float, n: int) -> np.ndarray:
    """Integers with P(y) proportional to exp(-|y| / scale): the difference of two geometric draws."""
    g1 = np.floor(-scale * np.log(secure_uniform(n)))
    g2 = np.floor(-scale * np.log(secure_uniform(n)))
    return (g1 - g2).astype(np.int64)


def discrete_gaussian(sigma: float, n: int) -> np.ndarray:
    """``n`` draws of the discrete Gaussian N_Z(0, sigma^2) (Canonne, Kamath, Steinke 2020, Algorithm 3)."""
    if not (sigma > 0) or not math.isfinite(sigma):
        raise ValueError(f"sigma must be positive and finite, got {sigma!r}")
    t = math.floor(sigma) + 1
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        want = int(1.6 * (n - out.size)) + 16  # acceptance is above 0.6 for t = floor(sigma) + 1
        y = _discrete_laplace(float(t), want)
        accept = secure_uniform(want) < np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
        out = np.concatenate([out, y[accept]])
    return out[:n]


def takes_part(rate: float) -> bool:
    """One participant's secret Poisson coin for a round of client-level DP: True with probability ``rate``.

    Drawn from the CSPRNG and never sent: the participant sends a masked vector either way, so the amplification
    by sampling that the accountant counts holds against the aggregator too (only the participant knows its coin).
    """
    if not 0 < rate <= 1:
        raise ValueError(f"a sampling rate is in (0, 1], got {rate!r}")
    return rate >= 1 or bool(secure_uniform(1)[0] < rate)


def clip_l2(update: np.ndarray, norm: float) -> np.ndarray:
    """``update`` scaled down to L2 norm ``norm`` if it is longer (float64 copy)."""
    v = np.asarray(update, dtype=np.float64)
    length = float(np.linalg.norm(v))
    return v * (norm / length) if length > norm else v.copy()


@dataclass(frozen=True)
class ClientNoise:
    """The public parameters of one federation's client-level mechanism; both sides derive the same.

    ``contributors_max`` bounds how many contributions one sum may hold (the
    expected participants); ``survivors_min`` is ``t_min``.
    """

    clipping_norm: float
    noise_multiplier: float
    survivors_min: int
    contributors_max: int
    dimension: int
    bits: int

    def __post_init__(self) -> None:
        if self.survivors_min < 1 or self.contributors_max < self.survivors_min:
            raise ValueError("need 1 <= survivors_min <= contributors_max")
        if not (self.clipping_norm > 0) or not (self.noise_multiplier > 0):
            raise ValueError("clipping norm and noise multiplier must be positive")
        if self.scale * self.clipping_norm < _MIN_RESOLUTION:
            raise ValueError(
                f"{self.bits} bits leave {self.scale * self.clipping_norm:.0f} integer steps per clipping norm for "
                f"{self.contributors_max} contributions at noise multiplier {self.noise_multiplier:g}; "
                f"raise spec.privacy.secureAggregation.bits"
            )

    @property
    def element_bound(self) -> int:
        """``M``: the largest magnitude of one noised element, so ``contributors_max`` of them cannot wrap."""
        return ((1 << (self.bits - 1)) - 2) // self.contributors_max

    @property
    def _noise_per_sensitivity(self) -> float:
        return self.noise_multiplier / math.sqrt(self.survivors_min)

    @property
    def scale(self) -> float:
        """``s`` with ``s*C + TAIL * std <= M``, where ``std = sigma * (s*C + sqrt(d)/2) / sqrt(t_min)``."""
        k = TAIL * self._noise_per_sensitivity
        s = (self.element_bound - k * math.sqrt(self.dimension) / 2) / (self.clipping_norm * (1 + k))
        return max(s, 0.0)

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of one contribution in integer units (``Delta``)."""
        return self.scale * self.clipping_norm + math.sqrt(self.dimension) / 2

    @property
    def participant_std(self) -> float:
        """Noise standard deviation each participant adds per element, in integer units."""
        return self._noise_per_sensitivity * self.sensitivity

    def privatize(self, update: np.ndarray) -> np.ndarray:
        """Clip, map to integers and add this participant's share of the noise (int64 vector)."""
        if update.shape != (self.dimension,):
            raise ValueError(f"update has shape {update.shape}, the mechanism expects ({self.dimension},)")
        x = np.rint(clip_l2(update, self.clipping_norm) * self.scale).astype(np.int64)
        noised = x + discrete_gaussian(self.participant_std, self.dimension)
        return np.clip(noised, -self.element_bound, self.element_bound)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The real-valued sum of clipped, noised updates from the integer sum."""
        return np.asarray(total, dtype=np.float64) / self.scale


#: A real-valued statistic is rounded to ``2**-LATTICE_BITS`` of its per-record bound before noise on that lattice.
STATISTICS_LATTICE_BITS = 10


@dataclass(frozen=True)
class StatisticsNoise:
    """Record-level Gaussian noise for the preprocessing statistics (counts, sums, sums of squares).

    One record changes slot ``j`` by at most ``maxima[j]`` (1 for a count, the feature's bound for a sum, its
    square for a sum of squares) and changes at most ``touched`` slots. Measured in units of ``maxima``, the
    vector's L2 sensitivity is ``sqrt(touched)``; each slot gets discrete Gaussian noise of standard deviation
    ``noise_multiplier * sqrt(touched) * (1 + 2**-LATTICE_BITS) * maxima[j]`` on a lattice of step 1 (counts,
    already whole) or ``maxima[j] * 2**-LATTICE_BITS`` (the value is rounded to the lattice first; the factor
    covers what rounding adds to the sensitivity). Independent discrete Gaussians with integer sensitivities are
    ``1 / (2 * noise_multiplier**2)``-zCDP together (Canonne, Kamath, Steinke 2020), which is the Gaussian's RDP
    curve at sampling rate 1: the accountant counts it as one such release. With ``shares`` > 1 each participant
    adds ``1 / shares`` of the variance and only sums of at least ``shares`` contributions are released.
    """

    maxima: tuple[float, ...]
    whole: tuple[bool, ...]
    touched: int
    noise_multiplier: float
    #: How many participants share the noise (pooled mode: t_min, each adding 1/t_min of the variance, the sum
    #: released only from at least t_min); 1 where each participant adds all of it for its own records.
    shares: int = 1

    def __post_init__(self) -> None:
        if self.shares < 1:
            raise ValueError("the noise is shared by at least one participant")
        if len(self.maxima) != len(self.whole) or not 1 <= self.touched <= len(self.maxima):
            raise ValueError("one per-record bound and one whole-number flag per slot, and 1 <= touched <= slots")
        if not all(m > 0 and math.isfinite(m) for m in self.maxima):
            raise ValueError("per-record bounds must be positive and finite")
        if not (self.noise_multiplier > 0) or not math.isfinite(self.noise_multiplier):
            raise ValueError("the noise multiplier must be positive and finite")

    @property
    def steps(self) -> np.ndarray:
        m = np.asarray(self.maxima, dtype=np.float64)
        return np.where(np.asarray(self.whole), 1.0, m * 2.0**-STATISTICS_LATTICE_BITS)

    @property
    def stds(self) -> np.ndarray:
        """Per slot, the standard deviation of the whole noise one release needs, in the slot's own units."""
        factor = self.noise_multiplier * math.sqrt(self.touched) * (1 + 2.0**-STATISTICS_LATTICE_BITS)
        return factor * np.asarray(self.maxima, dtype=np.float64)

    @property
    def participant_stds(self) -> np.ndarray:
        """Per slot, the standard deviation of what one participant adds: its share of :attr:`stds`."""
        return self.stds / math.sqrt(self.shares)

    def privatize(self, values: np.ndarray) -> np.ndarray:
        """This participant's statistics (already bounded per record), rounded to the lattice and noised."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (len(self.maxima),) or not np.all(np.isfinite(values)):
            raise ValueError(f"statistics must be {len(self.maxima)} finite numbers")
        step = self.steps
        noise = np.array([discrete_gaussian(s, 1)[0] for s in (self.participant_stds / step).tolist()],
                         dtype=np.float64)
        return (np.rint(values / step) + noise) * step


#: Pooled DP-SGD sums integers modulo 2**POOLED_BITS, fixed in code on both sides: a participant's sum of clipped
#: per-record gradients grows with its sampled records, which no public figure bounds as tightly as the modulus.
#: 52 bits stay exact in float64 and hold 2**51 / POOLED_RESOLUTION (3e10) clipped gradients in one sum.
POOLED_BITS = 52
#: One clipped per-record gradient is POOLED_RESOLUTION integer steps long: rounding a participant's sum adds at
#: most sqrt(d) steps to the sensitivity (0.5 % at 100k parameters).
POOLED_RESOLUTION = 2**16


@dataclass(frozen=True)
class PooledNoise:
    """One central DP-SGD step per round, its Gaussian noise shared out among the participants.

    Each participant sums its Poisson-sampled records' clipped gradients (each at most ``clipping_norm`` long),
    rounds the sum to integers at ``scale`` steps per unit and adds discrete Gaussian noise of variance
    ``(noise_multiplier * sensitivity)**2 / survivors_min``. Adding or removing one record moves one participant's
    rounded sum by at most ``sensitivity = scale * clipping_norm + sqrt(dimension)``; a secure sum of at least
    ``survivors_min`` contributions carries the whole noise of one sampled Gaussian step over the union of all
    records. The same interface as :class:`ClientNoise` (the secure sum, the t_min check and decoding share it).
    """

    clipping_norm: float
    noise_multiplier: float
    survivors_min: int
    contributors_max: int
    dimension: int
    bits: int = POOLED_BITS

    def __post_init__(self) -> None:
        if self.survivors_min < 1 or self.contributors_max < self.survivors_min:
            raise ValueError("need 1 <= survivors_min <= contributors_max")
        if not (self.clipping_norm > 0) or not (self.noise_multiplier > 0):
            raise ValueError("clipping norm and noise multiplier must be positive")

    @property
    def scale(self) -> float:
        return POOLED_RESOLUTION / self.clipping_norm

    @property
    def element_bound(self) -> int:
        """The largest magnitude of one participant's element, so ``contributors_max`` of them cannot wrap."""
        return ((1 << (self.bits - 1)) - 2) // self.contributors_max

    @property
    def sensitivity(self) -> float:
        return POOLED_RESOLUTION + math.sqrt(self.dimension)

    @property
    def participant_std(self) -> float:
        return self.noise_multiplier * self.sensitivity / math.sqrt(self.survivors_min)

    def privatize(self, gradient_sum: np.ndarray) -> np.ndarray:
        """This participant's sum of clipped per-record gradients as noised integers (int64)."""
        if gradient_sum.shape != (self.dimension,) or not np.all(np.isfinite(gradient_sum)):
            raise ValueError(f"the gradient sum must be {self.dimension} finite numbers")
        x = np.rint(gradient_sum.astype(np.float64) * self.scale).astype(np.int64)
        noised = x + discrete_gaussian(self.participant_std, self.dimension)
        return np.clip(noised, -self.element_bound, self.element_bound)

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The noised sum of clipped gradients, back in gradient units."""
        return np.asarray(total, dtype=np.float64) / self.scale
