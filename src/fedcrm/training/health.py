"""Warnings about a model that learned nothing, so it never looks like a success.

Small, skewed tenants under differential privacy can train a model that
predicts the majority class for every record, its accuracy equal to that
class's share, while validation loss rises round after round. Both show in the
summed validation counts every run already computes; nothing here needs a
record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["RISING_ROUNDS", "model_warnings"]

#: Validation loss rising in each of this many consecutive rounds (at the end of the run) is a warning.
RISING_ROUNDS = 5


def model_warnings(metrics: Mapping[str, float | None], losses: Sequence[float | None]) -> list[str]:
    """Plain-language warnings for the final validation ``metrics`` and the per-round validation ``losses``."""
    warnings: list[str] = []
    predicted, actual = metrics.get("predicted_positive_rate"), metrics.get("positive_rate")
    if predicted is not None and actual is not None and 0.0 < actual < 1.0 and predicted in (0.0, 1.0):
        which = "negative" if predicted == 0.0 else "positive"
        share = 1.0 - actual if predicted == 0.0 else actual
        warnings.append(
            f"the model predicts every validation record {which}: its accuracy ({100 * share:.1f}%) is the share of "
            "that class, and it learned nothing a constant would not. Under differential privacy the noise may swamp "
            "each tenant's few rows (raise epsilon, train fewer rounds, use larger batches); otherwise check "
            "spec.training.learningRate and how the target is mapped"
        )
    recent = [x for x in losses[-(RISING_ROUNDS + 1):] if x is not None]
    if len(recent) == RISING_ROUNDS + 1 and all(b > a for a, b in zip(recent, recent[1:])):
        warnings.append(
            f"validation loss rose in each of the last {RISING_ROUNDS} rounds ({recent[0]:.4f} -> {recent[-1]:.4f}): "
            "training made the model worse; fewer rounds or a smaller learning rate would have stopped earlier"
        )
    return warnings
