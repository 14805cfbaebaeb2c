"""The hub in a real browser: VO login through the provider's form, profiles, the quick-start
notebook to the end, the dashboard through the hub, and who is kept out.

Headless Debian chromium driven by Playwright; the identity provider, proxy, hub and user
servers are the embedded facility's real processes.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import jwt
import psutil
import pytest
from playwright.sync_api import Browser

from facility.batch import JobHandle
from facility.cluster.connect import connect
from facility.config import FacilityConfig
from tests.browser import login, run_all, start_server

pytestmark = pytest.mark.integration


def test_vo_member_runs_the_quickstart_notebook(hub: str, browser: Browser) -> None:
    page = login(browser, hub, "alice", "alice-dev")
    gpu = page.locator("input[value=gpu]")
    assert gpu.count() == 1  # alice is in cms/gpu, but this machine has too few GPUs
    assert gpu.is_disabled()
    assert re.search(r"GPU is not available here: it needs \d+ GPUs? \(this machine has \d+\)",
                     page.locator("body").inner_text())
    start_server(page, "cpu-small")
    page.wait_for_url("**/user/alice/lab**", timeout=180_000)

    run_all(page, f"{hub}/user/alice/lab/tree/quickstart.ipynb")
    peak = page.wait_for_selector(".jp-OutputArea-output:has-text('Z peak fitted at')", timeout=300_000)
    found = re.search(r"Z peak fitted at ([\d.]+) GeV", peak.inner_text())
    assert found
    assert abs(float(found.group(1)) - 91.19) < 1.0
    # the printed line (case matters: the client widget above says "Dashboard:" too)
    link = page.locator(".jp-OutputArea-output", has_text=re.compile(r"^dashboard: ")).first
    link.wait_for(timeout=120_000)
    dashboard = link.inner_text().split("dashboard:", 1)[1].strip()
    assert dashboard.startswith("/user/alice/proxy/")

    response = page.goto(f"{hub}{dashboard}")
    assert response is not None
    assert response.status == 200
    assert "Dask" in page.title()
    assert page.locator("text=Workers").count() >= 1

    bob = login(browser, hub, "bob", "bob-dev")
    assert bob.locator("input[value=gpu]").count() == 0  # not in cms/gpu
    response = bob.goto(f"{hub}/user/alice/lab")
    assert "You do not have permission to access Server at /user/alice/" in bob.locator("body").inner_text()


def _storage_claims(config: FacilityConfig, token: str) -> dict:
    """The access token is a WLCG token for the data servers, signed by the provider."""
    issuer = f"http://{config.hub.host}:{config.hub.provider_port}"
    keys = jwt.PyJWKClient(f"{issuer}/jwks").get_signing_key_from_jwt(token)
    return dict(jwt.decode(token, keys.key, algorithms=["RS256"],
                           audience=config.data_access.audience, issuer=issuer))


def test_the_access_token_is_renewed_for_the_server_and_its_workers(
        hub: str, facility_config: FacilityConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs after the notebook test: alice's server and her cluster are up."""
    token_file = facility_config.state_path / "hub" / "users" / "alice" / ".facility" / "token"
    first = token_file.read_text()
    claims = _storage_claims(facility_config, first)
    assert (claims["sub"], claims["scope"], claims["wlcg.ver"]) == ("alice", "storage.read:/", "1.0")
    deadline = time.monotonic() + 90
    while token_file.read_text() == first and time.monotonic() < deadline:
        time.sleep(1)
    renewed = token_file.read_text()
    assert renewed != first, "the token file was not renewed"
    assert _storage_claims(facility_config, renewed)["wlcg.groups"] == ["/cms", "/cms/gpu"]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    client = connect("quickstart", config=facility_config, wait=False)
    try:
        seen_by_worker = client.submit(lambda: Path(os.environ["BEARER_TOKEN_FILE"]).read_text(),
                                       pure=False).result()
    finally:
        client.close()
    assert seen_by_worker == token_file.read_text()


def test_outside_the_vo_group_is_refused_with_the_reason(hub: str, browser: Browser) -> None:
    page = login(browser, hub, "eve", "eve-dev")
    text = page.locator("body").inner_text()
    assert "403" in text
    assert ("eve may not use this facility: membership in one of the VO groups cms is required; "
            "your identity provider reports the groups: other-vo.") in text


def test_a_wrong_password_stays_at_the_provider(hub: str, browser: Browser) -> None:
    page = login(browser, hub, "alice", "not-her-password")
    assert "Unknown user or wrong password." in page.locator("body").inner_text()
    assert "/interaction/" in page.url


def _server_processes(user: str) -> list[psutil.Process]:
    """The user's notebook server and its kernels (the hub runs them as local processes)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            command = " ".join(proc.info["cmdline"] or [])
            if ("jupyterhub-singleuser" in command or "ipykernel_launcher" in command) and \
                    proc.environ().get("JUPYTERHUB_USER") == user:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_job_submitted_from_a_notebook_finishes_after_the_server_is_stopped(
        hub: str, browser: Browser, facility_config: FacilityConfig,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Runs last: it stops alice's server. An earlier job of alice's holds her one running slot
    (the test configuration's limit), so the job that batch.ipynb submits is still queued when
    the server and its kernels are gone; it starts when the earlier job ends, and finishes."""
    import facility.batch
    from tests.test_batch import WAIT_FOR_MARKER

    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    monkeypatch.setenv("FACILITY_CONFIG", str(facility_config.home / "facility.yaml"))
    marker, holder_script = tmp_path / "go", tmp_path / "hold.py"
    holder_script.write_text(WAIT_FOR_MARKER)
    holder = facility.batch.submit(holder_script, args=[str(marker)], workers=0)
    try:
        _submit_from_the_notebook_and_stop_the_server(hub, browser, holder, marker)
    finally:
        marker.touch()  # never leave the holder waiting, whatever failed


def _submit_from_the_notebook_and_stop_the_server(hub: str, browser: Browser, holder: JobHandle,
                                                  marker: Path) -> None:
    import facility.batch

    page = login(browser, hub, "alice", "alice-dev")
    if "/hub/spawn" in page.url:
        start_server(page, "cpu-small")
    page.wait_for_url("**/user/alice/lab**", timeout=180_000)
    run_all(page, f"{hub}/user/alice/lab/tree/batch.ipynb?reset")  # only this notebook open
    submitted = page.wait_for_selector(".jp-OutputArea-output:has-text('submitted job')",
                                       timeout=180_000)
    found = re.search(r"submitted job (\d+): queued", submitted.inner_text())
    assert found, submitted.inner_text()

    page.goto(f"{hub}/hub/home")
    page.click("#stop")
    page.wait_for_selector("#start:has-text('Start My Server')", timeout=120_000)
    _gone, alive = psutil.wait_procs(_server_processes("alice"), timeout=120)
    assert alive == []
    assert _server_processes("alice") == []
    submitted_job = facility.batch.job(int(found.group(1)))
    assert (holder.state, submitted_job.state) == ("running", "queued")

    marker.touch()
    record = submitted_job.wait(timeout=300, poll=1)
    assert record.state == "succeeded", submitted_job.logs()
    assert holder.state == "succeeded"
    assert {p.name for p in submitted_job.outputs()} >= {
        "zpeak_job.ipynb", "histograms.root", "plot.png", "summary.json", "job.json", "job.log"}
    summary = json.loads((record.output_dir / "summary.json").read_text())
    assert abs(summary["analysis"]["fit"]["peak"] - 91.19) < 1.0
