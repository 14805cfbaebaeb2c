"""TLS credentials of one cluster: the only key that lets a client or a worker in.

Every cluster gets its own self-signed certificate authority and key, created when the cluster
is created and kept in a folder only its owner can read. Scheduler, workers and clients use
mutual TLS, so a process without this cluster's credentials (another user's, or one that merely
knows the address) cannot connect or submit work.
"""

from __future__ import annotations

import os
from pathlib import Path

from distributed.security import Security

FILES = {"ca": "ca.pem", "cert": "cert.pem", "key": "key.pem"}


def create_credentials(folder: Path) -> Path:
    """Write fresh credentials into ``folder`` (made private to the current user)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    fresh = Security.temporary()
    contents = {"ca": fresh.tls_ca_file, "cert": fresh.tls_client_cert, "key": fresh.tls_client_key}
    for role, name in FILES.items():
        path = folder / name
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(contents[role]))
    return folder


def security_from(folder: Path) -> Security:
    """The credentials for every role (scheduler, worker, client) of a cluster."""
    paths = {role: str(folder / name) for role, name in FILES.items()}
    missing = [p for p in paths.values() if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"cluster credentials missing: {', '.join(missing)}")
    return Security(
        require_encryption=True, tls_ca_file=paths["ca"],
        tls_client_cert=paths["cert"], tls_client_key=paths["key"],
        tls_scheduler_cert=paths["cert"], tls_scheduler_key=paths["key"],
        tls_worker_cert=paths["cert"], tls_worker_key=paths["key"],
    )


def pem_contents(folder: Path) -> dict[str, str]:
    """The credentials as text, for a Kubernetes Secret."""
    return {name: (folder / name).read_text() for name in FILES.values()}
