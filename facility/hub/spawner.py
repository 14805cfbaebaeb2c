"""User servers on one machine: one process per user, in the user's own directory.

The form offers the profiles the user's VO groups open; the choice is checked again on start
(a form can be forged), and a GPU profile is refused with a clear message on a machine without
a GPU. The server gets the facility's environment: the user's groups (cluster limits), the
configuration, the facility's commands on PATH, and the JupyterLab Dask sidebar pointed at
facility clusters.
"""

from __future__ import annotations

import asyncio
import html
import shutil
from pathlib import Path
from typing import Any

from dask.utils import parse_bytes
from jupyterhub.spawner import SimpleLocalProcessSpawner
from tornado import web
from traitlets import Unicode, default

from facility.cluster.local import local_gpus
from facility.config import FacilityConfig, load_config
from facility.hub.profiles import profile_named, visible_profiles
from facility.hub.welcome import FirstStart


def user_groups(spawner: Any) -> set[str]:
    return {group.name for group in spawner.user.groups}


def profile_form(config: FacilityConfig, groups: set[str]) -> str:
    rows = []
    for profile in visible_profiles(config.hub, groups):
        checked = " checked" if profile.default else ""
        rows.append(
            f'<label class="facility-profile"><input type="radio" name="profile" '
            f'value="{html.escape(profile.slug)}"{checked}> <strong>{html.escape(profile.display_name)}'
            f"</strong> {html.escape(profile.description)}</label><br>")
    return "\n".join(rows) or "<p>No environment is open to your VO groups.</p>"


async def apply_profile(spawner: Any, user_options: dict[str, Any]) -> None:
    """JupyterHub's hook for the form's choice: check it, then shape the server by it."""
    config = await asyncio.to_thread(spawner.facility_config)
    try:
        profile = profile_named(config.hub, user_groups(spawner), user_options.get("profile"))
    except (PermissionError, LookupError) as exc:
        raise web.HTTPError(403, str(exc)) from None
    if profile.gpus:
        have = await asyncio.to_thread(local_gpus)
        if have < profile.gpus:
            raise web.HTTPError(
                400, f"The profile {profile.display_name!r} needs {profile.gpus} GPU(s); this "
                     f"machine has {have}. Pick a CPU profile.")
    spawner.mem_limit = parse_bytes(profile.memory)
    spawner.cpu_limit = profile.cpu
    spawner.environment["FACILITY_PROFILE"] = profile.slug


class FacilityLocalSpawner(FirstStart, SimpleLocalProcessSpawner):
    """SimpleLocalProcessSpawner with the facility's profiles and environment; a user's first
    server opens the quick-start notebook (:mod:`facility.hub.welcome`)."""

    facility_config_file = Unicode("", config=True, help="the facility configuration file")
    notebooks_dir = Unicode("", config=True, help="notebooks a user finds in a new directory")

    def facility_config(self) -> FacilityConfig:
        return load_config(Path(self.facility_config_file) if self.facility_config_file else None)

    @default("options_form")
    def _profiles_form(self) -> Any:
        return lambda spawner: profile_form(spawner.facility_config(), user_groups(spawner))

    def options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, Any]:
        chosen = formdata.get("profile") or []
        return {"profile": chosen[0] if chosen else None}

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
