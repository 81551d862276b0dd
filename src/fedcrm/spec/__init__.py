"""Federation and Participant manifests: models, loading, consent checks.

Imports neither torch nor pandas, so the operator can use it with a small image.
"""

from fedcrm.spec.loading import (
    check_membership,
    dump_manifest,
    load_federation,
    load_participant,
    parse_manifest,
)
from fedcrm.spec.manifests import (
    API_VERSION,
    Feature,
    FeatureType,
    Federation,
    FederationSpec,
    Participant,
    ParticipantSpec,
)

__all__ = [
    "API_VERSION",
    "Feature",
    "FeatureType",
    "Federation",
    "FederationSpec",
    "Participant",
    "ParticipantSpec",
    "check_membership",
    "dump_manifest",
    "load_federation",
    "load_participant",
    "parse_manifest",
]
