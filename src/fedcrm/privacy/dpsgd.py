"""DP-SGD inside one participant, with Opacus.

One :class:`PrivateTrainer` lives as long as the participant process: Opacus
wraps the model once (per-sample gradients by hooks, the fastest mode for
Linear and Embedding layers on CPU), its RDP accountant keeps counting
across rounds, and each round resets only Adam's moments, as non-private
rounds start a fresh optimiser. Batches are Poisson samples (rate
``1 / ceil(n / batch)``), the assumption the accountant's subsampling
amplification rests on.

Randomness: the sampling and noise generators are seeded from ``os.urandom``
so no one can predict which records a step used or the noise it drew.
Opacus's ``secure_mode`` (a CSPRNG for every draw, and its defence against
floating-point attacks, Mironov 2012) needs torchcsprng, which has no build
for this torch; the Gaussian noise here is torch's float32 sampler. This is
why sample-mode runs are not reproducible for a seed, by design.
"""

from __future__ import annotations

import os
import warnings

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcrm.models.mlp import TabularMLP
from fedcrm.privacy.plans import SamplePlan
from fedcrm.training.local import TrainOutcome
from fedcrm.training.preprocessing import EncodedData

__all__ = ["PrivateTrainer"]


def _secure_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)


class PrivateTrainer:
    def __init__(self, model: TabularMLP, data: EncodedData, plan: SamplePlan, *, batch_size: int,
                 learning_rate: float, clipping_norm: float, grad_sample_mode: str = "hooks") -> None:
        self.plan = plan
        self.examples = len(data)
        dataset = TensorDataset(torch.from_numpy(data.dense), torch.from_numpy(data.categorical),
                                torch.from_numpy(data.labels))
        loader = DataLoader(dataset, batch_size=batch_size, generator=_secure_generator())
        self.engine = PrivacyEngine(accountant="rdp")
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns that secure_mode is off; the module docstring says why
            self.module, self.optimizer, self.loader = self.engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.noise_multiplier,
                max_grad_norm=clipping_norm, poisson_sampling=True, noise_generator=_secure_generator(),
                grad_sample_mode=grad_sample_mode,
            )
        self.loss_fn = nn.BCEWithLogitsLoss(reduction="mean")

    def train_round(self, epochs: int) -> TrainOutcome:
        """``epochs`` passes of Poisson-sampled DP-SGD steps; the loss sum is over the last pass."""
        self.optimizer.original_optimizer.state.clear()
        self.module.train()
        steps, loss_sum = 0, 0.0
        for _ in range(epochs):
            loss_sum = 0.0
            for dense, cats, labels in self.loader:
                self.optimizer.zero_grad(set_to_none=True)
                logits = self.module(dense, cats)
                loss = self.loss_fn(logits, labels) if len(labels) else logits.sum() * 0.0
                loss.backward()
                self.optimizer.step()
                loss_sum += float(loss.detach()) * len(labels)
                steps += 1
        return TrainOutcome(examples=self.examples, loss_sum=loss_sum, steps=steps)

    def epsilon(self, delta: float) -> float:
        """Opacus's own RDP accounting of every step this participant has taken."""
        return float(self.engine.accountant.get_epsilon(delta=delta))
