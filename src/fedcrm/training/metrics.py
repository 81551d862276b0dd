"""Global evaluation metrics from summable counts.

A participant never sends predictions or labels; it sends one vector of counts
(confusion matrix at 0.5, loss sum, and histograms of the predicted probability
for positives and negatives). Vectors from every participant add up to the
counts of the pooled validation set, from which accuracy, precision, recall, F1
and ROC AUC are exact global numbers (AUC up to the histogram's resolution).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BINS", "EVAL_SIZE", "LOSS_CAP", "evaluation_counts", "metrics_from_counts"]

BINS = 256
#: The most one record's loss counts for. Binary cross-entropy from a logit grows like the logit's size, without
#: bound, so a wild model (early client-level DP noise) would overflow the bounded slot a loss sum has in a secure
#: sum and read back negative; each record's loss is capped here instead, and sums are a metric, not a parameter.
LOSS_CAP = 120.0
# [examples, loss_sum, tp, fp, tn, fn] + positive histogram + negative histogram
EVAL_SIZE = 6 + 2 * BINS


def evaluation_counts(probabilities: np.ndarray, labels: np.ndarray, loss_sum: float) -> np.ndarray:
    """The summable evaluation vector for one participant's predictions."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    pred = p >= 0.5
    out = np.zeros(EVAL_SIZE, dtype=np.float64)
    out[0] = p.size
    out[1] = loss_sum
    out[2] = np.sum(pred & y)
    out[3] = np.sum(pred & ~y)
    out[4] = np.sum(~pred & ~y)
    out[5] = np.sum(~pred & y)
    bins = np.minimum((p * BINS).astype(np.int64), BINS - 1)
    out[6 : 6 + BINS] = np.bincount(bins[y], minlength=BINS)
    out[6 + BINS :] = np.bincount(bins[~y], minlength=BINS)
    return out


def _auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(score of a random positive > score of a random negative), ties within a bin count half."""
    p, n = pos.sum(), neg.sum()
    if p == 0 or n == 0:
        return None
    neg_below = np.concatenate(([0.0], np.cumsum(neg)[:-1]))
    return float(np.sum(pos * (neg_below + 0.5 * neg)) / (p * n))


def metrics_from_counts(counts: np.ndarray) -> dict[str, float | None]:
    """Accuracy, precision, recall, F1, AUC and mean loss; ``None`` where undefined (no positives, say)."""
    c = np.asarray(counts, dtype=np.float64)
    n, loss_sum, tp, fp, tn, fn = c[:6]
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None
    return {
        "examples": float(n),
        "loss": float(loss_sum / n) if n else None,
        "accuracy": float((tp + tn) / n) if n else None,
        "precision": None if precision is None else float(precision),
        "recall": None if recall is None else float(recall),
        "f1": None if f1 is None else float(f1),
        "auc": _auc(c[6 : 6 + BINS], c[6 + BINS :]),
        # Sums only: how often the model says "converts", and how often records do (a collapse shows here).
        "predicted_positive_rate": float((tp + fp) / n) if n else None,
        "positive_rate": float((tp + fn) / n) if n else None,
    }
