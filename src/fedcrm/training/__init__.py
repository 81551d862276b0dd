"""Preprocessing, local training, federated averaging and metrics.

Submodules are imported directly (``fedcrm.training.local`` needs torch; the
others are numpy-only and used by the aggregator), so this package imports
nothing by itself.
"""
