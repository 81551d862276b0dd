"""The aggregator's privacy ledger: spend per round, the stop before overspending, persistence.

``client`` mode: one accountant for the federation; a round is one release
of the noised sum, counted as soon as the FIT sum is unmasked (before
anything else can fail), and written to ``checkpoint/privacy.json`` at once.

The preprocessing statistics are one record-level release (each participant
noises its own and re-sends the same vector when asked again): composed into
each participant's accountant in ``sample`` mode and into the federation's in
``pooled`` mode, reported beside the participant-level spend in ``client`` mode.

``pooled`` mode: one accountant for the federation's records, one sampled
Gaussian step per round, counted like ``client`` mode (when the noised sum
can first be seen).

``sample`` mode: one accountant per participant, from its training rows
(read from its statistics vector in the clear, or, under secure aggregation,
the one figure it sends in the clear beside its masked statistics) and the
same plan the participant derives; a participant's round is counted when its FIT task is
sent, since it trains (and spends) whether or not its update arrives.

Before each round the ledger checks that the round fits every budget; if
not, the federation stops cleanly and says why. Releases are keyed by round
and aggregator incarnation, so a restart never forgets or double-counts, and
a re-run of an interrupted round is counted again because its fresh noise is
a second look at the same data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedcrm.files import atomic_write
from fedcrm.privacy.accounting import BudgetExhausted, RdpAccountant
from fedcrm.privacy.mechanisms import ClientNoise, PooledNoise
from fedcrm.privacy.plans import (
    DROWNED,
    SWAMPED,
    client_accountant,
    client_noise,
    noise_to_signal,
    pooled_accountant,
    pooled_noise,
    sample_accountant,
    statistics_epsilon,
    statistics_noise_multiplier,
)
from fedcrm.spec.manifests import Federation, FeatureType
from fedcrm_aggregator.checkpoints import durable_folder

__all__ = ["BudgetExhausted", "PrivacyLedger"]

_FORMAT = "fedcrm.privacy-ledger/v1"
#: A numeric feature's bound at or above this (the default is 1e6) makes its noised statistics useless.
LOOSE_BOUND = 1e6
_FEDERATION = "*"


class PrivacyLedger:
    def __init__(self, federation: Federation, participants: list[str], out_dir: Path) -> None:
        self.spec = federation.spec
        self.dp = federation.spec.privacy.differential_privacy
        self.participants = participants
        self.path = durable_folder(out_dir) / "privacy.json"
        self.accountants: dict[str, RdpAccountant] = {}
        self.train_rows: dict[str, int] = {}
        self.noise: ClientNoise | PooledNoise | None = None
        self.pooled_rows = 0

    @property
    def mode(self) -> str:
        return self.dp.mode

    # ----------------------------------------------------------------- setup
    def setup(self, *, dimension: int, train_rows: dict[str, int], pooled_rows: int = 0) -> list[str]:
        """Build (or reload and check) the accountants once the model size and row counts are known.

        ``pooled_rows``: the federation's training rows from the (noised) statistics, for the warnings of
        ``pooled`` mode. Returns warnings for the user (a delta too large for the data).
        """
        self.pooled_rows = pooled_rows
        if self.mode == "none":
            return []
        if self.mode == "client":
            self.noise = client_noise(self.spec, participants=len(self.participants), dimension=dimension)
        elif self.mode == "pooled":
            self.noise = pooled_noise(self.spec, participants=len(self.participants), dimension=dimension)
        saved = self._read()
        if saved is not None:
            self.train_rows = {k: int(v) for k, v in saved["train_rows"].items()} or dict(train_rows)
        else:
            self.train_rows = dict(train_rows)
        for key in self._keys():
            expected = self._fresh(key)
            state = (saved or {}).get("accountants", {}).get(key)
            self.accountants[key] = RdpAccountant.from_state(state, expected=expected) if state else expected
        self._write()
        return self._warnings() + self._swamped(dimension)

    def _keys(self) -> list[str]:
        return [_FEDERATION] if self.mode in ("client", "pooled") else sorted(self.train_rows)

    def _fresh(self, key: str) -> RdpAccountant:
        if self.mode == "client":
            return client_accountant(self.spec)
        if self.mode == "pooled":
            return pooled_accountant(self.spec)
        return sample_accountant(self.spec, self.train_rows[key])

    def _warnings(self) -> list[str]:
        assert self.dp.delta is not None
        if self.mode == "client":
            records, what = len(self.participants), "participants (client-level DP protects whole participants)"
        elif self.mode == "pooled":
            records, what = self.pooled_rows, "training rows in the federation"
        else:
            records, what = min(self.train_rows.values(), default=0), "training rows at the smallest participant"
        out = []
        if records and self.dp.delta > 1 / records:
            out.append(f"spec.privacy.differentialPrivacy.delta {self.dp.delta:g} is larger than 1/{records} "
                       f"({records} {what}): the guarantee is weak; use delta below {1 / records:.2g}")
        loose = [f.name for f in self.spec.task.features if f.type is FeatureType.numeric and f.bound >= LOOSE_BOUND]
        if loose:
            out.append(f"spec.task.features {', '.join(loose)}: bound {LOOSE_BOUND:g} or more; the statistics' noise "
                       "grows with each bound, so these features' means and scales are mostly noise. Set each bound "
                       "close to the feature's real range after its transform")
        return out

    def _swamped(self, dimension: int) -> list[str]:
        """A warning for a plan whose noise drowns the run (:func:`noise_to_signal` above SWAMPED); a refusal
        (ValueError) above DROWNED unless the spec accepts it."""
        rounds = self.spec.training.rounds
        if self.mode == "sample":
            ratios = {k: noise_to_signal(noise_multiplier=a.noise_multiplier, dimension=dimension,
                                         batch=a.q * self.train_rows[k], steps=a.steps_per_release * rounds)
                      for k, a in self.accountants.items() if k in self.train_rows}
            drowned = sorted((k for k, r in ratios.items() if r > SWAMPED), key=lambda k: -ratios[k])
            if not drowned:
                return []
            worst = drowned[0]
            ratio = ratios[worst]
            message = (f"differential privacy: at {len(drowned)} participant(s) the DP-SGD noise over the whole run is "
                       f"larger than the gradients can be (worst {worst}: {ratio:.1f}x, noise multiplier "
                       f"{self.accountants[worst].noise_multiplier:.3g} over {self.train_rows[worst]} rows); the model "
                       "may learn little or one class. Pool the noise over all participants with "
                       "spec.privacy.differentialPrivacy.mode: pooled, or raise epsilon or batchSize")
        elif self.mode in ("client", "pooled") and self.noise is not None:
            batch = self.dp.rate * (self.pooled_rows if self.mode == "pooled" else len(self.participants))
            ratio = noise_to_signal(noise_multiplier=self.noise.noise_multiplier, dimension=dimension, batch=batch,
                                    steps=rounds)
            if ratio <= SWAMPED:
                return []
            unit = "records sampled" if self.mode == "pooled" else "participants' updates"
            fix = ("raise epsilon or the participants' rows" if self.mode == "pooled" else
                   "client-level DP needs many participants per round: raise epsilon, add participants, use a smaller "
                   "model, or protect records instead with mode: pooled")
            message = (f"differential privacy: the noise over the whole run is {ratio:.1f}x larger than the averaged "
                       f"{'gradients' if self.mode == 'pooled' else 'updates'} can be (noise multiplier "
                       f"{self.noise.noise_multiplier:.3g}, {batch:.0f} {unit} per round, {dimension} parameters); "
                       f"the model may learn little. To fix it, {fix}")
        else:
            return []
        if ratio > DROWNED and not self.dp.accept_noisy_plan:
            raise ValueError(f"refused before training: {message}. (Plans above {DROWNED:g}x are refused; "
                             "acceptNoisyPlan: true trains anyway, to measure the failure)")
        return [message]

    # ----------------------------------------------------------------- persistence
    def _read(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state = json.loads(self.path.read_text())
        if state.get("format") != _FORMAT or state.get("mode") != self.mode:
            raise ValueError(f"{self.path} holds privacy state for mode {state.get('mode')!r}, not {self.mode!r}; "
                             "use a fresh output folder")
        return state

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": _FORMAT, "mode": self.mode, "train_rows": self.train_rows,
                 "accountants": {k: a.state_dict() for k, a in self.accountants.items()}}
        atomic_write(self.path, json.dumps(state, indent=1).encode())

    # ----------------------------------------------------------------- rounds
    def check_round(self, cohort: list[str]) -> None:
        """Raise :class:`BudgetExhausted` if the next round would overspend anyone's budget."""
        for key in self._keys():
            if key == _FEDERATION or key in cohort:
                try:
                    self.accountants[key].check_next()
                except BudgetExhausted as err:
                    who = "" if key == _FEDERATION else f" for participant {key}"
                    raise BudgetExhausted(f"{err}{who}") from None

    def record(self, release: str, identities: list[str]) -> float | None:
        """Count one release (the federation's sum, or each listed participant's training); persist at once."""
        if self.mode == "none":
            return None
        new = False
        for key in self._keys():
            if (key == _FEDERATION or key in identities) and release not in self.accountants[key].releases:
                self.accountants[key].record(release)
                new = True
        if new:
            self._write()
        return self.spent()

    def expose(self, release: str) -> float | None:
        """Count the round's noised sum the moment it can first be seen, or raise :class:`BudgetExhausted` if
        the budget no longer funds it. The round was checked when it began, but a participant may since have
        shown a release this ledger missed (:meth:`reconcile`: an update sent just before a restart), and a
        participant whose own ledger still has room must not then spend past the budget for everyone."""
        if self.mode in ("client", "pooled") and release not in self.accountants[_FEDERATION].releases:
            self.check_round([])
        return self.record(release, [])

    def reconcile(self, identity: str, releases: int, *, incarnation: int) -> int:
        """Count releases a participant saw and this ledger did not (keys ``unseen-N@incarnation``); returns how
        many. A participant counts an update as released when it sends it; this ledger when it receives it, so
        an update in flight when the aggregator crashed is only in the participant's count."""
        if self.mode == "none":
            return 0
        missed = 0
        for key in self._keys():
            if key in (_FEDERATION, identity):
                accountant = self.accountants[key]
                while len(accountant.releases) < releases:
                    accountant.record(f"unseen-{len(accountant.releases) + 1}@{incarnation}")
                    missed += 1
        if missed:
            self._write()
        return missed

    def spent(self) -> float | None:
        if not self.accountants:
            return None
        return max(a.spent() for a in self.accountants.values())

    def summary(self) -> dict[str, Any]:
        """``report.json``'s ``privacy``."""
        if self.mode == "none" or not self.accountants:
            return {"mode": self.mode, "epsilon_spent": None, "delta": self.dp.delta,
                    "noise_multiplier": self.dp.noise_multiplier, "clipping_norm": self.dp.clipping_norm}
        out: dict[str, Any] = {
            "mode": self.mode, "epsilon_spent": self.spent(), "epsilon_budget": self.dp.epsilon, "delta": self.dp.delta,
            "noise_multiplier": min(a.noise_multiplier for a in self.accountants.values()),
            "clipping_norm": self.dp.clip,
        }
        # The statistics: one record-level release, noised by each participant itself. In sample mode it is part
        # of every participant's epsilon_spent; in client mode (a participant-level guarantee) it stands beside it.
        out["statistics"] = {"noise_multiplier": statistics_noise_multiplier(self.spec),
                             "epsilon": statistics_epsilon(self.spec), "protects": "records",
                             "in_epsilon_spent": self.mode in ("sample", "pooled")}
        if self.mode in ("client", "pooled") and self.noise is not None:
            out["survivors_min"] = self.noise.survivors_min
        if self.mode in ("client", "pooled"):
            out["sample_rate"] = self.dp.rate  # of records (pooled) or of participants' updates (client)
        if self.mode == "sample":
            out["participants"] = {k: {"epsilon_spent": a.spent(), "noise_multiplier": a.noise_multiplier,
                                       "sample_rate": a.q, "steps": a.steps} for k, a in self.accountants.items()}
        return out
