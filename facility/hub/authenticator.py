"""Log in with a VO identity: oauthenticator's GenericOAuthenticator, changed only by its hooks.

* groups come from the configured claims (see :mod:`facility.hub.groups`), through the
  ``auth_state_groups_key`` hook, so JupyterHub manages them as user groups;
* ``check_allowed`` refuses a user outside the allowed groups with a page that says once which
  groups would let them in and which they have, whom to ask (``support_contact``), and a
  sign-out link;
* logging out of the hub ends the session at the identity provider too (OpenID Connect
  RP-initiated logout, :class:`VOLogoutHandler`): the next "Sign in" asks who signs in, so
  another account can;
* tokens are kept in the (encrypted) auth state with the time they expire
  (``build_auth_state_dict``), refreshed with the refresh token *before* they expire
  (``refresh_user``: the base class waits until a request fails), and handed to the user's server
  when it starts (``pre_spawn_start``); the server keeps a token file current from then on
  (:mod:`facility.hub.tokens`).
"""

from __future__ import annotations

import html
import re
import time
from typing import Any

from oauthenticator.generic import GenericOAuthenticator
from oauthenticator.oauth2 import OAuthLogoutHandler
from tornado import web
from tornado.httputil import url_concat
from traitlets import Integer, List, Unicode, default

from facility.hub.groups import groups_from_claims


class VOLogoutHandler(OAuthLogoutHandler):
    """The hub's logout, then the provider's: the browser goes to the provider's end-session
    endpoint with the user's ID token as ``id_token_hint``, and comes back to the hub's login."""

    _id_token: str | None = None

    async def handle_logout(self) -> None:
        await super().handle_logout()
        user = self.current_user  # still known here: it is forgotten before the page
        if user is not None:
            self._id_token = (await user.get_auth_state() or {}).get("id_token")

    async def render_logout_page(self) -> None:
        url = self.authenticator.provider_logout_url(self._id_token)
        if url:
            self.redirect(url)
            return
        await super().render_logout_page()


class VOAuthenticator(GenericOAuthenticator):
    """GenericOAuthenticator for a VO: groups from WLCG, entitlement or plain group claims."""

    logout_handler = VOLogoutHandler

    group_claims = List(Unicode(), config=True,
                        help="claims to read VO groups from, e.g. wlcg.groups, eduperson_entitlement")
    refresh_margin = Integer(300, config=True,
                             help="seconds before expiry at which an access token is renewed")
    end_session_url = Unicode(
        "", config=True,
        help="the provider's end_session_endpoint; empty: logout ends the hub's session only")
    post_logout_redirect_url = Unicode(
        "", config=True, help="where the provider sends the browser after its logout (registered "
                              "at the provider as a post_logout_redirect_uri)")
    support_contact = Unicode(
        "", config=True, help="whom refused users ask for access: an e-mail address, a web "
                              "address or words; empty: their VO's administrators")

    def provider_logout_url(self, id_token: str | None) -> str:
        """The provider's logout address for a user with ``id_token`` ("" without an
        end-session endpoint). Without a token (a refused user) the client id names the hub."""
        if not self.end_session_url:
            return ""
        params = {"client_id": self.client_id}
        if self.post_logout_redirect_url:
            params["post_logout_redirect_uri"] = self.post_logout_redirect_url
        if id_token:
            params["id_token_hint"] = id_token
        return str(url_concat(self.end_session_url, params))

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

    def refusal_html(self, username: str, groups: set[str]) -> str:
        """The refusal page's text: the reason, whom to ask, and a sign-out that also ends the
        provider's session (so another account may sign in)."""
        contact = _contact_html(self.support_contact) if self.support_contact \
            else "your VO's administrators"
        # relative: the page is the hub's oauth_callback, beside its logout
        return (f'<span class="facility-refusal">{html.escape(self.refusal(username, groups))}'
                f'</span><br><span class="facility-contact">To ask for access, contact '
                f"{contact}.</span><br>"
                f'<a class="facility-sign-out" href="logout">Sign out</a> to sign in with '
                f"another account.")

    async def check_allowed(self, username: str, auth_model: dict | None) -> bool:
        if await super().check_allowed(username, auth_model):
            return True
        groups = set((auth_model or {}).get("groups") or [])
        # a reason of its own: without one the hub's error page repeats the message as its title
        refused = web.HTTPError(403, self.refusal(username, groups), reason="Access refused")
        refused.jupyterhub_message = self.refusal(username, groups)  # type: ignore[attr-defined]
        refused.jupyterhub_html_message = self.refusal_html(  # type: ignore[attr-defined]
            username, groups)
        raise refused

    async def pre_spawn_start(self, user: Any, spawner: Any) -> None:
        """The user's server starts with the access token (and its expiry) to read data as the user."""
        auth_state = await user.get_auth_state() or {}
        token = auth_state.get("access_token")
        if not token:
            return
        spawner.environment["FACILITY_ACCESS_TOKEN"] = token
        if auth_state.get("expires_at"):
            spawner.environment["FACILITY_ACCESS_TOKEN_EXPIRES"] = str(int(auth_state["expires_at"]))


def _contact_html(contact: str) -> str:
    """A contact as a link where it is an address (web or e-mail), else as words."""
    text = html.escape(contact)
    if re.match(r"^https?://", contact):
        return f'<a class="facility-support" href="{text}">{text}</a>'
    if re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", contact):
        return f'<a class="facility-support" href="mailto:{text}">{text}</a>'
    return f'<span class="facility-support">{text}</span>'
