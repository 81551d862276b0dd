"""Errors that reach a person.

Every failure a user can fix is raised as a :class:`FedcrmError` whose message
says what is wrong and what to do; the CLI, the node and the aggregator print
that message (never a traceback) and exit non-zero.
"""

from __future__ import annotations

__all__ = ["FedcrmError", "ManifestError", "DataError", "FederationFailed"]


class FedcrmError(Exception):
    """A problem the user can act on; ``str(err)`` is the whole message."""


class ManifestError(FedcrmError):
    """A Federation or Participant manifest is unreadable or invalid."""


class DataError(FedcrmError):
    """A participant's data cannot be read or does not fit the canonical schema."""


class FederationFailed(FedcrmError):
    """A federation stopped before finishing its rounds (too few participants, timeouts)."""


class RoundAbandoned(FedcrmError):
    """One round's secure sum was given up before anything was released (too few left at a stage, a corrupt
    share); the aggregator runs the round again, a bounded number of times, instead of failing the federation."""
