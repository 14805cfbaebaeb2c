"""JupyterLab in a user's server, as the facility sets it up: a Jupyter server extension.

* JupyterLab's defaults for every user (``jupyter/labconfig/default_setting_overrides.json``
  beside this module, on the Jupyter configuration path of the server): no "Jupyter news"
  question. Users may still change these settings; a default is not a lock.
* The Dask sidebar lists the user's running clusters, however they were started, and forgets
  those that stopped (:class:`facility.cluster.lab.ClusterSidebar`).

The hub loads it in every server (``--ServerApp.jpserver_extensions facility.hub.lab=True``,
see :func:`facility.hub.config.configure`), whichever spawner starts it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CONFIG_PATH_ENV = "JUPYTER_CONFIG_PATH"
# a Jupyter configuration folder: JupyterLab reads labconfig/default_setting_overrides.json there
JUPYTER_CONFIG = Path(__file__).parent / "jupyter"


def with_facility_config_path(environ: dict[str, str] | Any) -> None:
    """Put the facility's Jupyter configuration folder on ``JUPYTER_CONFIG_PATH``, after the
    folders already named there (and after the user's own, ``~/.jupyter``)."""
    entries = [e for e in environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if e]
    if str(JUPYTER_CONFIG) not in entries:
        environ[CONFIG_PATH_ENV] = os.pathsep.join([*entries, str(JUPYTER_CONFIG)])


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "facility.hub.lab"}]


def _link_jupyter_server_extension(server_app: Any) -> None:
    # every extension is linked before any is loaded, and JupyterLab reads its setting
    # overrides when it is loaded
    with_facility_config_path(os.environ)


def _load_jupyter_server_extension(server_app: Any) -> None:
    try:
        from dask_labextension.manager import manager
    except ImportError:
        server_app.log.info("facility: dask-labextension is not installed; no Dask sidebar")
        return
    from tornado.ioloop import IOLoop

    from facility.cluster.lab import ClusterSidebar

    server_app.facility_cluster_sidebar = ClusterSidebar(manager)
    IOLoop.current().add_callback(server_app.facility_cluster_sidebar.start)
