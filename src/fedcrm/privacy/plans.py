"""Mechanism parameters derived from a Federation and public numbers, identically on every side.

A participant and the aggregator must agree on the noise multiplier, the
sampling rate and the integer scale without talking about them: both call
these functions with the same manifest and the same public counts (the
expected participants, the model size, a participant's training rows as
sent in the clear statistics stage).

How the budget is split: a fixed share (:data:`STATISTICS_SHARE`) funds
the one release of the preprocessing statistics, and the planned ``rounds``
(times local epochs for ``sample``) get the rest, composed with it, at one
constant noise level; there is no per-round allocation to tune, and stopping
early simply leaves budget unspent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedcrm.privacy.accounting import RdpAccountant, calibrate_noise_multiplier, epsilon_for
from fedcrm.spec.manifests import FederationSpec

# The operator reads plans (status.privacyPlan) and is kept free of numpy, which the mechanisms and the
# secure-aggregation package need (some 12 MiB of its resident memory): those are imported where they are used.
if TYPE_CHECKING:
    from fedcrm.privacy.mechanisms import ClientNoise, PooledNoise

__all__ = ["DROWNED", "STATISTICS_SHARE", "SWAMPED", "SamplePlan", "noise_to_signal", "client_accountant", "client_noise", "client_noise_multiplier",
           "pooled_accountant", "pooled_noise", "pooled_noise_multiplier", "privacy_plan", "sample_accountant",
           "sample_plan",
           "statistics_epsilon", "statistics_noise_multiplier", "statistics_shares", "survivors_min"]

#: The statistics' noise multiplier is the one that would spend this share of epsilon on its own. Both are Gaussian,
#: and composed order by order in RDP the statistics cost far less than their share: at 0.3 the training's noise
#: multiplier grows by about 5 % (pooled or sample mode at epsilon 1), for a third of the statistics' noise at 0.1.
STATISTICS_SHARE = 0.3


def survivors_min(spec: FederationSpec, participants: int) -> int:
    """``t_min``: the fewest contributions a released sum can hold.

    With secure aggregation a sum is unmasked only while every neighbourhood
    keeps its threshold, so at least ``shares_needed`` participants survive;
    without it the aggregator refuses rounds below ``minParticipants`` (and
    sees each update anyway: then the guarantee protects participants from
    everyone who sees the model, not from the aggregator).
    """
    sa = spec.privacy.secure_aggregation
    floor = min(spec.training.min_participants, participants)
    if not sa.enabled or participants < 2:
        return max(1, floor)
    from fedcrm.secagg.params import SecAggParams

    params = SecAggParams(threshold=sa.threshold, neighbours=sa.neighbours, bits=sa.bits)
    return max(1, min(participants, params.shares_needed(params.neighbour_count(participants))))


def statistics_noise_multiplier(spec: FederationSpec) -> float | None:
    """The noise multiplier of the statistics release (record-level, sampling rate 1); None without DP.

    An explicit ``noiseMultiplier`` applies to it too; otherwise it is calibrated so that the statistics
    alone spend :data:`STATISTICS_SHARE` of epsilon.
    """
    dp = spec.privacy.differential_privacy
    if not dp.enabled:
        return None
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    assert dp.epsilon is not None and dp.delta is not None
    return calibrate_noise_multiplier(epsilon=STATISTICS_SHARE * dp.epsilon, delta=dp.delta, q=1.0, steps=1)


def statistics_shares(spec: FederationSpec, participants: int) -> int:
    """How many participants share the statistics' noise: t_min in pooled mode (the noise is paid once for the whole
    federation, as for its training steps), otherwise 1 (each participant adds all of it, for its own records)."""
    if spec.privacy.differential_privacy.mode != "pooled":
        return 1
    return survivors_min(spec, noise_participants(spec, participants))


def statistics_epsilon(spec: FederationSpec) -> float | None:
    """What the statistics release alone spends, per record (None without DP)."""
    sigma = statistics_noise_multiplier(spec)
    if sigma is None:
        return None
    dp = spec.privacy.differential_privacy
    assert dp.delta is not None
    return epsilon_for(q=1.0, noise_multiplier=1.0, steps=0, delta=dp.delta, base_noise_multiplier=sigma)


def client_noise_multiplier(spec: FederationSpec) -> float:
    """DP-FedAvg: one Gaussian release per round, each participant in it with probability ``samplingRate``
    (1 unless set: every participant, every round)."""
    dp = spec.privacy.differential_privacy
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    assert dp.epsilon is not None and dp.delta is not None
    return calibrate_noise_multiplier(epsilon=dp.epsilon, delta=dp.delta, q=dp.rate, steps=spec.training.rounds)


def noise_participants(spec: FederationSpec, claimed: int) -> int:
    """How many participants a participant sizes its share of client-level noise for.

    The aggregator says how many the federation has; more would mean less noise from each. A participant
    never takes more than its own Federation's allow-list admits (fewer only adds noise).
    """
    allowed = len(spec.participants.namespaces)
    return min(claimed, allowed) if allowed else claimed


def client_noise(spec: FederationSpec, *, participants: int, dimension: int) -> ClientNoise:
    from fedcrm.privacy.mechanisms import ClientNoise

    dp = spec.privacy.differential_privacy
    return ClientNoise(
        clipping_norm=dp.clip, noise_multiplier=client_noise_multiplier(spec),
        survivors_min=survivors_min(spec, participants), contributors_max=participants,
        dimension=dimension, bits=spec.privacy.secure_aggregation.bits,
    )


def client_accountant(spec: FederationSpec) -> RdpAccountant:
    """One release per round; each participant's update is in it with probability ``samplingRate``, decided by the
    participant's own secret coin (the sampled Gaussian mechanism over participants, zero-out neighbours)."""
    dp = spec.privacy.differential_privacy
    assert dp.epsilon is not None and dp.delta is not None
    return RdpAccountant(epsilon=dp.epsilon, delta=dp.delta, noise_multiplier=client_noise_multiplier(spec),
                         q=dp.rate)


@dataclass(frozen=True)
class SamplePlan:
    """DP-SGD at one participant: Poisson rate ``q``, steps per round, noise multiplier."""

    sample_rate: float
    steps_per_round: int
    noise_multiplier: float


def sample_plan(spec: FederationSpec, train_rows: int) -> SamplePlan:
    """Opacus's Poisson loader: ``q = 1 / ceil(n / batch)`` and ``ceil(n / batch)`` steps per epoch."""
    dp = spec.privacy.differential_privacy
    assert dp.epsilon is not None and dp.delta is not None
    batches = max(1, math.ceil(train_rows / spec.training.batch_size))
    steps = batches * spec.training.local_epochs
    q = 1.0 / batches
    sigma = dp.noise_multiplier
    if sigma is None:  # the statistics are per record too: each participant's own spend composes both
        sigma = calibrate_noise_multiplier(epsilon=dp.epsilon, delta=dp.delta, q=q, steps=steps * spec.training.rounds,
                                           base_noise_multiplier=statistics_noise_multiplier(spec))
    return SamplePlan(sample_rate=q, steps_per_round=steps, noise_multiplier=sigma)


def sample_accountant(spec: FederationSpec, train_rows: int) -> RdpAccountant:
    dp = spec.privacy.differential_privacy
    assert dp.epsilon is not None and dp.delta is not None
    plan = sample_plan(spec, train_rows)
    return RdpAccountant(epsilon=dp.epsilon, delta=dp.delta, noise_multiplier=plan.noise_multiplier,
                         q=plan.sample_rate, steps_per_release=plan.steps_per_round,
                         statistics_noise_multiplier=statistics_noise_multiplier(spec))


def pooled_noise_multiplier(spec: FederationSpec) -> float:
    """Pooled DP-SGD: one sampled Gaussian step per round at rate ``samplingRate`` over all records, composed with
    the statistics (both per record)."""
    dp = spec.privacy.differential_privacy
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    assert dp.epsilon is not None and dp.delta is not None
    return calibrate_noise_multiplier(epsilon=dp.epsilon, delta=dp.delta, q=dp.rate, steps=spec.training.rounds,
                                      base_noise_multiplier=statistics_noise_multiplier(spec))


def pooled_noise(spec: FederationSpec, *, participants: int, dimension: int) -> PooledNoise:
    from fedcrm.privacy.mechanisms import PooledNoise

    dp = spec.privacy.differential_privacy
    return PooledNoise(clipping_norm=dp.clip, noise_multiplier=pooled_noise_multiplier(spec),
                       survivors_min=survivors_min(spec, participants), contributors_max=max(participants, 1),
                       dimension=dimension)


def pooled_accountant(spec: FederationSpec) -> RdpAccountant:
    """The central accountant of pooled DP-SGD: the federation's records are one dataset, one step per round."""
    dp = spec.privacy.differential_privacy
    assert dp.epsilon is not None and dp.delta is not None
    return RdpAccountant(epsilon=dp.epsilon, delta=dp.delta, noise_multiplier=pooled_noise_multiplier(spec),
                         q=dp.rate, statistics_noise_multiplier=statistics_noise_multiplier(spec))


#: Above this noise-to-signal ratio (:func:`noise_to_signal`) a plan is warned about ...
SWAMPED = 1.0
#: ... and above this one refused, unless ``acceptNoisyPlan``: the small-tenant failure (a 24-row tenant's own
#: DP-SGD at epsilon 1) scores 12 and learns one class; client-level DP over 50 participants and 667 parameters
#: scores 2 and reaches 64 % where the same federation without DP reaches 89 %.
DROWNED = 4.0


def noise_to_signal(*, noise_multiplier: float, dimension: int, batch: float, steps: int) -> float:
    """How much longer the noise added over a run is than the signal can be, at best.

    One step's noise on the averaged gradient (or update) is about ``sigma * C * sqrt(d) / B`` long (``B`` records
    or participants averaged, ``d`` parameters); over ``T`` steps noise adds up like ``sqrt(T)`` and a consistent
    signal like ``T`` (at most ``C`` per step), so the ratio is ``sigma * sqrt(d) / (B * sqrt(T))``. Above 1 the
    model can learn little; note that for a fixed budget ``sigma`` grows like ``sqrt(T)`` (or ``q * sqrt(T)``
    with sampling), so neither fewer rounds nor sampling moves it much: more contributors per step, fewer
    parameters or a larger epsilon do.
    """
    return noise_multiplier * math.sqrt(max(dimension, 1)) / (max(batch, 1.0) * math.sqrt(max(steps, 1)))


def privacy_plan(spec: FederationSpec) -> str:
    """What the budget buys, in one line, before anything trains (what the manifest alone determines)."""
    dp = spec.privacy.differential_privacy
    rounds = spec.training.rounds
    statistics = f"statistics noised once at noise multiplier {statistics_noise_multiplier(spec):.3g}"
    if dp.mode == "pooled":
        return (f"{rounds} central DP-SGD steps (one per round) over all participants' records, each record sampled "
                f"at rate {dp.rate:g}, noise multiplier {pooled_noise_multiplier(spec):.3g} shared out among at least "
                f"t_min participants; {statistics}")
    if dp.mode == "client":
        sampled = (f"each participant's update in a round with probability {dp.rate:g} (its own secret coin; "
                   "every participant still trains and sends its noise share)" if dp.rate < 1
                   else "every participant's update in every round")
        return (f"{rounds} rounds of DP-FedAvg at noise multiplier {client_noise_multiplier(spec):.3g}, {sampled}; "
                f"{statistics}")
    return (f"each participant runs DP-SGD on its own rows over {rounds} rounds x {spec.training.local_epochs} "
            f"epochs, its noise multiplier from its own row count (small tenants get large ones; see mode 'pooled'); "
            f"{statistics}")
