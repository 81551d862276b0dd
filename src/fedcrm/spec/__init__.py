"""Federation and Participant manifests: models, loading, consent checks.

Imports neither torch nor pandas, so the operator can use it with a small image.
"""

from fedcrm.spec.loading import (
    ParticipantManifests,
    check_membership,
    dump_manifest,
    load_federation,
    load_participant,
    load_participant_manifests,
    parse_manifest,
    secret_values,
)
from fedcrm.spec.manifests import (
    API_VERSION,
    Feature,
    FeatureType,
    Federation,
    FederationSpec,
    Participant,
    ParticipantSpec,
    SalesforceSource,
    SecretRef,
    SqlSource,
)
from fedcrm.spec.secrets import Secret

__all__ = [
    "API_VERSION",
    "Feature",
    "FeatureType",
    "Federation",
    "FederationSpec",
    "Participant",
    "ParticipantManifests",
    "ParticipantSpec",
    "SalesforceSource",
    "Secret",
    "SecretRef",
    "SqlSource",
    "check_membership",
    "dump_manifest",
    "load_federation",
    "load_participant",
    "load_participant_manifests",
    "parse_manifest",
    "secret_values",
]
