"""Synthetic training rows from a small conditional tabular GAN, trained by one participant on its own rows.

``spec.augmentation.gan``: after the preprocessing arrives, each participant
trains a GAN once on its own *encoded* training rows (the very inputs the
model sees) and adds its rows to local training, e.g. to top up its minority
class. The synthetic rows stay in the participant's process: not in the
validation split, not in the statistics (summed before any encoding exists),
not in what is sent; the update is weighted by the real rows alone
(:func:`counted_as_real`).

The GAN (in the spirit of CTGAN, Xu et al. 2019, much smaller): a row is
encoded as the numeric features' standardised values, then a one-hot block
per two-valued input (every missing flag, every boolean value) and per
categorical feature (index 0, "missing or unseen", included). The generator
emits the numeric values linearly and each block through a Gumbel-softmax
(temperature 0.2) while training; generated rows take each block's argmax, and
a numeric or boolean value whose missing flag is set is zeroed, as
:func:`fedcrm.training.preprocessing.encode` does. With ``conditionalOnLabel``
both networks see the label (one-hot), so rows are drawn for a chosen class;
without it the label is one more generated block.

Differential privacy (``differentialPrivacy``): the discriminator, the only
network that reads records, is trained with DP-SGD (Opacus: Poisson batches,
per-record clipping, Gaussian noise calibrated to the GAN's own epsilon and
delta); the generator learns only through it, so the generator and its rows
are post-processing. This budget is the GAN's own: it is neither taken out of
nor counted in the federation's ``differentialPrivacy`` budget, which is why
the spec refuses the GAN with record-level modes ('sample', 'pooled'). Under
client-level DP everything a participant trains on, synthetic rows included,
is covered by the clipped and noised update. Without DP in the federation the
model trains on the real rows anyway, so the GAN's DP protects the synthetic
rows themselves, not the model.

Reproducibility: without DP, the same training seed and participant identity
give the same rows (the GAN runs under a forked, seeded torch RNG). With DP,
the sampling and noise come from ``os.urandom``, as in
:mod:`fedcrm.privacy.dpsgd`, and runs differ by design.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedcrm.spec.manifests import GanAugmentation
from fedcrm.training.local import TrainOutcome, derive_seed
from fedcrm.training.preprocessing import EncodedData, Preprocessing

__all__ = [
    "Augmentation", "GanPrivacyOutcome", "RowCodec", "TabularGan", "augment", "counted_as_real", "synthetic_counts",
    "with_synthetic",
]

#: A class with fewer real training rows gets no synthetic rows: a GAN cannot learn a class from a handful.
MIN_CLASS_ROWS = 5
#: Fewer real training rows than this and no GAN is trained at all.
MIN_TRAINING_ROWS = 20
#: Numeric values are z-scores clipped at this many standard deviations, as in the encoding.
_Z_CLIP = 6.0
_LATENT = 32
_HIDDEN = 64
_TAU = 0.2
_LEARNING_RATE = 1e-3
#: The GAN's batch: at least this many rows, or the federation's batch size if larger (GANs need batches).
_BATCH = 128


@dataclass(frozen=True)
class RowCodec:
    """Where each encoded input goes in the GAN's row vector, and back.

    ``continuous``: dense columns of numeric values; ``binary``: dense columns that take 0 or 1 (missing flags
    and boolean values), each a two-way one-hot block; ``vocab_sizes``: one block per categorical feature;
    ``missing_of``: (value column, its missing-flag column) pairs; ``label``: the label is a block too
    (unconditional GANs).
    """

    dense_width: int
    continuous: tuple[int, ...]
    binary: tuple[int, ...]
    vocab_sizes: tuple[int, ...]
    missing_of: tuple[tuple[int, int], ...]
    label: bool

    @classmethod
    def from_preprocessing(cls, prep: Preprocessing, *, label: bool = False) -> RowCodec:
        numeric = len(prep.numeric)
        features = numeric + len(prep.boolean)
        return cls(
            dense_width=prep.numeric_width,
            continuous=tuple(2 * k for k in range(numeric)),
            binary=tuple(sorted([2 * k + 1 for k in range(features)] + [2 * k for k in range(numeric, features)])),
            vocab_sizes=tuple(len(c.vocab) + 1 for c in prep.categorical),
            missing_of=tuple((2 * k, 2 * k + 1) for k in range(features)),
            label=label,
        )

    @property
    def blocks(self) -> tuple[int, ...]:
        """Widths of the one-hot blocks after the continuous values, in order."""
        return (2,) * len(self.binary) + self.vocab_sizes + ((2,) if self.label else ())

    @property
    def width(self) -> int:
        return len(self.continuous) + sum(self.blocks)

    def rows(self, data: EncodedData) -> np.ndarray:
        """Encoded rows as GAN vectors (float32)."""
        parts = [data.dense[:, list(self.continuous)].astype(np.float32)]
        parts += [np.eye(2, dtype=np.float32)[(data.dense[:, c] > 0.5).astype(np.int64)] for c in self.binary]
        parts += [np.eye(v, dtype=np.float32)[np.clip(data.categorical[:, j], 0, v - 1)]
                  for j, v in enumerate(self.vocab_sizes)]
        if self.label:
            parts.append(np.eye(2, dtype=np.float32)[data.labels.astype(np.int64)])
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(data), 0), np.float32)

    def decode(self, vectors: np.ndarray, labels: np.ndarray | None = None) -> EncodedData:
        """GAN vectors back to model inputs: each block's argmax, values under a missing flag zeroed."""
        n = len(vectors)
        dense = np.zeros((n, self.dense_width), dtype=np.float32)
        c = len(self.continuous)
        dense[:, list(self.continuous)] = np.clip(vectors[:, :c], -_Z_CLIP, _Z_CLIP)
        offset = c
        chosen: list[np.ndarray] = []
        for width in self.blocks:
            chosen.append(np.argmax(vectors[:, offset : offset + width], axis=1))
            offset += width
        for i, col in enumerate(self.binary):
            dense[:, col] = chosen[i]
        cats = np.zeros((n, len(self.vocab_sizes)), dtype=np.int64)
        for j in range(len(self.vocab_sizes)):
            cats[:, j] = chosen[len(self.binary) + j]
        for value, flag in self.missing_of:
            dense[dense[:, flag] > 0.5, value] = 0.0
        if self.label:
            labels = chosen[-1]
        assert labels is not None
        return EncodedData(dense=dense, categorical=cats, labels=np.asarray(labels, dtype=np.float32))


class _Generator(nn.Module):
    def __init__(self, codec: RowCodec, conditions: int) -> None:
        super().__init__()
        self.codec = codec
        self.body = nn.Sequential(
            nn.Linear(_LATENT + conditions, _HIDDEN), nn.LeakyReLU(0.2),
            nn.Linear(_HIDDEN, _HIDDEN), nn.LeakyReLU(0.2),
            nn.Linear(_HIDDEN, codec.width),
        )

    def forward(self, z: torch.Tensor, condition: torch.Tensor, *, hard: bool = False) -> torch.Tensor:
        raw = self.body(torch.cat([z, condition], dim=1))
        c, b = len(self.codec.continuous), 2 * len(self.codec.binary)
        logits = raw[:, c:]
        if not hard:  # Gumbel-softmax: Gumbel noise on every logit at once, then a softmax per block
            u = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
            logits = (logits - torch.log(-torch.log(u))) / _TAU
        pairs = logits[:, :b].reshape(len(raw), -1, 2)  # the two-valued blocks, all at once
        parts = [raw[:, :c], (F.one_hot(pairs.argmax(2), 2).float() if hard else pairs.softmax(2)).reshape(len(raw), b)]
        offset = b
        for width in self.codec.blocks[len(self.codec.binary):]:
            block = logits[:, offset : offset + width]
            parts.append(F.one_hot(block.argmax(1), width).float() if hard else block.softmax(1))
            offset += width
        return torch.cat(parts, dim=1)


class _Discriminator(nn.Module):
    def __init__(self, width: int, conditions: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(width + conditions, _HIDDEN), nn.LeakyReLU(0.2),
            nn.Linear(_HIDDEN, _HIDDEN), nn.LeakyReLU(0.2),
            nn.Linear(_HIDDEN, 1),
        )

    def forward(self, rows: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([rows, condition], dim=1)).squeeze(1)


@dataclass(frozen=True)
class GanPrivacyOutcome:
    """What the GAN's DP-SGD spent (Opacus's RDP accountant), and with what mechanism."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int


class TabularGan:
    """A conditional tabular GAN over one participant's encoded rows; see the module docstring."""

    def __init__(self, codec: RowCodec, *, conditional: bool, seed: int) -> None:
        self.codec = codec
        self.conditional = conditional
        self.seed = seed
        conditions = 2 if conditional else 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.generator = _Generator(codec, conditions)
            self.discriminator = _Discriminator(codec.width, conditions)
        self.privacy: GanPrivacyOutcome | None = None

    def _condition(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.conditional:
            return labels.new_zeros((len(labels), 0), dtype=torch.float32)
        return F.one_hot(labels.long(), 2).float()

    def fit(self, data: EncodedData, *, epochs: int, batch_size: int, dp: object | None = None) -> TabularGan:
        """Train on ``data``; ``dp`` (a :class:`fedcrm.spec.manifests.GanPrivacy`) trains the discriminator with
        DP-SGD to its budget."""
        rows = torch.from_numpy(self.codec.rows(data))
        labels = torch.from_numpy(data.labels.astype(np.int64))
        batch_size = max(1, min(max(batch_size, _BATCH), len(data)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            if dp is None:
                self._fit_plain(rows, labels, epochs=epochs, batch_size=batch_size)
            else:
                self._fit_private(rows, labels, epochs=epochs, batch_size=batch_size, dp=dp)
        return self

    def _generator_step(self, optimizer: torch.optim.Optimizer, condition: torch.Tensor, discriminator: nn.Module) -> None:
        z = torch.randn(len(condition), _LATENT)
        optimizer.zero_grad(set_to_none=True)
        logits = discriminator(self.generator(z, condition), condition)
        F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
        optimizer.step()

    def _fit_plain(self, rows: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int) -> None:
        g_opt = torch.optim.Adam(self.generator.parameters(), lr=_LEARNING_RATE, betas=(0.5, 0.9))
        d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=_LEARNING_RATE, betas=(0.5, 0.9))
        n = len(rows)
        for _ in range(epochs):
            order = torch.randperm(n)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                real, condition = rows[idx], self._condition(labels[idx])
                fake = self.generator(torch.randn(len(idx), _LATENT), condition).detach()
                d_opt.zero_grad(set_to_none=True)
                real_logits = self.discriminator(real, condition)
                fake_logits = self.discriminator(fake, condition)
                loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                        + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
                loss.backward()
                d_opt.step()
                self._generator_step(g_opt, condition, self.discriminator)

    def _fit_private(self, rows: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int,
                     dp: object) -> None:
        """DP-SGD on the discriminator: each Poisson batch of real rows with a fixed ``batch_size`` generated rows
        (their labels drawn uniformly, never copied from the batch), one clipped gradient per row, noise on the sum.
        Adding or removing one record changes one real row's clipped gradient and nothing else: the generated rows'
        number and conditions do not depend on the batch, so the sensitivity is the clipping norm the noise is
        calibrated for. The generator step reads the discriminator with its parameters frozen and its hooks off
        (no per-sample gradients, no record touched)."""
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        from fedcrm.privacy.accounting import calibrate_noise_multiplier

        secure = lambda: torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "big") >> 1)  # noqa: E731
        n = len(rows)
        steps_per_epoch = math.ceil(n / batch_size)
        q, steps = 1.0 / steps_per_epoch, epochs * steps_per_epoch
        sigma = calibrate_noise_multiplier(epsilon=dp.epsilon, delta=dp.delta, q=q, steps=steps)  # type: ignore[attr-defined]
        loader = DataLoader(TensorDataset(rows, labels), batch_size=batch_size, generator=secure())
        d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=_LEARNING_RATE, betas=(0.5, 0.9))
        g_opt = torch.optim.Adam(self.generator.parameters(), lr=_LEARNING_RATE, betas=(0.5, 0.9))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure_mode is off, as in fedcrm.privacy.dpsgd (its docstring says why)
            engine = PrivacyEngine(accountant="rdp")
            module, d_opt, loader = engine.make_private(
                module=self.discriminator, optimizer=d_opt, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=dp.clipping_norm, poisson_sampling=True, noise_generator=secure(),  # type: ignore[attr-defined]
            )
        module.train()
        taken = 0
        for _ in range(epochs):
            for real, label in loader:
                fake_labels = torch.randint(0, 2, (batch_size,))
                condition_fake = self._condition(fake_labels)
                fake = self.generator(torch.randn(len(fake_labels), _LATENT), condition_fake).detach()
                both = torch.cat([real, fake])
                targets = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))])
                d_opt.zero_grad(set_to_none=True)
                logits = module(both, torch.cat([self._condition(label), condition_fake]))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "full backward hook ... no inputs require gradients": none need
                    F.binary_cross_entropy_with_logits(logits, targets).backward()
                d_opt.step()
                taken += 1
                module.disable_hooks()  # the generator step reads no record: no per-sample gradients
                for p in module.parameters():
                    p.requires_grad_(False)
                self._generator_step(g_opt, condition_fake, module)
                for p in module.parameters():
                    p.requires_grad_(True)
                module.enable_hooks()
        self.privacy = GanPrivacyOutcome(
            epsilon=float(engine.accountant.get_epsilon(delta=dp.delta)), delta=dp.delta,  # type: ignore[attr-defined]
            noise_multiplier=sigma, sample_rate=q, steps=taken)

    @torch.no_grad()
    def sample(self, count: int, label: int | None = None, *, seed: int) -> EncodedData:
        """``count`` generated rows, of class ``label`` (conditional GANs) or with generated labels."""
        if self.conditional and label is None:
            raise ValueError("a conditional GAN draws rows for a class: pass label=0 or 1")
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(count, _LATENT, generator=generator)
        labels = torch.full((count,), label if label is not None else 0, dtype=torch.int64)
        self.generator.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vectors = self.generator(z, self._condition(labels), hard=True).numpy()
        self.generator.train()
        return self.codec.decode(vectors, None if self.codec.label else labels.numpy())


def synthetic_counts(labels: np.ndarray, ratio: float) -> tuple[tuple[int, int], list[int]]:
    """Rows to draw per class for ``ratio`` x the real rows: the minority class topped up towards the majority's
    count first, the rest split evenly. A class with fewer than :data:`MIN_CLASS_ROWS` real rows gets none (its
    share is dropped, not moved). Returns (per class, the classes skipped)."""
    real = [int(np.count_nonzero(labels == k)) for k in (0, 1)]
    total = int(round(ratio * len(labels)))
    minority = 0 if real[0] < real[1] else 1
    add = [0, 0]
    top = min(total, abs(real[0] - real[1]))
    add[minority] += top
    rest = total - top
    add[minority] += rest - rest // 2
    add[1 - minority] += rest // 2
    skipped = [k for k in (0, 1) if real[k] < MIN_CLASS_ROWS and add[k] > 0]
    for k in skipped:
        add[k] = 0
    return (add[0], add[1]), skipped


@dataclass(frozen=True)
class Augmentation:
    """One participant's synthetic rows and how they came about (all of it stays in the participant)."""

    synthetic: EncodedData
    per_class: tuple[int, int]
    real_rows: int
    skipped_classes: tuple[int, ...]
    seconds: float
    privacy: GanPrivacyOutcome | None
    reason: str = ""  # why nothing was added, when nothing was

    def summary(self) -> str:
        """One line for the participant's log."""
        if self.reason:
            return f"augmentation: no synthetic rows ({self.reason})"
        text = (f"augmentation: GAN trained on {self.real_rows} real training rows in {self.seconds:.1f}s; added "
                f"{len(self.synthetic)} synthetic rows (class 0: {self.per_class[0]}, class 1: {self.per_class[1]}) "
                "to local training only; they are never sent, and updates are weighted by the real rows")
        if self.skipped_classes:
            text += (f"; none for class {', '.join(map(str, self.skipped_classes))} (fewer than {MIN_CLASS_ROWS} "
                     "real rows)")
        return text

    def privacy_summary(self, federation_mode: str) -> str:
        """The accounting line for the participant's log: what the GAN spent, and what covers the model."""
        if self.privacy is None:
            gan = "the GAN is not differentially private"
        else:
            p = self.privacy
            gan = (f"the GAN's discriminator spent epsilon {p.epsilon:.4f} (delta {p.delta:g}; noise multiplier "
                   f"{p.noise_multiplier:.4f}, Poisson rate {p.sample_rate:.4f}, {p.steps} steps, Opacus RDP "
                   "accountant), once, on top of and not counted in the federation's budget")
        if federation_mode == "client":
            cover = "client-level DP covers the update, synthetic rows included"
        else:
            cover = "the model trains on the real rows without DP: no record-level guarantee for it"
        return f"augmentation privacy: {gan}; {cover}"


def augment(train: EncodedData, prep: Preprocessing, gan: GanAugmentation, *, batch_size: int, seed: int,
            identity: str) -> Augmentation:
    """Train the GAN ``gan`` describes on one participant's encoded training rows and draw its synthetic rows.

    Seeded from the federation's training ``seed`` and the participant's ``identity``.
    """
    started = time.perf_counter()
    empty = EncodedData(dense=train.dense[:0], categorical=train.categorical[:0], labels=train.labels[:0])
    if len(train) < MIN_TRAINING_ROWS:
        return Augmentation(empty, (0, 0), len(train), (), 0.0, None,
                            reason=f"{len(train)} training rows, fewer than the {MIN_TRAINING_ROWS} a GAN needs")
    codec = RowCodec.from_preprocessing(prep, label=not gan.conditional_on_label)
    base = derive_seed(seed, identity, "augmentation.gan")
    model = TabularGan(codec, conditional=gan.conditional_on_label, seed=base)
    model.fit(train, epochs=gan.epochs, batch_size=batch_size, dp=gan.differential_privacy)
    if gan.conditional_on_label:
        per_class, skipped = synthetic_counts(train.labels, gan.synthetic_ratio)
        parts = [model.sample(count, label, seed=base + 2 + label) for label, count in enumerate(per_class) if count]
        synthetic = concatenate([empty, *parts])
    else:
        synthetic = model.sample(int(round(gan.synthetic_ratio * len(train))), seed=base + 2)
        per_class = (int(np.count_nonzero(synthetic.labels == 0)), int(np.count_nonzero(synthetic.labels == 1)))
        skipped = []
    return Augmentation(synthetic, per_class, len(train), tuple(skipped), time.perf_counter() - started,
                        model.privacy)


def concatenate(parts: Sequence[EncodedData]) -> EncodedData:
    return EncodedData(dense=np.concatenate([p.dense for p in parts]),
                       categorical=np.concatenate([p.categorical for p in parts]),
                       labels=np.concatenate([p.labels for p in parts]))


def with_synthetic(train: EncodedData, augmentation: Augmentation | None) -> EncodedData:
    """The rows local training uses: the real ones, then the synthetic ones (if any)."""
    if augmentation is None or not len(augmentation.synthetic):
        return train
    return concatenate([train, augmentation.synthetic])


def counted_as_real(outcome: TrainOutcome, real_rows: int) -> TrainOutcome:
    """A training outcome over real + synthetic rows, reported as for the real rows: the example count (FedAvg's
    weight, sent) is the real rows', the loss sum scaled to them, so nothing sent counts a synthetic row."""
    if outcome.examples == real_rows or outcome.examples == 0:
        return outcome
    return TrainOutcome(examples=real_rows, loss_sum=outcome.loss_sum * real_rows / outcome.examples,
                        steps=outcome.steps)
