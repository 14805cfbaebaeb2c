"""The hub's services on one machine: the VO's identity provider, the proxy and JupyterHub.

All three run as supervised background services (logs and pid records under the state
directory), in this order: the provider (node ``oidc-provider`` with its own login form and the
configured dev users), configurable-http-proxy, and JupyterHub configured by
:func:`facility.hub.config.configure`. Their secrets (client secret, proxy token, auth-state key,
cookie key) are generated once and kept in a file only the facility's account can read.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import urllib.request
from pathlib import Path

from facility.config import FacilityConfig
from facility.embedded.services import NotReady, Service, port_open
from facility.errors import InfrastructureError
from facility.hub.config import issuer_url, post_logout_url, public_url

PROVIDER_DIR = Path(__file__).parent / "provider"
NODE_MODULES = PROVIDER_DIR / "node_modules"


class HubSetupError(InfrastructureError, RuntimeError):
    """Something the hub's services need is missing; the message says how to get it."""


def hub_state(config: FacilityConfig) -> Path:
    return config.state_path / "hub"


SECRET_NAMES = ("client_secret", "proxy_token", "crypt_key", "cookie_key", "data_client_secret")


def hub_secrets(config: FacilityConfig) -> dict[str, str]:
    """Generated on first use and kept (mode 0600) so restarts keep sessions and auth state;
    a secret added by a newer version is generated beside the kept ones."""
    path = hub_state(config) / "secrets.json"
    values = dict(json.loads(path.read_text())) if path.exists() else {}
    missing = [name for name in SECRET_NAMES if name not in values]
    if missing:
        values.update({name: secrets.token_hex(32) for name in missing})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(values, handle)
        tmp.replace(path)
    return values


def check_prerequisites() -> None:
    """Node.js and the provider's and proxy's packages (installed by ``make setup``)."""
    if shutil.which("node") is None:
        raise HubSetupError("Node.js is needed for the identity provider and the proxy: "
                            "run `make setup`")
    for package in ("oidc-provider", "configurable-http-proxy"):
        if not (NODE_MODULES / package).exists():
            raise HubSetupError(f"{package} is missing in {NODE_MODULES}: run `make setup`")


def _node() -> str:
    return shutil.which("node") or "node"


def _discovery_ready(issuer: str) -> bool:
    url = issuer + "/.well-known/openid-configuration"
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError as exc:
        raise NotReady(f"{url} did not answer: {exc}") from None


def _local_groups(config: FacilityConfig) -> list[str]:
    """The VO groups of terminal sessions' tokens: those that may log in to the hub."""
    vo = config.hub.vo
    return vo.allowed_groups or sorted({g for u in config.hub.dev_users for g in u.groups})


def write_provider_settings(config: FacilityConfig) -> Path:
    """The provider's clients and users, from the configuration (secrets included: 0600).

    Besides the hub, the facility's own client may get data tokens for terminal sessions."""
    hub, access = config.hub, config.data_access
    state = hub_state(config)
    settings = {
        "issuer": issuer_url(config), "host": hub.host, "port": hub.provider_port,
        "keys_file": str(state / "provider-keys.json"),
        "cookie_key": hub_secrets(config)["cookie_key"],
        "access_token_seconds": hub.access_token_seconds,
        "clients": [{
            "client_id": hub.vo.client_id, "client_secret": hub_secrets(config)["client_secret"],
            "redirect_uris": [f"{public_url(config)}/hub/oauth_callback"],
            "post_logout_redirect_uris": [post_logout_url(config)],
            "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
        }, {
            "client_id": access.local_client_id,
            "client_secret": hub_secrets(config)["data_client_secret"],
            "grant_types": ["client_credentials"], "response_types": [], "redirect_uris": [],
            "token_endpoint_auth_method": "client_secret_basic",
        }],
        "users": [user.model_dump() for user in hub.dev_users],
        "storage": {"audience": access.audience, "scope": access.scope,
                    "local_client_id": access.local_client_id,
                    "local_token_seconds": access.local_token_seconds,
                    "local_groups": [f"/{group}" for group in _local_groups(config)]},
    }
    path = state / "provider.json"
    state.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(settings, handle)
    return path


def provider_service(config: FacilityConfig) -> Service:
    hub = config.hub
    issuer = issuer_url(config)
    path = write_provider_settings(config)
    return Service(name="identity-provider", argv=[_node(), str(PROVIDER_DIR / "server.mjs"), str(path)],
                   ports=[hub.provider_port], ready=lambda: _discovery_ready(issuer),
                   description=f"VO identity provider {issuer}")


def proxy_service(config: FacilityConfig) -> Service:
    hub = config.hub
    return Service(
        name="hub-proxy",
        argv=[str(NODE_MODULES / ".bin" / "configurable-http-proxy"), "--ip", hub.host,
              "--port", str(hub.port), "--api-ip", "127.0.0.1", "--api-port", str(hub.proxy_api_port),
              "--default-target", f"http://127.0.0.1:{hub.hub_port}",
              "--error-target", f"http://127.0.0.1:{hub.hub_port}/hub/error"],
        ports=[hub.port, hub.proxy_api_port],
        env={"CONFIGPROXY_AUTH_TOKEN": hub_secrets(config)["proxy_token"]},
        description=f"configurable-http-proxy on {hub.host}:{hub.port}")


HUB_CONFIG_FILE = """# Written by `facility up`: the hub's whole configuration comes from the facility's.
from pathlib import Path
from facility.hub.config import configure
from facility.errors import InfrastructureError
configure(c, config_file=Path({config_file!r}), spawner="local")
"""


def write_hub_files(config: FacilityConfig) -> None:
    """The resolved facility configuration and the jupyterhub_config.py that loads it."""
    state = hub_state(config)
    state.mkdir(parents=True, exist_ok=True)
    config_file = state / "facility.yaml"
    config_file.write_text(config.model_dump_json(indent=1))  # JSON is YAML
    (state / "jupyterhub_config.py").write_text(HUB_CONFIG_FILE.format(config_file=str(config_file)))


def hub_service(config: FacilityConfig) -> Service:
    hub = config.hub
    state = hub_state(config)
    config_file = state / "facility.yaml"
    keys = hub_secrets(config)
    return Service(
        name="jupyterhub",
        argv=[sys.executable, "-m", "jupyterhub", "-f", str(state / "jupyterhub_config.py")],
        ports=[hub.hub_port], cwd=state,
        env={"CONFIGPROXY_AUTH_TOKEN": keys["proxy_token"], "JUPYTERHUB_CRYPT_KEY": keys["crypt_key"],
             hub.vo.client_secret_env: keys["client_secret"], "FACILITY_CONFIG": str(config_file)},
        ready=lambda: port_open(hub.port),
        start_timeout=120, description=f"JupyterHub http://{hub.host}:{hub.port}")


def identity_services(config: FacilityConfig) -> list[Service]:
    """The embedded provider, unless an external issuer is configured. It is started with the
    data servers, which accept only the tokens it issues, hub or no hub."""
    return [] if config.hub.vo.issuer else [provider_service(config)]


def hub_services(config: FacilityConfig) -> list[Service]:
    """In start order (after :func:`identity_services`)."""
    return [proxy_service(config), hub_service(config)]


def dev_logins(config: FacilityConfig) -> list[str]:
    return [f"{u.username} / {u.password}  (groups: {', '.join(u.groups) or 'none'})"
            for u in config.hub.dev_users]
