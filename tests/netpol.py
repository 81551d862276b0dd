"""A small NetworkPolicy evaluator, following the networking.k8s.io/v1 semantics.

There is no CNI on the test cluster, so nothing enforces the policies the
operator writes; this evaluator answers "would this connection be allowed?"
for the policies as stored by the API server:

- a pod selected by no policy of a direction is open in that direction;
- a pod selected by at least one policy listing that direction accepts only
  what some rule of those policies allows (rules are unioned);
- a connection needs both the source's egress and the destination's ingress.

Peers: ``podSelector`` alone means pods in the policy's own namespace,
``namespaceSelector`` alone all pods of the matching namespaces, both together
the matching pods in the matching namespaces. ``ipBlock`` matches by the
peer's address (``Pod.ip``: an address outside the cluster is a Pod with a
namespace of its own and no labels): inside ``cidr`` and in no ``except``
range; a peer without an address never matches an ipBlock.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Pod", "allowed", "selects"]


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str] = field(default_factory=dict)
    namespace_labels: dict[str, str] = field(default_factory=dict)
    ip: str | None = None

    def __hash__(self) -> int:
        return hash((self.namespace, self.name))

    @property
    def ns_labels(self) -> dict[str, str]:
        # The API server adds kubernetes.io/metadata.name to every namespace.
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector; an empty selector selects everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _peer_matches(peer: dict[str, Any], policy_namespace: str, other: Pod) -> bool:
    if "ipBlock" in peer:
        if other.ip is None:
            return False
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]

        def inside(cidr: str) -> bool:
            network = ipaddress.ip_network(cidr)
            return network.version == address.version and address in network

        return inside(block["cidr"]) and not any(inside(c) for c in block.get("except") or [])
    has_ns, has_pod = "namespaceSelector" in peer, "podSelector" in peer
    if has_ns and not selects(peer["namespaceSelector"], other.ns_labels):
        return False
    if not has_ns and other.namespace != policy_namespace:
        return False
    if has_pod and not selects(peer["podSelector"], other.labels):
        return False
    return True


def _port_matches(rule_ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        if isinstance(p["port"], str):
            raise AssertionError("named ports are not evaluated by this helper")
        end = p.get("endPort", p["port"])
        if p["port"] <= port <= end:
            return True
    return False


def _direction_allows(policies: list[dict[str, Any]], pod: Pod, other: Pod, port: int, protocol: str, direction: str) -> bool:
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    relevant = [
        p for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and direction in (p["spec"].get("policyTypes") or ["Ingress"])
        and selects(p["spec"].get("podSelector"), pod.labels)
    ]
    if not relevant:
        return True
    for policy in relevant:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            peer_ok = not peers or any(_peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers)
            if peer_ok and _port_matches(rule.get("ports"), port, protocol):
                return True
    return False


def allowed(policies: list[dict[str, Any]], src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
    """Whether ``src`` may open a connection to ``dst`` on ``port``."""
    return _direction_allows(policies, src, dst, port, protocol, "Egress") and _direction_allows(
        policies, dst, src, port, protocol, "Ingress"
    )
