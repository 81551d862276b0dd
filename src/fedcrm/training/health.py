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
#: Predicting fewer than this share of records as the minority class, where the data holds well more, is a collapse.
ONE_CLASS_SHARE = 0.02


def model_warnings(metrics: Mapping[str, float | None], losses: Sequence[float | None]) -> list[str]:
    """Plain-language warnings for the final validation ``metrics`` and the per-round validation ``losses``."""
    warnings: list[str] = []
    predicted, actual = metrics.get("predicted_positive_rate"), metrics.get("positive_rate")
    if predicted is not None and actual is not None and min(actual, 1 - actual) >= 2.5 * ONE_CLASS_SHARE:
        if min(predicted, 1 - predicted) < ONE_CLASS_SHARE:
            which = "negative" if predicted < 0.5 else "positive"
            share = 1.0 - actual if predicted < 0.5 else actual
            warnings.append(
                f"the model predicts {100 * max(predicted, 1 - predicted):.1f}% of validation records {which}, where "
                f"{100 * share:.1f}% are: it is close to a constant and its accuracy is about that class's share. "
                "Under differential privacy the noise may swamp each tenant's few rows (raise epsilon, train fewer "
                "rounds, use larger batches); otherwise check spec.training.learningRate and how the target is mapped"
            )
    recent = [x for x in losses[-(RISING_ROUNDS + 1):] if x is not None]
    if len(recent) == RISING_ROUNDS + 1 and all(b > a for a, b in zip(recent, recent[1:])):
        warnings.append(
            f"validation loss rose in each of the last {RISING_ROUNDS} rounds ({recent[0]:.4f} -> {recent[-1]:.4f}): "
            "training made the model worse; fewer rounds or a smaller learning rate would have stopped earlier"
        )
    return warnings
