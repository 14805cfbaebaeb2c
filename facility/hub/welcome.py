"""A user's first server opens the quick-start notebook; later ones open as they were left.

JupyterLab opens what the server's ``default_url`` names (``/lab/tree/quickstart.ipynb``: that
notebook, instead of the Launcher). The spawner gives that address to a server until one has
started; then the server gets the spawner's ``default_url`` (``/lab``: the workspace as the user
left it). Whether a server has started is kept in the spawner's state, which the hub stores in
its database, so a hub restart or an upgrade does not send a user back to the start. Both
spawners (:class:`facility.hub.spawner.FacilityLocalSpawner`,
:class:`facility.hub.kube.FacilityKubeSpawner`) mix this in.
"""

from __future__ import annotations

from typing import Any

from traitlets import Bool, HasTraits, Unicode

DEFAULT_URL_ENV = "JUPYTERHUB_DEFAULT_URL"
STATE_KEY = "welcomed"


def first_url(notebook: str | None) -> str:
    """JupyterLab's address of a notebook in the server's root folder ("" for none)."""
    return f"/lab/tree/{notebook.lstrip('/')}" if notebook else ""


class FirstStart(HasTraits):
    """Spawner mixin: ``first_url`` for a user's first server, ``default_url`` after it."""

    first_url = Unicode(
        "", config=True,
        help="what the first server of a user opens (a default_url); empty: default_url")
    welcomed = Bool(False, help="a server of this spawner has started (kept in its state)")

    def get_state(self) -> dict[str, Any]:
        state = dict(super().get_state())  # type: ignore[misc]
        if self.welcomed:
            state[STATE_KEY] = True
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)  # type: ignore[misc]
        self.welcomed = self.welcomed or bool(state.get(STATE_KEY))

    def clear_state(self) -> None:
        """A stopped server's state goes; that a server has started stays."""
        welcomed = self.welcomed
        super().clear_state()  # type: ignore[misc]
        self.welcomed = welcomed

    def get_env(self) -> dict[str, str]:
        env = dict(super().get_env())  # type: ignore[misc]
        if self.first_url and not self.welcomed:
            env[DEFAULT_URL_ENV] = self.format_string(self.first_url)  # type: ignore[attr-defined]
        return env

    def started(self) -> None:
        """The server is up: the next start opens ``default_url``."""
        self.welcomed = True
