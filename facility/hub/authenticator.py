"""Log in with a VO identity: oauthenticator's GenericOAuthenticator, changed only by its hooks.

* groups come from the configured claims (see :mod:`facility.hub.groups`), through the
  ``auth_state_groups_key`` hook, so JupyterHub manages them as user groups;
* ``check_allowed`` refuses a user outside the allowed groups with a page naming the groups
  that would let them in, instead of a bare 403;
* tokens are kept in the (encrypted) auth state with the time they expire
  (``build_auth_state_dict``), refreshed with the refresh token *before* they expire
  (``refresh_user``: the base class waits until a request fails), and handed to the user's server
  when it starts (``pre_spawn_start``); the server keeps a token file current from then on
  (:mod:`facility.hub.tokens`).
"""

from __future__ import annotations

import time
from typing import Any

from oauthenticator.generic import GenericOAuthenticator
from tornado import web
from traitlets import Integer, List, Unicode, default

from facility.hub.groups import groups_from_claims


class VOAuthenticator(GenericOAuthenticator):
    """GenericOAuthenticator for a VO: groups from WLCG, entitlement or plain group claims."""

    group_claims = List(Unicode(), config=True,
                        help="claims to read VO groups from, e.g. wlcg.groups, eduperson_entitlement")
    refresh_margin = Integer(300, config=True,
                             help="seconds before expiry at which an access token is renewed")

    def build_auth_state_dict(self, token_info: dict, user_info: dict) -> dict:
        state = super().build_auth_state_dict(token_info, user_info)
        lifetime = token_info.get("expires_in")
        if lifetime:
            state["expires_at"] = time.time() + float(lifetime)
        return state

    def _expires_soon(self, auth_state: dict) -> bool:
        expires_at = auth_state.get("expires_at")
        return expires_at is not None and expires_at - time.time() < self.refresh_margin

    async def refresh_user(self, user: Any, handler: Any = None, **kwargs: Any) -> Any:
        """Renew a token that expires within ``refresh_margin`` before anything fails with it."""
        auth_state = await user.get_auth_state() or {}
        refresh_token = auth_state.get("refresh_token")
        if not (refresh_token and self._expires_soon(auth_state)):
            return await super().refresh_user(user, handler, **kwargs)
        self.log.info("Renewing the access token of %s before it expires", user.name)
        try:
            token_info = await self.get_token_info(
                handler, self.build_refresh_token_request_params(refresh_token))
        except Exception as exc:  # noqa: BLE001 (any refusal means: log in again)
            self.log.warning("Renewing the token of %s failed (%s); a new login is needed",
                             user.name, exc)
            return False
        token_info.setdefault("refresh_token", refresh_token)
        user_info = await self.token_to_user(token_info)
        username = self.user_info_to_username(user_info)
        auth_model = {"name": username, "admin": None, "groups": None,
                      "auth_state": self.build_auth_state_dict(token_info, user_info)}
        return await self.update_auth_model(auth_model)  # groups: None keeps those of the login

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
        """The user's server starts with the access token (and its expiry) to read data as the user."""
        auth_state = await user.get_auth_state() or {}
        token = auth_state.get("access_token")
        if not token:
            return
        spawner.environment["FACILITY_ACCESS_TOKEN"] = token
        if auth_state.get("expires_at"):
            spawner.environment["FACILITY_ACCESS_TOKEN_EXPIRES"] = str(int(auth_state["expires_at"]))
