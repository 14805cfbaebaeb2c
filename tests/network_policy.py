"""Kubernetes NetworkPolicy semantics, to ask of rendered policies whether a connection is let
through: a pod is isolated in a direction once a policy of that direction selects it, and then
only what some rule of those policies allows passes; a connection needs the source's egress and
the destination's ingress. Pods are matched by labels and namespaces only; ``ipBlock`` rules
match addresses outside the cluster (as with network plugins that never match pod addresses in
them, such as Cilium).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Label selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels) or \
                (op == "In" and labels.get(key) not in values) or \
                (op == "NotIn" and key in labels and labels[key] in values):
            return False
    return True


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace and labels, named ports) or an address outside the cluster."""

    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    address: str | None = None


@dataclass
class Network:
    policies: list[dict[str, Any]]
    namespace_labels: dict[str, dict[str, str]]

    def allows(self, source: Endpoint, destination: Endpoint, port: int,
               protocol: str = "TCP") -> bool:
        return self._side(source, destination, port, protocol, "Egress") and \
            self._side(destination, source, port, protocol, "Ingress")

    def _side(self, pod: Endpoint, peer: Endpoint, port: int, protocol: str, direction: str) -> bool:
        if pod.namespace is None:
            return True  # outside the cluster: no policy applies there
        applying = [p for p in self.policies if p["metadata"]["namespace"] == pod.namespace
                    and selects(p["spec"]["podSelector"], pod.labels)
                    and direction in _types(p)]
        if not applying:
            return True
        key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        target = peer if direction == "Egress" else pod  # whose named ports the rule means
        return any(self._peer_in(rule.get(peers_key), policy, peer)
                   and _port_in(rule.get("ports"), port, protocol, target)
                   for policy in applying for rule in policy["spec"].get(key) or [])

    def _peer_in(self, peers: list[dict[str, Any]] | None, policy: dict[str, Any],
                 peer: Endpoint) -> bool:
        if not peers:
            return True
        return any(self._matches(p, policy["metadata"]["namespace"], peer) for p in peers)

    def _matches(self, selector: dict[str, Any], policy_namespace: str, peer: Endpoint) -> bool:
        if "ipBlock" in selector:
            if peer.address is None:
                return False
            address, block = ipaddress.ip_address(peer.address), selector["ipBlock"]
            return address in ipaddress.ip_network(block["cidr"]) and not any(
                address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))
        if peer.namespace is None:
            return False
        if "namespaceSelector" in selector:
            labels = {**self.namespace_labels.get(peer.namespace, {}),
                      "kubernetes.io/metadata.name": peer.namespace}
            if not selects(selector["namespaceSelector"], labels):
                return False
        elif peer.namespace != policy_namespace:
            return False
        return selects(selector.get("podSelector") or {}, peer.labels)


def _types(policy: dict[str, Any]) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def _port_in(ports: list[dict[str, Any]] | None, port: int, protocol: str, target: Endpoint) -> bool:
    if not ports:
        return True
    for rule in ports:
        if rule.get("protocol", "TCP") != protocol:
            continue
        wanted = rule.get("port")
        if wanted is None or wanted == port or target.ports.get(str(wanted)) == port:
            return True
    return False
