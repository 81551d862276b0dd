"""The tabular MLP's parameters as plain arrays.

The aggregator never imports torch, yet it must create the initial global
model and average updates. So the parameter list (names, shapes, order) and
the initialisation live here in numpy; :mod:`fedcrm.models.mlp` builds a torch
module whose ``state_dict`` has exactly these names and shapes. On the wire a
model is one flat float32 vector in this order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedcrm.spec.manifests import FederationSpec, ModelSpec
from fedcrm.training.preprocessing import Preprocessing

__all__ = ["ModelLayout", "embedding_width"]


def embedding_width(vocab_size: int, requested: int | None) -> int:
    """Embedding width for a vocabulary (plus the missing slot): small vocabularies get small vectors."""
    if requested is not None:
        return requested
    return max(2, min(16, math.ceil(1.6 * (vocab_size + 1) ** 0.56)))


@dataclass(frozen=True)
class ModelLayout:
    """Names and shapes of every parameter, in wire order."""

    dense_width: int
    vocab_sizes: tuple[int, ...]  # per categorical feature, including the missing slot
    embedding_widths: tuple[int, ...]
    hidden: tuple[int, ...]

    @classmethod
    def build(cls, spec: ModelSpec, prep: Preprocessing) -> ModelLayout:
        vocab = tuple(len(c.vocab) + 1 for c in prep.categorical)
        return cls(
            dense_width=prep.numeric_width,
            vocab_sizes=vocab,
            embedding_widths=tuple(embedding_width(v - 1, spec.embedding_dim) for v in vocab),
            hidden=tuple(spec.hidden),
        )

    @classmethod
    def largest(cls, spec: FederationSpec) -> ModelLayout:
        """The layout if every allowed category of every feature turns up: an upper bound on the model's size,
        known from the Federation alone, before any participant has sent statistics."""
        from fedcrm.training.preprocessing import StatisticsLayout

        stats = StatisticsLayout(spec.task)
        return cls.build(spec.model, stats.preprocessing(np.ones(stats.size)))

    @property
    def input_width(self) -> int:
        return self.dense_width + sum(self.embedding_widths)

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        out: list[tuple[str, tuple[int, ...]]] = []
        for i, (v, w) in enumerate(zip(self.vocab_sizes, self.embedding_widths)):
            out.append((f"embeddings.{i}.weight", (v, w)))
        width = self.input_width
        for i, h in enumerate((*self.hidden, 1)):
            out.append((f"layers.{i}.weight", (h, width)))
            out.append((f"layers.{i}.bias", (h,)))
            width = h
        return out

    @property
    def size(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes())

    def initial(self, seed: int) -> np.ndarray:
        """Flat float32 initial parameters; deterministic for ``seed``.

        Linear layers follow torch's default (uniform in +-1/sqrt(fan_in)); embeddings
        are N(0, 1) as in ``torch.nn.Embedding``.
        """
        rng = np.random.Generator(np.random.PCG64(seed))
        parts = []
        for name, shape in self.shapes():
            if name.startswith("embeddings."):
                parts.append(rng.standard_normal(shape))
            else:
                fan_in = self.input_width if name.startswith("layers.0.") else None
                if fan_in is None:
                    index = int(name.split(".")[1])
                    fan_in = self.hidden[index - 1]
                bound = 1.0 / math.sqrt(fan_in)
                parts.append(rng.uniform(-bound, bound, size=shape))
        return np.concatenate([p.ravel() for p in parts]).astype(np.float32)

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The flat vector as named arrays (views, no copy)."""
        if flat.shape != (self.size,):
            raise ValueError(f"model vector has {flat.shape[0] if flat.ndim else 0} values, this layout needs {self.size}")
        out, offset = {}, 0
        for name, shape in self.shapes():
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].reshape(shape)
            offset += n
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "dense_width": self.dense_width,
            "vocab_sizes": list(self.vocab_sizes),
            "embedding_widths": list(self.embedding_widths),
            "hidden": list(self.hidden),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> ModelLayout:
        return cls(
            dense_width=int(raw["dense_width"]),  # type: ignore[arg-type]
            vocab_sizes=tuple(raw["vocab_sizes"]),  # type: ignore[arg-type]
            embedding_widths=tuple(raw["embedding_widths"]),  # type: ignore[arg-type]
            hidden=tuple(raw["hidden"]),  # type: ignore[arg-type]
        )
