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

Rounding is to nearest by default; given a generator, :func:`quantize` rounds
stochastically (up with probability equal to the fractional part), which is
unbiased, so coarse steps average out over participants and rounds instead of
biasing every update the same way. On the wire a vector modulo ``2**bits``
travels at ``bits`` per element (:func:`pack_bits`).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "choose_scale",
    "dequantize",
    "log2_ceil",
    "modular_add",
    "modular_sub",
    "pack_bits",
    "packed_size",
    "quantize",
    "reduce",
    "stochastic_round",
    "unpack_bits",
    "vector_dtype",
]


def vector_dtype(bits: int) -> np.dtype:
    """The unsigned dtype that holds values modulo ``2**bits``."""
    _check_bits(bits)
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (8 <= bits <= 62):
        raise ValueError(f"bits must be an int from 8 to 62, got {bits!r}")


def log2_ceil(n: int) -> int:
    """``ceil(log2(n))`` for ``n >= 1``, exactly (no floating point): the bits that a sum of ``n`` terms adds."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"need a positive int, got {n!r}")
    return (n - 1).bit_length()


def choose_scale(*, clip: float, weight_bound: float, bits: int, rounding_slack: int = 0) -> float:
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

    ``rounding_slack``: headroom, in steps, kept free below ``2**(bits-1) - 1``
    (``M`` becomes ``floor((2**(bits-1) - 1 - slack) / W)``). When the *sum* of
    up to ``n`` contributions is bounded by ``clip`` (``weight_bound`` 1) and
    each is rounded stochastically, each rounded term exceeds its real value
    by less than one step, so ``n`` steps of slack keep the rounded sum within
    the modulus.
    """
    _check_bits(bits)
    if not (clip > 0) or not math.isfinite(clip):
        raise ValueError(f"clip must be a positive finite number, got {clip!r}")
    if not (weight_bound >= 1) or not math.isfinite(weight_bound):
        raise ValueError(f"weight_bound must be at least 1 (how many contributions are summed), got {weight_bound!r}")
    if isinstance(rounding_slack, bool) or not isinstance(rounding_slack, int) or rounding_slack < 0:
        raise ValueError(f"rounding_slack must be a non-negative int, got {rounding_slack!r}")
    per_element = ((1 << (bits - 1)) - 1 - rounding_slack) // math.ceil(weight_bound)
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


def stochastic_round(work: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round float64 ``work`` in place to ``floor(x) + [u < x - floor(x)]``, ``u ~ U[0, 1)``; returns ``work``.

    Unbiased: ``E[result] = floor(x) + frac(x) = x``, with variance ``frac(x) (1 - frac(x)) <= 1/4``. The result
    is one of the two integers around ``x``, so ``|result| <= ceil(|x|)``: an integer bound on ``|x|`` still bounds
    it, and it exceeds ``|x|`` by less than 1.
    """
    floor = np.floor(work)
    np.subtract(work, floor, out=work)  # the fractional part, in [0, 1)
    up = rng.random(work.shape) < work
    np.add(floor, up, out=work)
    return work


def quantize(values: np.ndarray, *, clip: float, scale: float, bits: int,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """Clip, scale, round (to nearest, or stochastically with ``rng``) and reduce modulo ``2**bits``.

    ``values`` are already multiplied by their weight by the caller (e.g. a
    sample count for FedAvg), so ``clip`` bounds each element of the *weighted*
    value; that is what makes the sum's bound in :func:`choose_scale` hold.
    Negative numbers become their two's-complement residues. Works in float64
    whatever the input dtype, since float32 cannot hold 31-bit integers; the
    round trip is then exact to half a step (``0.5 / scale``) as long as
    ``clip * scale < 2**52``; beyond that (more than ~53 bits per element)
    float64's own relative rounding error, about ``2**-53 * clip``, adds to it.
    With ``rng`` the rounding is :func:`stochastic_round` (error under one step,
    zero on average); ``ceil(clip * scale)`` (the integer ``M`` of :func:`choose_scale`) still bounds every
    rounded element.
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
    if rng is None:
        np.rint(work, out=work)
    else:
        stochastic_round(work, rng)
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


def packed_size(length: int, bits: int) -> int:
    """Bytes that ``length`` values of ``bits`` bits take packed: ``ceil(length * bits / 8)``."""
    return (length * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Values below ``2**bits`` as a little-endian bit stream of ``bits`` bits each (the last byte zero-padded).

    Element ``i`` occupies stream bits ``[i * bits, (i + 1) * bits)``, least significant first. A value of
    ``bits`` bits or more is refused rather than truncated.
    """
    _check_bits(bits)
    a = np.ascontiguousarray(values).ravel()
    if a.dtype not in (np.dtype(np.uint32), np.dtype(np.uint64)) or a.dtype.itemsize * 8 < bits:
        raise TypeError(f"can pack uint32 or uint64 values of at most the dtype's width, got {a.dtype} at {bits} bits")
    if bits < a.dtype.itemsize * 8 and a.size and int(a.max()) >> bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    width = 32 if bits <= 32 else 64
    words = a.astype(np.dtype(f"<u{width // 8}"), copy=False).view(np.uint8).reshape(-1, width // 8)
    stream = np.unpackbits(words, axis=1, bitorder="little")[:, :bits]
    return np.packbits(stream.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, length: int, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: ``length`` values (dtype :func:`vector_dtype`). The byte count must be
    exactly :func:`packed_size` and the padding bits zero, so each vector has one encoding."""
    _check_bits(bits)
    if len(data) != packed_size(length, bits):
        raise ValueError(f"{length} values of {bits} bits take {packed_size(length, bits)} bytes, got {len(data)}")
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if stream[length * bits:].any():
        raise ValueError("the padding bits after the last value are not zero")
    width = 32 if bits <= 32 else 64
    wide = np.zeros((length, width), dtype=np.uint8)
    wide[:, :bits] = stream[: length * bits].reshape(length, bits)
    out = np.packbits(wide, axis=1, bitorder="little").view(np.dtype(f"<u{width // 8}")).ravel()
    return out.astype(vector_dtype(bits))
