"""The user's VO token for reading data: where it is found, what it says, why a server refused it.

Data servers accept only bearer tokens in the WLCG profile, issued by the VO's provider, over
TLS. A client finds its token the way every WLCG tool does (WLCG Bearer Token Discovery):
``BEARER_TOKEN``, else the file named by ``BEARER_TOKEN_FILE``, else ``$XDG_RUNTIME_DIR/bt_u<uid>``,
else ``/tmp/bt_u<uid>``. In a notebook the hub keeps ``BEARER_TOKEN_FILE`` current. From a
terminal of the embedded facility, without a token of one's own, the facility's own client gets
one from the embedded provider (client-credentials grant) and keeps it in the facility's state.

The claims are read here without checking the signature: the servers check it. Reading them
only serves to tell a user, before a run and when a server refuses, which token was used and
what is wrong with it (expired, from an issuer the servers do not trust, without read scope).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facility.config import FacilityConfig
from facility.errors import UsageError

TOKEN_ENV = "BEARER_TOKEN"
WLCG_ANY_AUDIENCE = "https://wlcg.cern.ch/jwt/v1/any"
TOKEN_FILE_ENV = "BEARER_TOKEN_FILE"
# A run asks for a new local token when the current one has less left than this.
RENEW_BEFORE_SECONDS = 1800


class TokenError(UsageError):
    """The user's token is missing or cannot read the data; the message says which and why."""

    who = "your token"


@dataclass(frozen=True)
class FoundToken:
    """A token and where it was found (``BEARER_TOKEN``, or a file)."""

    value: str
    source: str
    path: Path | None = None

    def claims(self) -> dict[str, Any]:
        return token_claims(self.value)

    def file_problem(self) -> str | None:
        """The XRootD client uses a token file only if this account owns it and nobody else
        may read it."""
        if self.path is None:
            return None
        info = self.path.stat()
        if info.st_uid != os.getuid():
            return f"the token file {self.path} belongs to another account (uid {info.st_uid})"
        if info.st_mode & 0o077:
            return (f"the token file {self.path} may be read by others (mode "
                    f"{oct(info.st_mode & 0o777)}), and the XRootD client refuses it: "
                    f"chmod 600 {self.path}")
        return None


def token_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT (unverified); empty when the token is not one."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def discovery_paths(environ: dict[str, str] | os._Environ[str] = os.environ) -> list[Path]:
    """The files WLCG token discovery looks at, in order."""
    uid = os.getuid()
    paths = []
    if environ.get(TOKEN_FILE_ENV):
        paths.append(Path(environ[TOKEN_FILE_ENV]))
    if environ.get("XDG_RUNTIME_DIR"):
        paths.append(Path(environ["XDG_RUNTIME_DIR"]) / f"bt_u{uid}")
    paths.append(Path(f"/tmp/bt_u{uid}"))
    return paths


def find_token(environ: dict[str, str] | os._Environ[str] = os.environ) -> FoundToken | None:
    """The token WLCG discovery finds. A file found by looking (not named by
    ``BEARER_TOKEN_FILE``) that another account owns is passed over: ``/tmp`` is everyone's,
    and a token planted there must not be used."""
    if environ.get(TOKEN_ENV):
        return FoundToken(environ[TOKEN_ENV].strip(), TOKEN_ENV)
    for path in discovery_paths(environ):
        named = environ.get(TOKEN_FILE_ENV) == str(path)
        try:
            if not named and path.stat().st_uid != os.getuid():
                continue
            value = path.read_text().strip()
        except OSError:
            continue
        if value:
            return FoundToken(value, f"{TOKEN_FILE_ENV}={path}" if named else str(path), path)
    return None


def trusted_issuers(config: FacilityConfig) -> list[str]:
    """The issuers whose tokens the data servers accept: the VO's, and any configured."""
    from facility.hub.config import issuer_url

    return list(dict.fromkeys([issuer_url(config), *config.data_access.issuers]))


def token_problem(found: FoundToken | None, trusted: list[str], audience: str,
                  now: float | None = None) -> str | None:
    """Why servers trusting the issuers ``trusted``, for ``audience``, will refuse this token,
    or None when they should accept it (only they can check its signature)."""
    if found is None:
        looked = ", ".join([TOKEN_ENV, *map(str, discovery_paths())])
        return f"no token was found (looked at {looked})"
    problem = found.file_problem()
    if problem:
        return problem
    claims = found.claims()
    if not claims:
        return f"the token in {found.source} is not a JWT"
    now = time.time() if now is None else now
    issuer = claims.get("iss", "?")
    if issuer not in trusted:
        return (f"the token in {found.source} was issued by {issuer}, which the data servers do "
                f"not trust (they accept tokens of {', '.join(trusted)})")
    subject = claims.get("sub", "?")
    expires = claims.get("exp")
    if not isinstance(expires, int | float):
        return f"the token in {found.source} (subject {subject}) has no expiry"
    if expires <= now:
        return (f"the token in {found.source} (subject {subject}) expired "
                f"{_ago(now - expires)} ago, at {time.strftime('%H:%M:%S', time.localtime(expires))}")
    starts = claims.get("nbf")
    if isinstance(starts, int | float) and starts > now + 60:
        return f"the token in {found.source} (subject {subject}) is valid only from " \
               f"{time.strftime('%H:%M:%S', time.localtime(starts))}"
    audiences = claims.get("aud")
    audiences = audiences if isinstance(audiences, list) else [audiences]
    if audience not in audiences and WLCG_ANY_AUDIENCE not in audiences:
        return (f"the token in {found.source} (subject {subject}) is meant for "
                f"{', '.join(map(str, audiences))}, not the data servers ({audience})")
    scopes = str(claims.get("scope", "")).split()
    if not any(s.startswith("storage.read:") for s in scopes):
        return (f"the token in {found.source} has no storage.read scope (its scopes: "
                f"{' '.join(scopes) or 'none'})")
    return None


def describe(found: FoundToken | None) -> str:
    """One line naming the token for messages (never its value)."""
    if found is None:
        return "no token"
    claims = found.claims()
    left = claims.get("exp", 0) - time.time() if "exp" in claims else None
    life = "" if left is None else (f", expires in {_ago(left)}" if left > 0
                                    else f", expired {_ago(-left)} ago")
    return (f"the token in {found.source} (subject {claims.get('sub', '?')}, issuer "
            f"{claims.get('iss', '?')}{life})")


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


# ---------------------------------------------------------------------------------------------
# the embedded facility's own token


def local_token_file(config: FacilityConfig) -> Path:
    return config.state_path / "tokens" / f"bt_u{os.getuid()}"


def write_private(path: Path, text: str) -> None:
    """Replace the file atomically, readable by its owner only (the XRootD client refuses a
    token file that others can read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    tmp.replace(path)


def remaining_seconds(path: Path) -> float:
    try:
        claims = token_claims(path.read_text())
    except OSError:
        return 0.0
    return float(claims.get("exp", 0)) - time.time()


def fetch_local_token(config: FacilityConfig) -> str:
    """A token for the facility's own client from the embedded provider (client credentials)."""
    from facility.hub.config import issuer_url
    from facility.hub.embedded import hub_secrets

    access = config.data_access
    body = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": access.scope,
                                   "resource": access.audience}).encode()
    request = urllib.request.Request(f"{issuer_url(config)}/token", data=body, method="POST")
    credentials = f"{access.local_client_id}:{hub_secrets(config)['data_client_secret']}"
    request.add_header("Authorization",
                       "Basic " + base64.b64encode(credentials.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.load(response)["access_token"])
    except (urllib.error.URLError, OSError, KeyError, ValueError) as exc:
        raise TokenError(
            f"no data token could be had from the embedded identity provider at "
            f"{issuer_url(config)} ({exc}); start the facility with `facility up`") from exc


def keeps_local_token(config: FacilityConfig,
                      environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether the facility keeps this user's data token: tokens are required, the VO's provider
    is the embedded one, and the user brings no token of their own."""
    if not config.data_access.require_token or config.hub.vo.issuer:
        return False
    own = find_token(environ)
    path = local_token_file(config)
    return own is None or own.source in (str(path), f"{TOKEN_FILE_ENV}={path}")


def ensure_local_token(config: FacilityConfig) -> Path | None:
    """The local token file, renewed when it runs short (None: the facility keeps none)."""
    if not keeps_local_token(config):
        return None
    path = local_token_file(config)
    if remaining_seconds(path) < RENEW_BEFORE_SECONDS:
        write_private(path, fetch_local_token(config))
        path.parent.chmod(0o700)
    return path


def refusal(problem: str, where: str = "") -> TokenError:
    return TokenError(f"the data servers require a VO token{where}: {problem}. In a notebook the "
                      f"hub provides it; elsewhere set {TOKEN_FILE_ENV} to a current token file")


def worker_token_problem(trusted: list[str], audience: str) -> str | None:
    """Run on a worker: why the servers would refuse the token it reads with."""
    return token_problem(find_token(), trusted, audience)
