"""Central training on pooled data: the non-private reference a federated run is judged against.

It deliberately reuses every federated piece (the same per-participant
train/validation splits, statistics summed from per-participant vectors, the
same initial weights, model, optimiser and evaluation counts), so the only
difference from ``fedcrm run`` is that the records are pooled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcrm.data.canonical import CanonicalData
from fedcrm.data.splits import train_validation_split
from fedcrm.models.artifacts import save_model
from fedcrm.models.layout import ModelLayout
from fedcrm.models.mlp import TabularMLP, get_flat, set_flat
from fedcrm.reporting import RoundRecord, build_report
from fedcrm.spec.manifests import Federation
from fedcrm.training.fedavg import ordered_sum
from fedcrm.training.local import derive_seed, evaluate, train_epochs
from fedcrm.training.metrics import metrics_from_counts
from fedcrm.training.preprocessing import StatisticsLayout, encode

__all__ = ["train_central"]


def train_central(
    federation: Federation,
    datasets: dict[str, CanonicalData],
    out: Path,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> dict[str, Any]:
    """Train on the pooled data of ``datasets`` (identity -> rows); writes the model, returns the report."""
    spec = federation.spec
    training = spec.training
    started = time.monotonic()
    splits = {
        identity: train_validation_split(data.frame, fraction=training.validation_fraction, seed=training.seed, identity=identity)
        for identity, data in sorted(datasets.items())
    }
    stats_layout = StatisticsLayout(spec.task)
    prep = stats_layout.preprocessing(ordered_sum((i, stats_layout.local(tr)) for i, (tr, _) in splits.items()))
    layout = ModelLayout.build(spec.model, prep)
    train = encode(pd.concat([tr for tr, _ in splits.values()], ignore_index=True), prep)
    val = encode(pd.concat([va for _, va in splits.values()], ignore_index=True), prep)
    model = TabularMLP(layout)
    set_flat(model, layout.initial(training.seed))

    history: list[RoundRecord] = []
    metrics: dict[str, float | None] = {}
    for r in range(1, training.rounds + 1):
        t0 = time.monotonic()
        outcome = train_epochs(
            model, train, epochs=training.local_epochs, batch_size=training.batch_size,
            learning_rate=training.learning_rate, seed=derive_seed(training.seed, "baseline", r),
        )
        metrics = metrics_from_counts(evaluate(model, val))
        record = RoundRecord(
            round=r, loss=metrics["loss"], accuracy=metrics["accuracy"], f1=metrics["f1"], auc=metrics["auc"],
            precision=metrics["precision"], recall=metrics["recall"], participants=len(datasets),
            duration_s=round(time.monotonic() - t0, 4), bytes_up_per_client=0.0, bytes_down_per_client=0.0,
            train_loss=outcome.loss_sum / max(outcome.examples, 1),
        )
        history.append(record)
        if on_round is not None:
            on_round(record)

    weights = get_flat(model)
    digest = save_model(
        out / "model", weights=np.asarray(weights), layout=layout, preprocessing=prep, task=spec.task,
        metadata={"federation": federation.key, "kind": "baseline", "rounds_completed": training.rounds,
                  "rounds_planned": training.rounds, "partial": False, "seed": training.seed},
    )
    return build_report(
        kind="baseline",
        federation=federation.key,
        status="succeeded",
        message=f"central training on {len(train):,} pooled rows from {len(datasets)} participants",
        rounds_planned=training.rounds,
        history=history,
        participants=[{"identity": i, "status": "pooled", "rounds": training.rounds} for i in sorted(datasets)],
        metrics={k: v for k, v in metrics.items() if v is not None},
        metrics_source="validation",
        model_digest=digest,
        duration_s=round(time.monotonic() - started, 3),
        bytes_per_participant_round=[],
    )
