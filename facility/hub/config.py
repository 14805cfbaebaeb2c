"""JupyterHub's configuration, built from the facility configuration by importable Python.

The embedded facility's hub and the Helm chart's hub load the same thing; the hub image adds
a two-line file to the jupyterhub chart's ``jupyterhub_config.d``::

    from facility.hub.config import configure
    configure(c, spawner="kubernetes")

Nothing site-specific is written here: issuer, claims, groups, profiles, ports and timeouts come
from ``FacilityConfig.hub``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Literal

from facility.cluster.kubernetes import USER_LABEL
from facility.cluster.lab import LABEXTENSION_ENV
from facility.config import CONFIG_ENV, FacilityConfig, VOConfig, load_config
from facility.errors import UsageError
from facility.hub.authenticator import VOAuthenticator
from facility.hub.welcome import first_url

DISCOVERY_PATH = "/.well-known/openid-configuration"
CULLER_SCOPES = ["list:users", "read:users:activity", "read:servers", "delete:servers"]
SERVER_SCOPES = ["users:activity!user", "access:servers!server", "admin:auth_state!user"]
TOKEN_FILE = ".facility/token"
# how often the hub on Kubernetes looks for a new configuration (facility.hub.config_watch)
CONFIG_WATCH_SECONDS = 30
# beside the hub's facility.yaml: what the hub makes before a user's first server (their
# namespace, or their account in a shared one), as the chart renders it
USER_OBJECTS_FILE = "user-objects.yaml"
# the account of a user's server, batch jobs and what they make (one per user, in any layout)
USER_ACCOUNT = "facility-user-{username}"


class HubConfigError(UsageError, RuntimeError):
    """The hub cannot be configured (an unreachable issuer, a missing secret)."""


def issuer_url(config: FacilityConfig) -> str:
    hub = config.hub
    return hub.vo.issuer or f"http://{hub.host}:{hub.provider_port}"


def discover(issuer: str, timeout: float = 10.0) -> dict[str, Any]:
    """The provider's endpoints from its OpenID discovery document."""
    url = issuer.rstrip("/") + DISCOVERY_PATH
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return dict(json.load(response))
    except (OSError, ValueError) as exc:
        raise HubConfigError(f"cannot read the identity provider's discovery document {url}: "
                             f"{exc}; check hub.vo.issuer") from exc


def endpoints(vo: VOConfig, issuer: str) -> dict[str, str]:
    """The provider's endpoints the hub calls (userinfo only when claims are read there), named
    as the authenticator's settings; the end-session endpoint where it is known."""
    explicit = {"authorize_url": vo.authorize_url, "token_url": vo.token_url}
    keys = {"authorize_url": "authorization_endpoint", "token_url": "token_endpoint"}
    if vo.claims_from == "userinfo":
        explicit["userdata_url"] = vo.userinfo_url
        keys["userdata_url"] = "userinfo_endpoint"
    found: dict[str, Any] = {} if all(explicit.values()) else discover(issuer)
    chosen = {k: str(explicit[k] or found[keys[k]]) for k in keys}
    end_session = vo.end_session_url or found.get("end_session_endpoint")
    if end_session:
        chosen["end_session_url"] = str(end_session)
    return chosen


def groups_environment(spawner: Any) -> str:
    return ",".join(sorted(group.name for group in spawner.user.groups))


def public_url(config: FacilityConfig) -> str:
    """The address users open; the identity provider sends them back to it."""
    return config.hub.address()


def post_logout_url(config: FacilityConfig) -> str:
    """Where the provider sends a user back after logout: registered at the provider as one of
    the hub client's ``post_logout_redirect_uris``."""
    return f"{public_url(config)}/hub/login"


def _extend(section: Any, key: str, value: dict | list) -> None:
    """Add to what is already configured (on Kubernetes, by the jupyterhub chart's own hub
    configuration) instead of replacing it."""
    current: Any = section[key] if key in section else type(value)()
    section[key] = {**current, **value} if isinstance(value, dict) else [*current, *value]


def configure(c: Any, config: FacilityConfig | None = None, *,
              spawner: Literal["local", "kubernetes"] = "local",
              config_file: Path | None = None, environ: dict[str, str] | None = None) -> None:
    """Fill JupyterHub's traitlets config ``c`` from the facility configuration.

    ``local``: the whole hub of the embedded facility (ports, proxy, database, local spawner).
    ``kubernetes``: loaded by the jupyterhub chart's hub after its own configuration, which
    keeps owning networking, proxy, database and KubeSpawner's pod settings; this adds the VO
    login, the roles, the user environment, the profiles and the idle culler.
    """
    env = os.environ if environ is None else environ
    config = config or load_config(config_file)
    if spawner == "local":
        _embedded_hub(c, config)
    _authenticator(c, config, env)
    _extend(c.JupyterHub, "load_roles", [
        # users, and their servers' tokens, may read their own auth state (their own tokens):
        # that is how a server renews its token file (a token never has more rights than its owner)
        {"name": "user", "scopes": ["self", "admin:auth_state!user"]},
        {"name": "server", "scopes": SERVER_SCOPES},
        {"name": "idle-culler", "scopes": CULLER_SCOPES, "services": ["idle-culler"]}])
    # the culler talks to the hub inside the hub's own pod or machine (not through a Service)
    _extend(c.JupyterHub, "services", [{"name": "idle-culler", "command": [
        sys.executable, "-m", "jupyterhub_idle_culler", f"--timeout={config.hub.idle_culler_timeout}",
        f"--url=http://127.0.0.1:{config.hub.hub_port}/hub/api"]}])
    if spawner == "kubernetes":
        mounted = config_file or Path(env.get(CONFIG_ENV, ""))
        _kube_spawner(c, config)
        _user_objects_from_the_chart(c, mounted.parent / USER_OBJECTS_FILE)
        _restart_on_new_configuration(c, mounted)
    else:
        _local_spawner(c, config, config_file)


def _embedded_hub(c: Any, config: FacilityConfig) -> None:
    hub = config.hub
    c.JupyterHub.bind_url = public_url(config)
    c.JupyterHub.hub_ip = "127.0.0.1"
    c.JupyterHub.hub_port = hub.hub_port
    # the proxy runs as its own service and outlives hub restarts; both read its token from
    # CONFIGPROXY_AUTH_TOKEN
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{hub.proxy_api_port}"
    c.ConfigurableHTTPProxy.should_start = False
    c.JupyterHub.cookie_secret_file = str(config.state_path / "hub" / "cookie_secret")
    c.JupyterHub.db_url = f"sqlite:///{config.state_path / 'hub' / 'jupyterhub.sqlite'}"


def _authenticator(c: Any, config: FacilityConfig, env: Any) -> None:
    hub, vo = config.hub, config.hub.vo
    c.JupyterHub.authenticator_class = VOAuthenticator
    auth = c.VOAuthenticator
    for key, value in endpoints(vo, issuer_url(config)).items():
        setattr(auth, key, value)
    auth.userdata_from_id_token = vo.claims_from == "id_token"
    auth.login_service = vo.name
    auth.client_id = vo.client_id
    secret = env.get(vo.client_secret_env)
    if not secret:
        raise HubConfigError(f"the OpenID client secret is not set: export {vo.client_secret_env}")
    auth.client_secret = secret
    auth.oauth_callback_url = f"{public_url(config)}/hub/oauth_callback"
    # logout ends the provider's session too, then comes back to the hub's login page
    auth.post_logout_redirect_url = post_logout_url(config)
    auth.support_contact = hub.support_contact or ""
    auth.scope = list(vo.scopes)
    auth.username_claim = vo.username_claim
    auth.group_claims = list(vo.group_claims)
    auth.manage_groups = True
    auth.allowed_groups = set(vo.allowed_groups)
    auth.admin_groups = set(vo.admin_groups)
    # tokens, the ID token among them (logout's id_token_hint), are kept encrypted: the hub
    # refuses to start without a key (JUPYTERHUB_CRYPT_KEY here, CryptKeeper keys that the
    # jupyterhub chart generates on Kubernetes)
    auth.enable_auth_state = True
    auth.refresh_pre_spawn = True
    auth.refresh_margin = hub.token_refresh_seconds
    auth.auth_refresh_age = max(1, min(60, hub.token_refresh_seconds // 4))


# A terminal of a user's server runs a login shell (jupyter_server_terminals adds -l when the
# server has no terminal of its own), whose profile may set PATH anew (Debian's /etc/profile
# does): the server's PATH, which holds the `facility` command, goes back in front once the
# profile has run, and an interactive shell (reading ~/.bashrc) follows.
TERMINAL_COMMAND = [
    "/bin/sh", "-c",
    'FACILITY_SERVER_PATH="$PATH" exec "${SHELL:-/bin/sh}" -l -c '
    '\'PATH="$FACILITY_SERVER_PATH:$PATH"; unset FACILITY_SERVER_PATH; exec "${SHELL:-/bin/sh}" -i\'']
# the facility's extensions of every user server: token renewal, JupyterLab's defaults and the
# Dask sidebar's view of the user's clusters
SERVER_EXTENSIONS = ("facility.hub.tokens", "facility.hub.lab")
OUTPUT_ENV = "FACILITY_OUTPUT_DIR"


def _user_server(section: Any, own: Any, config: FacilityConfig, home: Any) -> None:
    """What every user server gets, whichever spawner starts it: ``section`` is the spawner's
    configuration, ``own`` the facility spawner class's, ``home`` the server's home (a path, or
    a callable of the spawner)."""
    hub = config.hub
    section.default_url = "/lab"
    own.first_url = first_url(hub.first_notebook)
    environment: dict[str, Any] = {
        **LABEXTENSION_ENV, "FACILITY_GROUPS": groups_environment,
        "FACILITY_TOKEN_POLL_SECONDS": str(hub.token_poll_seconds)}
    if hub.user_output_dir:
        environment[OUTPUT_ENV] = _below(home, hub.user_output_dir)
    _extend(section, "environment", environment)
    _extend(section, "args", [
        *(arg for name in SERVER_EXTENSIONS for arg in ("--ServerApp.jpserver_extensions", f"{name}=True")),
        "--ServerApp.terminado_settings=" + json.dumps({"shell_command": TERMINAL_COMMAND})])


def _below(home: Any, folder: str) -> Any:
    """``home/folder``, for a home that is a path or a callable of the spawner."""
    if callable(home):
        return lambda spawner: f"{str(home(spawner)).rstrip('/')}/{folder}"
    return f"{str(home).rstrip('/')}/{folder}"


def scripts_folder() -> Path:
    """Where the running environment's commands are (``facility``, ``jupyterhub-singleuser``)."""
    return Path(sys.executable).parent


def _path_with(folder: Path, path: str) -> str:
    """``PATH`` with ``folder`` first (once)."""
    rest = [entry for entry in path.split(os.pathsep) if entry and entry != str(folder)]
    return os.pathsep.join([str(folder), *rest])


def _kube_spawner(c: Any, config: FacilityConfig) -> None:
    from facility.hub.profiles import kubespawner_profiles
    from facility.hub.spawner import user_groups

    # KubeSpawner, with the server's credentials in a Secret (c.KubeSpawner settings apply)
    c.JupyterHub.spawner_class = "facility.hub.kube.FacilityKubeSpawner"
    spawner = c.KubeSpawner
    # FACILITY_CONFIG of user servers is the chart's: the ConfigMap mounted in their namespace;
    # the image puts the facility's commands on PATH
    home = config.hub.server_home.rstrip("/")
    _user_server(spawner, c.FacilityKubeSpawner, config, home)
    _extend(spawner, "environment", {"BEARER_TOKEN_FILE": f"{home}/{TOKEN_FILE}"})
    _starter_notebooks_from_the_image(spawner, config)
    # the label the chart's NetworkPolicies and the cluster manifests select a user's pods by
    _extend(spawner, "extra_labels", {USER_LABEL: "{username}"})
    spawner.profile_list = lambda s: kubespawner_profiles(config.hub, user_groups(s))
    _hub_reachable_from_other_namespaces(c)
    # users' servers never run in the hub's namespace: their own, or one they share
    template = config.cluster.kubernetes.user_namespace_template
    if template:
        spawner.enable_user_namespaces = True
        spawner.user_namespace_template = template
        _extend(spawner, "environment", {
            "FACILITY_CLUSTER__KUBERNETES__NAMESPACE": lambda s: s.namespace})
    else:
        spawner.namespace = config.cluster.kubernetes.namespace


def _starter_notebooks_from_the_image(spawner: Any, config: FacilityConfig) -> None:
    """``hub.notebooks_dir`` on Kubernetes is a folder of the user image: a new server copies
    its notebooks into the home (the user's own copies are kept) as the pod starts."""
    folder = config.hub.notebooks_dir
    if folder is None:
        return
    copy = f"cp -n {shlex.quote(str(folder))}/*.ipynb \"$HOME\"/ 2>/dev/null; true"
    _extend(spawner, "lifecycle_hooks", {"postStart": {"exec": {"command": ["sh", "-c", copy]}}})


def _user_objects_from_the_chart(c: Any, objects_file: Path) -> None:
    """The hub makes a user's namespace, or their account in a shared one, the way the chart
    makes those of the users it lists (see :mod:`facility.hub.kube`); servers run with the
    user's own account."""
    from facility.hub.kube import namespace_labels

    c.KubeSpawner.service_account = USER_ACCOUNT
    if not objects_file.is_file():
        return
    c.FacilityKubeSpawner.namespace_objects_file = str(objects_file)
    if c.KubeSpawner.get("enable_user_namespaces"):
        c.KubeSpawner.user_namespace_labels = namespace_labels(objects_file.read_text())


def _restart_on_new_configuration(c: Any, config_file: Path) -> None:
    """The hub reads its configuration once; a service of its own restarts it when the mounted
    file changes (see :mod:`facility.hub.config_watch`)."""
    if config_file.is_file():
        _extend(c.JupyterHub, "services", [{"name": "config-watch", "command": [
            sys.executable, "-m", "facility.hub.config_watch", "--file", str(config_file),
            "--every", str(CONFIG_WATCH_SECONDS)]}])


def _hub_reachable_from_other_namespaces(c: Any) -> None:
    """The jupyterhub chart gives servers the hub's short Service name, which resolves only in
    the hub's own namespace; users' servers run in others, so they get ``hub.<namespace>.svc``
    (the cluster's DNS search path completes it, whatever the cluster's domain)."""
    namespace = os.environ.get("POD_NAMESPACE")
    if not namespace or "hub_connect_url" not in c.JupyterHub:
        return
    url = urllib.parse.urlsplit(c.JupyterHub.hub_connect_url)
    if url.hostname and "." not in url.hostname:
        host = f"{url.hostname}.{namespace}.svc" + (f":{url.port}" if url.port else "")
        c.JupyterHub.hub_connect_url = urllib.parse.urlunsplit(url._replace(netloc=host))


def _local_spawner(c: Any, config: FacilityConfig, config_file: Path | None) -> None:
    from facility.hub.spawner import FacilityLocalSpawner

    c.JupyterHub.spawner_class = FacilityLocalSpawner
    spawner = c.FacilityLocalSpawner
    _user_server(spawner, spawner, config, lambda s: s.home_dir)
    # the facility's commands (`facility`, in the environment running the hub) come first on
    # the server's PATH, and so in its kernels and terminals
    _extend(spawner, "environment", {
        CONFIG_ENV: str(config_file or os.environ.get(CONFIG_ENV, "")),
        "PATH": _path_with(scripts_folder(), os.environ.get("PATH", os.defpath))})
    spawner.home_dir_template = str(config.state_path / "hub" / "users" / "{username}")
    spawner.facility_config_file = str(config_file or "")
    if config.hub.notebooks_dir is not None:
        spawner.notebooks_dir = str(config.path(config.hub.notebooks_dir))
    spawner.cmd = [str(scripts_folder() / "jupyterhub-singleuser")]
    _extend(spawner, "environment", {
        "BEARER_TOKEN_FILE": lambda s: str(Path(s.home_dir) / TOKEN_FILE)})
    if os.geteuid() == 0:  # the embedded facility runs every server as the account running it
        _extend(spawner, "args", ["--ServerApp.allow_root=True"])
