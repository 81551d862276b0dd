"""Shared random sparsification: every member of a sum keeps the same random coordinates of its vector.

Masking works element by element, so the pairwise masks of a sum cancel only if every member puts the same
coordinate at the same position. A sparsified update therefore uses one support (the kept coordinates) for the
whole round, derived by every party on its own from public values that all of them hold — the federation key,
the federation's seed and the round number — and never from one participant's secret or from the aggregator's
word. A member that derived another support of the same size would silently mix coordinates; one of another size
is refused by the vector-length check of the secure sum, so :func:`support` is a pure function of its arguments
and the callers pass it exactly the values both sides check (the terms, which include the fraction and the seed).

The support is the ``k`` coordinates with the smallest SHAKE-256 keys (ties broken by index): a uniformly random
``k``-subset, independent of numpy's generator algorithms, so a node and an aggregator built with different
numpy versions agree.
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np

__all__ = ["gather", "kept", "scatter", "support"]

_LABEL = b"fedcrm-secagg/sparsification-support/v1"


def kept(dimension: int, fraction: float) -> int:
    """``k = ceil(fraction x dimension)``, at least 1 and at most ``dimension``."""
    if dimension < 1:
        raise ValueError(f"cannot sparsify a vector of {dimension} values")
    if not 0 < fraction <= 1:
        raise ValueError(f"the kept fraction must be in (0, 1], got {fraction}")
    return min(dimension, max(1, math.ceil(fraction * dimension)))


def support(dimension: int, fraction: float, *, federation: str, seed: int, round_: int) -> np.ndarray:
    """The sorted indices (int64) of the ``kept(dimension, fraction)`` coordinates every member sends in
    ``round_``. All of ``range(dimension)`` when ``fraction`` is 1."""
    k = kept(dimension, fraction)
    if k == dimension:
        return np.arange(dimension, dtype=np.int64)
    h = hashlib.shake_256(_LABEL)
    name = federation.encode("utf-8")
    h.update(struct.pack(">H", len(name)) + name)
    h.update(struct.pack(">QQQ", seed, round_, dimension))
    h.update(struct.pack(">d", fraction))
    keys = np.frombuffer(h.digest(8 * dimension), dtype=">u8")
    chosen = np.argsort(keys, kind="stable")[:k]
    return np.sort(chosen).astype(np.int64)


def gather(vector: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The kept coordinates, in support order."""
    return np.asarray(vector)[indices]


def scatter(values: np.ndarray, indices: np.ndarray, dimension: int) -> np.ndarray:
    """A ``dimension``-vector with ``values`` at ``indices`` and zeros elsewhere (float64); the inverse of
    :func:`gather` on the support. A length mismatch is an error, never a silent truncation."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != indices.shape:
        raise ValueError(f"{values.size} values for a support of {indices.size} coordinates")
    out = np.zeros(dimension, dtype=np.float64)
    out[indices] = values
    return out
