"""One participant's part of a pooled DP-SGD step: the sum of clipped per-record gradients over a Poisson sample.

Every participant samples each of its records independently with the same
rate ``q`` (drawn from the operating system's CSPRNG, so neither the
aggregator nor anyone else can tell which records a round used), so the
union is a Poisson sample of all the federation's records, the assumption of
the sampled Gaussian's accountant. Each record's gradient is clipped to the
clipping norm before summing, which bounds what one record adds; the noise is
added afterwards by :class:`fedcrm.privacy.mechanisms.PooledNoise`, in
integers, before masking. Per-record gradients come from ``torch.func``
(``vmap`` over ``grad``) in chunks, so memory stays at ``chunk x parameters``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedcrm.models.mlp import TabularMLP
from fedcrm.privacy.mechanisms import secure_uniform
from fedcrm.training.preprocessing import EncodedData

__all__ = ["PooledContribution", "clipped_gradient_sum"]

#: Records per vectorised chunk: 256 x 100k parameters x 4 bytes is 100 MB at most.
CHUNK = 256


@dataclass(frozen=True)
class PooledContribution:
    gradient_sum: np.ndarray  # float64, wire order: the sum of the sampled records' clipped gradients
    sampled: int  # how many records the Poisson sample took (stays with the participant)
    loss_sum: float  # their summed loss at the current weights (a metric)


def clipped_gradient_sum(model: TabularMLP, data: EncodedData, *, rate: float, clip: float) -> PooledContribution:
    """Sample each record with probability ``rate``; return the sum of their gradients, each clipped to ``clip``."""
    keep = np.flatnonzero(secure_uniform(len(data)) < rate) if len(data) else np.zeros(0, dtype=np.int64)
    names = [name for name, _ in model.layout.shapes()]
    params = {k: v.detach() for k, v in model.named_parameters()}
    missing = set(names) - set(params)
    if missing:
        raise ValueError(f"the model has no parameters named {sorted(missing)}")

    def loss_one(p: dict[str, torch.Tensor], dense: torch.Tensor, cats: torch.Tensor,
                 label: torch.Tensor) -> torch.Tensor:
        logit = functional_call(model, p, (dense.unsqueeze(0), cats.unsqueeze(0)))
        return nn.functional.binary_cross_entropy_with_logits(logit, label.unsqueeze(0))

    per_record = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))
    total = np.zeros(model.layout.size, dtype=np.float64)
    loss_sum = 0.0
    model.eval()
    for start in range(0, keep.size, CHUNK):
        idx = torch.from_numpy(keep[start : start + CHUNK])
        dense = torch.from_numpy(data.dense)[idx]
        cats = torch.from_numpy(data.categorical)[idx]
        labels = torch.from_numpy(data.labels)[idx]
        grads = per_record(params, dense, cats, labels)
        flat = torch.cat([grads[name].reshape(idx.numel(), -1) for name in names], dim=1).to(torch.float64)
        norms = flat.norm(dim=1, keepdim=True)
        flat = flat * torch.clamp(clip / (norms + 1e-12), max=1.0)
        total += flat.sum(dim=0).numpy()
        with torch.no_grad():
            loss_sum += float(nn.functional.binary_cross_entropy_with_logits(
                model(dense, cats), labels, reduction="sum"))
    return PooledContribution(gradient_sum=total, sampled=int(keep.size), loss_sum=loss_sum)
