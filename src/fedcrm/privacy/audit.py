"""Membership-inference audit of a trained global model: measured leakage instead of "risk: high / low".

Targets: members are records a participant trained on (its training split,
re-derived from the federation's seed exactly as the participant split it);
non-members are held-out records of the same participants and distribution
(their validation splits, never trained on). Both sets are balanced.

Two attacks score every target; higher means "member":

- **Loss threshold** (Yeom et al., CSF 2018): the negative per-record loss of
  the global model. No knowledge beyond the model.
- **Shadow models, offline likelihood ratio** (Carlini et al., "Membership
  Inference Attacks From First Principles", S&P 2022, offline variant):
  ``K`` shadow models of the same architecture are trained on random halves of
  data the auditor controls (``--test-data``, disjoint from every target), so
  every target is *out* for every shadow. For each target the shadows give the
  distribution of its logit-scaled confidence ``phi = log(p_y / (1 - p_y))``
  when not trained on; the score is how many (global) standard deviations the
  target model's ``phi`` lies above that record's shadow mean. Shadows are
  trained without DP: the attacker's model of how a record behaves when it was
  not seen.

Reported per attack: ROC AUC, advantage (max TPR - FPR over thresholds) and
TPR at 1% FPR.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedcrm.data.canonical import CanonicalData
from fedcrm.data.splits import train_validation_split
from fedcrm.models.artifacts import SavedModel, load_model
from fedcrm.models.mlp import TabularMLP
from fedcrm.models.scoring import build_module
from fedcrm.spec.manifests import Federation
from fedcrm.training.local import derive_seed, train_epochs
from fedcrm.training.preprocessing import EncodedData, encode

__all__ = ["AttackResult", "attack_metrics", "run_audit"]


@dataclass(frozen=True)
class AttackResult:
    auc: float
    advantage: float
    tpr_at_1pct_fpr: float
    fpr: np.ndarray
    tpr: np.ndarray

    def summary(self) -> dict[str, float]:
        return {"auc": round(self.auc, 6), "advantage": round(self.advantage, 6),
                "tpr_at_1pct_fpr": round(self.tpr_at_1pct_fpr, 6)}


def attack_metrics(members: np.ndarray, non_members: np.ndarray) -> AttackResult:
    """ROC of scores where members should score higher; AUC counts ties as one half."""
    scores = np.concatenate([members, non_members]).astype(np.float64)
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each group of equal scores
    tp = np.cumsum(y)[distinct]
    fp = np.cumsum(1 - y)[distinct]
    tpr = np.r_[0.0, tp / max(len(members), 1)]
    fpr = np.r_[0.0, fp / max(len(non_members), 1)]
    auc = float(np.trapezoid(tpr, fpr))
    low = fpr <= 0.01
    return AttackResult(auc=auc, advantage=float(np.max(tpr - fpr)), tpr_at_1pct_fpr=float(np.max(tpr[low])),
                        fpr=fpr, tpr=tpr)


@torch.no_grad()
def _logits(model: TabularMLP, data: EncodedData) -> np.ndarray:
    model.eval()
    return model(torch.from_numpy(data.dense), torch.from_numpy(data.categorical)).numpy().astype(np.float64)


def _losses(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-record binary cross-entropy, computed stably from logits."""
    return np.logaddexp(0.0, logits) - labels * logits


def _phi(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``log(p_y / (1 - p_y))`` of the true label: the logit itself, signed by the label."""
    return logits * (2 * labels - 1)


def _targets(federation: Federation, datasets: dict[str, CanonicalData], max_records: int,
             rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    training = federation.spec.training
    members, non_members = [], []
    for identity, data in sorted(datasets.items()):
        tr, va = train_validation_split(data.frame, fraction=training.validation_fraction, seed=training.seed,
                                        identity=identity)
        members.append(tr)
        non_members.append(va)
    m, n = pd.concat(members, ignore_index=True), pd.concat(non_members, ignore_index=True)
    size = min(len(m), len(n), max_records)
    return (m.iloc[rng.choice(len(m), size, replace=False)].reset_index(drop=True),
            n.iloc[rng.choice(len(n), size, replace=False)].reset_index(drop=True))


def _shadow_phis(saved: SavedModel, federation: Federation, pool: EncodedData, targets: EncodedData, *,
                 shadows: int, epochs: int, seed: int) -> np.ndarray:
    """``phi`` of every target under each shadow model (shape ``shadows x targets``)."""
    training = federation.spec.training
    rng = np.random.default_rng(seed)
    out = []
    for k in range(shadows):
        half = np.sort(rng.choice(len(pool), len(pool) // 2, replace=False))
        part = EncodedData(dense=pool.dense[half], categorical=pool.categorical[half], labels=pool.labels[half])
        torch.manual_seed(derive_seed(seed, "shadow", k))
        model = TabularMLP(saved.layout)
        train_epochs(model, part, epochs=epochs, batch_size=training.batch_size,
                     learning_rate=training.learning_rate, seed=derive_seed(seed, "shadow-order", k))
        out.append(_phi(_logits(model, targets), targets.labels))
    return np.stack(out)


def run_audit(
    federation: Federation,
    datasets: dict[str, CanonicalData],
    run_dir: Path,
    *,
    auditor_data: pd.DataFrame | None,
    shadows: int = 4,
    shadow_epochs: int | None = None,
    max_records: int = 5000,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, AttackResult]]:
    """Attack the model in ``run_dir/model``; returns ``audit.json``'s content and the ROC curves."""
    saved = load_model(run_dir / "model")
    rng = np.random.default_rng(seed)
    members, non_members = _targets(federation, datasets, max_records, rng)
    if auditor_data is None:
        # No data of the auditor's own: set aside half the non-members for the shadows.
        half = len(non_members) // 2
        auditor_data, non_members = non_members.iloc[:half], non_members.iloc[half:].reset_index(drop=True)
        members = members.iloc[: len(non_members)]
    targets = encode(pd.concat([members, non_members], ignore_index=True), saved.preprocessing)
    is_member = np.r_[np.ones(len(members), dtype=bool), np.zeros(len(non_members), dtype=bool)]
    logits = _logits(build_module(saved), targets)
    results = {"loss_threshold": attack_metrics(-_losses(logits, targets.labels)[is_member],
                                                -_losses(logits, targets.labels)[~is_member])}
    training = federation.spec.training
    epochs = shadow_epochs or min(training.rounds * training.local_epochs, 50)
    pool = encode(auditor_data.reset_index(drop=True), saved.preprocessing)
    phis = _shadow_phis(saved, federation, pool, targets, shadows=shadows, epochs=epochs, seed=seed)
    spread = float(np.std(phis - phis.mean(axis=0))) or 1.0
    score = (_phi(logits, targets.labels) - phis.mean(axis=0)) / spread
    results["shadow"] = attack_metrics(score[is_member], score[~is_member])
    audit = {
        "loss_threshold": results["loss_threshold"].summary(),
        "shadow": results["shadow"].summary(),
        "members": int(is_member.sum()),
        "non_members": int((~is_member).sum()),
        "shadow_models": shadows,
        "shadow_epochs": epochs,
        "shadow_rows": int(len(pool) // 2),
        "model_digest": saved.metadata.get("digest"),
    }
    return audit, results
