"""Log in with a VO identity: oauthenticator's GenericOAuthenticator, changed only by its hooks.

* groups come from the configured claims (see :mod:`facility.hub.groups`), through the
  ``auth_state_groups_key`` hook, so JupyterHub manages them as user groups;
* ``check_allowed`` refuses a user outside the allowed groups with a page naming the groups
  that would let them in, instead of a bare 403;
* tokens are kept in the (encrypted) auth state, refreshed before they expire, and handed to the
  user's server as a bearer token file when it starts (``pre_spawn_start``).
"""

from __future__ import annotations

import time
from typing import Any

from oauthenticator.generic import GenericOAuthenticator
from tornado import web
from traitlets import List, Unicode, default

from facility.hub.groups import groups_from_claims

TOKEN_FILE_NAME = ".facility-token"


class VOAuthenticator(GenericOAuthenticator):
    """GenericOAuthenticator for a VO: groups from WLCG, entitlement or plain group claims."""

    group_claims = List(Unicode(), config=True,
                        help="claims to read VO groups from, e.g. wlcg.groups, eduperson_entitlement")

    def _groups_of(self, auth_state: dict[str, Any]) -> set[str]:
        return groups_from_claims(auth_state.get(self.user_auth_state_key) or {}, self.group_claims)

    @default("auth_state_groups_key")
    def _groups_key_default(self) -> Any:
        return self._groups_of

    def refusal(self, username: str, groups: set[str]) -> str:
        """What a refused user reads."""
        have = ", ".join(sorted(groups)) or "none"
        need = ", ".join(sorted(self.allowed_groups))
        return (f"{username} may not use this facility: membership in one of the VO groups "
                f"{need} is required; your identity provider reports the groups: {have}.")

    async def check_allowed(self, username: str, auth_model: dict | None) -> bool:
        if await super().check_allowed(username, auth_model):
            return True
        groups = set((auth_model or {}).get("groups") or [])
        raise web.HTTPError(403, self.refusal(username, groups))

    async def pre_spawn_start(self, user: Any, spawner: Any) -> None:
        """The user's server gets the access token (and its expiry) to read data as the user."""
        auth_state = await user.get_auth_state() or {}
        token = auth_state.get("access_token")
        if not token:
            return
        spawner.environment["FACILITY_ACCESS_TOKEN"] = token
        expires = auth_state.get("token_response", {}).get("expires_in")
        if expires:
            spawner.environment["FACILITY_ACCESS_TOKEN_EXPIRES"] = str(int(time.time() + expires))
