"""Vectors made of parts with different ranges, quantized so their sum cannot wrap.

A participant's contribution mixes kinds of numbers: weighted model-update
elements (real, bounded by the clip and the total weight), counts (integers,
exact) and loss sums (real, loosely bounded). Each segment gets its own scale,
derived only from public bounds, so every participant and the aggregator
compute the same scales and the modular sum of the whole vector dequantizes
to the true sum of each part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcrm.secagg.quantization import choose_scale, dequantize, quantize

__all__ = ["Segment", "SegmentedQuantizer"]


@dataclass(frozen=True)
class Segment:
    """``length`` values whose sum over all participants stays within ``+-sum_bound``.

    ``integer`` segments (counts) are sent exactly, with scale 1.
    """

    name: str
    length: int
    sum_bound: float
    integer: bool = False


class SegmentedQuantizer:
    def __init__(self, segments: Sequence[Segment], bits: int) -> None:
        self.segments = tuple(segments)
        self.bits = bits
        limit = 2 ** (bits - 1) - 1
        self.scales: list[float] = []
        for s in self.segments:
            if s.integer:
                if s.sum_bound >= limit:
                    raise ValueError(f"segment {s.name!r}: counts up to {s.sum_bound:g} do not fit in {bits} bits")
                self.scales.append(1.0)
            else:
                self.scales.append(choose_scale(clip=s.sum_bound, weight_bound=1.0, bits=bits))
        self.size = sum(s.length for s in self.segments)

    def _parts(self, values: np.ndarray) -> list[np.ndarray]:
        if values.shape != (self.size,):
            raise ValueError(f"vector has shape {values.shape}, this layout needs ({self.size},)")
        out, offset = [], 0
        for s in self.segments:
            out.append(values[offset : offset + s.length])
            offset += s.length
        return out

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """One participant's vector as integers mod 2^bits (each part clipped to its bound)."""
        parts = self._parts(np.asarray(values, dtype=np.float64))
        return np.concatenate([
            quantize(p, clip=s.sum_bound, scale=scale, bits=self.bits)
            for p, s, scale in zip(parts, self.segments, self.scales)
        ])

    def dequantize(self, total: np.ndarray) -> np.ndarray:
        """The real-valued sum from the modular sum of every participant's :meth:`quantize`."""
        out, offset = [], 0
        for s, scale in zip(self.segments, self.scales):
            out.append(dequantize(total[offset : offset + s.length], scale=scale, bits=self.bits))
            offset += s.length
        return np.concatenate(out)
