"""Who may read the data: the real XRootD servers (TLS, read-only, SciTokens plugin) and XCache.

Anonymous reads over root:// and https:// are refused, writes are refused even with a token,
and a token that is expired, from another VO or forged is refused by the servers themselves;
the facility stops a run with such a token and names it and the reason. The XCache serves a
second read from its disk: the region's server is killed in between.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from facility.config import FacilityConfig
from facility.data.catalog import load_catalog
from facility.data.servers import cache_dir
from facility.data.tls import data_tls
from facility.data.tokens import (
    FoundToken,
    describe,
    ensure_local_token,
    find_token,
    keeps_local_token,
    token_problem,
    trusted_issuers,
)
from facility.embedded import facility as embedded
from facility.embedded.services import Supervisor
from facility.hub.config import issuer_url
from facility.hub.embedded import hub_state

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def _private(path: Path, text: str) -> Path:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    return path


def _provider_key(config: FacilityConfig) -> tuple[str, object]:
    """The embedded provider's signing key, to make a token it could have issued."""
    [key] = json.loads((hub_state(config) / "provider-keys.json").read_text())["keys"]
    return key["kid"], jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(key))


def _token(config: FacilityConfig, issuer: str | None = None, key: object = None,
           lifetime: int = 3600, **claims: object) -> str:
    kid, provider_key = _provider_key(config)
    now = int(time.time())
    payload = {"iss": issuer or issuer_url(config), "sub": "mallory", "scope": "storage.read:/",
               "aud": config.data_access.audience, "wlcg.ver": "1.0", "iat": now - 60,
               "nbf": now - 60, "exp": now + lifetime, **claims}
    return jwt.encode(payload, key or provider_key, algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def bad_tokens(facility_config: FacilityConfig, tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tokens")
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "expired": _private(folder / "expired", _token(facility_config, lifetime=-600)),
        "other VO": _private(folder / "other-vo", _token(
            facility_config, issuer="https://other-vo.example", key=stranger)),
        "forged": _private(folder / "forged", _token(facility_config, key=stranger)),
        "other audience": _private(folder / "other-audience", _token(
            facility_config, aud="facility-hub", sub="xcache")),
    }


def _a_file(config: FacilityConfig, region: str = "east") -> tuple[str, Path]:
    """A DY file: its path below the region's root, and its bytes on disk."""
    entry = load_catalog(config.catalog_path).get("DY").files[0]
    relative = f"DY/{entry.name}"
    return relative, config.region_root(config.region(region)) / relative


def _xrootd(config: FacilityConfig, *argv: str, token: Path | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEARER_TOKEN")}
    env["X509_CERT_DIR"] = str(data_tls(config).ca_dir)
    env["XDG_RUNTIME_DIR"] = "/nonexistent"  # no token found by discovery either
    if token is not None:
        env["BEARER_TOKEN_FILE"] = str(token)
    return subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=60)


def _https_status(config: FacilityConfig, url: str, token: str | None) -> int:
    context = ssl.create_default_context(capath=str(data_tls(config).ca_dir))
    headers = {"Authorization": f"Bearer {token}", "Range": "bytes=0-3"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30,
                                    context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as refused:
        return refused.code


def test_anonymous_reads_and_any_write_are_refused_and_the_token_reads(
        facility_config: FacilityConfig, tmp_path: Path) -> None:
    east = facility_config.region("east")
    assert east.serve is not None
    assert east.serve.http_port is not None
    relative, on_disk = _a_file(facility_config)
    url = f"root://localhost:{east.serve.xrootd_port}//{relative}"
    copy = tmp_path / "copy.root"

    anonymous = _xrootd(facility_config, "xrdcp", "-f", url, str(copy), token=None)
    assert anonymous.returncode != 0
    assert "Auth failed" in anonymous.stderr + anonymous.stdout
    assert not copy.exists()
    https = f"https://localhost:{east.serve.http_port}/{relative}"
    assert _https_status(facility_config, https, None) == 403

    token_file = ensure_local_token(facility_config)
    assert token_file is not None
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    read = _xrootd(facility_config, "xrdcp", "-f", url, str(copy), token=token_file)
    assert read.returncode == 0, read.stderr
    assert copy.read_bytes() == on_disk.read_bytes()
    assert _https_status(facility_config, https, token_file.read_text()) == 206

    removed = _xrootd(facility_config, "xrdfs", f"localhost:{east.serve.xrootd_port}", "rm",
                      f"/{relative}", token=token_file)
    assert removed.returncode != 0
    assert "permission denied" in removed.stderr.lower() + removed.stdout.lower()
    assert on_disk.exists()

    ran = subprocess.run(
        [sys.executable, "-m", "facility.cli", "--config", str(facility_config.home / "facility.yaml"),
         "run", "dimuon", "--dataset", "DY", "--json"], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={k: v for k, v in os.environ.items() if not k.startswith("BEARER_TOKEN")})
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout[ran.stdout.index("{"):])
    assert url in summary["replicas_used"]
    assert summary["events"] == sum(f.events for f in load_catalog(
        facility_config.catalog_path).get("DY").files)


def test_the_servers_refuse_expired_foreign_and_forged_tokens(
        facility_config: FacilityConfig, bad_tokens: dict[str, Path], tmp_path: Path) -> None:
    east = facility_config.region("east")
    assert east.serve is not None
    relative, _ = _a_file(facility_config)
    for why, token in bad_tokens.items():
        copy = tmp_path / f"{why}.root"
        refused = _xrootd(facility_config, "xrdcp", "-f",
                          f"root://localhost:{east.serve.xrootd_port}//{relative}", str(copy),
                          token=token)
        assert refused.returncode != 0, why
        assert not copy.exists(), why
        status = _https_status(facility_config,
                               f"https://localhost:{east.serve.http_port}/{relative}",
                               token.read_text())
        assert status == 403, why


RUN_WITH_TOKEN = textwrap.dedent("""
    import sys
    import facility
    from facility.errors import FacilityError
    client = facility.connect(sys.argv[2], workers=1, config=facility.load_config(sys.argv[1]))
    try:
        facility.run("dimuon", "TT", client=client, output=False,
                     config=facility.load_config(sys.argv[1]))
        print("read")
    except FacilityError as error:
        print(f"error ({error.who}): {error}")
        sys.exit(error.exit_code)
    finally:
        client.cluster.close()
""")


def _run_with_token(config: FacilityConfig, token: Path, cluster: str
                    ) -> subprocess.CompletedProcess:
    env = {**os.environ, "BEARER_TOKEN_FILE": str(token), "JUPYTERHUB_USER": "mallory"}
    return subprocess.run([sys.executable, "-c", RUN_WITH_TOKEN,
                           str(config.home / "facility.yaml"), cluster],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_a_run_with_a_token_the_servers_refuse_stops_naming_the_token_and_why(
        facility_config: FacilityConfig, bad_tokens: dict[str, Path]) -> None:
    expired = _run_with_token(facility_config, bad_tokens["expired"], "expired-token")
    assert expired.returncode == 2, expired.stderr[-2000:]
    assert re.search(rf"the token in BEARER_TOKEN_FILE={re.escape(str(bad_tokens['expired']))} "
                     r"\(subject mallory\) expired 1\d min ago", expired.stdout), expired.stdout

    forged = _run_with_token(facility_config, bad_tokens["forged"], "forged-token")
    assert forged.returncode == 2, forged.stderr[-2000:]
    assert (f"the data servers refused the token in BEARER_TOKEN_FILE={bad_tokens['forged']} "
            "(subject mallory") in forged.stdout
    refusals = [line for line in forged.stdout.splitlines() if line.startswith("  - ")]
    assert refusals
    assert all("(access refused)" in line for line in refusals)
    assert bad_tokens["forged"].read_text() not in forged.stdout + forged.stderr


def test_what_is_wrong_with_a_token_is_said_without_its_value(
        facility_config: FacilityConfig, bad_tokens: dict[str, Path], tmp_path: Path) -> None:
    trusted, audience = trusted_issuers(facility_config), facility_config.data_access.audience
    found = {why: FoundToken(path.read_text(), str(path), path)
             for why, path in bad_tokens.items()}

    def problem(token: FoundToken | None) -> str:
        return str(token_problem(token, trusted, audience))

    assert re.search(r"expired 1\d min ago", problem(found["expired"]))
    assert "issued by https://other-vo.example, which the data servers do not trust" in problem(
        found["other VO"])
    assert token_problem(found["forged"], trusted, audience) is None  # only the servers can tell
    assert "is meant for facility-hub, not the data servers" in problem(found["other audience"])
    unscoped = FoundToken(_token(facility_config, scope="openid"), "test")
    assert "no storage.read scope" in problem(unscoped)
    assert problem(None).startswith("no token was found")
    loose = bad_tokens["forged"].with_name("loose")
    loose.write_text(_token(facility_config))
    loose.chmod(0o644)
    assert f"may be read by others (mode 0o644), and the XRootD client refuses it: chmod 600 " \
           f"{loose}" in problem(FoundToken(loose.read_text(), str(loose), loose))
    for token in found.values():
        assert token.value not in describe(token)


def test_a_token_another_account_planted_where_tokens_are_looked_for_is_not_used(
        facility_config: FacilityConfig, tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    planted = _private(runtime / f"bt_u{os.getuid()}", _token(facility_config))
    environ = {"XDG_RUNTIME_DIR": str(runtime)}
    assert find_token(environ) is not None  # this account's own file is found...
    os.chown(planted, os.getuid() + 4242, -1)
    assert find_token(environ) is None  # ...one another account owns is passed over
    assert keeps_local_token(facility_config, environ)  # and the facility keeps its own


def test_other_accounts_cannot_read_the_served_files_around_the_servers(
        facility_config: FacilityConfig) -> None:
    for region in ("east", "west"):
        _, on_disk = _a_file(facility_config, region)
        root = facility_config.region_root(facility_config.region(region))
        assert root.stat().st_mode & 0o007 == 0, oct(root.stat().st_mode)
        if os.geteuid() == 0:  # try it as another account
            attempt = subprocess.run(["runuser", "-u", "nobody", "--", "head", "-c", "4",
                                      str(on_disk)], capture_output=True, text=True)
            assert attempt.returncode != 0
            assert "Permission denied" in attempt.stderr


def _cache_server_pid(config: FacilityConfig, region: str) -> int:
    record = json.loads((config.state_path / "run" / f"xrootd-{region}.json").read_text())
    return int(record["pid"])


def test_a_second_read_through_the_cache_is_served_from_it(
        facility_config: FacilityConfig, tmp_path: Path) -> None:
    west = facility_config.region("west")
    assert west.cache is not None
    assert west.serve is not None
    relative, on_disk = _a_file(facility_config, "west")
    token = ensure_local_token(facility_config)
    through_cache = f"root://localhost:{west.cache.xrootd_port}//{relative}"
    first, second = tmp_path / "first.root", tmp_path / "second.root"
    read = _xrootd(facility_config, "xrdcp", "-f", through_cache, str(first), token=token)
    assert read.returncode == 0, read.stderr
    assert first.read_bytes() == on_disk.read_bytes()
    assert (cache_dir(facility_config, west) / f"{relative}.cinfo").exists()

    origin = psutil.Process(_cache_server_pid(facility_config, "west"))
    origin.send_signal(signal.SIGKILL)
    origin.wait(10)
    try:
        refused = _xrootd(facility_config, "xrdcp", "-f", through_cache, str(second), token=None)
        assert refused.returncode != 0  # the cache, too, wants a token
        read = _xrootd(facility_config, "xrdcp", "-f", through_cache, str(second), token=token)
        assert read.returncode == 0, read.stderr
        assert second.read_bytes() == on_disk.read_bytes()
    finally:
        embedded.up(facility_config, report=lambda _: None, hub=False)
    assert Supervisor(facility_config.state_path).process("xrootd-west") is not None
