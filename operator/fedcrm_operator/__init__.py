"""The fedcrm operator: turns Federation and Participant resources into running, isolated training.

Public surface: :mod:`fedcrm_operator.builders` (pure functions from specs to
Kubernetes objects) and the ``fedcrm-operator`` entry point. The handlers,
client and metrics are internal.
"""
