"""User servers on one machine: one process per user, in the user's own directory.

The form offers the profiles the user's VO groups open, each with its description and
resources; those this machine cannot serve (more cores, memory or GPUs than it has) are shown
disabled with the reason. The choice is checked again before the server starts, by the same
decision (:func:`facility.hub.profiles.unavailable_reason`), since a form can be forged. The
server gets the facility's environment: the user's groups (cluster limits), the configuration,
the facility's commands on PATH, and the JupyterLab Dask sidebar pointed at facility clusters.
"""

from __future__ import annotations

import asyncio
import functools
import html
import shutil
from pathlib import Path
from typing import Any

from dask.utils import parse_bytes
from jupyterhub.spawner import SimpleLocalProcessSpawner
from tornado import web
from traitlets import Unicode, default

from facility.cluster.local import local_gpus
from facility.config import FacilityConfig, HubConfig, ProfileConfig, load_config
from facility.hub.profiles import (
    Machine,
    profile_named,
    resources,
    unavailable_reason,
    visible_profiles,
)
from facility.hub.welcome import FirstStart
from facility.machine import usable_cores, usable_memory

FORM_STYLE = """<style>
.facility-profile{margin:.4em 0 .9em}
.facility-profile-description{margin-left:1.6em}
.facility-profile-unavailable{margin-left:1.6em;color:#8a4b00}
.facility-profile-disabled label,.facility-profile-disabled .facility-profile-description{opacity:.6}
</style>"""


def user_groups(spawner: Any) -> set[str]:
    return {group.name for group in spawner.user.groups}


@functools.cache
def this_machine() -> Machine:
    """The cores, memory and GPUs of this machine that the hub may use (its CPU affinity and
    its cgroup's limits count), where the local spawner runs servers.

    Blocking (it may run ``nvidia-smi``): call it off the event loop. Asked once per process:
    the machine does not change under a running hub."""
    return Machine(cpus=usable_cores(), memory=usable_memory(),
                   gpus=local_gpus())


async def _config_and_machine(spawner: Any) -> tuple[FacilityConfig, Machine]:
    """Both read off the event loop (a file, and the machine's devices)."""
    config, machine = await asyncio.gather(asyncio.to_thread(spawner.facility_config),
                                           asyncio.to_thread(this_machine))
    return config, machine


def profile_form(hub: HubConfig, groups: set[str], machine: Machine) -> str:
    """The spawn form: the profiles open to ``groups``; those ``machine`` cannot serve are
    disabled, with the reason."""
    mine = visible_profiles(hub, groups)
    if not mine:
        return "<p>No environment is open to your VO groups.</p>"
    chosen = profile_named(hub, groups, None, machine)
    rows = [_profile_choice(p, unavailable_reason(p, machine), p is chosen) for p in mine]
    return "\n".join([FORM_STYLE, *rows])


def _profile_choice(profile: ProfileConfig, reason: str | None, chosen: bool) -> str:
    slug = html.escape(profile.slug)
    state = " disabled" if reason else (" checked" if chosen else "")
    why = (f'<div class="facility-profile-unavailable" id="profile-{slug}-unavailable">'
           f"{html.escape(reason)}</div>") if reason else ""
    described = f' aria-describedby="profile-{slug}-unavailable"' if reason else ""
    return (
        f'<div class="facility-profile{" facility-profile-disabled" if reason else ""}">'
        f'<label><input type="radio" name="profile" value="{slug}"{state}{described}> '
        f"<strong>{html.escape(profile.display_name)}</strong> "
        f'<span class="facility-profile-resources">({html.escape(resources(profile))})</span>'
        f"</label>"
        f'<div class="facility-profile-description">{html.escape(profile.description)}</div>'
        f"{why}</div>")


def refusal(status: int, message: str) -> web.HTTPError:
    """An HTTP error whose message the hub's pages show as it is (a bare HTTPError shows as
    "HTTP 400: error (...)")."""
    error = web.HTTPError(status, "%s", message)
    error.jupyterhub_message = message  # type: ignore[attr-defined]
    return error


async def chosen_profile(spawner: Any, user_options: dict[str, Any]) -> ProfileConfig:
    """The profile a start asks for, or a refusal that says why it may not or cannot start."""
    config, machine = await _config_and_machine(spawner)
    try:
        profile = profile_named(config.hub, user_groups(spawner), user_options.get("profile"),
                                machine)
    except (PermissionError, LookupError) as exc:
        raise refusal(403, str(exc)) from None
    reason = unavailable_reason(profile, machine)
    if reason:
        raise refusal(400, reason)
    return profile


async def apply_profile(spawner: Any, user_options: dict[str, Any]) -> None:
    """JupyterHub's hook for the start's choice (form or API): check it, then shape the server
    by it."""
    profile = await chosen_profile(spawner, user_options)
    spawner.mem_limit = parse_bytes(profile.memory)
    spawner.cpu_limit = profile.cpu
    spawner.environment["FACILITY_PROFILE"] = profile.slug


async def profiles_form_of(spawner: Any) -> str:
    config, machine = await _config_and_machine(spawner)
    return profile_form(config.hub, user_groups(spawner), machine)


class FacilityLocalSpawner(FirstStart, SimpleLocalProcessSpawner):
    """SimpleLocalProcessSpawner with the facility's profiles and environment; a user's first
    server opens the quick-start notebook (:mod:`facility.hub.welcome`)."""

    facility_config_file = Unicode("", config=True, help="the facility configuration file")
    notebooks_dir = Unicode("", config=True, help="notebooks a user finds in a new directory")

    def facility_config(self) -> FacilityConfig:
        return load_config(Path(self.facility_config_file) if self.facility_config_file else None)

    @default("options_form")
    def _profiles_form(self) -> Any:
        return profiles_form_of

    def options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, Any]:
        chosen = formdata.get("profile") or []
        return {"profile": chosen[0] if chosen else None}

    async def run_options_from_form(self, form_data: dict[str, Any]) -> dict[str, Any]:
        """A submitted form choosing a profile that may not or cannot start comes back as the
        form, with the reason, before anything starts."""
        options = dict(super().run_options_from_form(form_data))
        await chosen_profile(self, options)
        return options

    @default("apply_user_options")
    def _apply_profile_default(self) -> Any:
        return apply_profile

    async def start(self) -> Any:
        await asyncio.to_thread(self._copy_notebooks)
        started = await super().start()
        self.started()
        return started

    def _copy_notebooks(self) -> None:
        """Starter notebooks into the user's directory; the user's own copies are kept."""
        home = Path(self.home_dir)
        home.mkdir(parents=True, exist_ok=True)
        if not self.notebooks_dir:
            return
        for source in sorted(Path(self.notebooks_dir).glob("*.ipynb")):
            target = home / source.name
            if not target.exists():
                shutil.copy2(source, target)
