"""The aggregator's step with each round's aggregate: FedAvg, FedAvgM or FedAdam (Reddi et al. 2021).

The aggregate is a direction in weight space: the mean update of FedAvg, or
minus the mean gradient of pooled DP-SGD. Under differential privacy it is
noisy, and its scale is the noise's as much as the signal's; an adaptive
server step (Adam's per-coordinate normalisation) keeps the step size the
operator chose instead. The moments are part of the aggregator's checkpoint
(:meth:`ServerOptimizerState.arrays`), so a restart resumes the same trajectory.
Post-processing of released aggregates only: no privacy cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcrm.spec.manifests import ServerOptimizer

__all__ = ["ServerOptimizerState"]

#: The moments a server optimiser keeps between rounds (momentum: the first only; none: neither).
_MOMENTS = ("first", "second")


@dataclass
class ServerOptimizerState:
    settings: ServerOptimizer
    steps: int = 0
    first: np.ndarray | None = None
    second: np.ndarray | None = None

    def step(self, weights: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """The new weights (float32) after one step along ``direction`` (the round's aggregate)."""
        if direction.shape != weights.shape or not np.all(np.isfinite(direction)):
            raise ValueError(f"the round's aggregate must be {weights.shape[0]} finite numbers")
        s = self.settings
        d = direction.astype(np.float64)
        self.steps += 1
        if s.name == "none":
            move = s.learning_rate * d
        elif s.name == "momentum":
            self.first = d if self.first is None else s.momentum * self.first + d
            move = s.learning_rate * self.first
        else:
            self.first = (1 - s.momentum) * d + (s.momentum * self.first if self.first is not None else 0.0)
            self.second = (1 - s.beta2) * d * d + (s.beta2 * self.second if self.second is not None else 0.0)
            move = s.learning_rate * self.first / (np.sqrt(self.second) + s.epsilon)
        return (weights.astype(np.float64) + move).astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        """What the checkpoint keeps (empty for 'none', which has no state)."""
        out = {f"server_{n}": getattr(self, n) for n in _MOMENTS if getattr(self, n) is not None}
        if out:
            out["server_steps"] = np.array([self.steps])
        return out

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        for n in _MOMENTS:
            value = arrays.get(f"server_{n}")
            setattr(self, n, None if value is None else np.asarray(value, dtype=np.float64))
        steps = arrays.get("server_steps")
        self.steps = int(steps[0]) if steps is not None else 0
