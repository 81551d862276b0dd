"""The train/validation split every party computes the same way.

The split is seeded by the federation seed and the participant's identity, so
the federated run, a rerun, and ``fedcrm baseline`` all validate on exactly
the same rows.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

__all__ = ["split_seed", "train_validation_split"]


def split_seed(seed: int, identity: str) -> int:
    digest = hashlib.sha256(f"split\x1f{seed}\x1f{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def train_validation_split(frame: pd.DataFrame, *, fraction: float, seed: int, identity: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation); validation keeps at least one row when there are two or more."""
    n = len(frame)
    order = np.random.Generator(np.random.PCG64(split_seed(seed, identity))).permutation(n)
    n_val = int(round(n * fraction))
    if n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return frame.iloc[train_idx].reset_index(drop=True), frame.iloc[val_idx].reset_index(drop=True)
