"""Rényi differential privacy of the sampled Gaussian mechanism, in pure Python.

The aggregator must account privacy without torch or scipy, so this module is
the one implementation every component uses; a test checks it against
Opacus's accountant for known parameters.

- Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian
  Mechanism" (2019): the RDP of a Gaussian mechanism with noise multiplier
  ``sigma`` applied to a Poisson sample of rate ``q``, for integer orders
  (a finite binomial sum) and fractional orders (a converging series).
- Balle et al., "Hypothesis Testing Interpretations and Renyi Differential
  Privacy" (AISTATS 2020): the RDP -> (epsilon, delta) conversion, tighter
  than Mironov's original ``rdp + log(1/delta) / (alpha - 1)``.

With ``q = 1`` (every participant in every round) the mechanism is the plain
Gaussian mechanism, whose RDP is ``alpha / (2 sigma^2)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

__all__ = ["DEFAULT_ORDERS", "compute_rdp", "epsilon_from_rdp"]

# Fine near 1 (large epsilon is optimal at small orders), sparser integers up to 256 for small epsilon:
# Opacus's default orders plus a few large ones, few enough that accounting stays fast in pure Python.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 80, 96, 128, 160, 192, 256]
)


def _log_add(a: float, b: float) -> float:
    lo, hi = min(a, b), max(a, b)
    if lo == -math.inf:
        return hi
    return math.log1p(math.exp(lo - hi)) + hi


def _log_sub(a: float, b: float) -> float:
    """``log(exp(a) - exp(b))``; requires ``a >= b``."""
    if a < b:
        raise ValueError("log-space subtraction would be negative")
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    try:
        return math.log(math.expm1(a - b)) + b
    except OverflowError:
        return a


def _log_erfc(x: float) -> float:
    """``log(erfc(x))`` without underflow for large ``x`` (asymptotic series past 25)."""
    if x < 25.0:
        return math.log(math.erfc(x))
    inv2 = 1.0 / (x * x)
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log1p(-0.5 * inv2 + 0.75 * inv2 * inv2)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    for k in range(alpha + 1):
        log_coef = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        term = log_coef + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    i, coef = 0, 1.0  # coef: the generalised binomial coefficient C(alpha, i)
    while True:
        log_coef = math.log(abs(coef)) if coef != 0 else -math.inf
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        coef *= (alpha - i) / (i + 1)
        i += 1
        if max(log_s0, log_s1) < -30 or i > 10_000:
            break
    return _log_add(log_a0, log_a1)


def _rdp_one(q: float, sigma: float, alpha: float) -> float:
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if math.isinf(alpha):
        return math.inf
    if float(alpha).is_integer():
        return _log_a_int(q, sigma, int(alpha)) / (alpha - 1)
    return _log_a_frac(q, sigma, alpha) / (alpha - 1)


@functools.lru_cache(maxsize=4096)
def _rdp_step(q: float, sigma: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    """RDP of one step; composition over steps is a multiplication, so this is all that needs computing."""
    return tuple(_rdp_one(q, sigma, float(a)) for a in orders)


def compute_rdp(*, q: float, noise_multiplier: float, steps: int, orders: Sequence[float] = DEFAULT_ORDERS) -> list[float]:
    """RDP at each order of ``steps`` compositions of the sampled Gaussian mechanism.

    ``q`` is the Poisson sampling rate (1 when everyone takes part), and
    ``noise_multiplier`` the noise standard deviation over the L2 sensitivity.
    """
    if not (0 <= q <= 1):
        raise ValueError(f"sampling rate must be in [0, 1], got {q!r}")
    if noise_multiplier < 0 or steps < 0:
        raise ValueError("noise multiplier and steps must be non-negative")
    return [steps * r for r in _rdp_step(float(q), float(noise_multiplier), tuple(float(a) for a in orders))]


def epsilon_from_rdp(rdp: Sequence[float], delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """The smallest epsilon over ``orders`` for which the RDP curve gives (epsilon, delta)-DP."""
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    best = math.inf
    for r, a in zip(rdp, orders, strict=True):
        if a <= 1 or math.isinf(r) or math.isnan(r):
            continue
        eps = r - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        best = min(best, eps)
    return max(best, 0.0)
