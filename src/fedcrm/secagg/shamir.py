"""t-of-n Shamir secret sharing of byte strings over GF(2**127 - 1).

A 32-byte seed or key does not fit one element of a 127-bit field, so the
secret is cut into 15-byte chunks (each below ``2**120``, so always a field
element) and every chunk gets its own random polynomial of degree ``t - 1``
whose constant term is the chunk. A share is the value of all chunk
polynomials at one point ``x``, encoded as fixed 16-byte big-endian integers.
Any ``t`` shares determine every polynomial (Lagrange interpolation at 0);
``t - 1`` are uniformly distributed whatever the secret, so they reveal nothing.

Points are participant ids + 1, never 0 (the value at 0 is the secret).
Coefficients come from :mod:`secrets`. Arithmetic is on Python ints: at the
sizes of secure aggregation (3 chunks, ``t`` up to a few dozen) that is a few
thousand modular multiplications per secret, and the Lagrange coefficients,
the only costly part of reconstruction, are computed once per set of points
(:func:`reconstruct_many`).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

__all__ = [
    "CHUNK_BYTES",
    "ELEMENT_BYTES",
    "NotEnoughShares",
    "PRIME",
    "lagrange_at_zero",
    "reconstruct",
    "reconstruct_many",
    "share_length",
    "split",
]

PRIME = (1 << 127) - 1
CHUNK_BYTES = 15
ELEMENT_BYTES = 16


class NotEnoughShares(ValueError):
    """Fewer shares than the threshold: the secret is information-theoretically hidden."""


def share_length(secret_length: int) -> int:
    """Bytes in one share of a ``secret_length``-byte secret."""
    return -(-secret_length // CHUNK_BYTES) * ELEMENT_BYTES


def _chunks(secret: bytes) -> list[int]:
    return [int.from_bytes(secret[i : i + CHUNK_BYTES], "big") for i in range(0, len(secret), CHUNK_BYTES)]


def _check_x(x: int) -> None:
    if isinstance(x, bool) or not isinstance(x, int) or not (0 < x < PRIME):
        raise ValueError(f"share points must be ints in [1, 2**127 - 1), got {x!r}")


def split(secret: bytes, *, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` at each point of ``xs``; any ``threshold`` of them rebuild it."""
    if not secret:
        raise ValueError("cannot share an empty secret")
    points = list(xs)
    for x in points:
        _check_x(x)
    if len(set(points)) != len(points):
        raise ValueError("share points must be distinct")
    if not (1 <= threshold <= len(points)):
        raise ValueError(f"threshold must be between 1 and the number of shares ({len(points)}), got {threshold}")
    constants = _chunks(bytes(secret))
    # coefficients[j][c]: coefficient of x**j in chunk c's polynomial, highest degree first for Horner.
    rows = [[secrets.randbelow(PRIME) for _ in constants] for _ in range(threshold - 1)]
    rows.reverse()
    rows.append(constants)
    shares: dict[int, bytes] = {}
    for x in points:
        acc = rows[0]
        for row in rows[1:]:
            acc = [(a * x + c) % PRIME for a, c in zip(acc, row)]
        shares[x] = b"".join(v.to_bytes(ELEMENT_BYTES, "big") for v in acc)
    return shares


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Coefficients ``l_j`` with ``f(0) = sum_j l_j f(x_j)`` for any polynomial of degree ``< len(xs)``."""
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return out


def _decode(share: bytes, n_chunks: int) -> list[int]:
    if len(share) != n_chunks * ELEMENT_BYTES:
        raise ValueError(f"a share must be {n_chunks * ELEMENT_BYTES} bytes, got {len(share)}")
    values = [int.from_bytes(share[i : i + ELEMENT_BYTES], "big") for i in range(0, len(share), ELEMENT_BYTES)]
    if any(v >= PRIME for v in values):
        raise ValueError("a share holds a value outside the field")
    return values


def _chosen_points(shares: Mapping[int, bytes], threshold: int) -> tuple[int, ...]:
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    if len(shares) < threshold:
        raise NotEnoughShares(f"{len(shares)} shares given, {threshold} needed")
    points = sorted(shares)
    for x in points:
        _check_x(x)
    return tuple(points[:threshold])


def _combine(
    shares: Mapping[int, bytes], points: Sequence[int], coefficients: Sequence[int], secret_length: int
) -> bytes:
    n_chunks = -(-secret_length // CHUNK_BYTES)
    totals = [0] * n_chunks
    for x, lam in zip(points, coefficients):
        totals = [(t + lam * v) for t, v in zip(totals, _decode(shares[x], n_chunks))]
    out = bytearray()
    for c, total in enumerate(totals):
        size = min(CHUNK_BYTES, secret_length - c * CHUNK_BYTES)
        value = total % PRIME
        if value >> (8 * size):
            raise ValueError("the shares are inconsistent (one is corrupt or belongs to another secret)")
        out += value.to_bytes(size, "big")
    return bytes(out)


def reconstruct(shares: Mapping[int, bytes], *, threshold: int, secret_length: int) -> bytes:
    """Rebuild a ``secret_length``-byte secret from the ``threshold`` shares with the smallest points.

    Raises :class:`NotEnoughShares` with fewer than ``threshold`` shares, and
    ``ValueError`` when the result cannot be a secret of that length (a
    corrupt share usually shows up this way, though not always).
    """
    points = _chosen_points(shares, threshold)
    return _combine(shares, points, lagrange_at_zero(points), secret_length)


def reconstruct_many(
    share_sets: Sequence[Mapping[int, bytes]], *, threshold: int | Sequence[int], secret_length: int
) -> list[bytes]:
    """:func:`reconstruct` for many secrets, computing Lagrange coefficients once per set of points.

    ``threshold`` is one number for all secrets or one per secret. In classic
    SecAgg without late dropouts every secret is rebuilt from the same
    survivors' shares, so one set of coefficients serves all of them.
    """
    thresholds = [threshold] * len(share_sets) if isinstance(threshold, int) else list(threshold)
    if len(thresholds) != len(share_sets):
        raise ValueError("give one threshold per share set")
    cache: dict[tuple[int, ...], list[int]] = {}
    out = []
    for shares, t in zip(share_sets, thresholds):
        points = _chosen_points(shares, t)
        coefficients = cache.get(points)
        if coefficients is None:
            coefficients = cache[points] = lagrange_at_zero(points)
        out.append(_combine(shares, points, coefficients, secret_length))
    return out
