"""The tabular MLP in torch: embeddings for categoricals, a dense block, ReLU layers, one logit."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedcrm.models.layout import ModelLayout

__all__ = ["TabularMLP", "get_flat", "set_flat"]


class TabularMLP(nn.Module):
    def __init__(self, layout: ModelLayout) -> None:
        super().__init__()
        self.layout = layout
        self.embeddings = nn.ModuleList(nn.Embedding(v, w) for v, w in zip(layout.vocab_sizes, layout.embedding_widths))
        widths = (layout.input_width, *layout.hidden, 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, dense: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        parts = [dense] + [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        x = torch.cat(parts, dim=1)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x).squeeze(1)


def set_flat(model: TabularMLP, flat: np.ndarray) -> None:
    """Load a flat wire-order vector into the module."""
    named = model.layout.split(np.asarray(flat, dtype=np.float32))
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in named.items()}
    model.load_state_dict(state, strict=True)


def get_flat(model: TabularMLP) -> np.ndarray:
    """The module's parameters as one flat float32 vector in wire order."""
    state = model.state_dict()
    return np.concatenate([state[name].detach().cpu().numpy().ravel() for name, _ in model.layout.shapes()]).astype(np.float32)
