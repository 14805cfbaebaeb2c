"""Restart the hub when its facility configuration changes (a service the hub runs on Kubernetes).

The hub reads ``facility.yaml`` (the ConfigMap ``facility-config``, mounted as a folder, which
Kubernetes updates in place) when it starts. A Deployment rolls its pods when their template
changes, but the jupyterhub chart builds the hub's template from its own values only, which the
facility chart cannot extend with a checksum of its ConfigMap. So the hub runs this watcher as
one of its services: when the file's content changes it asks the hub (its parent process) to
stop with SIGTERM, the hub shuts down cleanly (users' servers keep running), and Kubernetes
starts it again with the new configuration.

    python -m facility.hub.config_watch --file /etc/facility/facility.yaml --every 30
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from pathlib import Path


def digest(path: Path) -> str | None:
    """The file's content hash; None while it is missing (a ConfigMap mid-update)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def watch(path: Path, every: float, hub_pid: int) -> str:
    """Wait until ``path`` holds other content than at the start, then stop the hub; returns
    the new digest."""
    started = digest(path)
    while True:
        time.sleep(every)
        now = digest(path)
        if now is not None and now != started:
            print(f"facility: {path} changed; restarting the hub to load it", flush=True)
            os.kill(hub_pid, signal.SIGTERM)
            return now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facility.hub.config_watch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, required=True, help="the configuration file to watch")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between checks")
    args = parser.parse_args(argv)
    if digest(args.file) is None:
        print(f"error: {args.file} does not exist", file=sys.stderr)
        return 2
    watch(args.file, args.every, os.getppid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
