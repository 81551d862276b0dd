"""Training and evaluating the tabular MLP on one party's encoded rows.

Used by participants (local rounds), by ``fedcrm baseline`` (central training
on pooled data, the non-private reference) and by the CLI's test-set
evaluation, so every path computes loss and metrics the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedcrm.models.mlp import TabularMLP
from fedcrm.training.metrics import LOSS_CAP, evaluation_counts
from fedcrm.training.preprocessing import EncodedData

__all__ = ["TrainOutcome", "derive_seed", "evaluate", "one_thread", "predict", "train_epochs"]


def one_thread() -> None:
    """Run torch's operators on one thread in this process.

    The models here are small (thousands of parameters) and every operator takes microseconds, so intra-op
    threads cost more in hand-offs than they save: ``make bench-dp`` (variant ``plain-threaded``) measures half
    the throughput with a thread per core on two cores, and it gets far worse when other processes want the
    cores too. Participants pin their threads at start; central training and the privacy audit call this.
    """
    torch.set_num_threads(1)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a federation seed and names; stable across processes and Python runs."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class TrainOutcome:
    examples: int
    loss_sum: float  # summed per-example training loss over the last epoch
    steps: int


def _tensors(data: EncodedData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.from_numpy(data.dense), torch.from_numpy(data.categorical), torch.from_numpy(data.labels)


def train_epochs(
    model: TabularMLP,
    data: EncodedData,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    proximal_mu: float = 0.0,
) -> TrainOutcome:
    """Adam on binary cross-entropy; with ``proximal_mu`` > 0, FedProx's pull towards the starting weights.

    Shuffling uses its own seeded generator, so a participant's round is
    reproducible regardless of what else ran in the process.
    """
    dense, cats, labels = _tensors(data)
    n = len(data)
    if n == 0:
        return TrainOutcome(0, 0.0, 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    generator = torch.Generator().manual_seed(seed)
    model.train()
    steps, last_loss = 0, 0.0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        last_loss = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_total = loss_fn(model(dense[idx], cats[idx]), labels[idx])
            loss = loss_total / idx.numel()
            if anchor is not None:
                prox = sum(torch.sum((p - a) ** 2) for p, a in zip(model.parameters(), anchor))
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            optimizer.step()
            last_loss += float(loss_total.detach())
            steps += 1
    return TrainOutcome(examples=n, loss_sum=last_loss, steps=steps)


@torch.no_grad()
def predict(model: TabularMLP, data: EncodedData) -> tuple[np.ndarray, float]:
    """Probabilities and the summed binary cross-entropy, each record's capped at :data:`LOSS_CAP`."""
    model.eval()
    dense, cats, labels = _tensors(data)
    logits = model(dense, cats) if len(data) else torch.zeros(0)
    per_record = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    loss = float(per_record.clamp(max=LOSS_CAP).sum()) if len(data) else 0.0
    return torch.sigmoid(logits).numpy().astype(np.float64), loss


def evaluate(model: TabularMLP, data: EncodedData) -> np.ndarray:
    """The summable evaluation vector (see :mod:`fedcrm.training.metrics`)."""
    probs, loss = predict(model, data)
    return evaluation_counts(probs, data.labels, loss)
