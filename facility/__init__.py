"""An interactive analysis facility for high-energy physics.

``facility.connect()`` gives a Dask client on a cluster of one's own; ``facility.run(processor,
dataset)`` runs a coffea processor over a catalog dataset on the configured Dask cluster;
``facility.submit(notebook)`` runs a notebook or script as a batch job that outlives the notebook
server; ``facility.load_config()`` reads the one configuration everything uses.
"""

from __future__ import annotations

import os

# The XRootD client retries an unreachable server for minutes by default; a facility fails over
# to the next replica instead. After a connection failed it also refuses that server for 30
# minutes (the stream error window): a data server restarted after an outage would go unused
# that long, so it is tried again after a few seconds. Set before the client library is first
# loaded (workers inherit them); users may override.
os.environ.setdefault("XRD_CONNECTIONRETRY", "1")
os.environ.setdefault("XRD_CONNECTIONWINDOW", "5")
os.environ.setdefault("XRD_REQUESTTIMEOUT", "60")
os.environ.setdefault("XRD_STREAMERRORWINDOW", "5")

from facility.config import FacilityConfig, load_config

__all__ = ["FacilityConfig", "connect", "load_config", "lumi_weight", "run", "submit"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``facility.run`` (and the others) without importing coffea for every ``facility`` command."""
    if name == "run":
        from facility.processing.runner import run

        return run
    if name == "lumi_weight":
        from facility.processing.weights import lumi_weight

        return lumi_weight
    if name == "connect":
        from facility.cluster.connect import connect

        return connect
    if name == "submit":
        from facility.batch import submit

        return submit
    if name == "batch":
        import facility.batch

        return facility.batch
    raise AttributeError(f"module 'facility' has no attribute {name!r}")
