"""Pure functions from a Federation/Participant to the Kubernetes objects that run it.

No I/O here: each builder takes validated specs and settings and returns a
plain dict the API server accepts. That keeps every security-relevant choice
(non-root, read-only root filesystem, no service-account token, what a
NetworkPolicy admits) in one readable place, unit-testable without a cluster.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import kopf

from fedcrm.data.credentials import MOUNT_PATH as CREDENTIALS_DIR
from fedcrm.exit_codes import NodeExitCode
from fedcrm.runconfig import AggregatorConfig, TlsPaths
from fedcrm.spec.loading import dump_manifest
from fedcrm.spec.manifests import EgressRule, Federation, Participant, Resources
from fedcrm_operator.naming import FEDERATION_LABEL, FEDERATION_NAMESPACE_LABEL, ROLE_LABEL, Names
from fedcrm_operator.settings import OperatorSettings, label_pair

__all__ = [
    "AGGREGATOR_CONFIG_KEY",
    "CONTAINER_UID",
    "aggregator_config_map",
    "aggregator_network_policy",
    "aggregator_services",
    "aggregator_stateful_set",
    "ca_secret",
    "client_secret",
    "owned_by",
    "participant_config_map",
    "participant_network_policy",
    "server_secret",
    "service_monitor",
    "training_job",
    "training_resources",
]

CONTAINER_UID = 65532  # "nonroot" in distroless images
AGGREGATOR_CONFIG_KEY = "aggregator.json"
PARTICIPANT_MANIFEST_KEY = "participant.yaml"
FEDERATION_MANIFEST_KEY = "federation.yaml"
# Node exit codes that fail the training Job at once instead of being retried.
_FINAL_EXITS = [int(NodeExitCode.CONFIG), int(NodeExitCode.TERMS_REFUSED)]
TLS_DIR = "/etc/fedcrm/tls"
CONFIG_DIR = "/etc/fedcrm/config"
CHECKPOINT_DIR = "/var/lib/fedcrm"
DATA_DIR = "/var/run/fedcrm/data"
STATE_DIR = "/var/lib/fedcrm/state"
#: Exit code of fedcrm-node when its manifest, data or certificate is wrong: retrying cannot help.


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _meta(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels}


def _selector(labels: dict[str, str]) -> dict[str, str]:
    """The stable subset of a child's labels used to select its pods."""
    keys = (FEDERATION_LABEL, FEDERATION_NAMESPACE_LABEL, ROLE_LABEL, "fedcrm.io/participant")
    return {k: v for k, v in labels.items() if k in keys}


def _hardened_container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": CONTAINER_UID,
        "runAsGroup": CONTAINER_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": CONTAINER_UID,
        "runAsGroup": CONTAINER_UID,
        "fsGroup": CONTAINER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def owned_by(obj: dict[str, Any], owner: dict[str, Any] | None) -> dict[str, Any]:
    """``obj`` with a controller owner reference to ``owner`` (a Federation or Participant as the API serves
    it), when both are in one namespace; otherwise ``obj`` unchanged. ``obj`` itself is never modified.

    The reference is kopf's (:func:`kopf.append_owner_reference`, as :func:`kopf.adopt` sets it) with
    ``controller: true``, so the garbage collector removes the child with its owner and ``kubectl`` shows who
    manages it. Not :func:`kopf.adopt` itself: it would also copy the owner's labels (the tenant's own, for a
    Participant) onto the child, whose labels the sweeps select on. ``blockOwnerDeletion`` stays false:
    setting it needs ``update`` on the owner's ``finalizers`` subresource where the API server enforces
    owner-reference permissions, and nothing here needs an owner's deletion to wait for its children.

    An owner reference cannot cross namespaces (the garbage collector would look for the owner in the child's
    namespace, find nothing and delete the child), so a Federation's children in tenant namespaces carry only
    its labels and go through its finalizer.
    """
    meta = (owner or {}).get("metadata") or {}
    if owner is None or not meta.get("uid") or meta.get("namespace") != obj["metadata"].get("namespace"):
        return obj
    out = copy.deepcopy(obj)
    kopf.append_owner_reference(out, kopf.Body(owner), controller=True, block_owner_deletion=False)
    return out


# --------------------------------------------------------------------------- coordinator side


def ca_secret(names: Names, *, cert_pem: bytes, key_pem: bytes) -> dict[str, Any]:
    """The federation CA. Only the operator reads it: no pod mounts this Secret."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(names.ca_secret, names.namespace, names.labels("ca")),
        "type": "Opaque",
        "data": {"ca.crt": _b64(cert_pem), "ca.key": _b64(key_pem)},
    }


def _tls_secret(name: str, namespace: str, labels: dict[str, str], *, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(name, namespace, labels),
        "type": "kubernetes.io/tls",
        "data": {"ca.crt": _b64(ca_pem), "tls.crt": _b64(cert_pem), "tls.key": _b64(key_pem)},
    }


def server_secret(names: Names, *, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> dict[str, Any]:
    return _tls_secret(
        names.server_secret, names.namespace, names.labels("aggregator"), ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem
    )


def aggregator_config_map(names: Names, federation: Federation, participants: list[str], settings: OperatorSettings) -> dict[str, Any]:
    """The same AggregatorConfig ``fedcrm run`` writes, with in-pod paths."""
    config = AggregatorConfig(
        federation=federation,
        participants=sorted(participants),
        listen=f"0.0.0.0:{settings.grpc_port}",
        tls=TlsPaths(ca=f"{TLS_DIR}/ca.crt", cert=f"{TLS_DIR}/tls.crt", key=f"{TLS_DIR}/tls.key"),
        out_dir=CHECKPOINT_DIR,
        status_listen=f"0.0.0.0:{settings.metrics_port}",
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(names.aggregator_config, names.namespace, names.labels("aggregator")),
        "data": {AGGREGATOR_CONFIG_KEY: config.model_dump_json(by_alias=True, indent=2)},
    }


def aggregator_services(names: Names, settings: OperatorSettings) -> list[dict[str, Any]]:
    """A headless Service (the StatefulSet's stable network identity) and the one participants dial."""
    labels = names.labels("aggregator")
    ports = [
        {"name": "grpc", "port": settings.grpc_port, "targetPort": "grpc", "protocol": "TCP"},
        {"name": "metrics", "port": settings.metrics_port, "targetPort": "metrics", "protocol": "TCP"},
    ]
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(names.aggregator, names.namespace, labels),
        "spec": {"clusterIP": "None", "selector": _selector(labels), "ports": ports, "publishNotReadyAddresses": True},
    }
    client = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(names.aggregator_client_service, names.namespace, labels),
        "spec": {"type": "ClusterIP", "selector": _selector(labels), "ports": ports},
    }
    return [headless, client]


def aggregator_stateful_set(names: Names, settings: OperatorSettings, *, config_digest: str) -> dict[str, Any]:
    """One aggregator replica with a volume for checkpoints and accountant state.

    ``config_digest`` goes into a pod annotation so a changed config rolls the pod
    (the aggregator resumes from its checkpoint).
    """
    labels = names.labels("aggregator")
    resources = {"cpu": settings.aggregator_cpu, "memory": settings.aggregator_memory}
    http_probe = {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10, "timeoutSeconds": 3}
    claim: dict[str, Any] = {
        "metadata": {"name": "checkpoints", "labels": labels},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": settings.checkpoint_storage}}},
    }
    if settings.storage_class:
        claim["spec"]["storageClassName"] = settings.storage_class
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(names.aggregator, names.namespace, labels),
        "spec": {
            "replicas": 1,
            "serviceName": names.aggregator,
            "selector": {"matchLabels": _selector(labels)},
            "podManagementPolicy": "OrderedReady",
            # The claim holds checkpoint/privacy.json, the only durable privacy ledger: a deleted StatefulSet
            # must not take it along (it comes back and resumes); the Federation's finalizer removes the claim.
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
            "template": {
                "metadata": {"labels": labels, "annotations": {"fedcrm.io/config-digest": config_digest}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security(),
                    "containers": [
                        {
                            "name": "aggregator",
                            "image": settings.aggregator_image,
                            "imagePullPolicy": settings.image_pull_policy,
                            "args": ["--config", f"{CONFIG_DIR}/{AGGREGATOR_CONFIG_KEY}", "--serve-after-finish"],
                            "ports": [
                                {"name": "grpc", "containerPort": settings.grpc_port, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": settings.metrics_port, "protocol": "TCP"},
                            ],
                            "readinessProbe": {**http_probe, "initialDelaySeconds": 2},
                            "livenessProbe": {**http_probe, "initialDelaySeconds": 10, "failureThreshold": 6},
                            "resources": {"requests": resources, "limits": resources},
                            "securityContext": _hardened_container_security(),
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            "volumeMounts": [
                                {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
                                {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                                {"name": "checkpoints", "mountPath": CHECKPOINT_DIR},
                                {"name": "tmp", "mountPath": "/tmp"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "tls", "secret": {"secretName": names.server_secret, "defaultMode": 0o400}},
                        {"name": "config", "configMap": {"name": names.aggregator_config}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
                    ],
                },
            },
            "volumeClaimTemplates": [claim],
        },
    }


def aggregator_network_policy(names: Names, participant_namespaces: list[str], settings: OperatorSettings) -> dict[str, Any]:
    """Ingress to the aggregator: admitted participants' training pods on gRPC, monitoring and the operator on metrics.

    Nothing else reaches it, and it reaches nothing (it only answers).
    """
    training = {FEDERATION_LABEL: names.labels("training")[FEDERATION_LABEL],
                FEDERATION_NAMESPACE_LABEL: names.namespace, ROLE_LABEL: "training"}
    monitoring_key, monitoring_value = label_pair(settings.monitoring_namespace_label)
    operator_key, operator_value = label_pair(settings.operator_pod_label)
    grpc = [{"protocol": "TCP", "port": settings.grpc_port}]
    metrics = [{"protocol": "TCP", "port": settings.metrics_port}]
    ingress: list[dict[str, Any]] = []
    if participant_namespaces:
        ingress.append(
            {
                "from": [
                    {
                        "namespaceSelector": {
                            "matchExpressions": [
                                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": sorted(set(participant_namespaces))}
                            ]
                        },
                        "podSelector": {"matchLabels": training},
                    }
                ],
                "ports": grpc,
            }
        )
    ingress.append({"from": [{"namespaceSelector": {"matchLabels": {monitoring_key: monitoring_value}}}], "ports": metrics})
    ingress.append(
        {
            "from": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.operator_namespace}},
                    "podSelector": {"matchLabels": {operator_key: operator_value}},
                }
            ],
            "ports": metrics,
        }
    )
    labels = names.labels("aggregator")
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(names.aggregator_policy, names.namespace, labels),
        "spec": {"podSelector": {"matchLabels": _selector(labels)}, "policyTypes": ["Ingress", "Egress"], "ingress": ingress, "egress": []},
    }


def service_monitor(names: Names) -> dict[str, Any]:
    labels = names.labels("aggregator")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(names.aggregator, names.namespace, labels),
        "spec": {
            "selector": {"matchLabels": _selector(labels)},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }


# --------------------------------------------------------------------------- tenant side


def client_secret(names: Names, participant: Participant, *, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> dict[str, Any]:
    """The participant's certificate, identity ``<namespace>/<name>``, in its own namespace."""
    p = participant.metadata
    return _tls_secret(
        names.client_secret(p.name), p.namespace, names.labels("training", p.name), ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem
    )


def participant_config_map(names: Names, federation: Federation, participant: Participant) -> dict[str, Any]:
    """The Participant as the node reads it, and the Federation whose task the enrolment check maps to.

    Statuses are stripped; the pod needs no API access.
    """
    p = participant.metadata
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(names.participant_config(p.name), p.namespace, names.labels("training", p.name)),
        "data": {
            PARTICIPANT_MANIFEST_KEY: dump_manifest(participant.model_copy(update={"status": None})),
            FEDERATION_MANIFEST_KEY: dump_manifest(federation.model_copy(update={"status": None})),
        },
    }


def training_resources(federation: Federation, participant: Participant, settings: OperatorSettings) -> Resources:
    """The Federation's pod size with the tenant's overrides applied.

    A Federation whose ``spec.resources`` equals the built-in defaults gets the operator's configured
    defaults instead (the API server fills defaults in, so "left unset" and "set to the defaults" look alike).
    """
    base = federation.spec.resources
    if base == Resources():
        base = settings.default_resources
    overrides = participant.spec.resources
    return overrides.applied_to(base) if overrides else base


def _resource_list(resources: Resources) -> dict[str, Any]:
    out: dict[str, Any] = {"cpu": resources.cpu, "memory": resources.memory}
    if resources.gpu:
        out["nvidia.com/gpu"] = str(resources.gpu)  # extended resources: requests must equal limits
    return out


def training_job(
    names: Names, federation: Federation, participant: Participant, settings: OperatorSettings, *, connect_timeout: float
) -> dict[str, Any]:
    """The participant's training pod, as a Job.

    restartPolicy Never with a backoff limit: a crashed pod is replaced and the
    node reconnects, resuming from the aggregator's current round. Exit code 2
    (the tenant's manifest or data is wrong) fails the Job at once instead of
    crash-looping. The pod mounts only this tenant's own claim and certificate,
    and carries no service-account token.
    """
    p = participant.metadata
    labels = names.labels("training", p.name)
    sized = training_resources(federation, participant, settings)
    resources = _resource_list(sized)
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in participant.spec.tolerations]
    if sized.gpu and not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    volumes: list[dict[str, Any]] = [
        {"name": "tls", "secret": {"secretName": names.client_secret(p.name), "defaultMode": 0o400}},
        {"name": "config", "configMap": {"name": names.participant_config(p.name)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    manifest = ["--participant", f"{CONFIG_DIR}/{PARTICIPANT_MANIFEST_KEY}"]
    source: list[str] = []  # where the tenant's records are: the same for the check and for training
    secret = participant.spec.credentials_secret_name()
    if secret is not None:
        # The tenant's own Secret (the name cannot point elsewhere), owner-read-only, in this pod only.
        volumes.append({"name": "credentials", "secret": {"secretName": secret, "defaultMode": 0o400}})
        mounts.append({"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True})
        source += ["--credentials", CREDENTIALS_DIR]
    pvc = participant.spec.data.pvc
    if pvc is not None:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": pvc.claim_name, "readOnly": True}})
        mounts.append({"name": "data", "mountPath": DATA_DIR, "readOnly": True})
        source += ["--data-root", DATA_DIR]
    train_args = manifest + source + [
        # The node enforces its own copy of the terms (the ConfigMap), never the aggregator's word.
        "--federation", f"{CONFIG_DIR}/{FEDERATION_MANIFEST_KEY}",
        "--aggregator", f"{names.aggregator_host(settings.cluster_domain)}:{settings.grpc_port}",
        "--ca", f"{TLS_DIR}/ca.crt",
        "--cert", f"{TLS_DIR}/tls.crt",
        "--key", f"{TLS_DIR}/tls.key",
        "--connect-timeout", f"{connect_timeout:.0f}",
    ]
    node_mounts = list(mounts)
    if participant.spec.state_claim is not None:
        # The node's own count of privacy releases, written before each release; the training container only.
        volumes.append({"name": "state", "persistentVolumeClaim": {"claimName": participant.spec.state_claim}})
        node_mounts.append({"name": "state", "mountPath": STATE_DIR})
        train_args += ["--state-dir", STATE_DIR]
    check_args = manifest + source + ["--check-only", f"{CONFIG_DIR}/{FEDERATION_MANIFEST_KEY}"]
    node = {
        "image": settings.node_image,
        "imagePullPolicy": settings.image_pull_policy,
        "resources": {"requests": resources, "limits": resources},
        "securityContext": _hardened_container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(),
        # The enrolment check: the tenant's data is read and mapped before the pod ever dials the aggregator;
        # its problems (exit code 2) fail the Job and reach the Participant's status as the pod's message.
        "initContainers": [{"name": "data-check", "args": check_args, **node}],
        "containers": [
            {
                "name": "node",
                "args": train_args,
                "env": [{"name": "FEDCRM_TORCH_THREADS", "value": _threads(sized.cpu)}],
                **node,
                "volumeMounts": node_mounts,
            }
        ],
        "volumes": volumes,
    }
    if participant.spec.node_selector:
        pod_spec["nodeSelector"] = dict(participant.spec.node_selector)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(names.training_job(p.name), p.namespace, labels),
        "spec": {
            "backoffLimit": settings.training_backoff_limit,
            "podFailurePolicy": {
                "rules": [
                    # What a retry cannot fix: bad data or manifest, or an aggregator serving other terms.
                    {"action": "FailJob", "onExitCodes": {"containerName": c, "operator": "In", "values": _FINAL_EXITS}}
                    for c in ("data-check", "node")
                ] + [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ],
            },
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def _threads(cpu: str) -> str:
    """Torch threads from the CPU request: whole cores, at least one."""
    try:
        cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    except ValueError:
        return "1"
    return str(max(1, int(cores)))


def _egress_rule(rule: EgressRule) -> dict[str, Any]:
    if rule.cidr is not None:
        block: dict[str, Any] = {"cidr": rule.cidr}
        if rule.except_:
            block["except"] = list(rule.except_)
        peer: dict[str, Any] = {"ipBlock": block}
    else:
        peer = {"podSelector": {"matchLabels": dict(rule.pod_selector or {})}}  # this namespace only
    return {"to": [peer], "ports": [{"protocol": "TCP", "port": port} for port in rule.ports]}


def participant_network_policy(names: Names, participant: Participant, settings: OperatorSettings) -> dict[str, Any]:
    """The training pod talks to the aggregator's gRPC port, to DNS and to its own data source as the Participant
    declares it (``spec.data.<source>.egress``); nothing talks to it."""
    p = participant.metadata
    labels = names.labels("training", p.name)
    dns_key, dns_value = label_pair(settings.dns_pod_label)
    aggregator = _selector(names.labels("aggregator"))
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(names.participant_policy(p.name), p.namespace, labels),
        "spec": {
            "podSelector": {"matchLabels": _selector(labels)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [
                {
                    "to": [
                        {
                            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": names.namespace}},
                            "podSelector": {"matchLabels": aggregator},
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": settings.grpc_port}],
                },
                {
                    "to": [
                        {
                            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.dns_namespace}},
                            "podSelector": {"matchLabels": {dns_key: dns_value}},
                        }
                    ],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                },
                *(_egress_rule(rule) for rule in participant.spec.data.network_egress()),
            ],
        },
    }
