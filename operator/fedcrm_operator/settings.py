"""Every operator setting in one place, read once at start from the environment.

The Helm chart sets these variables from its values; a developer running the
operator by hand against ``e2e/cluster`` gets working defaults.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field

from fedcrm.pki import DEFAULT_LEAF_LIFETIME, MIN_LEAF_LIFETIME
from fedcrm.spec.manifests import Resources

__all__ = ["OperatorSettings", "parse_duration"]

_DURATION = re.compile(r"(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?")


def parse_duration(text: str) -> dt.timedelta:
    """A duration as cert-manager writes one (Go's hours, minutes, seconds): ``2160h``, ``1h30m``, ``45s``."""
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"{text!r} is not a duration such as 2160h, 1h30m or 45s")
    return dt.timedelta(hours=int(match["h"] or 0), minutes=int(match["m"] or 0), seconds=int(match["s"] or 0))


def _lifetime(text: str) -> dt.timedelta:
    lifetime = parse_duration(text)
    if lifetime < MIN_LEAF_LIFETIME:
        raise ValueError(f"FEDCRM_CERTIFICATE_LIFETIME={text} is shorter than {MIN_LEAF_LIFETIME.total_seconds():g}s")
    return lifetime


def _env(name: str, default: str) -> str:
    return os.environ.get(f"FEDCRM_{name}", default)


def _list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class OperatorSettings:
    #: Namespaces whose Federations and Participants are watched; empty means the whole cluster.
    namespaces: tuple[str, ...] = ()
    node_image: str = "ghcr.io/fedcrm/node:0.1.0"
    aggregator_image: str = "ghcr.io/fedcrm/aggregator:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    #: Training-pod requests when a Federation leaves ``spec.resources`` at its defaults.
    default_resources: Resources = field(default_factory=Resources)
    aggregator_cpu: str = "1"
    aggregator_memory: str = "1Gi"
    #: Size and class of each aggregator's checkpoint volume ('' = the cluster default class).
    checkpoint_storage: str = "1Gi"
    storage_class: str = ""
    grpc_port: int = 8443
    metrics_port: int = 9090
    #: Pods allowed to scrape aggregator metrics: namespaces carrying this label (key=value).
    monitoring_namespace_label: str = "kubernetes.io/metadata.name=monitoring"
    #: The operator's own namespace and pod labels, admitted to the aggregator's status port.
    operator_namespace: str = "fedcrm-system"
    operator_pod_label: str = "app.kubernetes.io/name=fedcrm-operator"
    #: Where DNS runs, for the tenant pods' egress rule.
    dns_namespace: str = "kube-system"
    dns_pod_label: str = "k8s-app=kube-dns"
    #: How the operator reaches an aggregator's status endpoint; {service}, {namespace}, {port} are filled in.
    aggregator_status_url: str = "http://{service}.{namespace}.svc:{port}/status"
    status_poll_seconds: float = 1.0
    #: Attempts at a training pod before the participant counts as failed (a crash must not lose the federation).
    training_backoff_limit: int = 4
    cluster_domain: str = "cluster.local"
    #: Lifetime of the aggregator's and the participants' certificates; each is renewed at two thirds of it.
    certificate_lifetime: dt.timedelta = DEFAULT_LEAF_LIFETIME
    #: Watch the operator's children (namespace by namespace) and read them from the watches; off, every pass
    #: asks the API server (hundreds of requests per idle Federation a minute; for comparison and debugging).
    watch_children: bool = True

    @classmethod
    def from_environment(cls) -> OperatorSettings:
        d = cls()
        return cls(
            namespaces=_list(_env("WATCH_NAMESPACES", "")),
            node_image=_env("NODE_IMAGE", d.node_image),
            aggregator_image=_env("AGGREGATOR_IMAGE", d.aggregator_image),
            image_pull_policy=_env("IMAGE_PULL_POLICY", d.image_pull_policy),
            default_resources=Resources(
                cpu=_env("DEFAULT_CPU", d.default_resources.cpu),
                memory=_env("DEFAULT_MEMORY", d.default_resources.memory),
                gpu=int(_env("DEFAULT_GPU", str(d.default_resources.gpu))),
            ),
            aggregator_cpu=_env("AGGREGATOR_CPU", d.aggregator_cpu),
            aggregator_memory=_env("AGGREGATOR_MEMORY", d.aggregator_memory),
            checkpoint_storage=_env("CHECKPOINT_STORAGE", d.checkpoint_storage),
            storage_class=_env("STORAGE_CLASS", d.storage_class),
            monitoring_namespace_label=_env("MONITORING_NAMESPACE_LABEL", d.monitoring_namespace_label),
            operator_namespace=_env("OPERATOR_NAMESPACE", d.operator_namespace),
            operator_pod_label=_env("OPERATOR_POD_LABEL", d.operator_pod_label),
            dns_namespace=_env("DNS_NAMESPACE", d.dns_namespace),
            dns_pod_label=_env("DNS_POD_LABEL", d.dns_pod_label),
            aggregator_status_url=_env("AGGREGATOR_STATUS_URL", d.aggregator_status_url),
            status_poll_seconds=float(_env("STATUS_POLL_SECONDS", str(d.status_poll_seconds))),
            training_backoff_limit=int(_env("TRAINING_BACKOFF_LIMIT", str(d.training_backoff_limit))),
            cluster_domain=_env("CLUSTER_DOMAIN", d.cluster_domain),
            certificate_lifetime=_lifetime(_env("CERTIFICATE_LIFETIME", f"{int(d.certificate_lifetime.total_seconds())}s")),
            watch_children=_env("WATCH_CHILDREN", "true").strip().lower() not in ("0", "false", "no", "off"),
        )


def label_pair(text: str) -> tuple[str, str]:
    """``key=value`` -> (key, value); settings carry selectors in this form."""
    key, _, value = text.partition("=")
    return key.strip(), value.strip()
