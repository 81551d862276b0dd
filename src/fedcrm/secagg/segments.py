"""Vectors made of parts with different ranges, quantized so their sum cannot wrap.

A participant's contribution mixes kinds of numbers: weighted model-update
elements (real, bounded by the clip and the total weight), counts (integers,
exact) and loss sums (real, loosely bounded). Each segment gets its own scale,
derived only from public bounds, so every participant and the aggregator
compute the same scales and the modular sum of the whole vector dequantizes
to the true sum of each part.

A narrow modulus (quantized updates, ``bits`` = q + ceil(log2 n)) cannot hold a
count of all training rows in one element: such segments are sent as
``digits``, non-negative values written in base ``2**d`` with
``d = bits - 1 - ceil(log2 n)``. One participant's digit is below ``2**d``, so
the sum of ``n`` participants' digits is below ``n * 2**d <= 2**(bits - 1)``
and reads back exactly; the value is then ``sum_k digit_sum_k * 2**(d k)``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcrm.secagg.quantization import choose_scale, dequantize, log2_ceil, quantize, vector_dtype

__all__ = ["Segment", "SegmentedQuantizer"]

#: Fixed-point bits of a real-valued ``digits`` segment: its bound is ``2**32 - 1`` steps.
DIGIT_FIXED_BITS = 32


@dataclass(frozen=True)
class Segment:
    """``length`` values whose sum over all participants stays within ``+-sum_bound``.

    ``integer`` segments (counts) are sent exactly, with scale 1. ``stochastic`` segments are rounded
    stochastically (unbiased), with headroom for the rounding of every contributor. ``digits`` segments are
    non-negative and bounded per participant by ``sum_bound`` (the sum over participants may then reach
    ``contributors x sum_bound``); they are sent as base ``2**d`` digits (see the module docstring), exactly when
    ``integer``, else in fixed point with ``2**32 - 1`` steps up to ``sum_bound``.
    """

    name: str
    length: int
    sum_bound: float
    integer: bool = False
    stochastic: bool = False
    digits: bool = False


class SegmentedQuantizer:
    """``contributors``: the most participants whose vectors are summed; needed by ``stochastic`` and ``digits``
    segments (their no-wrap bounds depend on it), and like ``bits`` derived by each side from public numbers."""

    def __init__(self, segments: Sequence[Segment], bits: int, *, contributors: int | None = None) -> None:
        self.segments = tuple(segments)
        self.bits = bits
        self.contributors = contributors
        limit = 2 ** (bits - 1) - 1
        self.scales: list[float] = []
        self.widths: list[int] = []  # elements per value: the number of digits, else 1
        needs_n = [s.name for s in self.segments if s.stochastic or s.digits]
        if needs_n and contributors is None:
            raise ValueError(f"segments {needs_n} need the number of contributors")
        self.digit_bits = 0
        if contributors is not None:
            self.digit_bits = bits - 1 - log2_ceil(contributors)
        for s in self.segments:
            if s.digits:
                if self.digit_bits < 1:
                    raise ValueError(f"segment {s.name!r}: {bits} bits leave no digit for {contributors} contributors")
                if s.integer:
                    scale, total = 1.0, math.floor(s.sum_bound)
                else:
                    scale, total = ((1 << DIGIT_FIXED_BITS) - 1) / s.sum_bound, (1 << DIGIT_FIXED_BITS) - 1
                self.scales.append(scale)
                self.widths.append(max(1, -(-total.bit_length() // self.digit_bits)))
                continue
            self.widths.append(1)
            if s.integer:
                if s.sum_bound >= limit:
                    raise ValueError(f"segment {s.name!r}: counts up to {s.sum_bound:g} do not fit in {bits} bits")
                self.scales.append(1.0)
            else:
                slack = contributors if s.stochastic and contributors is not None else 0
                self.scales.append(choose_scale(clip=s.sum_bound, weight_bound=1.0, bits=bits, rounding_slack=slack))
        self.values = sum(s.length for s in self.segments)
        self.size = sum(s.length * w for s, w in zip(self.segments, self.widths))

    def _parts(self, values: np.ndarray) -> list[np.ndarray]:
        if values.shape != (self.values,):
            raise ValueError(f"vector has shape {values.shape}, this layout needs ({self.values},)")
        out, offset = [], 0
        for s in self.segments:
            out.append(values[offset : offset + s.length])
            offset += s.length
        return out

    def _digits(self, part: np.ndarray, s: Segment, scale: float, width: int) -> np.ndarray:
        """Clip to ``[0, sum_bound]``, scale, round to nearest; ``width`` base-``2**d`` digits per value."""
        fixed = np.rint(np.clip(part, 0.0, s.sum_bound) * scale).astype(np.uint64)
        base = np.uint64(self.digit_bits)
        out = np.empty((part.size, width), dtype=np.uint64)
        for k in range(width):
            out[:, k] = fixed & np.uint64((1 << self.digit_bits) - 1)
            fixed >>= base
        return out.ravel().astype(vector_dtype(self.bits))

    def quantize(self, values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """One participant's vector as integers mod 2^bits (each part clipped to its bound).

        ``stochastic`` segments draw their rounding from ``rng``; by default a generator seeded with 128 bits from
        the operating system's CSPRNG (:mod:`secrets`), so no one can predict the rounding from the manifest."""
        parts = self._parts(np.asarray(values, dtype=np.float64))
        if rng is None and any(s.stochastic for s in self.segments):
            rng = np.random.default_rng(secrets.randbits(128))
        out = []
        for p, s, scale, width in zip(parts, self.segments, self.scales, self.widths):
            if s.digits:
                out.append(self._digits(p, s, scale, width))
            else:
                out.append(quantize(p, clip=s.sum_bound, scale=scale, bits=self.bits,
                                    rng=rng if s.stochastic else None))
        return np.concatenate(out)

    def dequantize(self, total: np.ndarray) -> np.ndarray:
        """The real-valued sum from the modular sum of every participant's :meth:`quantize`."""
        out, offset = [], 0
        for s, scale, width in zip(self.segments, self.scales, self.widths):
            chunk = dequantize(total[offset : offset + s.length * width], scale=1.0 if s.digits else scale,
                               bits=self.bits)
            if s.digits:
                weights = np.ldexp(1.0, self.digit_bits * np.arange(width))
                chunk = chunk.reshape(s.length, width) @ weights / scale
            out.append(chunk)
            offset += s.length * width
        return np.concatenate(out)
