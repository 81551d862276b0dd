"""The Federation and Participant resources (``fedcrm.io/v1alpha1``).

These models are the one interface: the YAML a tenant ``kubectl apply``s is
what ``fedcrm run`` reads. Field names are the Kubernetes camelCase names;
Python attributes are snake_case. Every model forbids unknown fields so a typo
is an error with its path, not a silently ignored setting.
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "API_VERSION",
    "Condition",
    "DataSource",
    "DifferentialPrivacy",
    "Feature",
    "FeatureType",
    "Federation",
    "FederationRef",
    "FederationSpec",
    "FederationStatus",
    "FileSource",
    "ModelSpec",
    "ObjectMeta",
    "Participant",
    "ParticipantSpec",
    "ParticipantsSpec",
    "Phase",
    "Privacy",
    "Resources",
    "SecureAggregation",
    "Task",
    "Training",
    "Transform",
    "ValueTransform",
]

API_VERSION = "fedcrm.io/v1alpha1"

# RFC 1123 label: what Kubernetes accepts for namespaces and most names.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Canonical field names become column names and metric labels.
_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


def _check_dns_label(value: str, what: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{what} {value!r} must be a DNS label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


class ObjectMeta(_Model):
    """The part of Kubernetes metadata a manifest author writes."""

    name: str
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_dns_label(v, "name")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return _check_dns_label(v, "namespace")


# --------------------------------------------------------------------------- Federation


class FeatureType(str, Enum):
    numeric = "numeric"
    categorical = "categorical"
    boolean = "boolean"


class Transform(str, Enum):
    """How a numeric feature is reshaped before standardisation.

    ``log1p`` suits heavy-tailed counts and amounts (revenue, company size),
    whose raw z-scores would be dominated by a few huge accounts.
    """

    none = "none"
    log1p = "log1p"


class Feature(_Model):
    name: Annotated[str, Field(description="Canonical field name (lowercase, digits, '_').")]
    type: FeatureType
    categories: Annotated[
        list[str] | None,
        Field(
            description=(
                "Allowed values of a categorical feature. Required for categorical features: "
                "participants' category counts are summed over this fixed list, so no "
                "participant reveals a category the others do not share."
            )
        ),
    ] = None
    transform: Transform = Transform.none
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _FIELD_NAME.match(v):
            raise ValueError(f"feature name {v!r} must match {_FIELD_NAME.pattern}")
        return v

    @model_validator(mode="after")
    def _categories_fit_type(self) -> Feature:
        if self.type is FeatureType.categorical:
            if not self.categories:
                raise ValueError(
                    f"categorical feature {self.name!r} needs 'categories', the list of allowed values"
                )
            if len(set(self.categories)) != len(self.categories):
                raise ValueError(f"feature {self.name!r} lists a category twice")
        elif self.categories is not None:
            raise ValueError(f"feature {self.name!r} is {self.type.value}; only categorical features take 'categories'")
        if self.transform is not Transform.none and self.type is not FeatureType.numeric:
            raise ValueError(f"feature {self.name!r}: 'transform' applies to numeric features only")
        return self


class Task(_Model):
    """What to predict: a binary target and the canonical feature schema."""

    target: Annotated[str, Field(description="Canonical name of the boolean label, e.g. 'converted'.")]
    features: list[Feature]
    description: str = ""

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if not _FIELD_NAME.match(v):
            raise ValueError(f"target name {v!r} must match {_FIELD_NAME.pattern}")
        return v

    @model_validator(mode="after")
    def _unique(self) -> Task:
        names = [f.name for f in self.features]
        if not names:
            raise ValueError("task.features must list at least one feature")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names must be unique; repeated: {', '.join(dupes)}")
        if self.target in names:
            raise ValueError(f"the target {self.target!r} cannot also be a feature")
        return self

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def field_names(self) -> list[str]:
        """Every canonical column: the features, then the target."""
        return [f.name for f in self.features] + [self.target]


class ModelSpec(_Model):
    type: Literal["mlp"] = "mlp"
    hidden: Annotated[list[Annotated[int, Field(gt=0, le=4096)]], Field(min_length=1, max_length=8)] = [64, 32]
    embedding_dim: Annotated[
        int | None,
        Field(gt=0, le=64, description="Width of each categorical embedding; derived from the vocabulary size when unset."),
    ] = None


class Training(_Model):
    rounds: Annotated[int, Field(gt=0, le=10_000)] = 20
    local_epochs: Annotated[int, Field(gt=0, le=1000)] = 1
    batch_size: Annotated[int, Field(gt=0, le=65_536)] = 64
    learning_rate: Annotated[float, Field(gt=0, le=10)] = 0.005
    algorithm: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: Annotated[
        float, Field(ge=0, description="FedProx proximal term weight; used when algorithm is fedprox.")
    ] = 0.0
    min_participants: Annotated[int, Field(gt=0)] = 2
    round_timeout_seconds: Annotated[
        float,
        Field(
            gt=0,
            description=(
                "How long a round waits for results. Participants that have not answered by then "
                "are dropped from the round; the round goes on while minParticipants remain."
            ),
        ),
    ] = 300.0
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    seed: Annotated[int, Field(ge=0, description="Seeds initialisation, splits and shuffling; same seed, same model.")] = 0

    @model_validator(mode="after")
    def _prox(self) -> Training:
        if self.algorithm == "fedprox" and self.proximal_mu == 0:
            raise ValueError("algorithm fedprox needs proximalMu > 0 (with 0 it is plain fedavg)")
        return self


class DifferentialPrivacy(_Model):
    """The privacy budget as a contract: declared here, accounted per round, never exceeded.

    ``sample``: DP-SGD inside each participant (per-record protection over all
    rounds x local epochs it runs). ``client``: each participant clips its
    update to ``clippingNorm`` and adds its share of Gaussian noise before
    masking (per-participant protection). Training stops before a round that
    would spend more than (``epsilon``, ``delta``).
    """

    mode: Annotated[
        Literal["none", "sample", "client"],
        Field(description="'none', 'sample' (DP-SGD per record) or 'client' (DP-FedAvg per participant)."),
    ] = "none"
    epsilon: Annotated[float | None, Field(description="Total privacy budget over the whole run.")] = None
    delta: Annotated[
        float | None, Field(description="Failure probability of the guarantee; well below 1/(number of records).")
    ] = None
    clipping_norm: Annotated[
        float | None,
        Field(description="L2 bound on each record's gradient (sample) or each participant's update (client)."),
    ] = None
    noise_multiplier: Annotated[
        float | None,
        Field(description="Noise standard deviation over the clipping norm; derived from the budget and the planned "
                          "rounds when unset."),
    ] = None

    @field_validator("epsilon")
    @classmethod
    def _epsilon(cls, v: float | None) -> float | None:
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"epsilon must be a positive number (got {v}); smaller is more private, e.g. 1.0")
        return v

    @field_validator("delta")
    @classmethod
    def _delta(cls, v: float | None) -> float | None:
        if v is not None and not (0 < v < 1):
            raise ValueError(f"delta must be between 0 and 1, exclusive (got {v}); use e.g. 1e-5, "
                             "well below 1/(number of records)")
        return v

    @field_validator("clipping_norm")
    @classmethod
    def _clip(cls, v: float | None) -> float | None:
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"clippingNorm must be a positive number (got {v}), e.g. 1.0")
        return v

    @field_validator("noise_multiplier")
    @classmethod
    def _sigma(cls, v: float | None) -> float | None:
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"noiseMultiplier must be a positive number (got {v}); leave it out to derive it "
                             "from the budget")
        return v

    @model_validator(mode="after")
    def _complete(self) -> DifferentialPrivacy:
        if self.mode == "none":
            given = [n for n, v in (("epsilon", self.epsilon), ("delta", self.delta),
                                    ("clippingNorm", self.clipping_norm), ("noiseMultiplier", self.noise_multiplier))
                     if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply with mode 'sample' or 'client'; set the mode or "
                                 "remove them")
            return self
        missing = [n for n, v in (("epsilon", self.epsilon), ("delta", self.delta)) if v is None]
        if missing:
            raise ValueError(f"mode {self.mode!r} needs {' and '.join(missing)}: the budget it must not exceed")
        return self

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def clip(self) -> float:
        """The clipping norm, 1.0 when unset."""
        return 1.0 if self.clipping_norm is None else self.clipping_norm


class SecureAggregation(_Model):
    """Bonawitz-style secure aggregation with SecAgg+ neighbourhoods.

    The aggregator learns only the sum of the participants' (weighted) updates and
    evaluation counts, never one participant's. Federated preprocessing
    statistics are summed in the clear.
    """

    enabled: Annotated[bool, Field(description="Mask every update so the aggregator sees only the sum.")] = False
    threshold: Annotated[
        float,
        Field(
            gt=0,
            le=1,
            description=(
                "Fraction of each neighbourhood (the participant included) whose shares are needed to unmask. "
                "Keep it above 0.5 (a strict majority) so an aggregator that lies about who dropped out cannot "
                "collect both kinds of share for one participant; higher tolerates fewer dropouts."
            ),
        ),
    ] = 0.6
    neighbours: Annotated[
        Literal["complete", "logarithmic"] | Annotated[int, Field(ge=1)],
        Field(
            description=(
                "Who shares masks with whom: 'complete' (classic SecAgg, cost grows with n^2), 'logarithmic' "
                "(SecAgg+, k = O(log n) neighbours) or a number of neighbours."
            )
        ),
    ] = "logarithmic"
    bits: Annotated[
        int, Field(ge=16, le=62, description="Arithmetic modulo 2^bits; 32 keeps uploads the size of float32 weights.")
    ] = 32
    clip: Annotated[
        float,
        Field(
            gt=0,
            description=(
                "Bound on each element of a participant's model update per round; larger values are clipped. "
                "It fixes the quantization range: smaller is finer."
            ),
        ),
    ] = 1.0


class Privacy(_Model):
    differential_privacy: DifferentialPrivacy = DifferentialPrivacy()
    secure_aggregation: SecureAggregation = SecureAggregation()


class ParticipantsSpec(_Model):
    namespaces: Annotated[
        list[str],
        Field(description="Tenant namespaces allowed to join. A Participant elsewhere is refused."),
    ] = Field(default_factory=list)

    @field_validator("namespaces")
    @classmethod
    def _ns(cls, v: list[str]) -> list[str]:
        for ns in v:
            _check_dns_label(ns, "namespace")
        return v


class Resources(_Model):
    """What each training pod requests in a cluster; the local runner does not use it."""

    cpu: str = "1"
    memory: str = "2Gi"
    gpu: Annotated[int, Field(ge=0, le=16)] = 0


class FederationSpec(_Model):
    task: Task
    model: ModelSpec = ModelSpec()
    training: Training = Training()
    privacy: Privacy = Privacy()
    participants: ParticipantsSpec = ParticipantsSpec()
    resources: Resources = Resources()


class Phase(str, Enum):
    pending = "Pending"
    enrolling = "Enrolling"
    training = "Training"
    succeeded = "Succeeded"
    failed = "Failed"


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


class FederationStatus(_Model):
    phase: Phase = Phase.pending
    round: int = 0
    rounds: int = 0
    enrolled_participants: int = 0
    active_participants: int = 0
    epsilon_spent: float | None = None
    last_metrics: dict[str, float] = Field(default_factory=dict)
    conditions: list[Condition] = Field(default_factory=list)
    model_digest: str | None = None


class Federation(_Model):
    api_version: Literal["fedcrm.io/v1alpha1"] = API_VERSION
    kind: Literal["Federation"] = "Federation"
    metadata: ObjectMeta
    spec: FederationSpec
    status: FederationStatus | None = None

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace}/{self.metadata.name}"

    @model_validator(mode="after")
    def _min_participants(self) -> Federation:
        allowed = self.spec.participants.namespaces
        if allowed and self.spec.training.min_participants > len(allowed):
            raise ValueError(
                f"spec.training.minParticipants is {self.spec.training.min_participants} but "
                f"spec.participants.namespaces allows only {len(allowed)}"
            )
        dp = self.spec.privacy.differential_privacy
        if dp.mode == "sample" and self.spec.training.algorithm == "fedprox":
            raise ValueError("spec.privacy.differentialPrivacy: mode 'sample' clips per-record gradients and cannot "
                             "account FedProx's proximal term; use algorithm fedavg or mode 'client'")
        if dp.mode == "client" and dp.noise_multiplier is not None:
            from fedcrm.privacy.accounting import epsilon_for

            one = epsilon_for(q=1.0, noise_multiplier=dp.noise_multiplier, steps=1, delta=dp.delta or 0.5)
            if one > (dp.epsilon or 0):
                raise ValueError(
                    f"spec.privacy.differentialPrivacy: epsilon {dp.epsilon:g} cannot fund even one round at "
                    f"noiseMultiplier {dp.noise_multiplier:g} (one round spends {one:.3f}); raise epsilon or "
                    "noiseMultiplier, or leave noiseMultiplier out to derive it"
                )
        return self


# --------------------------------------------------------------------------- Participant


class FederationRef(_Model):
    name: str
    namespace: str = "default"


class FileSource(_Model):
    path: Annotated[
        str, Field(description="CSV or Parquet file; a relative path resolves against the manifest's folder.")
    ]
    format: Literal["csv", "parquet"] | None = Field(
        default=None, description="Read as this format; inferred from the extension when unset."
    )


class ValueTransform(_Model):
    """Converts a local numeric column to canonical units: ``canonical = local * scale + offset``."""

    scale: float = 1.0
    offset: float = 0.0


class DataSource(_Model):
    file: FileSource
    mapping: Annotated[
        dict[str, str],
        Field(
            description=(
                "Canonical field -> local column. A canonical feature left out is treated as missing "
                "at this participant; the target must be mapped."
            )
        ),
    ] = Field(default_factory=dict)
    values: Annotated[
        dict[str, dict[str, str | bool | int | float]],
        Field(description="Per canonical field, local value -> canonical value (category spellings, labels)."),
    ] = Field(default_factory=dict)
    transforms: Annotated[
        dict[str, ValueTransform],
        Field(description="Per canonical numeric field, the unit conversion from the local column."),
    ] = Field(default_factory=dict)


class ParticipantSpec(_Model):
    federation_ref: FederationRef
    data: DataSource


class Participant(_Model):
    api_version: Literal["fedcrm.io/v1alpha1"] = API_VERSION
    kind: Literal["Participant"] = "Participant"
    metadata: ObjectMeta
    spec: ParticipantSpec

    @property
    def identity(self) -> str:
        """The identity carried in this participant's client certificate."""
        return f"{self.metadata.namespace}/{self.metadata.name}"
