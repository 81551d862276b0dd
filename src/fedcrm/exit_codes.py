"""How a participant process ends: the contract between ``fedcrm-node``, ``fedcrm run`` and the operator.

The operator fails a training Job at once on the codes a retry cannot fix
(``CONFIG``, ``TERMS_REFUSED``) instead of crash-looping, and names the reason
on the Participant; ``fedcrm run`` does not count ``STOPPED`` as a crash.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["NodeExitCode"]


class NodeExitCode(IntEnum):
    SUCCEEDED = 0
    #: this participant's manifest, data or certificate is wrong; the message says what to fix
    CONFIG = 2
    #: the federation stopped without success (the aggregator said so)
    STOPPED = 3
    #: the aggregator could not be reached, went away, or broke the protocol
    UNREACHABLE = 4
    #: the aggregator asked for something this participant's own Federation manifest does not allow
    TERMS_REFUSED = 5
