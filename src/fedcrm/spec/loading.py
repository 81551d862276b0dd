"""Reading manifests from YAML and turning validation errors into sentences."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fedcrm.errors import ManifestError
from fedcrm.spec.manifests import Federation, Participant
from fedcrm.spec.terms import privacy_summary, terms_digest, unmet_requirements
from fedcrm.spec.secrets import Secret

__all__ = [
    "ParticipantManifests",
    "check_membership",
    "describe_validation_error",
    "dump_manifest",
    "load_federation",
    "load_participant",
    "load_participant_manifests",
    "parse_manifest",
    "secret_values",
]

M = TypeVar("M", bound=BaseModel)


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The aliases accepted at ``loc``'s parent, for 'did you mean' hints."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = next(
            (f for n, f in current.model_fields.items() if (f.alias or n) == part or n == part),
            None,
        )
        if field is None:
            return []
        current = _inner_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside ``X``, ``X | None`` or ``list[X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(document)"


def describe_validation_error(err: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per problem: ``<field path>: <what is wrong>``."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # Pydantic reports union branches as path parts ("str", "bool"); they mean nothing to a user.
        loc = tuple(
            p for p in loc
            if not (isinstance(p, str) and (p in {"str", "bool", "int", "float"} or p.startswith(("literal[", "constrained-"))))
        )
        where = _path(loc)
        if e["type"] == "extra_forbidden":
            known = _known_fields(model, loc)
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            msg = "unknown field"
            if hint:
                msg += f" (did you mean '{hint[0]}'?)"
            elif known:
                msg += f" (allowed here: {', '.join(sorted(known))})"
        elif e["type"] == "missing":
            msg = "required field is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "literal_error" and "input" in e:
                msg += f" (got {e['input']!r})"
        lines.append(f"{where}: {msg}")
    return lines


def parse_manifest(data: Any, model: type[M], source: str) -> M:
    """Validate an already-parsed document as ``model``; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a {model.__name__} manifest (a YAML mapping), got {type(data).__name__}")
    kind = data.get("kind")
    if kind is not None and kind != model.__name__:
        raise ManifestError(f"{source}: this is a {kind} manifest; a {model.__name__} is needed here")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = describe_validation_error(err, model)
        raise ManifestError(
            f"{source}: invalid {model.__name__} manifest:\n" + "\n".join(f"  - {p}" for p in problems)
        ) from None


def _documents(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except OSError as err:
        raise ManifestError(f"{path}: cannot read it ({err.strerror})") from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML: {err}") from None


def _is_secret(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == "Secret" and doc.get("apiVersion", "v1") == "v1"


def _load(path: Path, model: type[M]) -> M:
    """The one ``model`` document of a file; Secrets beside a Participant are allowed and skipped here."""
    docs = _documents(path)
    if model is Participant:
        docs = [d for d in docs if not _is_secret(d)]
    if len(docs) != 1:
        raise ManifestError(f"{path}: expected exactly one {model.__name__} document, found {len(docs)}")
    return parse_manifest(docs[0], model, str(path))


def load_federation(path: str | Path) -> Federation:
    return _load(Path(path), Federation)


def load_participant(path: str | Path) -> Participant:
    """The Participant of a file that may also carry the Secret it references."""
    return _load(Path(path), Participant)


@dataclass(frozen=True)
class ParticipantManifests:
    """What the files given with ``--participant`` hold: Participants (with their file) and Secrets."""

    participants: list[tuple[Participant, Path]] = field(default_factory=list)
    secrets: dict[tuple[str, str], Secret] = field(default_factory=dict)


def load_participant_manifests(paths: list[Path]) -> ParticipantManifests:
    """Read every document of every file: Participants, and the ``v1 Secret`` manifests they reference.

    All problems are reported together. A file may hold one Participant, its
    Secret(s), or both, as ``kubectl apply -f`` would take them.
    """
    out = ParticipantManifests()
    problems: list[str] = []
    for path in paths:
        try:
            docs = _documents(path)
        except ManifestError as err:
            problems.append(str(err))
            continue
        others = [d for d in docs if not _is_secret(d)]
        for i, doc in enumerate(docs):
            source = f"{path} (document {i + 1})" if len(docs) > 1 else str(path)
            try:
                if _is_secret(doc):
                    secret = parse_manifest(doc, Secret, source)
                    out.secrets[secret.key] = secret
                else:
                    out.participants.append((parse_manifest(doc, Participant, source), path))
            except ManifestError as err:
                problems.append(str(err))
        if len(others) > 1:
            problems.append(f"{path}: holds {len(others)} Participant documents; give each Participant its own file")
    if problems:
        raise ManifestError("\n".join(problems))
    return out


def secret_values(participant: Participant, secrets: dict[tuple[str, str], Secret]) -> dict[str, str] | None:
    """The keys of the Secret ``participant`` references, looked up in its own namespace only; None if it needs none."""
    name = participant.spec.credentials_secret_name()
    if name is None:
        return None
    secret = secrets.get((participant.metadata.namespace, name))
    if secret is None:
        elsewhere = sorted(f"{ns}/{n}" for ns, n in secrets if n == name)
        raise ManifestError(
            f"participant {participant.identity}: spec.data.{participant.spec.data.kind}.secretRef names Secret "
            f"{name!r}, but no Secret of that name in namespace {participant.metadata.namespace!r} was given; "
            "pass its manifest (kind: Secret) with the Participant's files"
            + (f" (found {', '.join(elsewhere)}: a Participant only sees Secrets of its own namespace)" if elsewhere else "")
        )
    return secret.values()


def dump_manifest(obj: BaseModel) -> str:
    """YAML as a person would write it: camelCase, defaults left out, status never."""
    data = obj.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude={"status"})
    data = {"apiVersion": getattr(obj, "api_version"), "kind": getattr(obj, "kind"), **data}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def check_membership(federation: Federation, participant: Participant) -> None:
    """Both sides must consent: the Participant names the Federation, and the Federation allows its namespace."""
    ref = participant.spec.federation_ref
    who = participant.identity
    if (ref.namespace, ref.name) != (federation.metadata.namespace, federation.metadata.name):
        raise ManifestError(
            f"participant {who} names federation {ref.namespace}/{ref.name} in spec.federationRef, "
            f"but this federation is {federation.key}; fix spec.federationRef"
        )
    allowed = federation.spec.participants.namespaces
    if participant.metadata.namespace not in allowed:
        raise ManifestError(
            f"participant {who}: namespace {participant.metadata.namespace!r} is not in the federation's "
            f"spec.participants.namespaces ({', '.join(allowed) or 'empty'}); the federation owner must add it"
        )
    unmet = unmet_requirements(participant.spec.requires, federation.spec)
    if unmet:
        raise ManifestError(f"participant {who}: federation {federation.key} is weaker than its spec.requires: "
                            f"{'; '.join(unmet)}; strengthen the federation or relax spec.requires")
    pinned, current = participant.spec.accepted_terms, terms_digest(federation.spec)
    if pinned is not None and pinned != current:
        raise ManifestError(f"participant {who} consents to terms {pinned[:12]} (spec.acceptedTerms) but federation "
                            f"{federation.key} has terms {current} ({privacy_summary(federation.spec)}); review "
                            "them and set spec.acceptedTerms to that digest, or remove it")
