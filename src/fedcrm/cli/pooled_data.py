"""Every participant's mapped rows in one process: for `fedcrm baseline` and `fedcrm audit` only.

Pooling is exactly what a federation avoids; these two commands do it where the
data may be read (synthetic data, or inside one enterprise). `fedcrm run` never
calls this: each participant loads its own rows in its own process.
"""

from __future__ import annotations

from typing import Any

from fedcrm.cli.launcher import LoadedFederation
from fedcrm.data.loaders import load_participant_data
from fedcrm.errors import DataError

__all__ = ["load_inputs_data"]


def load_inputs_data(inputs: LoadedFederation) -> dict[str, Any]:
    """Load and map every participant's data in this process; returns CanonicalData per identity."""
    problems, datasets = [], {}
    for participant, path in inputs.participants:
        try:
            datasets[participant.identity] = load_participant_data(
                participant, inputs.federation.spec.task, base_dir=path.resolve().parent,
                credentials=inputs.credentials.get(participant.identity))
        except DataError as err:
            problems.append(str(err))
    if problems:
        raise DataError("\n".join(problems))
    return datasets
