# Loaded by the jupyterhub chart's hub after its own configuration: the facility's VO login,
# roles, profiles and idle culler, from the configuration in $FACILITY_CONFIG.
from facility.hub.config import configure

configure(c, spawner="kubernetes")  # type: ignore[name-defined]  # noqa: F821  (c: JupyterHub's config)
