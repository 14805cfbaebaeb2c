"""VO group membership as the identity provider states it, in one spelling.

Providers say the same thing three ways: WLCG tokens list ``wlcg.groups`` as paths
(``/cms/gpu``), AARC/EGI-style providers list ``eduperson_entitlement`` URNs
(``urn:mace:egi.eu:group:cms:gpu:role=member#aai.egi.eu``), others a plain ``groups`` list. All
become ``cms/gpu``, which is how the configuration names groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

GROUP_MARKER = "group"


def normalise(claim: str, value: str) -> str | None:
    """One group in the facility's spelling, or None if the value is not a group."""
    value = value.strip()
    if claim == "eduperson_entitlement" or value.startswith("urn:"):
        return _from_entitlement(value)
    return value.strip("/") or None


def _from_entitlement(urn: str) -> str | None:
    parts = urn.split("#", 1)[0].split(":")
    if GROUP_MARKER not in parts:
        return None
    path = [p for p in parts[parts.index(GROUP_MARKER) + 1:] if p and "=" not in p]
    return "/".join(path) or None


def _values(raw: Any) -> Iterable[str]:
    if isinstance(raw, str):
        return raw.replace(",", " ").split()
    if isinstance(raw, list | tuple | set):
        return [str(v) for v in raw]
    return []


def groups_from_claims(claims: dict[str, Any], names: list[str]) -> set[str]:
    """Every group found under the configured claim names (dotted names are literal keys)."""
    found = set()
    for name in names:
        for value in _values(claims.get(name)):
            group = normalise(name, value)
            if group:
                found.add(group)
    return found
