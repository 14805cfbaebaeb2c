"""The user environments a user may pick, by VO group, for both spawners.

One list in the configuration (``hub.profiles``) is the source: the local spawner renders it as
its own form, and KubeSpawner gets it as ``profile_list`` (GPU profiles with the
``nvidia.com/gpu`` limit, node selector and tolerations).
"""

from __future__ import annotations

from typing import Any

from dask.utils import parse_bytes

from facility.config import HubConfig, ProfileConfig


def visible_profiles(hub: HubConfig, groups: set[str]) -> list[ProfileConfig]:
    """Profiles open to everyone, and those whose groups the user is in."""
    return [p for p in hub.profiles if not p.groups or set(p.groups) & groups]


def profile_named(hub: HubConfig, groups: set[str], slug: str | None) -> ProfileConfig:
    """The chosen profile, checked against what the user may use (forms can be forged)."""
    mine = visible_profiles(hub, groups)
    if not mine:
        raise PermissionError("no profile is open to your VO groups")
    if slug is None:
        return next((p for p in mine if p.default), mine[0])
    for profile in mine:
        if profile.slug == slug:
            return profile
    known = {p.slug: p for p in hub.profiles}
    if slug in known:
        raise PermissionError(f"profile {slug!r} needs membership in one of "
                              f"{', '.join(known[slug].groups)}")
    raise LookupError(f"no profile {slug!r}; offered: {', '.join(p.slug for p in mine)}")


def kubespawner_profile(profile: ProfileConfig) -> dict[str, Any]:
    """One entry of KubeSpawner's ``profile_list``."""
    override: dict[str, Any] = {
        "cpu_guarantee": profile.cpu, "cpu_limit": profile.cpu,
        "mem_guarantee": parse_bytes(profile.memory), "mem_limit": parse_bytes(profile.memory),
    }
    if profile.image:
        override["image"] = profile.image
    if profile.gpus:
        override["extra_resource_limits"] = {"nvidia.com/gpu": str(profile.gpus)}
        override["extra_resource_guarantees"] = {"nvidia.com/gpu": str(profile.gpus)}
    if profile.node_selector:
        override["node_selector"] = dict(profile.node_selector)
    if profile.tolerations:
        override["tolerations"] = [dict(t) for t in profile.tolerations]
    return {"display_name": profile.display_name, "slug": profile.slug,
            "description": profile.description, "default": profile.default,
            "kubespawner_override": override}


def kubespawner_profiles(hub: HubConfig, groups: set[str]) -> list[dict[str, Any]]:
    return [kubespawner_profile(p) for p in visible_profiles(hub, groups)]
