"""Who shares secrets with whom: the SecAgg+ neighbourhood graph.

In SecAgg+ (Bell et al., CCS 2020) a participant masks its input only against
its ``k`` neighbours and secret-shares its keys only among them, which cuts
the cost from ``O(n)`` to ``O(log n)`` per participant. Security then rests on
the graph not being chosen by the adversary: an aggregator that could pick
neighbourhoods would surround a victim with colluding participants. So the
graph here is a deterministic function of *public randomness* only, a seed
that hashes the round id and the whole roster of advertised keys
(:func:`graph_seed`). It is fixed only once every key is in, so neither the
aggregator nor a participant can steer it except by grinding keys, and every
party can recompute it.

Against an aggregator that deviates from the protocol the seed must also be
one that every participant can recompute without trusting the aggregator's
word and without verifying every other participant's keys (which would cost
each participant O(n) signature checks per round, and SecAgg+ exists to keep
that O(log n)). :func:`public_seed` is that seed: a hash of the federation, the
round number, the phase and the member list (ids and identities), nothing the
aggregator picks at run time. Both sides compute each participant's
neighbourhood from it; the member list and the seed are bound into every
signature (:mod:`fedcrm.secagg.signing`), so neighbours that sign the same
survivor set agree on the graph. :func:`graph_seed` (a hash of every advertised
key) is kept for callers that still derive the graph from keys.

The graph is the Harary-style ring over a pseudorandom permutation of the
participants: each connects to the ``k // 2`` nearest on each side, and for odd
``k`` to the participant diametrically opposite. That is exactly ``k``-regular
whenever ``n * k`` is even; when both are odd no ``k``-regular graph exists,
and one participant gets ``k + 1`` neighbours.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping, Sequence

__all__ = ["graph_seed", "neighbourhoods", "public_seed"]

_PERMUTATION_LABEL = b"fedcrm-secagg/graph-permutation/v1"
_SEED_LABEL = b"fedcrm-secagg/graph-seed/v1"
_PUBLIC_SEED_LABEL = b"fedcrm-secagg/public-graph-seed/v2"


def public_seed(federation: str, round_: int, phase: int, members: Mapping[int, str], salt: bytes = b"") -> bytes:
    """SHA-256 over the federation key, round number, phase, the member list (id and identity, in id order) and salt.

    Nothing in it is chosen by the aggregator during the round: a restarted
    aggregator re-running a round gets the same graph (it cannot re-roll it),
    and a participant recomputes it from its own Federation's key and the
    round it is asked to take part in. ``salt`` is the federation's graph salt
    from the member-list agreement (:mod:`fedcrm.secagg.member_lists`): random
    bytes of every member, revealed only once the list was fixed, so that nobody
    could pick a list for the graph it gives.
    """
    h = hashlib.sha256(_PUBLIC_SEED_LABEL)
    name = federation.encode("utf-8")
    h.update(struct.pack(">H", len(name)) + name)
    if salt:
        h.update(struct.pack(">H", len(salt)) + salt)
    h.update(struct.pack(">QQQ", round_, phase, len(members)))
    for cid in sorted(members):
        identity = members[cid].encode("utf-8")
        h.update(struct.pack(">QH", cid, len(identity)) + identity)
    return h.digest()


def graph_seed(round_id: int, keys: Mapping[int, tuple[bytes, bytes]]) -> bytes:
    """SHA-256 over the round id and every participant's id and advertised keys, in id order.

    ``keys`` maps a participant id to its ``(c_pk, s_pk)``.
    """
    h = hashlib.sha256(_SEED_LABEL)
    h.update(struct.pack(">Q", round_id))
    h.update(struct.pack(">Q", len(keys)))
    for cid in sorted(keys):
        c_pk, s_pk = keys[cid]
        h.update(struct.pack(">QHH", cid, len(c_pk), len(s_pk)))
        h.update(c_pk)
        h.update(s_pk)
    return h.digest()


def _permute(ids: Sequence[int], public_seed: bytes) -> list[int]:
    """Sort ids by HMAC-SHA256(seed, id): a pseudorandom permutation nobody can steer without the seed."""
    def rank(cid: int) -> tuple[bytes, int]:
        return hmac.new(public_seed, _PERMUTATION_LABEL + struct.pack(">Q", cid), hashlib.sha256).digest(), cid

    return sorted(ids, key=rank)


def neighbourhoods(ids: Sequence[int], k: int, public_seed: bytes) -> dict[int, tuple[int, ...]]:
    """Each participant's neighbours (sorted), a symmetric graph of degree ``k`` derived from ``public_seed``.

    ``k >= len(ids) - 1`` gives the complete graph (classic SecAgg).
    """
    unique = sorted(set(ids))
    if len(unique) != len(ids):
        raise ValueError("participant ids must be distinct")
    if any(cid < 0 for cid in unique):
        raise ValueError("participant ids must be non-negative")
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    n = len(unique)
    if k >= n - 1:
        return {cid: tuple(c for c in unique if c != cid) for cid in unique}
    ring = _permute(unique, public_seed)
    adjacent: dict[int, set[int]] = {cid: set() for cid in unique}

    def link(i: int, j: int) -> None:
        a, b = ring[i % n], ring[j % n]
        if a != b:
            adjacent[a].add(b)
            adjacent[b].add(a)

    for i in range(n):
        for step in range(1, k // 2 + 1):
            link(i, i + step)
    if k % 2 == 1:
        if n % 2 == 0:
            for i in range(n // 2):
                link(i, i + n // 2)
        else:
            # Harary H(k, n) with k and n odd: chords of length (n + 1) / 2 from the first half;
            # ring position 0 ends with k + 1 neighbours, everyone else with k.
            for i in range((n - 1) // 2 + 1):
                link(i, i + (n + 1) // 2)
    return {cid: tuple(sorted(adjacent[cid])) for cid in unique}
