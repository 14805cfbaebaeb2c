"""The hub's configuration: VO groups from tokens, who may log in, which profiles they see."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from kubespawner import KubeSpawner
from tornado import web
from traitlets.config import Config

from facility.config import FacilityConfig, load_config
from facility.hub.authenticator import VOAuthenticator
from facility.hub.config import HubConfigError, configure
from facility.hub.groups import groups_from_claims
from facility.hub.profiles import kubespawner_profiles, profile_named, visible_profiles
from facility.hub.spawner import FacilityLocalSpawner, profile_form

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
    form = profile_form(config, {"cms"})
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
