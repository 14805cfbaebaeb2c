"""What a process that reads the data needs: trust in the data servers' CA, and a VO token.

The client of a run and every worker of a cluster read through the same servers. Workers get
the variables when their cluster starts (``X509_CERT_DIR`` and, when the facility keeps the
user's token, ``BEARER_TOKEN_FILE``); the file itself is renewed by the
client before each run, so long-lived workers read with a current token.
"""

from __future__ import annotations

from typing import Any

from facility.config import FacilityConfig
from facility.data.servers import cache_token_file, renew_cache_token
from facility.data.tls import client_tls_environment
from facility.data.tokens import (
    TOKEN_FILE_ENV,
    ensure_local_token,
    keeps_local_token,
    local_token_file,
    refusal,
    trusted_issuers,
    worker_token_problem,
)


def reader_environment(config: FacilityConfig) -> dict[str, str]:
    """The variables, without fetching anything (used when a cluster's workers start)."""
    env = client_tls_environment(config)
    if keeps_local_token(config):
        env[TOKEN_FILE_ENV] = str(local_token_file(config))
    return env


def renew_reader_token(config: FacilityConfig) -> None:
    """Before work that reads: the token the facility keeps for this user (when it keeps one)
    has a good while left, and so has the caches' own. Workers of this user's clusters read
    that very file."""
    ensure_local_token(config)
    if not config.hub.vo.issuer and cache_token_file(config).parent.exists():
        renew_cache_token(config)


def check_workers_token(client: Any, config: FacilityConfig) -> None:
    """Before a run's first task: the workers read with their own token (the one of the
    environment their cluster started in). Stop with the first worker's reason when the
    servers would refuse it."""
    if not config.data_access.require_token:
        return
    answers = client.run(worker_token_problem, trusted_issuers(config),
                         config.data_access.audience, on_error="return")
    for worker, problem in sorted(answers.items()):
        if isinstance(problem, str):
            raise refusal(problem, where=f" (worker {worker} of the cluster reads with its own)")
