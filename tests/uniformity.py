"""A chi-square uniformity check shared by the secure-aggregation tests (no scipy needed)."""

from __future__ import annotations

import math

import numpy as np


def chi_square_p(counts: np.ndarray) -> float:
    """Upper tail of chi-square with len(counts) - 1 degrees of freedom (Wilson-Hilferty approximation)."""
    expected = counts.sum() / counts.size
    stat = float(((counts - expected) ** 2 / expected).sum())
    k = counts.size - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))
