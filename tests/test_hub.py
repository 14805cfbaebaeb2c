"""The hub's configuration: VO groups from tokens, who may log in, which profiles they see."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubespawner import KubeSpawner
from tornado import web
from traitlets.config import Config

from facility.config import FacilityConfig, HubConfig, ProfileConfig, load_config
from facility.hub.authenticator import VOAuthenticator
from facility.hub.config import HubConfigError, configure
from facility.hub.embedded import write_provider_settings
from facility.hub.groups import groups_from_claims
from facility.hub.profiles import (
    Machine,
    kubespawner_profiles,
    profile_named,
    unavailable_reason,
    visible_profiles,
)
from facility.hub.spawner import FacilityLocalSpawner, apply_profile, profile_form, this_machine

CLAIMS = ["wlcg.groups", "eduperson_entitlement", "groups"]


def test_groups_from_wlcg_entitlement_and_plain_claims() -> None:
    claims = {
        "wlcg.groups": ["/cms", "/cms/gpu"],
        "eduperson_entitlement": ["urn:mace:egi.eu:group:atlas:role=member#aai.egi.eu",
                                  "urn:mace:egi.eu:group:cms:higgs:role=vm_operator#aai.egi.eu",
                                  "urn:mace:egi.eu:res:not-a-group#aai.egi.eu"],
        "groups": "dune, lsst",
        "unrelated": ["/ignored"],
    }
    assert groups_from_claims(claims, CLAIMS) == {"cms", "cms/gpu", "atlas", "cms/higgs", "dune", "lsst"}
    assert groups_from_claims(claims, ["groups"]) == {"dune", "lsst"}
    assert groups_from_claims({}, CLAIMS) == set()


@pytest.fixture
def config(tmp_path: Path) -> FacilityConfig:
    (tmp_path / "facility.yaml").write_text("home: .\n")
    return load_config(tmp_path / "facility.yaml", environ={})


def hub_config(config: FacilityConfig) -> Config:
    c = Config()
    configure(c, config, environ={"FACILITY_HUB_CLIENT_SECRET": "s3cret"})
    return c


@pytest.fixture
def explicit_endpoints(config: FacilityConfig) -> FacilityConfig:
    vo = config.hub.vo
    vo.authorize_url, vo.token_url = "https://vo.example/auth", "https://vo.example/token"
    vo.userinfo_url = "https://vo.example/me"
    return config


def authenticator(c: Config) -> VOAuthenticator:
    return VOAuthenticator(config=c)


def auth_model(name: str, **claims: Any) -> dict[str, Any]:
    return {"name": name, "admin": None, "auth_state": {"oauth_user": claims}}


def test_members_of_the_vo_get_their_groups_and_admin_from_groups(
        explicit_endpoints: FacilityConfig) -> None:
    auth = authenticator(hub_config(explicit_endpoints))
    alice = asyncio.run(auth._apply_managed_groups(auth_model("alice", **{"wlcg.groups": ["/cms", "/cms/gpu"]})))
    assert alice["groups"] == ["cms", "cms/gpu"]
    assert alice["admin"] is False
    admin = asyncio.run(auth._apply_managed_groups(auth_model("root", **{"wlcg.groups": ["/cms/admin"]})))
    assert admin["admin"] is True
    assert asyncio.run(auth.check_allowed("alice", alice)) is True


def test_a_user_outside_the_vo_is_told_which_group_is_required(
        explicit_endpoints: FacilityConfig) -> None:
    auth = authenticator(hub_config(explicit_endpoints))
    eve = asyncio.run(auth._apply_managed_groups(auth_model("eve", groups=["other-vo"])))
    with pytest.raises(web.HTTPError) as refused:
        asyncio.run(auth.check_allowed("eve", eve))
    assert refused.value.status_code == 403
    assert refused.value.log_message == (
        "eve may not use this facility: membership in one of the VO groups cms is required; "
        "your identity provider reports the groups: other-vo.")


def test_configure_fills_the_hub_from_the_facility_configuration(
        explicit_endpoints: FacilityConfig) -> None:
    c = hub_config(explicit_endpoints)
    auth = c.VOAuthenticator
    assert auth.token_url == "https://vo.example/token"
    assert auth.userdata_from_id_token is True  # userinfo refuses tokens for the data servers
    assert "userdata_url" not in auth
    assert auth.client_secret == "s3cret"
    assert auth.allowed_groups == {"cms"}
    assert auth.enable_auth_state is True
    assert auth.username_claim == "preferred_username"
    assert c.JupyterHub.spawner_class is FacilityLocalSpawner
    assert c.FacilityLocalSpawner.environment["DASK_LABEXTENSION__FACTORY__CLASS"] == "LabCluster"
    assert c.JupyterHub.services[0]["name"] == "idle-culler"
    assert "--timeout=3600" in c.JupyterHub.services[0]["command"]


def test_configure_names_what_is_missing(config: FacilityConfig,
                                         explicit_endpoints: FacilityConfig) -> None:
    with pytest.raises(HubConfigError, match="export FACILITY_HUB_CLIENT_SECRET"):
        configure(Config(), explicit_endpoints, environ={})
    config.hub.vo.authorize_url = None
    config.hub.vo.issuer = "http://127.0.0.1:9"
    with pytest.raises(HubConfigError, match=r"127\.0\.0\.1:9/\.well-known/openid-configuration.*hub\.vo\.issuer"):
        configure(Config(), config, environ={"FACILITY_HUB_CLIENT_SECRET": "x"})


def test_profiles_follow_vo_groups(config: FacilityConfig) -> None:
    hub = config.hub
    assert [p.slug for p in visible_profiles(hub, {"cms", "cms/gpu"})] == ["cpu-small", "cpu-large", "gpu"]
    assert [p.slug for p in visible_profiles(hub, {"cms"})] == ["cpu-small", "cpu-large"]
    assert profile_named(hub, {"cms"}, None).slug == "cpu-small"
    with pytest.raises(PermissionError, match="'gpu' needs membership in one of cms/gpu"):
        profile_named(hub, {"cms"}, "gpu")
    with pytest.raises(LookupError, match="no profile 'huge'"):
        profile_named(hub, {"cms"}, "huge")
    form = profile_form(hub, {"cms"}, Machine(cpus=64, memory=2**40, gpus=8))
    assert 'value="cpu-large"' in form
    assert 'value="gpu"' not in form


def test_kubespawner_profiles_carry_gpu_limits_and_placement(config: FacilityConfig) -> None:
    profiles = {p["slug"]: p for p in kubespawner_profiles(config.hub, {"cms", "cms/gpu"})}
    gpu = profiles["gpu"]["kubespawner_override"]
    assert gpu["extra_resource_limits"] == {"nvidia.com/gpu": "1"}
    assert gpu["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "extra_resource_limits" not in profiles["cpu-small"]["kubespawner_override"]
    traits = set(KubeSpawner.class_trait_names())
    for profile in profiles.values():
        assert set(profile["kubespawner_override"]) <= traits
    assert profiles["cpu-small"]["default"] is True
    # the node pools decide what can run, not the hub's own machine: all are offered, described
    assert [p["description"] for p in profiles.values()] == [
        p.description for p in config.hub.profiles]


def test_tokens_are_renewed_before_they_expire(explicit_endpoints: FacilityConfig,
                                               tmp_path: Path) -> None:
    import time

    from facility.hub.tokens import write_token

    auth = authenticator(hub_config(explicit_endpoints))
    assert auth.refresh_margin == 300
    state = auth.build_auth_state_dict({"access_token": "a", "expires_in": 600}, {"sub": "alice"})
    assert 590 < state["expires_at"] - time.time() <= 600
    assert not auth._expires_soon(state)
    state["expires_at"] = time.time() + 200
    assert auth._expires_soon(state)
    token = tmp_path / "deep" / "token"
    assert write_token(token, "first")
    assert not write_token(token, "first")
    assert write_token(token, "second")
    assert token.read_text() == "second"
    assert token.stat().st_mode & 0o777 == 0o600


# -- profiles this machine can serve -------------------------------------------------------------

GIB = 2**30
LAPTOP = Machine(cpus=2, memory=16 * GIB, gpus=0)


def profile(**fields: Any) -> ProfileConfig:
    return ProfileConfig(slug="p", display_name="Some profile", **fields)


@pytest.mark.parametrize(("fields", "machine", "reason"), [
    ({"cpu": 2, "memory": "8GiB"}, LAPTOP, None),
    ({"cpu": 2, "memory": "16GiB"}, LAPTOP, None),
    ({"cpu": 8, "memory": "8GiB"}, LAPTOP,
     "Some profile is not available here: it needs 8 cores (this machine has 2). "
     "Pick another environment."),
    ({"cpu": 1, "memory": "32GiB"}, LAPTOP,
     "Some profile is not available here: it needs 32GiB of memory (this machine has 16.00 GiB). "
     "Pick another environment."),
    ({"cpu": 1, "memory": "1GiB", "gpus": 1}, LAPTOP,
     "Some profile is not available here: it needs 1 GPU (this machine has 0). "
     "Pick another environment."),
    ({"cpu": 4, "memory": "32GiB", "gpus": 2}, Machine(cpus=2, memory=16 * GIB, gpus=1),
     "Some profile is not available here: it needs 2 GPUs (this machine has 1), 4 cores (this "
     "machine has 2), 32GiB of memory (this machine has 16.00 GiB). Pick another environment."),
    ({"cpu": 4, "memory": "32GiB", "gpus": 2}, Machine(cpus=4, memory=32 * GIB, gpus=2), None),
])
def test_a_profile_is_served_only_by_a_machine_with_its_cores_memory_and_gpus(
        fields: dict[str, Any], machine: Machine, reason: str | None) -> None:
    assert unavailable_reason(profile(**fields), machine) == reason


def test_the_default_profiles_say_what_they_are_for() -> None:
    for default in HubConfig().profiles:
        assert len(default.description.split()) >= 5, default.slug


def test_the_form_describes_profiles_and_disables_those_the_machine_cannot_serve() -> None:
    hub = HubConfig()  # cpu-small: 2 cores, 8GiB (default); cpu-large: 8 cores; gpu: 1 GPU
    form = profile_form(hub, {"cms", "cms/gpu"}, LAPTOP)
    for each in hub.profiles:
        assert each.description in form
    assert '<input type="radio" name="profile" value="cpu-small" checked>' in form
    assert 'value="cpu-large" disabled aria-describedby="profile-cpu-large-unavailable"' in form
    assert 'value="gpu" disabled' in form
    assert "CPU, large is not available here: it needs 8 cores (this machine has 2)" in form
    assert "GPU is not available here: it needs 1 GPU (this machine has 0)" in form
    assert "(2 cores, 8GiB of memory)" in form
    assert "(4 cores, 32GiB of memory, 1 GPU)" in form
    # a default the machine cannot serve is not preselected: the first it can is
    small = Machine(cpus=1, memory=64 * GIB, gpus=0)
    hub.profiles.append(ProfileConfig(slug="cpu-one", display_name="CPU, one", cpu=1))
    form = profile_form(hub, {"cms"}, small)
    assert 'value="cpu-small" disabled' in form
    assert 'value="cpu-one" checked' in form
    assert profile_named(hub, {"cms"}, None, small).slug == "cpu-one"


class SpawnerView:
    """What the profile hook reads of a local spawner: the configuration and the user's groups."""

    def __init__(self, config: FacilityConfig, *groups: str) -> None:
        self.config = config
        self.user = type("User", (), {"groups": [type("Group", (), {"name": g}) for g in groups]})
        self.environment: dict[str, str] = {}
        self.mem_limit = self.cpu_limit = None

    def facility_config(self) -> FacilityConfig:
        return self.config


def test_a_start_choosing_a_profile_the_machine_cannot_serve_is_refused_with_the_reason(
        config: FacilityConfig) -> None:
    machine = this_machine()
    config.hub.profiles.append(ProfileConfig(slug="too-big", display_name="Too big",
                                             cpu=machine.cpus + 1, gpus=machine.gpus + 1))
    spawner = SpawnerView(config, "cms")
    with pytest.raises(web.HTTPError) as refused:
        asyncio.run(apply_profile(spawner, {"profile": "too-big"}))
    reason = unavailable_reason(config.hub.profiles[-1], machine)
    assert reason is not None
    assert reason.startswith("Too big is not available here: it needs ")
    assert refused.value.status_code == 400
    assert refused.value.jupyterhub_message == reason  # what the hub's pages show
    with pytest.raises(web.HTTPError) as forbidden:
        asyncio.run(apply_profile(spawner, {"profile": "gpu"}))
    assert forbidden.value.jupyterhub_message == "profile 'gpu' needs membership in one of cms/gpu"
    asyncio.run(apply_profile(spawner, {"profile": "cpu-small"}))
    assert (spawner.cpu_limit, spawner.environment["FACILITY_PROFILE"]) == (2, "cpu-small")


# -- logout and refusal ----------------------------------------------------------------------


@pytest.fixture
def provider_discovery() -> Iterator[str]:
    """A real HTTP server with a provider's discovery document (an end-session endpoint)."""
    class Discovery(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
            body = json.dumps({"issuer": issuer, "authorization_endpoint": f"{issuer}/auth",
                               "token_endpoint": f"{issuer}/token",
                               "end_session_endpoint": f"{issuer}/session/end"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Discovery)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("spawner", ["local", "kubernetes"])
def test_logout_ends_the_provider_session_found_in_its_discovery(
        config: FacilityConfig, provider_discovery: str, spawner: str) -> None:
    config.hub.vo.issuer = provider_discovery
    config.hub.public_url = "https://hub.example.org"
    c = Config()
    configure(c, config, spawner=spawner, environ={"FACILITY_HUB_CLIENT_SECRET": "s3cret"})
    auth = authenticator(c)
    assert auth.end_session_url == f"{provider_discovery}/session/end"
    assert auth.post_logout_redirect_url == "https://hub.example.org/hub/login"
    assert auth.logout_handler.__name__ == "VOLogoutHandler"
    url = urllib.parse.urlsplit(auth.provider_logout_url("the.id.token"))
    assert f"{url.scheme}://{url.netloc}{url.path}" == f"{provider_discovery}/session/end"
    assert urllib.parse.parse_qs(url.query) == {
        "client_id": ["facility-hub"], "id_token_hint": ["the.id.token"],
        "post_logout_redirect_uri": ["https://hub.example.org/hub/login"]}
    # a refused user has no token: the client id names the hub
    assert "id_token_hint" not in auth.provider_logout_url(None)


def test_an_explicit_end_session_endpoint_and_the_provider_registration_agree(
        explicit_endpoints: FacilityConfig) -> None:
    assert authenticator(hub_config(explicit_endpoints)).provider_logout_url("t") == ""
    explicit_endpoints.hub.vo.end_session_url = "https://vo.example/logout"
    auth = authenticator(hub_config(explicit_endpoints))
    assert auth.provider_logout_url("t").startswith("https://vo.example/logout?client_id=")
    settings = json.loads(write_provider_settings(explicit_endpoints).read_text())
    [hub_client] = [c for c in settings["clients"] if c["client_id"] == "facility-hub"]
    assert hub_client["post_logout_redirect_uris"] == [auth.post_logout_redirect_url]


@pytest.mark.parametrize(("contact", "shown"), [
    (None, "To ask for access, contact your VO's administrators."),
    ("help@vo.example", '<a class="facility-support" href="mailto:help@vo.example">'
                        'help@vo.example</a>'),
    ("https://vo.example/help?a=1&b=2", '<a class="facility-support" '
                                        'href="https://vo.example/help?a=1&amp;b=2">'),
    ("the <facility> desk", '<span class="facility-support">the &lt;facility&gt; desk</span>'),
])
def test_the_refusal_states_the_reason_once_with_the_contact_and_a_sign_out(
        explicit_endpoints: FacilityConfig, contact: str | None, shown: str) -> None:
    explicit_endpoints.hub.support_contact = contact
    auth = authenticator(hub_config(explicit_endpoints))
    eve = asyncio.run(auth._apply_managed_groups(auth_model("eve", groups=["other-vo"])))
    with pytest.raises(web.HTTPError) as refused:
        asyncio.run(auth.check_allowed("eve", eve))
    error = refused.value
    reason = auth.refusal("eve", {"other-vo"})
    # the hub's error page titles itself with the reason when it has one, else the message
    assert (error.status_code, error.reason) == (403, "Access refused")
    assert error.jupyterhub_message == reason
    page = error.jupyterhub_html_message
    assert page.count(reason) == 1
    assert shown in page
    assert '<a class="facility-sign-out" href="logout">Sign out</a>' in page
