"""A user's server as the hub starts it, without the hub: a real Jupyter server with the
environment and arguments that :func:`facility.hub.config.configure` gives the spawner. Its
terminals find the ``facility`` command (the login shell's profile resets PATH), and JupyterLab
asks no "Jupyter news" question; a user's first server opens the quick-start notebook.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect
from traitlets.config import Config

from facility.config import FacilityConfig, load_config
from facility.hub.config import configure, scripts_folder
from facility.hub.welcome import DEFAULT_URL_ENV, FirstStart
from tests.conftest import free_port

TOKEN = "lab-test-token"
# what the hub's account has on PATH when `make demo` starts it: not the virtual environment
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


@pytest.fixture
def config(tmp_path: Path) -> FacilityConfig:
    (tmp_path / "facility.yaml").write_text(
        "home: .\nhub:\n  vo: {authorize_url: 'https://vo.example/auth', "
        "token_url: 'https://vo.example/token'}\n")
    return load_config(tmp_path / "facility.yaml", environ={})


def spawner_settings(config: FacilityConfig, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PATH", SYSTEM_PATH)
    c = Config()
    configure(c, config, config_file=config.home / "facility.yaml",
              environ={"FACILITY_HUB_CLIENT_SECRET": "s3cret"})
    return c.FacilityLocalSpawner


def test_servers_get_the_facility_command_first_on_their_path(
        config: FacilityConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    spawner = spawner_settings(config, monkeypatch)
    path = spawner.environment["PATH"].split(os.pathsep)
    assert path[0] == str(scripts_folder())
    assert (scripts_folder() / "facility").is_file()
    assert path[1:] == SYSTEM_PATH.split(os.pathsep)
    assert spawner.default_url == "/lab"
    assert spawner.first_url == "/lab/tree/quickstart.ipynb"
    output = spawner.environment["FACILITY_OUTPUT_DIR"]
    assert output(type("Spawner", (), {"home_dir": "/srv/users/alice"})) == \
        "/srv/users/alice/facility-output"


class _Spawner:
    """What FirstStart needs of a JupyterHub spawner."""

    def get_state(self) -> dict[str, Any]:
        return {"pid": 42}

    def load_state(self, state: dict[str, Any]) -> None:
        pass

    def clear_state(self) -> None:
        pass

    def get_env(self) -> dict[str, str]:
        return {DEFAULT_URL_ENV: "/lab"}

    def format_string(self, text: str) -> str:
        return text


class _Welcoming(FirstStart, _Spawner):
    pass


def test_only_a_users_first_server_opens_the_quickstart_notebook() -> None:
    spawner = _Welcoming(first_url="/lab/tree/quickstart.ipynb")
    assert spawner.get_env()[DEFAULT_URL_ENV] == "/lab/tree/quickstart.ipynb"
    assert "welcomed" not in spawner.get_state()
    spawner.started()
    state = spawner.get_state()
    assert state == {"pid": 42, "welcomed": True}
    spawner.clear_state()  # the server stopped
    assert spawner.get_env()[DEFAULT_URL_ENV] == "/lab"
    after_a_hub_restart = _Welcoming(first_url="/lab/tree/quickstart.ipynb")
    after_a_hub_restart.load_state(state)
    assert after_a_hub_restart.get_env()[DEFAULT_URL_ENV] == "/lab"
    assert _Welcoming().get_env()[DEFAULT_URL_ENV] == "/lab"  # no first_url: default_url


@pytest.fixture
def server(config: FacilityConfig, monkeypatch: pytest.MonkeyPatch,
           tmp_path: Path) -> Iterator[str]:
    """A Jupyter server started as the local spawner starts one (its arguments and the
    facility's part of its environment), with a token instead of the hub."""
    spawner = spawner_settings(config, monkeypatch)
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in spawner.environment.items() if isinstance(value, str)}
    env |= {"HOME": str(home), "SHELL": "/bin/bash", "USER": "alice", "LANG": "C.UTF-8",
            "JUPYTER_CONFIG_DIR": str(home / ".jupyter"), "JUPYTER_DATA_DIR": str(home / ".local")}
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", *spawner.args, f"--ServerApp.port={port}",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}", "--no-browser",
         f"--ServerApp.root_dir={home}"],
        env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}api/status?token={TOKEN}", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((tmp_path / "server.log").read_text()[-3000:]) from None
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


async def terminal_output(url: str, command: str, until: str, timeout: float = 60) -> str:
    """Start a terminal through the server's REST API, type ``command`` over its websocket and
    return what the terminal shows until ``until`` (a regular expression) appears."""
    headers = {"Authorization": f"token {TOKEN}"}
    created = await AsyncHTTPClient().fetch(f"{url}api/terminals", method="POST", body="",
                                            headers=headers)
    name = json.loads(created.body)["name"]
    socket = await websocket_connect(HTTPRequest(
        f"{url.replace('http', 'ws', 1)}terminals/websocket/{name}", headers=headers))
    socket.write_message(json.dumps(["stdin", command + "\r"]))
    seen = ""
    deadline = time.monotonic() + timeout
    while not re.search(until, seen):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the terminal did not show {until!r}:\n{seen}")
        message = await asyncio.wait_for(socket.read_message(), left)
        if message is None:
            raise AssertionError(f"the terminal closed:\n{seen}")
        kind, *rest = json.loads(message)
        if kind == "stdout":
            seen += rest[0]
    socket.close()
    return seen


@pytest.mark.integration
def test_a_terminal_of_the_server_runs_the_facility_command(server: str) -> None:
    shown = asyncio.run(terminal_output(
        server, "facility --version; echo exit=$?", r"exit=\d+"))
    assert re.search(r"facility \d+\.\d+", shown), shown
    assert "exit=0" in shown, shown


@pytest.mark.integration
def test_jupyterlab_asks_no_news_question(server: str) -> None:
    request = urllib.request.Request(
        f"{server}lab/api/settings/@jupyterlab/apputils-extension:notification",
        headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        settings = json.load(response)
    assert settings["schema"]["properties"]["fetchNews"]["default"] == "false"
    assert settings["settings"].get("fetchNews", "false") == "false"
