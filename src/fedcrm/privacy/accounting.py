"""Privacy accounting that survives restarts, and noise calibration from a budget.

The accountant only observes: a mechanism (``noise_multiplier``, sampling
rate ``q``) ran ``steps`` more times. Its state is a small JSON document,
saved with the aggregator's checkpoint and checked on load against the
mechanism and budget the federation declares, so a restarted aggregator can
neither forget spend (the ledger is written as soon as a sum is released) nor
count one release twice (each release is keyed by round and incarnation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedcrm.privacy.rdp import compute_rdp, epsilon_from_rdp

__all__ = [
    "BudgetExhausted",
    "RdpAccountant",
    "calibrate_noise_multiplier",
    "epsilon_for",
    "rounds_funded",
]

_FORMAT = "fedcrm.rdp-accountant/v1"
# Above this the budget is effectively unusable: nothing useful survives that much noise.
MAX_NOISE_MULTIPLIER = 1e6


class BudgetExhausted(ValueError):
    """The next release would spend more than the declared budget."""


def epsilon_for(*, q: float, noise_multiplier: float, steps: int, delta: float,
                base_noise_multiplier: float | None = None) -> float:
    """Epsilon after ``steps`` compositions of one sampled Gaussian mechanism.

    ``base_noise_multiplier``: one more Gaussian release (sampling rate 1) composed in, the preprocessing
    statistics (:func:`fedcrm.privacy.plans.statistics_noise_multiplier`); RDP adds up order by order.
    """
    rdp = compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=steps) if steps else None
    if base_noise_multiplier is not None:
        base = compute_rdp(q=1.0, noise_multiplier=base_noise_multiplier, steps=1)
        rdp = base if rdp is None else [a + b for a, b in zip(rdp, base)]
    return 0.0 if rdp is None else epsilon_from_rdp(rdp, delta)


def calibrate_noise_multiplier(*, epsilon: float, delta: float, q: float, steps: int, tolerance: float = 1e-3,
                               base_noise_multiplier: float | None = None) -> float:
    """The smallest noise multiplier (to ``tolerance`` relative) whose ``steps`` releases stay within epsilon.

    Bisection on a monotone function, returning the upper end, so the result
    never overspends: the same search Opacus's ``get_noise_multiplier`` does,
    with a relative instead of an absolute tolerance. ``base_noise_multiplier``
    is a release already planned (see :func:`epsilon_for`): the steps get what
    it leaves of the budget.
    """
    if not (epsilon > 0) or not (0 < delta < 1) or steps < 1:
        raise ValueError("calibration needs epsilon > 0, 0 < delta < 1 and at least one step")
    if base_noise_multiplier is not None and \
            epsilon_for(q=q, noise_multiplier=1.0, steps=0, delta=delta, base_noise_multiplier=base_noise_multiplier) \
            >= epsilon:
        raise ValueError(f"the preprocessing statistics alone spend epsilon {epsilon:g} or more; nothing is left "
                         "for training")
    low, high = 0.0, 1.0
    while epsilon_for(q=q, noise_multiplier=high, steps=steps, delta=delta,
                      base_noise_multiplier=base_noise_multiplier) > epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"epsilon {epsilon:g} cannot fund {steps} step(s) at any usable noise level")
    while high - low > tolerance * high:
        mid = (low + high) / 2
        if epsilon_for(q=q, noise_multiplier=mid, steps=steps, delta=delta,
                       base_noise_multiplier=base_noise_multiplier) > epsilon:
            low = mid
        else:
            high = mid
    return high


def rounds_funded(*, epsilon: float, delta: float, q: float, noise_multiplier: float, steps_per_round: int,
                  limit: int, base_noise_multiplier: float | None = None) -> int:
    """How many rounds (up to ``limit``) fit in the budget at this noise level."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon_for(q=q, noise_multiplier=noise_multiplier, steps=mid * steps_per_round, delta=delta,
                       base_noise_multiplier=base_noise_multiplier) <= epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class RdpAccountant:
    """Spend of one sampled Gaussian mechanism against an (epsilon, delta) budget.

    ``releases`` names every release already counted (``"<round>@<incarnation>"``),
    so recording the same release twice is a no-op and a re-run of a round
    under a new incarnation is counted again, as it must be: its fresh noise
    is a second look at the same data. ``statistics_noise_multiplier``: the
    preprocessing statistics, released once (a participant re-sends the same
    noised vector on every retry, so a retry is no new look), always counted.
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    q: float = 1.0
    steps_per_release: int = 1
    releases: list[str] = field(default_factory=list)
    statistics_noise_multiplier: float | None = None

    @property
    def steps(self) -> int:
        return len(self.releases) * self.steps_per_release

    def spent(self, extra_releases: int = 0) -> float:
        return epsilon_for(q=self.q, noise_multiplier=self.noise_multiplier,
                           steps=self.steps + extra_releases * self.steps_per_release, delta=self.delta,
                           base_noise_multiplier=self.statistics_noise_multiplier)

    def check_next(self) -> float:
        """Epsilon after one more release; raises :class:`BudgetExhausted` if it exceeds the budget."""
        after = self.spent(1)
        if after > self.epsilon * (1 + 1e-9):
            raise BudgetExhausted(
                f"another release would spend epsilon {after:.4f}, over the budget of {self.epsilon:g} "
                f"(already spent {self.spent():.4f} in {len(self.releases)} release(s))"
            )
        return after

    def record(self, release: str) -> float:
        """Count ``release`` (once); returns the epsilon spent so far."""
        if release not in self.releases:
            self.releases.append(release)
        return self.spent()

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT, "epsilon": self.epsilon, "delta": self.delta,
            "noise_multiplier": self.noise_multiplier, "q": self.q,
            "steps_per_release": self.steps_per_release, "releases": list(self.releases),
            "statistics_noise_multiplier": self.statistics_noise_multiplier,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], *, expected: RdpAccountant | None = None) -> RdpAccountant:
        """Rebuild from :meth:`state_dict`, refusing state that belongs to another mechanism or budget."""
        if state.get("format") != _FORMAT:
            raise ValueError(f"unknown accountant state format {state.get('format')!r}")
        acc = cls(epsilon=float(state["epsilon"]), delta=float(state["delta"]),
                  noise_multiplier=float(state["noise_multiplier"]), q=float(state["q"]),
                  steps_per_release=int(state["steps_per_release"]), releases=[str(r) for r in state["releases"]],
                  statistics_noise_multiplier=_optional_float(state.get("statistics_noise_multiplier")))
        if len(set(acc.releases)) != len(acc.releases):
            raise ValueError("accountant state lists a release twice")
        if expected is not None:
            for name in ("epsilon", "delta", "noise_multiplier", "q", "steps_per_release", "statistics_noise_multiplier"):
                a, b = getattr(acc, name), getattr(expected, name)
                if (a is None) != (b is None) or (a is not None and not math.isclose(a, b, rel_tol=1e-12)):
                    raise ValueError(f"saved privacy accountant has {name} {a!r} but the federation now implies {b!r}; "
                                     "a changed privacy setting needs a fresh output folder")
        return acc



def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
