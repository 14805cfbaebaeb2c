"""The user environments a user may pick, by VO group, for both spawners.

One list in the configuration (``hub.profiles``) is the source: the local spawner renders it as
its own form, and KubeSpawner gets it as ``profile_list`` (GPU profiles with the
``nvidia.com/gpu`` limit, node selector and tolerations).

On one machine, a profile asking for more cores, memory or GPUs than the machine has cannot be
served: :func:`unavailable_reason` says why, and the same answer disables the profile in the
form and refuses a start that chooses it. On Kubernetes the node pools decide, not the hub's
own machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dask.utils import format_bytes, parse_bytes

from facility.config import HubConfig, ProfileConfig


def visible_profiles(hub: HubConfig, groups: set[str]) -> list[ProfileConfig]:
    """Profiles open to everyone, and those whose groups the user is in."""
    return [p for p in hub.profiles if not p.groups or set(p.groups) & groups]


@dataclass(frozen=True)
class Machine:
    """What a machine can give one user's server."""

    cpus: int
    memory: int  # bytes
    gpus: int


def _plural(count: float, noun: str) -> str:
    return f"{count:g} {noun}" + ("" if count == 1 else "s")


def resources(profile: ProfileConfig) -> str:
    """What a profile's server gets, in words: "4 cores, 32GiB of memory, 1 GPU"."""
    parts = [_plural(profile.cpu, "core"), f"{profile.memory} of memory"]
    if profile.gpus:
        parts.append(_plural(profile.gpus, "GPU"))
    return ", ".join(parts)


def unavailable_reason(profile: ProfileConfig, machine: Machine) -> str | None:
    """Why ``machine`` cannot serve ``profile`` (None: it can): every resource it lacks."""
    lacking = []
    if profile.gpus > machine.gpus:
        lacking.append(f"{_plural(profile.gpus, 'GPU')} (this machine has {machine.gpus})")
    if profile.cpu > machine.cpus:
        lacking.append(f"{_plural(profile.cpu, 'core')} (this machine has {machine.cpus})")
    memory = parse_bytes(profile.memory)
    if memory > machine.memory:
        lacking.append(f"{profile.memory} of memory (this machine has "
                       f"{format_bytes(machine.memory)})")
    if not lacking:
        return None
    return (f"{profile.display_name} is not available here: it needs {', '.join(lacking)}. "
            f"Pick another environment.")


def profile_named(hub: HubConfig, groups: set[str], slug: str | None,
                  machine: Machine | None = None) -> ProfileConfig:
    """The chosen profile, checked against what the user may use (forms can be forged); with
    no choice, the default, or else the first ``machine`` can serve."""
    mine = visible_profiles(hub, groups)
    if not mine:
        raise PermissionError("no profile is open to your VO groups")
    if slug is None:
        servable = [p for p in mine if machine is None or unavailable_reason(p, machine) is None]
        return next((p for p in servable if p.default), (servable or mine)[0])
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
