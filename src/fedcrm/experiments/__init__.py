"""Experiments: a grid of settings x seeds over ``fedcrm run`` / ``baseline`` / ``audit``, with its tables and plots.

``fedcrm experiment`` is the command; :func:`load_experiment` reads and checks
the file, :func:`run_experiment` runs what is not finished yet and writes
results.csv, results.md and the PNGs. See docs/experiments.md.
"""

from __future__ import annotations

from fedcrm.experiments.configs import Experiment, deep_merge, load_experiment
from fedcrm.experiments.running import run_experiment

__all__ = ["Experiment", "deep_merge", "load_experiment", "run_experiment"]
