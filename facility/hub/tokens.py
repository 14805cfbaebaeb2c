"""Keep the user's VO access token current in a file, for the notebook and its Dask workers.

A Jupyter server extension of the user's server: every ``FACILITY_TOKEN_POLL_SECONDS`` it asks
the hub for the user's auth state (the hub renews a token that is about to expire on that very
request) and writes the access token to ``BEARER_TOKEN_FILE`` (the WLCG bearer-token
convention), atomically and readable by the user only. Kernels, and the local Dask workers they
start, read the file, so they always hold a valid token. Asynchronous: the server's event loop
is never blocked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from tornado.ioloop import PeriodicCallback

from facility.data.tokens import write_private

TOKEN_FILE_ENV = "BEARER_TOKEN_FILE"
POLL_ENV = "FACILITY_TOKEN_POLL_SECONDS"
DEFAULT_POLL_SECONDS = 60.0


def write_token(path: Path, token: str) -> bool:
    """Replace the file's token (0600, atomic); returns whether it changed."""
    if path.exists() and path.read_text() == token:
        return False
    write_private(path, token)
    return True


class TokenKeeper:
    """Polls the hub for the user's current access token and keeps the token file up to date."""

    def __init__(self, hub_api: str, api_token: str, user: str, path: Path, log: Any) -> None:
        self.hub_api, self.api_token, self.user = hub_api.rstrip("/"), api_token, user
        self.path, self.log = path, log

    async def refresh(self) -> None:
        # the user's model (not /user, which never carries the auth state)
        request = f"{self.hub_api}/users/{quote(self.user)}"
        try:
            response = await AsyncHTTPClient().fetch(
                request, headers={"Authorization": f"token {self.api_token}"}, request_timeout=30)
        except (HTTPClientError, OSError) as exc:
            self.log.warning("facility: could not renew the access token from %s: %s", request, exc)
            return
        state = json.loads(response.body).get("auth_state") or {}
        token = state.get("access_token")
        if token and write_token(self.path, token):
            self.log.info("facility: access token renewed in %s", self.path)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "facility.hub.tokens"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    path, hub_api, api_token, user = (
        os.environ.get(TOKEN_FILE_ENV), os.environ.get("JUPYTERHUB_API_URL"),
        os.environ.get("JUPYTERHUB_API_TOKEN"), os.environ.get("JUPYTERHUB_USER"))
    if not (path and hub_api and api_token and user):
        server_app.log.info("facility: no hub or token file configured; tokens are not renewed")
        return
    initial = os.environ.get("FACILITY_ACCESS_TOKEN")
    if initial:
        write_token(Path(path), initial)
    keeper = TokenKeeper(hub_api, api_token, user, Path(path), server_app.log)
    seconds = float(os.environ.get(POLL_ENV, DEFAULT_POLL_SECONDS))
    server_app.facility_token_keeper = PeriodicCallback(keeper.refresh, seconds * 1000)
    server_app.facility_token_keeper.start()
