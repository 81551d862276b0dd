"""Federated preprocessing: global feature statistics without pooling records.

Each participant summarises its own rows as one fixed-length vector of counts
and sums (:meth:`StatisticsLayout.local`); the aggregator adds the vectors up
on the same path as model updates, and :meth:`StatisticsLayout.preprocessing`
turns the sum into means, standard deviations and category vocabularies. The
vector's length depends only on the schema, so with secure aggregation on the
sum is taken masked (:meth:`StatisticsLayout.bounded`, each numeric value
clipped to its feature's ``bound``, and
:func:`fedcrm.training.secure_vectors.statistics_quantizer`).

Missing values are explicit: every numeric and boolean feature gets a
missing-indicator input, and categorical features reserve index 0 for
"missing or never seen".
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

from typing import TYPE_CHECKING

import numpy as np

from fedcrm.privacy.mechanisms import StatisticsNoise
from fedcrm.spec.manifests import FeatureType, Task, Transform

if TYPE_CHECKING:  # the aggregator uses this module and never imports pandas
    import pandas as pd

__all__ = ["CategoricalVocab", "EncodedData", "NumericStats", "Preprocessing", "StatisticsLayout", "encode"]

#: Noised statistics are refused only this many noise standard deviations outside what honest data allows.
NOISE_TOLERANCE = 8.0

# z-scores beyond this are clipped: one extreme account must not dominate a batch.
_Z_CLIP = 6.0


def _transform(values: np.ndarray, transform: Transform) -> np.ndarray:
    if transform is Transform.log1p:
        return np.sign(values) * np.log1p(np.abs(values))
    return values


@dataclass(frozen=True)
class NumericStats:
    name: str
    mean: float
    std: float
    transform: str


@dataclass(frozen=True)
class CategoricalVocab:
    """A categorical feature's vocabulary; index 0 is reserved for missing or unseen values."""

    name: str
    vocab: list[str]


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to encode canonical rows for the model, derived from global sums.

    Feature order is significant (it is the model's input order), so every part
    is a list: serialised JSON may sort object keys, never list items.
    """

    numeric: list[NumericStats]
    boolean: list[str]
    categorical: list[CategoricalVocab]
    target: str
    # Pooled facts about the data that encoding does not need: known to the aggregator, never shared (see shared()).
    rows: int | None = None
    positive_rate: float | None = None
    missing_rate: dict[str, float] = field(default_factory=dict)

    @property
    def numeric_width(self) -> int:
        """Inputs besides embeddings: value + missing flag per numeric and boolean feature."""
        return 2 * (len(self.numeric) + len(self.boolean))

    def shared(self) -> Preprocessing:
        """What every participant, and the model artifact, gets: only what encoding a row needs.

        The pooled row count, positive rate and missing rates are left out: in a federation of two, one tenant
        would otherwise subtract its own from them and learn the other's exact row count and conversion rate.
        Means, standard deviations and vocabularies stay (the model's input encoding needs them).
        """
        return replace(self, rows=None, positive_rate=None, missing_rate={})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        raw = json.loads(text)
        raw["numeric"] = [NumericStats(**n) for n in raw["numeric"]]
        raw["categorical"] = [CategoricalVocab(**c) for c in raw["categorical"]]
        return cls(**raw)


#: The most rows one participant may report: far beyond any CRM export, small enough that the secure sums'
#: weight bounds (twice the pooled rows) keep their precision.
MAX_PARTICIPANT_ROWS = 100_000_000


def training_rows(value: int) -> int:
    """A participant's training rows as sent for sample-level DP accounting, refused (ValueError) out of range."""
    if not 1 <= value <= MAX_PARTICIPANT_ROWS:
        raise ValueError(f"sample-level differential privacy needs the training rows (1 to {MAX_PARTICIPANT_ROWS:,}), "
                         f"got {value}")
    return int(value)


class StatisticsLayout:
    """The fixed layout of a participant's statistics vector for one task.

    ``[rows, positives]``, then per numeric feature ``[present, sum, sum of squares]``
    (after its transform), per boolean feature ``[present, trues]``, per categorical
    feature one count per allowed category.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.slots: list[tuple[str, FeatureType, int, int]] = []
        offset = 2
        for f in task.features:
            width = {FeatureType.numeric: 3, FeatureType.boolean: 2}.get(f.type, len(f.categories or []))
            self.slots.append((f.name, f.type, offset, width))
            offset += width
        self.size = offset

    def noise(self, noise_multiplier: float, *, shares: int = 1) -> StatisticsNoise:
        """Record-level noise for this layout: what one record can change, slot by slot (see
        :class:`fedcrm.privacy.mechanisms.StatisticsNoise`); the vector must be :meth:`bounded`."""
        maxima: list[float] = [1.0, 1.0]  # rows, positives
        whole: list[bool] = [True, True]
        touched = 2
        for name, kind, _, width in self.slots:
            if kind is FeatureType.numeric:
                bound = self.task.feature(name).bound
                maxima += [1.0, bound, bound * bound]
                whole += [True, False, False]
                touched += 3
            elif kind is FeatureType.boolean:
                maxima += [1.0, 1.0]
                whole += [True, True]
                touched += 2
            else:  # a record is in at most one category of a feature
                maxima += [1.0] * width
                whole += [True] * width
                touched += 1 if width else 0
        return StatisticsNoise(maxima=tuple(maxima), whole=tuple(whole), touched=touched,
                               noise_multiplier=noise_multiplier, shares=shares)

    def clamped(self, total: np.ndarray, *, rows: int | None = None) -> np.ndarray:
        """Noised pooled statistics made consistent again (post-processing, so no privacy cost): counts within
        zero and the rows, sums within their bounds, sums of squares at least what the sum implies. ``rows``: the
        exact pooled row count where it is public anyway (sample-level DP sends each participant's rows)."""
        out = np.asarray(total, dtype=np.float64).copy()
        out[0] = max(1.0, float(rows) if rows is not None else round(out[0]))
        n_rows = out[0]
        out[1] = min(max(out[1], 0.0), n_rows)
        for name, kind, off, width in self.slots:
            if kind is FeatureType.numeric:
                bound = self.task.feature(name).bound
                n = min(max(out[off], 0.0), n_rows)
                sums = min(max(out[off + 1], -n * bound), n * bound)
                squares = min(max(out[off + 2], sums * sums / n if n else 0.0), n * bound * bound)
                out[off : off + 3] = (n, sums, squares)
            elif kind is FeatureType.boolean:
                present = min(max(out[off], 0.0), n_rows)
                out[off : off + 2] = (present, min(max(out[off + 1], 0.0), present))
            else:
                out[off : off + width] = np.clip(out[off : off + width], 0.0, n_rows)
        return out

    def local(self, frame: pd.DataFrame) -> np.ndarray:
        """This participant's counts and sums (float64: sums of squares overflow float32)."""
        return self._local(frame, bounded=False)[0]

    def bounded(self, frame: pd.DataFrame) -> tuple[np.ndarray, dict[str, int]]:
        """:meth:`local` with each numeric value (after its transform) clipped to ``[-bound, bound]`` of its feature.

        What a secure sum of the statistics takes (:func:`fedcrm.training.secure_vectors.statistics_quantizer`):
        the bounds make every sum fit the modulus. Returns the vector and, per numeric feature, how many values
        were clipped (counts, present flags and categories are never changed).
        """
        return self._local(frame, bounded=True)

    def _local(self, frame: pd.DataFrame, *, bounded: bool) -> tuple[np.ndarray, dict[str, int]]:
        out = np.zeros(self.size, dtype=np.float64)
        clipped: dict[str, int] = {}
        out[0] = len(frame)
        out[1] = float(frame[self.task.target].sum())
        for name, kind, off, width in self.slots:
            col = frame[name]
            if kind is FeatureType.numeric:
                feature = self.task.feature(name)
                v = _transform(col.to_numpy(dtype=np.float64), feature.transform)
                v = v[~np.isnan(v)]
                if bounded:
                    clipped[name] = int(np.count_nonzero(np.abs(v) > feature.bound))
                    v = np.clip(v, -feature.bound, feature.bound)
                out[off : off + 3] = (v.size, v.sum(), np.square(v).sum())
            elif kind is FeatureType.boolean:
                v = col.to_numpy(dtype=np.float64)
                v = v[~np.isnan(v)]
                out[off : off + 2] = (v.size, v.sum())
            else:
                counts = col.value_counts()
                for i, cat in enumerate(self.task.feature(name).categories or []):
                    out[off + i] = float(counts.get(cat, 0))
        return out, clipped

    def check(self, vector: np.ndarray, *, noise: StatisticsNoise | None = None) -> None:
        """Refuse (ValueError) a participant's statistics no honest :meth:`local` could produce.

        Summed in the clear, they set every participant's preprocessing: one NaN, a negative count or a
        billion-row claim would otherwise poison the means, the vocabularies or the quantization bounds of
        the whole federation. ``noise``: the vector is noised (differential privacy), so whole numbers and
        consistency are checked only within :data:`NOISE_TOLERANCE` of its standard deviations.
        """
        if noise is not None:
            self._check_noised(vector, contributors=1, noise=noise)
            return
        if vector.shape != (self.size,) or not np.all(np.isfinite(vector)):
            raise ValueError("statistics must be finite numbers, one per slot of the task's layout")
        rows, positives = vector[0], vector[1]
        if not 1 <= rows <= MAX_PARTICIPANT_ROWS or rows != round(rows):
            raise ValueError(f"a participant's row count must be a whole number from 1 to {MAX_PARTICIPANT_ROWS:,} "
                             f"(got {rows:g})")
        if not 0 <= positives <= rows:
            raise ValueError(f"positives ({positives:g}) must be between 0 and the rows ({rows:g})")
        for name, kind, off, width in self.slots:
            counts = [vector[off]] if kind is not FeatureType.categorical else list(vector[off : off + width])
            if any(c < 0 or c != round(c) for c in counts) or sum(counts) > rows:
                raise ValueError(f"{name}: counts must be whole, non-negative and at most the rows ({rows:g})")
            if kind is FeatureType.numeric:
                n, total, squares = vector[off : off + 3]
                # Cauchy-Schwarz: (sum v)^2 <= n * sum v^2, with room for rounding.
                if squares < 0 or total * total > n * squares * (1 + 1e-9) + 1e-6:
                    raise ValueError(f"{name}: the sum and the sum of squares of {n:g} values are inconsistent")
            elif kind is FeatureType.boolean and not 0 <= vector[off + 1] <= vector[off]:
                raise ValueError(f"{name}: trues ({vector[off + 1]:g}) must be between 0 and present ({vector[off]:g})")

    def check_sum(self, total: np.ndarray, *, contributors: int, resolution: np.ndarray,
                  noise: StatisticsNoise | None = None) -> None:
        """Refuse (ValueError) a securely summed statistics vector no honest cohort could produce.

        Under secure aggregation no single vector can be inspected (:meth:`check` needs it in the clear): only
        the sum is checked, within ``resolution`` (the fixed-point step of each slot). A hostile participant
        can still shift the sums within the public bounds; what it cannot do is make them non-finite,
        negative, fractional where counts are whole, or inconsistent with the row count. ``noise``: each
        contribution is noised, so the checks allow :data:`NOISE_TOLERANCE` standard deviations of the sum.
        """
        if noise is not None:
            self._check_noised(total, contributors=contributors, noise=noise)
            return
        if total.shape != (self.size,) or not np.all(np.isfinite(total)):
            raise ValueError("the summed statistics must be finite numbers, one per slot of the task's layout")
        rows, positives = total[0], total[1]
        if not contributors <= rows <= contributors * MAX_PARTICIPANT_ROWS or rows != round(rows):
            raise ValueError(f"the summed row count must be a whole number from {contributors} to "
                             f"{contributors * MAX_PARTICIPANT_ROWS:,} for {contributors} participant(s) "
                             f"(got {rows:g})")
        if not 0 <= positives <= rows:
            raise ValueError(f"summed positives ({positives:g}) must be between 0 and the rows ({rows:g})")
        for name, kind, off, width in self.slots:
            counts = [total[off]] if kind is not FeatureType.categorical else list(total[off : off + width])
            if any(c < 0 or c != round(c) or c > rows for c in counts):
                raise ValueError(f"{name}: summed counts must be whole, non-negative and at most the rows ({rows:g})")
            if kind is FeatureType.numeric:
                n, sums, squares = total[off : off + 3]
                bound = self.task.feature(name).bound
                if abs(sums) > n * bound + resolution[off + 1] or squares < -resolution[off + 2] \
                        or squares > n * bound * bound + resolution[off + 2]:
                    raise ValueError(f"{name}: the summed values are out of range for {n:g} values within "
                                     f"+-{bound:g}")
            elif kind is FeatureType.boolean and not 0 <= total[off + 1] <= total[off]:
                raise ValueError(f"{name}: summed trues ({total[off + 1]:g}) must be between 0 and present "
                                 f"({total[off]:g})")

    def _check_noised(self, total: np.ndarray, *, contributors: int, noise: StatisticsNoise) -> None:
        """Range checks on a noised vector (one participant's, or a sum of ``contributors``): what noise cannot
        explain, :data:`NOISE_TOLERANCE` standard deviations out (about 1e-15 for one honest slot)."""
        if total.shape != (self.size,) or not np.all(np.isfinite(total)):
            raise ValueError("statistics must be finite numbers, one per slot of the task's layout")
        slack = NOISE_TOLERANCE * math.sqrt(contributors) * noise.participant_stds
        rows = total[0]
        if not -slack[0] <= rows <= contributors * MAX_PARTICIPANT_ROWS + slack[0]:
            raise ValueError(f"the row count ({rows:g}) is out of range for {contributors} participant(s), even "
                             "allowing for the privacy noise")
        upper_rows = rows + slack[0]
        for name, kind, off, width in self.slots:
            for j in range(off, off + (width if kind is FeatureType.categorical else 1)):
                if not -slack[j] <= total[j] <= upper_rows + slack[j]:
                    raise ValueError(f"{name}: a count ({total[j]:g}) is out of range for {rows:g} rows, even "
                                     "allowing for the privacy noise")
            if kind is FeatureType.numeric:
                bound = self.task.feature(name).bound
                n_max = total[off] + slack[off]
                if abs(total[off + 1]) > n_max * bound + slack[off + 1] or total[off + 2] < -slack[off + 2] \
                        or total[off + 2] > n_max * bound * bound + slack[off + 2]:
                    raise ValueError(f"{name}: the summed values are out of range for {total[off]:g} values within "
                                     f"+-{bound:g}, even allowing for the privacy noise")

    def preprocessing(self, total: np.ndarray) -> Preprocessing:
        """Global statistics from the sum of every participant's :meth:`local` vector."""
        if total.shape != (self.size,):
            raise ValueError(f"statistics vector has shape {total.shape}, expected ({self.size},)")
        rows = int(round(total[0]))
        numeric: list[NumericStats] = []
        boolean: list[str] = []
        categorical: list[CategoricalVocab] = []
        missing: dict[str, float] = {}
        for name, kind, off, width in self.slots:
            if kind is FeatureType.numeric:
                n, s, ss = total[off : off + 3]
                mean = s / n if n else 0.0
                var = max(ss / n - mean * mean, 0.0) if n else 0.0
                std = math.sqrt(var) if var > 1e-12 else 1.0
                numeric.append(NumericStats(name, float(mean), float(std), self.task.feature(name).transform.value))
                missing[name] = 1.0 - n / rows if rows else 1.0
            elif kind is FeatureType.boolean:
                boolean.append(name)
                missing[name] = 1.0 - total[off] / rows if rows else 1.0
            else:
                cats = self.task.feature(name).categories or []
                counts = total[off : off + width]
                categorical.append(CategoricalVocab(name, [c for c, k in zip(cats, counts) if k > 0]))
                missing[name] = 1.0 - counts.sum() / rows if rows else 1.0
        return Preprocessing(
            numeric=numeric,
            boolean=boolean,
            categorical=categorical,
            target=self.task.target,
            rows=rows,
            positive_rate=float(total[1] / rows) if rows else 0.0,
            missing_rate={k: round(float(v), 6) for k, v in missing.items()},
        )


@dataclass(frozen=True)
class EncodedData:
    """Model inputs: dense float32 block, categorical indices, and labels."""

    dense: np.ndarray  # (n, numeric_width) float32
    categorical: np.ndarray  # (n, n_categorical) int64; 0 = missing or unseen
    labels: np.ndarray  # (n,) float32 0/1

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode(frame: pd.DataFrame, prep: Preprocessing) -> EncodedData:
    """Standardise, flag missing values and index categories, exactly as every participant does."""
    n = len(frame)
    dense = np.zeros((n, prep.numeric_width), dtype=np.float32)
    col = 0
    for stats in prep.numeric:
        v = _transform(frame[stats.name].to_numpy(dtype=np.float64), Transform(stats.transform))
        missing = np.isnan(v)
        z = np.clip((v - stats.mean) / stats.std, -_Z_CLIP, _Z_CLIP)
        dense[:, col] = np.where(missing, 0.0, z)
        dense[:, col + 1] = missing
        col += 2
    for name in prep.boolean:
        v = frame[name].to_numpy(dtype=np.float64)
        missing = np.isnan(v)
        dense[:, col] = np.where(missing, 0.0, v)
        dense[:, col + 1] = missing
        col += 2
    cats = np.zeros((n, len(prep.categorical)), dtype=np.int64)
    for j, cat in enumerate(prep.categorical):
        index = {c: i + 1 for i, c in enumerate(cat.vocab)}
        cats[:, j] = [index.get(v, 0) if isinstance(v, str) else 0 for v in frame[cat.name].tolist()]
    labels = frame[prep.target].to_numpy(dtype=np.float32) if prep.target in frame else np.zeros(n, np.float32)
    return EncodedData(dense=dense, categorical=cats, labels=labels)
