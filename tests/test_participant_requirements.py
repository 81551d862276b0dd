"""A tenant's own minimum terms (spec.requires) and its consent to one version of the terms (acceptedTerms).

Pure decisions here; the same rules against a real API server are in test_operator_cluster.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fedcrm_operator.admission import accepted_terms, decide
from hypothesis import given
from hypothesis import strategies as st

from fedcrm.errors import ManifestError
from fedcrm.spec.loading import check_membership, parse_manifest
from fedcrm.spec.manifests import Federation, Participant, Phase, Requirements
from fedcrm.spec.terms import terms_digest, unmet_requirements

ENROLLING: dict[str, Any] = {"phase": Phase.enrolling, "training": []}


def federation(privacy: dict[str, Any] | None = None, *, tenants: int = 2, **training: Any) -> Federation:
    spec = {
        "task": {"target": "converted", "features": [{"name": "amount", "type": "numeric"}]},
        "participants": {"namespaces": ["tenant-a", "tenant-b", *(f"tenant-{i}" for i in range(tenants - 2))]},
        "privacy": privacy or {},
        "training": training,
    }
    return parse_manifest({"apiVersion": "fedcrm.io/v1alpha1", "kind": "Federation",
                           "metadata": {"name": "churn", "namespace": "coord"}, "spec": spec}, Federation, "test")


def participant(ns: str = "tenant-a", **spec: Any) -> Participant:
    body = {"federationRef": {"name": "churn", "namespace": "coord"},
            "data": {"pvc": {"claimName": "crm", "path": "leads.csv"}, "mapping": {"converted": "Converted"}}, **spec}
    return parse_manifest({"apiVersion": "fedcrm.io/v1alpha1", "kind": "Participant",
                           "metadata": {"name": "crm", "namespace": ns}, "spec": body}, Participant, "test")


STRONG = {"secureAggregation": {"enabled": True, "threshold": 0.7},
          "differentialPrivacy": {"mode": "client", "epsilon": 1.0, "delta": 1e-5}}


@pytest.mark.parametrize(("requires", "privacy", "training", "unmet"), [
    ({"secureAggregation": True}, {}, {}, "secure aggregation must be on"),
    ({"minThreshold": 0.8}, STRONG, {}, "threshold must be at least 0.8"),
    ({"minThreshold": 0.8}, {}, {}, "secure aggregation must be on"),
    ({"maxEpsilon": 0.5}, STRONG, {}, "epsilon must be at most 0.5"),
    ({"maxEpsilon": 2}, {}, {}, "differential privacy must be on"),
    ({"minTenants": 5}, STRONG, {"minParticipants": 2, "tenants": 6}, "at least 5 tenants"),
])
def test_a_federation_weaker_than_the_tenant_requires_is_refused(requires: dict, privacy: dict, training: dict,
                                                                  unmet: str) -> None:
    d = decide(participant(requires=requires), federation(privacy, **training), **ENROLLING)
    assert not d.admitted and d.reason == "RequirementsNotMet"
    assert unmet in d.message and "spec.requires" in d.message


def test_a_federation_meeting_every_requirement_is_admitted() -> None:
    requires = {"secureAggregation": True, "minThreshold": 0.7, "maxEpsilon": 1, "minTenants": 2}
    assert decide(participant(requires=requires), federation(STRONG), **ENROLLING).admitted


@given(sa=st.booleans(), threshold=st.floats(0.51, 1.0), eps=st.floats(0.01, 20), tenants=st.integers(2, 50),
       r_sa=st.booleans(), r_thr=st.none() | st.floats(0.01, 1.0), r_eps=st.none() | st.floats(0.01, 20),
       r_ten=st.none() | st.integers(2, 50))
def test_requirements_are_met_exactly_when_each_bound_holds(sa: bool, threshold: float, eps: float, tenants: int,
                                                            r_sa: bool, r_thr: float | None, r_eps: float | None,
                                                            r_ten: int | None) -> None:
    fed = federation({"secureAggregation": {"enabled": sa, "threshold": threshold},
                      "differentialPrivacy": {"mode": "client", "epsilon": eps, "delta": 1e-5}},
                     minParticipants=tenants, tenants=50)
    requires = Requirements(secure_aggregation=r_sa, min_threshold=r_thr, max_epsilon=r_eps, min_tenants=r_ten)
    expected_ok = ((not (r_sa or r_thr is not None) or sa) and (r_thr is None or not sa or threshold >= r_thr)
                   and (r_eps is None or eps <= r_eps) and (r_ten is None or tenants >= r_ten))
    assert (unmet_requirements(requires, fed.spec) == []) == expected_ok


def test_a_terms_change_after_admission_needs_the_tenants_re_consent() -> None:
    before, after = federation(STRONG), federation({**STRONG, "differentialPrivacy": {
        "mode": "client", "epsilon": 8.0, "delta": 1e-5}})
    body = {"spec": {}, "status": {"acceptedTerms": terms_digest(before.spec)}}  # recorded at admission
    assert decide(participant(), before, **ENROLLING, accepted=accepted_terms(body)).admitted
    d = decide(participant(), after, **ENROLLING, accepted=accepted_terms(body))
    assert not d.admitted and d.reason == "TermsChanged"
    assert f"spec.acceptedTerms: {terms_digest(after.spec)}" in d.message and "epsilon 8.0" in d.message
    # The tenant reviews and re-consents by pinning the new digest in its spec.
    body["spec"]["acceptedTerms"] = terms_digest(after.spec)
    assert decide(participant(acceptedTerms=terms_digest(after.spec)), after, **ENROLLING,
                  accepted=accepted_terms(body)).admitted
    # Already training: the running rounds keep the terms they started with; it is not asked again.
    training = {"phase": Phase.training, "training": ["tenant-a/crm"]}
    assert decide(participant(), after, **training, accepted=terms_digest(before.spec)).admitted
    # Never admitted before: consent is to the terms as they are.
    assert decide(participant(), after, **ENROLLING, accepted=None).admitted


def test_only_terms_count_not_who_may_join() -> None:
    fed = federation(STRONG)
    wider = fed.model_copy(deep=True)
    wider.spec.participants.namespaces.append("tenant-c")
    assert terms_digest(wider.spec) == terms_digest(fed.spec)


def test_fedcrm_run_refuses_a_participant_whose_terms_are_not_met() -> None:
    with pytest.raises(ManifestError, match="weaker than its spec.requires: secure aggregation must be on"):
        check_membership(federation(), participant(requires={"secureAggregation": True}))
    with pytest.raises(ManifestError, match="spec.acceptedTerms"):
        check_membership(federation(STRONG), participant(acceptedTerms="0" * 64))
    check_membership(federation(STRONG), participant(acceptedTerms=terms_digest(federation(STRONG).spec)))


def test_accepted_terms_must_be_a_digest() -> None:
    with pytest.raises(ManifestError, match="acceptedTerms"):
        participant(acceptedTerms="yes")


def test_fedcrm_terms_prints_the_digest_and_checks_participants(tmp_path: Path) -> None:
    fed = federation(STRONG)
    fed_file = tmp_path / "federation.yaml"
    fed_file.write_text(yaml.safe_dump(fed.model_dump(mode="json", by_alias=True, exclude={"status"})))
    ok, strict = tmp_path / "ok.yaml", tmp_path / "strict.yaml"
    for path, requires in ((ok, {"maxEpsilon": 1}), (strict, {"maxEpsilon": 0.5})):
        p = participant("tenant-a" if path == ok else "tenant-b", requires=requires)
        path.write_text(yaml.safe_dump(p.model_dump(mode="json", by_alias=True, exclude={"status"})))
    fedcrm = [sys.executable, "-m", "fedcrm.cli.main"]
    out = subprocess.run([*fedcrm, "terms", str(fed_file)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and terms_digest(fed.spec) in out.stdout and "epsilon 1.0" in out.stdout
    out = subprocess.run([*fedcrm, "terms", str(fed_file), "--participant", str(ok), str(strict)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "tenant-a/crm: accepts" in out.stdout
    assert "tenant-b/crm: refuses" in out.stdout and "epsilon must be at most 0.5" in out.stdout
