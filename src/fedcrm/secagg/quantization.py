"""Real vectors <-> integers modulo ``2**bits``, and modular sums that do not wrap by accident.

Masking only works in a finite group, so updates are clipped, scaled, rounded
and reduced modulo ``2**bits`` before they are masked. The sum of everyone's
quantized vectors is read back as a signed (two's complement) number, which is
the true integer sum as long as it stays within ``(-2**(bits-1), 2**(bits-1))``:
:func:`choose_scale` picks the largest scale for which it provably does.

Vectors are ``uint32`` when ``bits <= 32`` (half the traffic and memory of
``uint64``), else ``uint64``. Because ``2**bits`` divides ``2**32`` (or
``2**64``), arithmetic may wrap at the machine width and be reduced modulo
``2**bits`` only at the end: that is what makes the hot loops single numpy
operations.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "choose_scale",
    "dequantize",
    "modular_add",
    "modular_sub",
    "quantize",
    "reduce",
    "vector_dtype",
]


def vector_dtype(bits: int) -> np.dtype:
    """The unsigned dtype that holds values modulo ``2**bits``."""
    _check_bits(bits)
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (8 <= bits <= 62):
        raise ValueError(f"bits must be an int from 8 to 62, got {bits!r}")


def choose_scale(*, clip: float, weight_bound: float, bits: int) -> float:
    """The largest scale at which summing up to ``weight_bound`` clipped vectors cannot wrap.

    Each quantized element is ``rint(v * scale)`` with ``|v| <= clip``. With
    ``scale = floor((2**(bits-1) - 1) / W) / clip`` (``W = ceil(weight_bound)``)
    every rounded element is at most ``M = floor((2**(bits-1) - 1) / W)`` in
    magnitude (rounding cannot push ``clip * scale = M`` past ``M``), so any
    sum of at most ``W`` of them stays within ``2**(bits-1) - 1`` and reads
    back exactly. This is the bound ``W * clip * scale <= 2**(bits-1) - 1``
    made safe against rounding.

    ``weight_bound`` is the number of clipped contributions that can be summed
    (usually the number of participants, when each participant clips its
    already weighted update to ``clip``).
    """
    _check_bits(bits)
    if not (clip > 0) or not math.isfinite(clip):
        raise ValueError(f"clip must be a positive finite number, got {clip!r}")
    if not (weight_bound >= 1) or not math.isfinite(weight_bound):
        raise ValueError(f"weight_bound must be at least 1 (how many contributions are summed), got {weight_bound!r}")
    per_element = ((1 << (bits - 1)) - 1) // math.ceil(weight_bound)
    if per_element < 1:
        raise ValueError(
            f"{bits} bits cannot hold a sum of {weight_bound} contributions; use more bits or fewer contributions"
        )
    scale = per_element / clip
    # Above 2**53 floats are coarser than integers: step down until the product
    # really is at most per_element (Python compares floats and ints exactly).
    while clip * scale > per_element:
        scale = math.nextafter(scale, 0.0)
    return scale


def quantize(values: np.ndarray, *, clip: float, scale: float, bits: int) -> np.ndarray:
    """Clip, scale, round to nearest and reduce modulo ``2**bits``.

    ``values`` are already multiplied by their weight by the caller (e.g. a
    sample count for FedAvg), so ``clip`` bounds each element of the *weighted*
    value; that is what makes the sum's bound in :func:`choose_scale` hold.
    Negative numbers become their two's-complement residues. Works in float64
    whatever the input dtype, since float32 cannot hold 31-bit integers; the
    round trip is then exact to half a step (``0.5 / scale``) as long as
    ``clip * scale < 2**52``; beyond that (more than ~53 bits per element)
    float64's own relative rounding error, about ``2**-53 * clip``, adds to it.
    """
    _check_bits(bits)
    if not (clip > 0) or not (scale > 0):
        raise ValueError(f"clip and scale must be positive, got clip={clip!r}, scale={scale!r}")
    if clip * scale > (1 << (bits - 1)) - 1:
        raise ValueError(
            f"clip * scale = {clip * scale:g} does not fit {bits} signed bits; pick the scale with choose_scale"
        )
    work = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(work).all():
        raise ValueError("cannot quantize NaN or infinite values")
    work = np.clip(work, -clip, clip)  # a fresh array: the caller's values are never modified
    work *= scale
    np.rint(work, out=work)
    dtype = vector_dtype(bits)
    if dtype == np.uint32:
        out = work.astype(np.int32).view(np.uint32)
    else:
        out = work.astype(np.int64).view(np.uint64)
    return reduce(out, bits)


def dequantize(total: np.ndarray, *, scale: float, bits: int) -> np.ndarray:
    """Read a sum modulo ``2**bits`` as a signed integer and undo the scale (float64)."""
    _check_bits(bits)
    if not (scale > 0):
        raise ValueError(f"scale must be positive, got {scale!r}")
    signed = (np.asarray(total).astype(np.uint64) & np.uint64((1 << bits) - 1)).astype(np.int64)
    signed -= (signed >= (1 << (bits - 1))).astype(np.int64) << bits
    return signed.astype(np.float64) / scale


def reduce(acc: np.ndarray, bits: int) -> np.ndarray:
    """Reduce ``acc`` modulo ``2**bits`` in place (a no-op when ``bits`` is the dtype's width)."""
    if bits < acc.dtype.itemsize * 8:
        acc &= acc.dtype.type((1 << bits) - 1)
    return acc


def _check_pair(acc: np.ndarray, x: np.ndarray, bits: int) -> None:
    _check_bits(bits)
    if acc.dtype != x.dtype or acc.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)):
        raise TypeError(f"modular arithmetic needs two uint32 or two uint64 arrays, got {acc.dtype} and {x.dtype}")
    if acc.dtype.itemsize * 8 < bits:
        raise TypeError(f"{acc.dtype} cannot hold values modulo 2**{bits}")


def modular_add(acc: np.ndarray, x: np.ndarray, bits: int) -> np.ndarray:
    """``acc = (acc + x) mod 2**bits`` in place; returns ``acc``.

    Unsigned numpy arithmetic wraps modulo the dtype's width, a multiple of
    ``2**bits``, so one add and (below the width) one mask are exact.
    """
    _check_pair(acc, x, bits)
    acc += x
    return reduce(acc, bits)


def modular_sub(acc: np.ndarray, x: np.ndarray, bits: int) -> np.ndarray:
    """``acc = (acc - x) mod 2**bits`` in place; returns ``acc``."""
    _check_pair(acc, x, bits)
    acc -= x
    return reduce(acc, bits)
