"""The experiment file: data, seeds, rounds and named settings, validated before anything runs.

An experiment is a grid, settings x seeds. Every setting is one command
(``baseline`` or ``run``) on the Federation manifest ``fedcrm synth`` writes,
deep-merged with the experiment's common ``spec`` overrides and then the
setting's own (see :func:`deep_merge`). Each merged manifest is validated as a
Federation when the file is loaded, so a typo in one setting is an error that
names the setting and the key, before any data is generated or any cell runs.

Keys are camelCase like the manifests'. ``quick`` holds the sizes of
``--quick`` (a smoke-sized run through the same code path); the defaults are
:data:`QUICK_DEFAULTS`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from fedcrm.errors import FedcrmError
from fedcrm.spec.loading import describe_validation_error, parse_manifest
from fedcrm.spec.manifests import Federation

__all__ = ["QUICK_DEFAULTS", "REFERENCE_METRICS", "Experiment", "Setting", "deep_merge", "load_experiment",
           "setting_manifest"]

#: What ``--quick`` changes unless the file's own ``quick`` block says otherwise: at most 3 clients of 400 rows, 3
#: rounds, the first 2 seeds, one shadow model of 3 epochs on at most 400 records per side.
QUICK_DEFAULTS: dict[str, Any] = {
    "data": {"clients": 3, "rows": 400, "minRows": None, "testRows": 1000},
    "rounds": 3,
    "seeds": 2,
    "audit": {"shadows": 1, "shadowEpochs": 3, "maxRecords": 400},
}

#: Metrics a ``reference`` block may give per setting (the papers' numbers), as named in results.csv.
REFERENCE_METRICS = ("accuracy", "precision", "recall", "f1", "auc", "bytes_per_client_per_round",
                     "bytes_up_per_client_per_round", "attack_auc")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Data(_Model):
    """Arguments of ``fedcrm synth``; each seed gets its own data (``--seed`` is the cell's seed)."""

    clients: Annotated[int, Field(ge=2, le=500, description="Enterprises (participants).")] = 10
    rows: Annotated[int, Field(ge=20, description="Leads per enterprise (the largest one's with minRows).")] = 2000
    min_rows: Annotated[int | None, Field(ge=20, description="Spread sizes log-uniformly from here to rows.")] = None
    alpha: Annotated[float, Field(gt=0, description="Dirichlet label skew: smaller is more non-IID.")] = 0.5
    test_rows: Annotated[int | None, Field(ge=100, description="Rows of the held-out test set.")] = None

    @model_validator(mode="after")
    def _sizes(self) -> Data:
        if self.min_rows is not None and self.min_rows > self.rows:
            raise ValueError(f"minRows ({self.min_rows}) must not exceed rows ({self.rows})")
        return self


class Audit(_Model):
    """Options of ``fedcrm audit`` for the settings that audit."""

    shadows: Annotated[int, Field(ge=1, le=64)] = 4
    shadow_epochs: Annotated[int | None, Field(ge=1)] = None
    max_records: Annotated[int, Field(ge=10)] = 5000


class Setting(_Model):
    """One column of the grid: which command, which changes to the manifest, whether to attack the model."""

    command: Annotated[Literal["baseline", "run"], Field(
        description="'baseline' (central training on the pooled rows) or 'run' (the federation).")]
    spec: Annotated[dict[str, Any], Field(
        description="Deep-merged into the Federation's spec after the experiment's common spec.")] = {}
    audit: Annotated[bool, Field(description="Run `fedcrm audit` on the result (membership-inference AUC).")] = False
    description: str = ""


class Reference(_Model):
    """Published numbers to show beside ours: ``values[setting][metric]`` (fractions and bytes)."""

    source: Annotated[str, Field(description="Where the numbers come from (shown above the comparison).")]
    note: str = ""
    values: dict[str, dict[str, float]]

    @field_validator("values")
    @classmethod
    def _metrics(cls, v: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        # camelCase like the rest of the file, or results.csv's snake_case names
        v = {s: {re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower(): x for k, x in m.items()} for s, m in v.items()}
        for setting, metrics in v.items():
            unknown = sorted(set(metrics) - set(REFERENCE_METRICS))
            if unknown:
                raise ValueError(f"{setting}: unknown metric(s) {', '.join(unknown)}; known: {', '.join(REFERENCE_METRICS)}")
        return v


class Experiment(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Names the outputs.")]
    description: str = ""
    data: Data = Data()
    seeds: Annotated[list[Annotated[int, Field(ge=0)]] | int, Field(
        description="Seeds (a list), or a count N meaning 0..N-1; each seeds the data and the training.",
        validate_default=True)] = 3
    rounds: Annotated[int, Field(ge=1, le=10_000)] = 20
    spec: Annotated[dict[str, Any], Field(description="Deep-merged into every setting's Federation spec.")] = {}
    audit: Audit = Audit()
    settings: Annotated[dict[str, Setting], Field(min_length=1)]
    reference: Reference | None = None
    quick: dict[str, Any] = {}
    #: True when this is the ``--quick`` variant (set by :func:`load_experiment`, not by the file).
    is_quick: Annotated[bool, Field(exclude=True)] = False

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | int) -> list[int]:
        seeds = list(range(v)) if isinstance(v, int) else v
        if not seeds:
            raise ValueError("give at least one seed")
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds repeat")
        return seeds

    @field_validator("settings")
    @classmethod
    def _names(cls, v: dict[str, Setting]) -> dict[str, Setting]:
        slugs: dict[str, str] = {}
        for name in v:
            s = slug(name)
            if not s:
                raise ValueError(f"setting name {name!r} needs a letter or digit")
            if s in slugs:
                raise ValueError(f"settings {slugs[s]!r} and {name!r} would share the folder {s!r}; rename one")
            slugs[s] = name
        return v

    @model_validator(mode="after")
    def _reference_names(self) -> Experiment:
        if self.reference is not None:
            unknown = sorted(set(self.reference.values) - set(self.settings))
            if unknown:
                raise ValueError(f"reference.values names unknown setting(s) {', '.join(unknown)}; "
                                 f"settings: {', '.join(self.settings)}")
        return self

    @property
    def seed_list(self) -> list[int]:
        assert isinstance(self.seeds, list)
        return self.seeds

    def synth_args(self) -> dict[str, Any]:
        """Keyword arguments of :func:`fedcrm.data.synthetic.generate_federation` (less ``seed`` and ``out_dir``)."""
        d = self.data
        return {"clients": d.clients, "rows": d.rows, "min_rows": d.min_rows, "alpha": d.alpha,
                "test_rows": d.test_rows, "rounds": self.rounds}


def slug(name: str) -> str:
    """A setting's folder name: ``federated+DP`` -> ``federated-dp``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def deep_merge(base: Any, override: Any) -> Any:
    """``override`` laid over ``base``: mappings merge key by key, anything else (lists too) replaces, and a key
    set to ``null`` is removed. Neither argument is changed."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    out = dict(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = deep_merge(base.get(key), value)
    return out


def setting_manifest(base: dict[str, Any], experiment: Experiment, setting: Setting, seed: int) -> dict[str, Any]:
    """The Federation document of one cell: ``base`` (synth's manifest) with the experiment's rounds and the seed,
    then the common spec overrides, then the setting's."""
    doc = deep_merge(base, {"spec": {"training": {"rounds": experiment.rounds, "seed": seed}}})
    doc = deep_merge(doc, {"spec": experiment.spec})
    return deep_merge(doc, {"spec": setting.spec})  # type: ignore[no-any-return]


def digest(value: Any) -> str:
    """A short content digest of JSON-able ``value`` (what a cell was made from, to tell a stale result)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _validation_base(experiment: Experiment) -> dict[str, Any]:
    """The manifest ``fedcrm synth`` would write for this data, without generating the data (seconds for 50
    clients): the same builder, with the namespaces synth gives (tenant-01, ...)."""
    from fedcrm.data import synthetic

    namespaces = [f"tenant-{i + 1:02d}" for i in range(experiment.data.clients)]
    federation = synthetic._federation(namespaces, experiment.rounds, 0)  # noqa: SLF001 - synth's own builder
    return federation.model_dump(mode="json", by_alias=True, exclude_none=True)


def check_settings(experiment: Experiment, base: dict[str, Any], source: str) -> None:
    """Every setting's merged manifest must be a valid Federation; the error names the setting and the key."""
    problems = []
    for name, setting in experiment.settings.items():
        doc = setting_manifest(base, experiment, setting, experiment.seed_list[0])
        try:
            parse_manifest(doc, Federation, f"setting {name!r}")
        except FedcrmError as err:
            problems.append(str(err).replace("invalid Federation manifest", "its spec overrides make an invalid "
                                             "Federation manifest"))
    if problems:
        raise FedcrmError(f"{source}:\n" + "\n".join(problems))


def load_experiment(path: Path, *, quick: bool = False) -> Experiment:
    """Read, validate and (with ``quick``) shrink an experiment file; raise :class:`FedcrmError` saying what to fix."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedcrmError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise FedcrmError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise FedcrmError(f"{path}: expected a mapping with name, data, seeds, rounds, settings")
    experiment = _validate(raw, path)
    if quick:
        shrink = deep_merge(QUICK_DEFAULTS, experiment.quick)
        data = {k: v for k, v in shrink.get("data", {}).items()}
        if "clients" in data:
            data["clients"] = min(data["clients"], experiment.data.clients)
        raw = deep_merge(raw, {**shrink, "data": data})  # a null (minRows) unsets the full variant's value
        seeds = experiment.seed_list[: shrink["seeds"]] if isinstance(shrink.get("seeds"), int) else shrink.get("seeds")
        raw["seeds"] = seeds or experiment.seed_list
        experiment = _validate(raw, path, what="its quick variant").model_copy(update={"is_quick": True})
    check_settings(experiment, _validation_base(experiment), str(path))
    return experiment


def _validate(raw: dict[str, Any], path: Path, what: str = "") -> Experiment:
    try:
        return Experiment.model_validate(raw)
    except ValidationError as err:
        problems = describe_validation_error(err, Experiment)
        where = f"{path} ({what})" if what else str(path)
        raise FedcrmError(f"{where}: invalid experiment:\n" + "\n".join(f"  - {p}" for p in problems)) from None
