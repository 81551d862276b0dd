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
    "ParticipantPhase",
    "ParticipantStatus",
    "Phase",
    "SalesforceSource",
    "SecretRef",
    "SqlSource",
    "Privacy",
    "PvcSource",
    "ResourceOverrides",
    "Resources",
    "SecureAggregation",
    "Task",
    "Toleration",
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

    model_config = ConfigDict(extra="ignore")  # uid, resourceVersion, managedFields... come back from the API server

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
    type: Annotated[FeatureType, Field(description="numeric, categorical or boolean.")]
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
    transform: Annotated[
        Transform, Field(description="Reshaping of a numeric feature before standardisation: none or log1p.")
    ] = Transform.none
    bound: Annotated[
        float,
        Field(
            gt=0,
            le=1e12,
            description=(
                "Largest magnitude of a numeric feature's value after its transform, for the preprocessing "
                "statistics under secure aggregation or differential privacy: each participant clips its values to "
                "[-bound, bound] before summing them (and logs how many it clipped), so that the masked sums fit "
                "the modulus and one record's effect is bounded. With differential privacy the statistics' noise "
                "grows with it (the noise on the feature's mean is about proportional to bound / rows): set it "
                "close to the values' real range. Numeric features only; unused with neither."
            ),
        ),
    ] = 1e6
    description: Annotated[str, Field(description="What the field means, for people reading the federation.")] = ""

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
    features: Annotated[list[Feature], Field(description="The canonical feature schema every participant maps to.")]
    description: Annotated[str, Field(description="What the model predicts, in words.")] = ""

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
    """The architecture every participant trains."""

    type: Annotated[Literal["mlp"], Field(description="Model family; a tabular multilayer perceptron.")] = "mlp"
    hidden: Annotated[
        list[Annotated[int, Field(gt=0, le=4096)]],
        Field(min_length=1, max_length=8, description="Widths of the hidden layers."),
    ] = [64, 32]
    embedding_dim: Annotated[
        int | None,
        Field(gt=0, le=64, description="Width of each categorical embedding; derived from the vocabulary size when unset."),
    ] = None


class ServerOptimizer(_Model):
    """The step the aggregator takes with each round's aggregate (Reddi et al. 2021, "Adaptive Federated
    Optimization"). ``none`` adds the mean update as it is (FedAvg); ``momentum`` is FedAvgM; ``adam`` is FedAdam,
    which keeps a noisy aggregate (differential privacy) from setting the step size."""

    name: Annotated[
        Literal["none", "momentum", "adam"],
        Field(description="'none' (FedAvg: add the mean update), 'momentum' (FedAvgM) or 'adam' (FedAdam)."),
    ] = "none"
    learning_rate: Annotated[
        float, Field(gt=0, le=100, description="Server step size; 1.0 with 'none' is plain FedAvg.")
    ] = 1.0
    momentum: Annotated[
        float, Field(ge=0, lt=1, description="Momentum ('momentum') or first-moment decay ('adam').")
    ] = 0.9
    beta2: Annotated[float, Field(gt=0, lt=1, description="Second-moment decay ('adam').")] = 0.99
    epsilon: Annotated[
        float, Field(gt=0, description="Adaptivity floor ('adam'): larger is closer to momentum SGD.")
    ] = 1e-3


class Training(_Model):
    """How the federation trains: rounds of local training followed by one aggregation each."""

    rounds: Annotated[int, Field(gt=0, le=10_000, description="Federated rounds to run.")] = 20
    local_epochs: Annotated[
        int, Field(gt=0, le=1000, description="Passes over its own data each participant makes per round.")
    ] = 1
    batch_size: Annotated[int, Field(gt=0, le=65_536, description="Local mini-batch size.")] = 64
    learning_rate: Annotated[float, Field(gt=0, le=10, description="Local optimiser step size.")] = 0.005
    algorithm: Annotated[
        Literal["fedavg", "fedprox"],
        Field(description="fedavg, or fedprox (adds a proximal term; needs proximalMu > 0)."),
    ] = "fedavg"
    proximal_mu: Annotated[
        float, Field(ge=0, description="FedProx proximal term weight; used when algorithm is fedprox.")
    ] = 0.0
    min_participants: Annotated[
        int, Field(gt=0, description="Fewest participants a round may run with; fewer stops the federation.")
    ] = 2
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
    validation_fraction: Annotated[
        float, Field(gt=0, lt=1, description="Share of each participant's records held out for evaluation.")
    ] = 0.2
    seed: Annotated[int, Field(ge=0, description="Seeds initialisation, splits and shuffling; same seed, same model.")] = 0
    personalization_epochs: Annotated[
        int,
        Field(ge=0, le=100, description="After the federation succeeds, each participant fine-tunes the final global "
                                        "model for this many epochs on its own training rows and compares both on its "
                                        "own validation rows; the personalized model and both sets of metrics stay "
                                        "with the participant (its log and --report-file). 0 turns it off."),
    ] = 0
    server_optimizer: Annotated[
        ServerOptimizer,
        Field(description="How the aggregator applies each round's aggregate (the mean update, or the mean gradient "
                          "of differentialPrivacy mode 'pooled')."),
    ] = Field(default_factory=lambda: ServerOptimizer())

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
        Literal["none", "sample", "client", "pooled"],
        Field(description="'none', 'sample' (DP-SGD per record, in each participant), 'client' (DP-FedAvg per "
                          "participant) or 'pooled' (one central DP-SGD step per round over all participants' records, "
                          "its noise shared out under secure aggregation)."),
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
    sampling_rate: Annotated[
        float | None,
        Field(gt=0, le=1, description="'pooled': the Poisson rate at which every participant samples its records each "
                                      "round (the same for all; 0.5 when unset). 'client': the rate at which each "
                                      "participant takes part in a round, drawn in secret by the participant itself "
                                      "(1 when unset: every participant, every round)."),
    ] = None

    accept_noisy_plan: Annotated[
        bool,
        Field(description="Train even when the planned noise is more than 4 times what the averaged updates or "
                          "gradients can carry over the run (such a plan is refused before training, with what to "
                          "change; above 1 it is warned about). For experiments that measure that failure."),
    ] = False

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
                                    ("clippingNorm", self.clipping_norm), ("noiseMultiplier", self.noise_multiplier),
                                    ("samplingRate", self.sampling_rate))
                     if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply with mode 'sample', 'client' or 'pooled'; set the "
                                 "mode or remove them")
            return self
        if self.sampling_rate is not None and self.mode == "sample":
            raise ValueError("samplingRate applies to modes 'pooled' and 'client' (mode 'sample' derives its own from "
                             "each participant's rows and the batch size)")
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

    @property
    def rate(self) -> float:
        """The Poisson sampling rate: of records ('pooled', 0.5 when unset) or of participants ('client', 1 when
        unset)."""
        if self.sampling_rate is not None:
            return self.sampling_rate
        return 1.0 if self.mode == "client" else 0.5


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
            gt=0.5,
            le=1,
            description=(
                "Fraction of each neighbourhood (the participant included) whose shares, and whose signatures over "
                "the survivor set, are needed to unmask. Above 0.5 (a strict majority), so an aggregator that lies "
                "about who dropped out cannot collect both kinds of share for one participant; higher tolerates "
                "fewer dropouts."
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
    quantization_bits: Annotated[
        int | None,
        Field(
            description=(
                "Compress the training update: q bits per element for a participant's share of the update, "
                "rounded stochastically (unbiased) to one scale every party derives, summed modulo "
                "2^(q + ceil(log2 n)) for n members and sent packed at that width (12 bits an element for q = 8 "
                "and 10 members, against 32 for float32). 8 to 24; unset sends the update at `bits`, as before. "
                "Not used by client-level or pooled DP, whose updates are integers sized by their noise."
            ),
            json_schema_extra={"minimum": 8, "maximum": 24},  # checked by _quantization_bits, with its message
        ),
    ] = None
    keep_fraction: Annotated[
        float,
        Field(
            gt=0,
            le=1,
            description=(
                "Shared random sparsification of the training update: each round every participant sends only the "
                "same ceil(keepFraction x d) of the model's d parameters, chosen at random from the federation key, "
                "spec.training.seed and the round number (so every party derives the same subset and the masks "
                "still cancel); the others stay as they are that round. Upload shrinks by the same factor and "
                "composes with quantizationBits. 1 (the default) sends every parameter. Not with client-level or "
                "pooled DP."
            ),
        ),
    ] = 1.0
    rescale_kept: Annotated[
        bool,
        Field(
            description=(
                "With keepFraction below 1: multiply the kept coordinates of the aggregate by d / k, so that each "
                "round's step is an unbiased estimate of the full FedAvg step. False applies the kept coordinates "
                "as they are, which with plain FedAvg acts like a server learning rate of keepFraction and learns "
                "more slowly (measured: docs/benchmarks.md)."
            ),
        ),
    ] = True

    @field_validator("quantization_bits")
    @classmethod
    def _quantization_bits(cls, v: int | None) -> int | None:
        if v is not None and not (8 <= v <= 24):
            raise ValueError(
                f"quantizationBits must be from 8 to 24 (bits per element of a participant's update; the sum adds "
                f"ceil(log2 n) more), got {v}; leave it unset to send updates unquantized at `bits`"
            )
        return v

    @model_validator(mode="after")
    def _quantization_needs_masking(self) -> SecureAggregation:
        if self.quantization_bits is not None and not self.enabled:
            raise ValueError(
                "quantizationBits compresses the masked sum of secure aggregation; set enabled: true or leave "
                "quantizationBits unset"
            )
        if self.keep_fraction < 1 and not self.enabled:
            raise ValueError(
                f"keepFraction {self.keep_fraction} sparsifies the masked sum of secure aggregation; set enabled: "
                "true or leave keepFraction at 1"
            )
        return self


class Privacy(_Model):
    """What the aggregator and the model may reveal about one participant or one record."""

    differential_privacy: Annotated[
        DifferentialPrivacy, Field(description="Noise that bounds what the model reveals about a record.")
    ] = DifferentialPrivacy()
    secure_aggregation: Annotated[
        SecureAggregation, Field(description="Masking that shows the aggregator only the sum of updates.")
    ] = SecureAggregation()


class ParticipantsSpec(_Model):
    """Who may join: the coordinator's half of the two-sided consent."""

    namespaces: Annotated[
        list[str],
        Field(description="Tenant namespaces allowed to join. A Participant elsewhere is refused."),
    ] = Field(default_factory=list)
    enrollment_timeout_seconds: Annotated[
        float,
        Field(
            gt=0,
            description=(
                "In a cluster, training starts as soon as every allowed namespace has an admitted Participant, "
                "or this long after minParticipants were first admitted, whichever comes first."
            ),
        ),
    ] = 300.0

    @field_validator("namespaces")
    @classmethod
    def _ns(cls, v: list[str]) -> list[str]:
        for ns in v:
            _check_dns_label(ns, "namespace")
        return v


_QUANTITY = r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


class Resources(_Model):
    """What each training pod requests in a cluster (requests = limits); the local runner does not use it."""

    cpu: Annotated[str, Field(pattern=_QUANTITY, description="CPU cores, as a Kubernetes quantity (e.g. 1, 500m).")] = "1"
    memory: Annotated[
        str, Field(pattern=_QUANTITY, description="Memory, as a Kubernetes quantity (e.g. 2Gi).")
    ] = "2Gi"
    gpu: Annotated[
        int, Field(ge=0, le=16, description="nvidia.com/gpu devices; 0 schedules the pod on any node.")
    ] = 0


class ResourceOverrides(_Model):
    """A tenant's own sizing for its training pod; unset fields keep the Federation's."""

    cpu: Annotated[str | None, Field(pattern=_QUANTITY, description="CPU cores (e.g. 2, 500m).")] = None
    memory: Annotated[str | None, Field(pattern=_QUANTITY, description="Memory (e.g. 8Gi).")] = None
    gpu: Annotated[int | None, Field(ge=0, le=16, description="nvidia.com/gpu devices.")] = None

    def applied_to(self, base: Resources) -> Resources:
        return base.model_copy(update=self.model_dump(exclude_none=True))


class GanPrivacy(_Model):
    """Differential privacy for the augmentation GAN: its discriminator, the only part that reads records, trained
    with DP-SGD (Opacus), so the generator and every synthetic row are post-processing of a DP release."""

    epsilon: Annotated[
        float,
        Field(description="The GAN's own budget, spent once per participant and run (not taken out of, and not "
                          "counted in, spec.privacy.differentialPrivacy.epsilon)."),
    ]
    delta: Annotated[
        float, Field(description="The GAN's failure probability; well below 1/(the participant's training rows).")
    ]
    clipping_norm: Annotated[
        float, Field(description="L2 bound on each record's discriminator gradient.")
    ] = 1.0

    @field_validator("epsilon")
    @classmethod
    def _epsilon(cls, v: float) -> float:
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"augmentation.gan.differentialPrivacy.epsilon must be a positive number (got {v}), "
                             "e.g. 3.0")
        return v

    @field_validator("delta")
    @classmethod
    def _delta(cls, v: float) -> float:
        if not (0 < v < 1):
            raise ValueError(f"augmentation.gan.differentialPrivacy.delta must be between 0 and 1, exclusive (got "
                             f"{v}); use e.g. 1e-5, well below 1/(training rows)")
        return v

    @field_validator("clipping_norm")
    @classmethod
    def _clip(cls, v: float) -> float:
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"augmentation.gan.differentialPrivacy.clippingNorm must be a positive number (got {v}),"
                             " e.g. 1.0")
        return v


class GanAugmentation(_Model):
    """Synthetic rows from a conditional tabular GAN each participant trains on its own encoded training rows.

    The rows are added to that participant's local training only: never to its validation split, never to the
    statistics, never sent, and the update it sends is weighted by its real rows alone.
    """

    enabled: Annotated[bool, Field(description="Train the GAN and add its rows to local training.")] = False
    synthetic_ratio: Annotated[
        float,
        Field(description="Synthetic rows to add, as a fraction of the participant's real training rows (0.5 adds "
                          "half as many again). With conditionalOnLabel they top up the minority class towards the "
                          "majority's count first; what is left is split evenly between the classes. 0 < ratio <= 10.",
              json_schema_extra={"exclusiveMinimum": 0, "maximum": 10}),  # checked by _ratio, with its message
    ] = 0.5
    epochs: Annotated[
        int,
        Field(description="Passes of GAN training over the participant's training rows, once per run (1 to 5000).",
              json_schema_extra={"minimum": 1, "maximum": 5000}),  # checked by _epochs, with its message
    ] = 300
    conditional_on_label: Annotated[
        bool,
        Field(description="Condition the generator on the label, so rows can be drawn for a chosen class (the "
                          "minority first); false draws rows with generated labels, in the learned class mix."),
    ] = True
    differential_privacy: Annotated[
        GanPrivacy | None,
        Field(description="Train the discriminator with DP-SGD to this budget; unset trains it without noise."),
    ] = None

    @field_validator("synthetic_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not (0 < v <= 10):
            raise ValueError(f"augmentation.gan.syntheticRatio must be above 0 and at most 10 synthetic rows per real "
                             f"training row (got {v}); e.g. 0.5 adds half as many rows again")
        return v

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v: int) -> int:
        if not (1 <= v <= 5000):
            raise ValueError(f"augmentation.gan.epochs must be from 1 to 5000 passes over the training rows (got {v})")
        return v


class Augmentation(_Model):
    """Local data augmentation: what each participant may add to its own training rows, and never sends."""

    gan: Annotated[
        GanAugmentation, Field(description="Synthetic rows from a conditional tabular GAN trained by each participant.")
    ] = GanAugmentation()


class FederationSpec(_Model):
    """What to learn, how, under which guarantees, and with whom."""

    task: Annotated[Task, Field(description="The binary target and the canonical feature schema.")]
    model: Annotated[ModelSpec, Field(description="The model architecture.")] = ModelSpec()
    training: Annotated[Training, Field(description="Rounds, local training and round timing.")] = Training()
    privacy: Annotated[Privacy, Field(description="Differential privacy and secure aggregation.")] = Privacy()
    augmentation: Annotated[
        Augmentation,
        Field(description="Synthetic rows each participant adds to its own local training (never sent). A "
                          "participant's own copy decides; it is not part of the terms compared with the aggregator's."),
    ] = Augmentation()
    participants: Annotated[
        ParticipantsSpec, Field(description="Which tenant namespaces may join.")
    ] = ParticipantsSpec()
    resources: Annotated[
        Resources, Field(description="Default requests of every training pod; a Participant may override them.")
    ] = Resources()

    @model_validator(mode="after")
    def _augmentation_and_privacy(self) -> FederationSpec:
        mode = self.privacy.differential_privacy.mode
        if self.augmentation.gan.enabled and mode in ("sample", "pooled"):
            raise ValueError(
                f"augmentation.gan cannot be combined with differentialPrivacy mode {mode!r}: the synthetic rows would "
                "enter DP-SGD as records of the participant, its sampling rate and accounting are planned for the "
                "real rows only, and the GAN's own epsilon is not counted in the federation's budget, so the "
                "declared (epsilon, delta) would not hold. Use mode 'client' (which covers everything a participant "
                "trains on) or 'none', or turn augmentation.gan off"
            )
        keep = self.privacy.secure_aggregation.keep_fraction
        if keep < 1 and mode in ("client", "pooled"):
            raise ValueError(
                f"privacy.secureAggregation.keepFraction {keep} cannot be combined with differentialPrivacy mode "
                f"{mode!r} (yet): the noise would still be sound, since the kept coordinates of a clipped update "
                "have at most its norm, but the noise shares, their decoding and the sampling are sized for the "
                "whole update and are not wired for a subset. Use mode 'sample' or 'none', or keepFraction 1"
            )
        return self


class Phase(str, Enum):
    pending = "Pending"
    enrolling = "Enrolling"
    training = "Training"
    succeeded = "Succeeded"
    failed = "Failed"


class Condition(_Model):
    """A Kubernetes-style condition; its message says what happened and what to do."""

    type: Annotated[str, Field(description="What the condition is about, e.g. Ready, Admitted.")]
    status: Annotated[Literal["True", "False", "Unknown"], Field(description="True, False or Unknown.")]
    reason: Annotated[str, Field(description="One CamelCase word, for machines.")] = ""
    message: Annotated[str, Field(description="What happened and what to do about it, for people.")] = ""
    last_transition_time: Annotated[
        str | None, Field(description="When status last changed (RFC 3339).")
    ] = None
    observed_generation: Annotated[
        int | None, Field(description="The metadata.generation of the spec this condition was computed from.")
    ] = None


#: Conditions are a list-map keyed by type: one condition per type, merged by type on server-side apply.
CONDITIONS_LIST = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


class EnrollmentStatus(_Model):
    """The enrollment timer, written by the operator."""

    min_reached_at: Annotated[
        str | None,
        Field(description="When spec.training.minParticipants were admitted (RFC 3339); training starts "
                          "spec.participants.enrollmentTimeoutSeconds later unless every allowed namespace joins "
                          "first. Removed if the admitted fall below the minimum again.",
              json_schema_extra={"format": "date-time"}),
    ] = None


class FederationStatus(_Model):
    """Written by the operator; round progress comes from the aggregator."""

    phase: Annotated[Phase, Field(description="Pending, Enrolling, Training, Succeeded or Failed.")] = Phase.pending
    observed_generation: Annotated[int, Field(description="The spec generation this status describes.")] = 0
    round: Annotated[int, Field(description="Rounds completed.")] = 0
    rounds: Annotated[int, Field(description="Rounds planned.")] = 0
    progress: Annotated[str, Field(description="round/rounds, for kubectl get.")] = ""
    enrolled_participants: Annotated[int, Field(description="Participants admitted.")] = 0
    active_participants: Annotated[int, Field(description="Participants in the last round.")] = 0
    participants: Annotated[
        list[str], Field(description="Identities (<namespace>/<name>) of the admitted participants.")
    ] = Field(default_factory=list)
    epsilon_spent: Annotated[float | None, Field(description="Differential-privacy budget spent so far.")] = None
    privacy_plan: Annotated[
        str | None,
        Field(description="What the differential-privacy budget buys, from the spec alone: the mechanism, its noise "
                          "multiplier and sampling rate over the planned rounds (absent without DP). A plan whose "
                          "noise would drown the updates is refused before training, in the Ready condition."),
    ] = None
    last_metrics: Annotated[
        dict[str, float], Field(description="Global evaluation metrics of the last round (accuracy, f1, auc...).")
    ] = Field(default_factory=dict)
    accuracy: Annotated[str, Field(description="Last round's accuracy in percent, for kubectl get.")] = ""
    conditions: Annotated[
        list[Condition],
        Field(description="Ready, Enrolled, SpecAccepted, AggregatorReachable, ModelHealthy.",
              json_schema_extra=CONDITIONS_LIST),
    ] = Field(default_factory=list)
    enrollment: Annotated[
        EnrollmentStatus | None, Field(description="The enrollment timer (absent until minParticipants are admitted).")
    ] = None
    model_digest: Annotated[str | None, Field(description="sha256 of the final model.")] = None
    training_spec_digest: Annotated[
        str | None, Field(description="Digest of the task/model/training/privacy the running training uses.")
    ] = None


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
        if dp.mode == "pooled" and not self.spec.privacy.secure_aggregation.enabled:
            raise ValueError("spec.privacy.differentialPrivacy: mode 'pooled' shares the noise of one central step out "
                             "among the participants, which only a secure sum can hide; set "
                             "spec.privacy.secureAggregation.enabled: true (or use mode 'sample')")
        if dp.mode == "pooled" and self.spec.training.algorithm == "fedprox":
            raise ValueError("spec.privacy.differentialPrivacy: mode 'pooled' takes one gradient step per round and "
                             "has no local training for FedProx to regularise; use algorithm fedavg")
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
    """The Federation this Participant asks to join: the tenant's half of the consent."""

    name: Annotated[str, Field(description="The Federation's name.")]
    namespace: Annotated[str, Field(description="The coordinator namespace the Federation lives in.")] = "default"


# A Secret name is a DNS-1123 subdomain: DNS labels joined by dots, at most 253 characters.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class SecretRef(_Model):
    """A Secret in the Participant's own namespace, holding a data source's credentials.

    There is deliberately no ``namespace`` field: a Participant can only ever
    reach Secrets its own tenant created, so another tenant's credentials
    cannot even be named.
    """

    name: Annotated[str, Field(description="Name of a Secret in the Participant's namespace.")]

    @model_validator(mode="before")
    @classmethod
    def _no_namespace(cls, data: object) -> object:
        if isinstance(data, dict) and "namespace" in data:
            raise ValueError(
                "a Participant can only reference a Secret in its own namespace; remove 'namespace' "
                "and create the Secret next to the Participant"
            )
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > 253 or not _DNS_SUBDOMAIN.match(v):
            raise ValueError(f"Secret name {v!r} must be a DNS subdomain: lowercase letters, digits, '-' and '.'")
        return v


class _Source(_Model):
    """Base of every kind of ``spec.data`` source; DataSource finds its source fields by this type."""


class FileSource(_Source):
    """A CSV or Parquet file on the machine running ``fedcrm run``."""

    path: Annotated[
        str, Field(description="CSV or Parquet file; a relative path resolves against the manifest's folder.")
    ]
    format: Annotated[
        Literal["csv", "parquet"] | None,
        Field(description="Read as this format; inferred from the extension when unset."),
    ] = None


_PARENT_STEP = re.compile(r"(^|/)[.][.](/|$)")


class PvcSource(_Source):
    """A CSV or Parquet file on a PersistentVolumeClaim in the Participant's own namespace (cluster only)."""

    claim_name: Annotated[
        str,
        Field(
            pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
            max_length=253,
            description="A PersistentVolumeClaim in the Participant's own namespace (a plain name, no namespace).",
        ),
    ]
    path: Annotated[
        str,
        Field(
            min_length=1,
            description="The file inside the claim, relative (no leading '/', no '..').",
            json_schema_extra={
                "x-kubernetes-validations": [
                    {
                        "rule": "!self.startsWith('/') && !self.matches('" + _PARENT_STEP.pattern + "')",
                        "message": "must be a path inside the claim: relative, without '..'",
                    }
                ]
            },
        ),
    ]
    format: Annotated[
        Literal["csv", "parquet"] | None,
        Field(description="Read as this format; inferred from the extension when unset."),
    ] = None

    @field_validator("path")
    @classmethod
    def _inside_claim(cls, v: str) -> str:
        if v.startswith("/") or _PARENT_STEP.search(v):
            raise ValueError(f"{v!r} must be a path inside the claim: relative, without '..'")
        return v


class EgressRule(_Model):
    """Where a training pod may connect to read its data: in a cluster, one rule of its NetworkPolicy.

    Either ``cidr`` (addresses outside the cluster, e.g. a database host or a
    SaaS range) or ``podSelector`` (pods in the Participant's own namespace,
    e.g. a database running beside it), with the TCP ports. Another namespace
    cannot be expressed.
    """

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [{
        "rule": "has(self.cidr) != has(self.podSelector)",
        "message": "give either cidr or podSelector (pods in this namespace), not both and not neither",
    }]})

    cidr: Annotated[
        str | None, Field(description="Destination addresses, e.g. 10.20.0.15/32 or 0.0.0.0/0 (IPv4 or IPv6 CIDR).")
    ] = None
    except_: Annotated[
        list[str],
        Field(alias="except", description="With cidr: ranges inside it to leave out (e.g. the cluster's own)."),
    ] = Field(default_factory=list)
    pod_selector: Annotated[
        dict[str, str] | None,
        Field(description="Labels of pods in the Participant's own namespace (e.g. app: crm-postgres)."),
    ] = None
    ports: Annotated[
        list[Annotated[int, Field(ge=1, le=65535)]],
        Field(min_length=1, description="TCP ports on the destination, e.g. [5432] or [443]."),
    ]

    @model_validator(mode="after")
    def _one_destination(self) -> EgressRule:
        import ipaddress

        if (self.cidr is None) == (self.pod_selector is None):
            raise ValueError("give either 'cidr' or 'podSelector' (pods in this namespace), not both and not neither")
        if self.pod_selector is not None and not self.pod_selector:
            raise ValueError("podSelector needs at least one label, or it would select every pod of the namespace")
        if self.cidr is None and self.except_:
            raise ValueError("'except' goes with 'cidr'")
        for value in ([self.cidr] if self.cidr else []) + self.except_:
            try:
                ipaddress.ip_network(value, strict=True)
            except ValueError:
                raise ValueError(f"{value!r} is not a CIDR such as 10.20.0.0/16 (host bits must be zero)") from None
        return self


_EGRESS_DESCRIPTION = (
    "In a cluster, where the training pod may connect to read this source (its NetworkPolicy denies everything "
    "else but the aggregator and DNS). "
)


_SOQL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*$")


class SalesforceSource(_Source):
    """Records from a Salesforce org through the REST query API (SOQL, paged with queryMore)."""

    query: Annotated[
        str | None, Field(description="A SOQL query, e.g. SELECT Id, LeadSource, Owner.Name, IsConverted FROM Lead.")
    ] = None
    sobject: Annotated[
        str | None,
        Field(alias="object", description="Instead of query: the object to read (Lead, Opportunity, Case ...)."),
    ] = None
    fields: Annotated[
        list[str] | None, Field(description="With object: the fields to select; relationship fields as Owner.Name.")
    ] = None
    where: Annotated[str | None, Field(description="With object: an optional SOQL WHERE condition.")] = None
    secret_ref: Annotated[
        SecretRef, Field(description="The Secret with the login: instanceUrl+accessToken, username+password+"
                         "securityToken, or username+consumerKey+privateKey (JWT bearer).")
    ]
    api_version: Annotated[str, Field(description="REST API version, e.g. '62.0'.")] = "62.0"
    domain: Annotated[
        str,
        Field(description="Login host prefix: 'login' (production), 'test' (sandbox) or a My Domain such as 'acme.my'."),
    ] = "login"
    batch_size: Annotated[
        int | None,
        Field(ge=200, le=2000, description="Records per page (Sforce-Query-Options batchSize); Salesforce's default when unset."),
    ] = None
    egress: Annotated[
        list[EgressRule],
        Field(description=_EGRESS_DESCRIPTION + "Unset: HTTPS (TCP 443) to addresses outside the cluster's "
              "private ranges; narrow it to Salesforce's published ranges here."),
    ] = Field(default_factory=list)

    @field_validator("api_version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not re.fullmatch(r"\d{2}\.0", v):
            raise ValueError(f"apiVersion {v!r} must look like '62.0'")
        return v

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if not _SOQL_NAME.match(name):
                raise ValueError(f"field {name!r} is not a Salesforce field name (letters, digits, '_', dots for relationships)")
        return v

    @model_validator(mode="after")
    def _query_or_object(self) -> SalesforceSource:
        if (self.query is None) == (self.sobject is None):
            raise ValueError("give either 'query' (SOQL) or 'object' with 'fields', not both and not neither")
        if self.sobject is not None:
            if not _SOQL_NAME.match(self.sobject) or "." in self.sobject:
                raise ValueError(f"object {self.sobject!r} is not a Salesforce object name")
            if not self.fields:
                raise ValueError(f"object {self.sobject!r} needs 'fields', the fields to read")
        elif self.fields is not None or self.where is not None:
            raise ValueError("'fields' and 'where' go with 'object'; with 'query', write them into the SOQL")
        return self

    def soql(self) -> str:
        """The SOQL this source runs."""
        if self.query is not None:
            return self.query
        text = f"SELECT {', '.join(self.fields or [])} FROM {self.sobject}"
        return text + (f" WHERE {self.where}" if self.where else "")


class SqlSource(_Source):
    """Rows of a SQL query against any database SQLAlchemy reaches (PostgreSQL, MySQL, warehouses)."""

    query: Annotated[str, Field(description="The SELECT to run; join leads, opportunities and cases here.")]
    secret_ref: Annotated[SecretRef, Field(description="The Secret whose key 'url' is the SQLAlchemy database URL.")]
    chunk_rows: Annotated[
        int, Field(ge=1, le=1_000_000, description="Rows fetched per round trip (a server-side cursor streams the rest).")
    ] = 10_000
    egress: Annotated[
        list[EgressRule],
        Field(description=_EGRESS_DESCRIPTION + "Required in a cluster: the database's address (cidr) or its pods "
              "in this namespace (podSelector), with its port; unused by fedcrm run."),
    ] = Field(default_factory=list)


class ValueTransform(_Model):
    """Converts a local numeric column to canonical units: ``canonical = local * scale + offset``."""

    scale: Annotated[float, Field(description="Multiplier applied to the local value.")] = 1.0
    offset: Annotated[float, Field(description="Added after scaling.")] = 0.0




class DataSource(_Model):
    """Where the tenant's records are (exactly one source) and how its columns map to the canonical schema."""

    model_config = ConfigDict(json_schema_extra=lambda schema: DataSource._cel_one_source(schema))

    file: Annotated[FileSource | None, Field(description="A local CSV or Parquet file (fedcrm run).")] = None
    pvc: Annotated[PvcSource | None, Field(description="A file on a PersistentVolumeClaim (in a cluster).")] = None
    salesforce: Annotated[
        SalesforceSource | None, Field(description="A Salesforce org, read with SOQL through the REST API.")
    ] = None
    sql: Annotated[SqlSource | None, Field(description="A SQL database reached through SQLAlchemy.")] = None
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

    @staticmethod
    def _cel_one_source(schema: dict) -> None:
        """The same one-source rule for the API server, so `kubectl apply` rejects what the models reject."""
        kinds = DataSource.source_kinds()
        schema["x-kubernetes-validations"] = [{
            "rule": "[" + ", ".join(f"has(self.{k})" for k in kinds) + "].filter(x, x).size() == 1",
            "message": f"exactly one data source is needed, one of {', '.join(kinds)}",
        }]

    @classmethod
    def source_kinds(cls) -> list[str]:
        """The manifest names of every kind of source, e.g. ['file', 'salesforce', 'sql'].

        Found from the field types, so a new kind is one more ``_Source`` field.
        """
        return [
            f.alias or n
            for n, f in cls.model_fields.items()
            if any(isinstance(a, type) and issubclass(a, _Source) for a in getattr(f.annotation, "__args__", ()))
        ]

    @model_validator(mode="before")
    @classmethod
    def _exactly_one_source(cls, data: object) -> object:
        if isinstance(data, dict):
            kinds = cls.source_kinds()
            given = [k for k in kinds if data.get(k) is not None]
            if len(given) != 1:
                what = "none is given" if not given else f"got {' and '.join(given)}"
                raise ValueError(f"exactly one data source is needed, one of {', '.join(kinds)}; {what}")
        return data

    @property
    def kind(self) -> str:
        """Which source is set: 'file', 'salesforce', 'sql', ..."""
        return next(k for k in self.source_kinds() if getattr(self, _attribute(type(self), k)) is not None)

    @property
    def source(self) -> _Source:
        return getattr(self, _attribute(type(self), self.kind))

    def network_egress(self) -> list[EgressRule]:
        """Where a training pod must be able to connect to read this source (empty for a file or a claim)."""
        declared = list(getattr(self.source, "egress", []) or [])
        if declared or self.salesforce is None:
            return declared
        # Salesforce's addresses are many and change: HTTPS to anything outside the private ranges.
        return [
            EgressRule(cidr="0.0.0.0/0", except_=["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"], ports=[443]),
            EgressRule(cidr="::/0", except_=["fc00::/7"], ports=[443]),
        ]

    def secret_ref(self) -> SecretRef | None:
        """The Secret holding this source's credentials, if the source needs one."""
        return getattr(self.source, "secret_ref", None)


def _attribute(model: type[BaseModel], alias: str) -> str:
    return next(n for n, f in model.model_fields.items() if (f.alias or n) == alias)


class Toleration(_Model):
    """A Kubernetes toleration, passed through to the training pod."""

    key: Annotated[str | None, Field(description="Taint key; empty with operator Exists matches every taint.")] = None
    operator: Annotated[Literal["Exists", "Equal"], Field(description="Exists or Equal.")] = "Equal"
    value: Annotated[str | None, Field(description="Taint value, with operator Equal.")] = None
    effect: Annotated[
        Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None,
        Field(description="Taint effect to tolerate; unset tolerates all effects."),
    ] = None
    toleration_seconds: Annotated[int | None, Field(description="For NoExecute: how long to stay bound.")] = None


class Requirements(_Model):
    """The weakest terms a tenant accepts: a Federation below any of them is refused at admission, whatever its
    owner does, and so is a later change that goes below them."""

    secure_aggregation: Annotated[
        bool, Field(description="The Federation must mask every update (spec.privacy.secureAggregation.enabled).")
    ] = False
    max_epsilon: Annotated[
        float | None,
        Field(gt=0, description="Differential privacy must be on, with a total epsilon of at most this."),
    ] = None
    min_threshold: Annotated[
        float | None,
        Field(gt=0, le=1, description="Secure aggregation must be on, with a threshold of at least this."),
    ] = None
    min_tenants: Annotated[
        int | None,
        Field(ge=2, description="Every round must have at least this many tenants (spec.training.minParticipants): "
                                "the fewer there are, the more the sum shows of each."),
    ] = None


class ParticipantSpec(_Model):
    """A tenant's consent to join one Federation, and where its data is."""

    federation_ref: Annotated[FederationRef, Field(description="The Federation to join.")]
    data: Annotated[DataSource, Field(description="The tenant's records and their mapping to the canonical schema.")]
    resources: Annotated[
        ResourceOverrides | None,
        Field(description="This tenant's training-pod requests; unset fields keep the Federation's spec.resources."),
    ] = None
    node_selector: Annotated[
        dict[str, str], Field(description="Node labels the training pod must run on (e.g. a GPU pool).")
    ] = Field(default_factory=dict)
    tolerations: Annotated[
        list[Toleration], Field(description="Taints the training pod tolerates (e.g. a dedicated GPU pool).")
    ] = Field(default_factory=list)
    requires: Annotated[
        Requirements, Field(description="The weakest privacy terms this tenant accepts; weaker Federations are refused.")
    ] = Requirements()
    state_claim: Annotated[
        str | None,
        Field(
            pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
            max_length=253,
            description=(
                "A small ReadWriteOnce PersistentVolumeClaim in this namespace (a few MiB) where the training pod keeps "
                "its own count of privacy releases, so a restarted pod never releases more than the budget was "
                "planned for. Unset: the count lives in the pod (the aggregator's ledger still counts every release)."
            ),
        ),
    ] = None
    accepted_terms: Annotated[
        str | None,
        Field(
            pattern=r"^[0-9a-f]{64}$",
            description=(
                "The digest of the Federation's terms (task, model, training, privacy) this tenant consents to. Unset: "
                "the terms as they are when the Participant is first admitted (recorded in status.acceptedTerms). "
                "After the Federation's owner changes them, the Participant is refused with reason TermsChanged "
                "until this is set to the new digest its condition names."
            ),
        ),
    ] = None

    def credentials_secret_name(self) -> str | None:
        """Name of the Secret (in the Participant's namespace) whose keys the training container gets as files."""
        ref = self.data.secret_ref()
        return ref.name if ref else None


class ParticipantPhase(str, Enum):
    pending = "Pending"
    refused = "Refused"
    admitted = "Admitted"
    training = "Training"
    succeeded = "Succeeded"
    failed = "Failed"


class ParticipantStatus(_Model):
    """Written by the operator: whether the Participant was admitted, and why not."""

    phase: Annotated[
        ParticipantPhase, Field(description="Pending, Refused, Admitted, Training, Succeeded or Failed.")
    ] = ParticipantPhase.pending
    observed_generation: Annotated[int, Field(description="The spec generation this status describes.")] = 0
    identity: Annotated[str, Field(description="The identity in this participant's certificate.")] = ""
    accepted_terms: Annotated[
        str, Field(description="Digest of the Federation terms this Participant was admitted under.")
    ] = ""
    conditions: Annotated[
        list[Condition], Field(description="Admitted, Ready.", json_schema_extra=CONDITIONS_LIST)
    ] = Field(default_factory=list)


class Participant(_Model):
    api_version: Literal["fedcrm.io/v1alpha1"] = API_VERSION
    kind: Literal["Participant"] = "Participant"
    metadata: ObjectMeta
    spec: ParticipantSpec
    status: ParticipantStatus | None = None

    @property
    def identity(self) -> str:
        """The identity carried in this participant's client certificate."""
        return f"{self.metadata.namespace}/{self.metadata.name}"
