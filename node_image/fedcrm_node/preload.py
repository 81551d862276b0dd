"""Imported once by a local run's forkserver, before it forks the participants.

Importing torch, pandas and the node's modules costs each participant about two
seconds of CPU, and torch's first training step (operator dispatch, autograd
and Adam set-up) about one more: ten participants on two cores paid this at
once before round 1 could finish. Done here once, every forked participant
starts with it done. Only CPU work runs here and torch stays single-threaded
(no device or worker threads exist at fork time), which is what makes forking
afterwards safe.

A pod runs ``fedcrm-node`` directly and never imports this module.
"""

from __future__ import annotations

import numpy as np
import pandas  # noqa: F401  (the participant reads and maps its data with it)
import torch

import fedcrm.data.loaders  # noqa: F401
import fedcrm.models.scoring  # noqa: F401  (the held-out scorer forks from here too)
import fedcrm_node.participant  # noqa: F401
import fedcrm_node.secure_sums  # noqa: F401
from fedcrm.models.layout import ModelLayout
from fedcrm.models.mlp import TabularMLP
from fedcrm.training.local import evaluate, one_thread, train_epochs
from fedcrm.training.preprocessing import EncodedData

__all__: list[str] = []


def _warm_up() -> None:
    """One epoch on a few random rows through the same code a round runs."""
    one_thread()
    rng = np.random.default_rng(0)
    rows = 64
    layout = ModelLayout(dense_width=4, vocab_sizes=(3,), embedding_widths=(2,), hidden=(8,))
    data = EncodedData(dense=rng.standard_normal((rows, 4)).astype(np.float32),
                       categorical=rng.integers(0, 3, (rows, 1)).astype(np.int64),
                       labels=rng.integers(0, 2, rows).astype(np.float32))
    model = TabularMLP(layout)
    train_epochs(model, data, epochs=1, batch_size=16, learning_rate=1e-3, seed=0)
    evaluate(model, data)


_warm_up()
