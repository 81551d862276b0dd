"""The knobs of one secure-aggregation round, checked once, up front.

Both sides of the protocol derive everything else from these three numbers and
the roster: how many neighbours each participant has (SecAgg+ replaces the
complete graph of classic SecAgg by a sparse one), how many of a
neighbourhood's shares are needed to rebuild a secret, and the modulus of the
arithmetic. Keeping the derivations here means the participant and the
aggregator cannot disagree about them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SecAggParams"]

_NEIGHBOUR_MODES = ("complete", "logarithmic")


@dataclass(frozen=True)
class SecAggParams:
    """Parameters of a SecAgg / SecAgg+ round.

    Parameters
    ----------
    threshold
        Fraction of each neighbourhood (the participant itself included) whose
        shares (and, in the consistency check, signatures over the survivor
        set) are needed to rebuild one of its secrets; ``0.5 < threshold <= 1``.
        Robustness falls as it rises (more of a neighbourhood must stay online
        until the end). It must exceed 0.5 against an aggregator that lies
        about who dropped out: then the neighbours that reveal a participant's
        self-mask and those that reveal its mask key overlap in an honest
        neighbour (who never reveals both), and two different survivor sets
        cannot each gather ``t`` signatures in one neighbourhood, nor can a
        neighbour's mask key be rebuilt only from the ``k/2`` holders of a
        ring neighbourhood that lie outside the victim's
        (docs/secure-aggregation.md, threat model). The default 0.6 leaves a
        margin above that bound.
    neighbours
        ``"complete"`` (classic SecAgg: everyone is everyone's neighbour),
        ``"logarithmic"`` (SecAgg+: ``k = O(log n)``) or a fixed ``int`` k.
    bits
        Arithmetic is modulo ``2**bits``; ``8 <= bits <= 62``. Up to 32 the
        vectors are ``uint32`` (half the traffic of ``uint64``).
    """

    threshold: float = 0.6
    neighbours: str | int = "complete"
    bits: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number in (0, 1], got {self.threshold!r}")
        if math.isnan(self.threshold) or not (0.5 < float(self.threshold) <= 1.0):
            raise ValueError(
                f"threshold must be in (0.5, 1] (the fraction of a neighbourhood needed to unmask; a strict majority, "
                f"or an aggregator that lies about dropouts could unmask one participant), got {self.threshold}"
            )
        if isinstance(self.neighbours, bool):
            raise ValueError("neighbours must be 'complete', 'logarithmic' or a positive int, got a bool")
        if isinstance(self.neighbours, int):
            if self.neighbours < 1:
                raise ValueError(f"neighbours must be at least 1 when given as a number, got {self.neighbours}")
        elif self.neighbours not in _NEIGHBOUR_MODES:
            raise ValueError(
                f"neighbours must be 'complete', 'logarithmic' or a positive int, got {self.neighbours!r}"
            )
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not (8 <= self.bits <= 62):
            raise ValueError(
                f"bits must be an int from 8 to 62 (arithmetic is modulo 2**bits), got {self.bits!r}"
            )

    def neighbour_count(self, n: int) -> int:
        """How many neighbours each of ``n`` participants gets (``k``).

        ``"logarithmic"`` uses the smallest even number ``>= ceil(3 * log2(n))``:
        Bell et al. show ``k = O(log n)`` keeps the graph connected and every
        neighbourhood holding an honest majority with overwhelming probability
        for realistic dropout and corruption rates; the factor 3 is a
        conservative constant (k=18 for 50 participants, 30 for 1,000), and an
        even ``k`` makes the ring graph exactly ``k``-regular for any ``n``.
        Capped at ``n - 1`` (then it is classic SecAgg).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of participants must be a positive int, got {n!r}")
        if self.neighbours == "complete":
            return n - 1
        if self.neighbours == "logarithmic":
            k = math.ceil(3 * math.log2(n)) if n > 1 else 0
            k += k % 2
            return min(n - 1, k)
        return min(int(self.neighbours), n - 1)

    def shares_needed(self, neighbourhood_size: int) -> int:
        """Shares needed to rebuild a secret of a participant with ``neighbourhood_size`` neighbours.

        ``t = max(2, ceil(threshold * (k + 1)), floor((k + 1) / 2) + 1)``,
        capped at ``k + 1``: always a strict majority of the ``k + 1``
        holders, the neighbours and the participant itself. At
        least 2, because with ``t = 1`` every share *is* the secret: any single
        neighbour would hold the participant's self-mask seed and mask key and,
        with the aggregator, could unmask its input. At most ``k + 1`` because
        there are no more holders.
        """
        if isinstance(neighbourhood_size, bool) or not isinstance(neighbourhood_size, int) or neighbourhood_size < 1:
            raise ValueError(
                f"a neighbourhood needs at least one neighbour (secure aggregation needs 2 participants), "
                f"got {neighbourhood_size!r}"
            )
        holders = neighbourhood_size + 1
        # Round before ceil so that 0.5 * 4 is 2, not 3 through float noise.
        t = math.ceil(round(float(self.threshold) * holders, 9))
        return min(holders, max(2, t, holders // 2 + 1))
