"""Client, scheduler and workers must run the same software: checked when a client attaches.

A worker started from another image or environment deserialises the client's functions with
other code; the symptoms (odd pickling errors, wrong results) are far from the cause. The check
turns that into one message listing every mismatched package and where each version runs.
"""

from __future__ import annotations

from typing import Any

from facility.errors import InfrastructureError

PACKAGES = ("python", "facility", "dask", "distributed", "coffea", "awkward", "uproot", "numpy",
            "hist", "cloudpickle", "msgpack")


class VersionMismatch(InfrastructureError, RuntimeError):
    """The client and the cluster run different versions of packages that must agree."""


def _package_versions(section: dict[str, Any]) -> dict[str, str | None]:
    return dict(section.get("packages", {}))


def mismatches(versions: dict[str, Any], packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """One line per package whose version differs anywhere: ``name: client X, worker W Y``."""
    places = {"client": _package_versions(versions.get("client", {})),
              "scheduler": _package_versions(versions.get("scheduler", {}))}
    for address, section in sorted(versions.get("workers", {}).items()):
        places[f"worker {address}"] = _package_versions(section)
    lines = []
    for package in packages:
        seen = {place: found.get(package) for place, found in places.items() if package in found}
        if len(set(seen.values())) > 1:
            lines.append(f"{package}: " + ", ".join(f"{place} {version}"
                                                    for place, version in seen.items()))
    return lines


def check_versions(client: Any, cluster_name: str) -> None:
    """Raise :class:`VersionMismatch` naming every package that differs."""
    found = mismatches(client.get_versions(check=False, packages=list(PACKAGES)))
    if found:
        raise VersionMismatch(
            f"cluster {cluster_name!r} runs other software than this notebook:\n  "
            + "\n  ".join(found)
            + "\nStart a new cluster from this environment, or use the environment the cluster "
              "was started from.")
