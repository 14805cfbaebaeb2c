"""JupyterLab in a real browser, as a new user finds it: the first server opens the quick-start
notebook (no Launcher, no "Jupyter news" question), a terminal opened from the Launcher runs the
`facility` command, and what a job submitted there writes is in the home, where the file
browser shows it.

Headless Debian chromium driven by Playwright, through the embedded facility's real hub. The
user is bob, whose server no other browser test starts: his first login is this module's.
"""

from __future__ import annotations

import re
from typing import Any

import nbformat
import pytest
from playwright.sync_api import Browser, Page

from facility.config import FacilityConfig
from tests.browser import login, start_server

pytestmark = pytest.mark.integration

USER, PASSWORD = "bob", "bob-dev"
NEWS_QUESTION = "Would you like to get notified about official Jupyter news?"

# Reads what a terminal of the server shows: terminado sends a new client the terminal's
# history, so a second connection sees what the terminal on the page shows.
READ_TERMINALS = """
async ([base, pattern, seconds]) => {
  const deadline = Date.now() + seconds * 1000;
  let seen = "";
  while (Date.now() < deadline) {
    const xsrf = (document.cookie.match(/(?:^|; )_xsrf=([^;]*)/) || [])[1] || "";
    const terminals = await (await fetch(base + "api/terminals",
                                         {headers: {"X-XSRFToken": decodeURIComponent(xsrf)}})).json();
    for (const {name} of terminals) {
      seen = await new Promise((resolve) => {
        const socket = new WebSocket(base.replace(/^http/, "ws") + "terminals/websocket/" + name);
        let text = "";
        socket.onmessage = (event) => {
          const [kind, data] = JSON.parse(event.data);
          if (kind === "stdout") { text += data; }
        };
        setTimeout(() => { socket.close(); resolve(text); }, 1000);
      });
      if (new RegExp(pattern).test(seen)) { return seen; }
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  return seen;
}
"""


@pytest.fixture(scope="module")
def lab(hub: str, browser: Browser) -> Page:
    """Bob signed in, his first server started."""
    page = login(browser, hub, USER, PASSWORD)
    start_server(page, "cpu-small")
    page.wait_for_url(f"**/user/{USER}/lab**", timeout=180_000)
    return page


def terminal_shows(page: Page, hub: str, pattern: str, seconds: float = 60) -> str:
    seen = page.evaluate(READ_TERMINALS, [f"{hub}/user/{USER}/", pattern, seconds])
    assert re.search(pattern, seen), f"no {pattern!r} in the terminal:\n{seen[-3000:]}"
    return str(seen)


def test_the_first_server_opens_the_quickstart_notebook_and_asks_no_news(
        lab: Page, hub: str) -> None:
    assert lab.url.endswith(f"/user/{USER}/lab/tree/quickstart.ipynb"), lab.url
    lab.wait_for_selector(".jp-Notebook")
    lab.locator(".jp-StatusBar-TextItem", has_text="Idle").first.wait_for()
    current = lab.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current")
    assert "quickstart.ipynb" in current.inner_text()
    assert lab.locator(".jp-Launcher").count() == 0
    settings = lab.request.get(
        f"{hub}/user/{USER}/lab/api/settings/@jupyterlab/apputils-extension:notification").json()
    assert settings["schema"]["properties"]["fetchNews"]["default"] == "false"
    lab.wait_for_timeout(3000)  # the question comes, if at all, once JupyterLab has restored
    assert lab.get_by_text(NEWS_QUESTION).count() == 0


def test_a_terminal_from_the_launcher_runs_the_facility_command_and_a_job_lands_at_home(
        lab: Page, hub: str, facility_config: FacilityConfig) -> None:
    lab.click("div.lm-MenuBar-itemLabel:text-is('File')")
    lab.locator("li[data-command='launcher:create']").click()
    lab.locator(".jp-LauncherCard", has_text="Terminal").first.click()
    lab.wait_for_selector(".jp-Terminal .xterm")
    terminal_shows(lab, hub, r"[$#] $")  # the shell's prompt
    lab.locator(".jp-Terminal .xterm").last.click()
    lab.keyboard.type("facility --version; echo version-exit=$?\n")
    shown = terminal_shows(lab, hub, r"version-exit=\d")
    assert re.search(r"facility \d+\.\d+", shown), shown[-2000:]
    assert "version-exit=0" in shown, shown[-2000:]

    # a batch job submitted from the terminal: its outputs are in the home, its user's only
    lab.keyboard.type("echo 'from facility.batch import output_folder; (output_folder() / "
                      "\"hello.txt\").write_text(\"hi\")' > hello.py\n")
    lab.keyboard.type("facility submit hello.py --workers 0 --wait; echo submit-exit=$?\n")
    shown = terminal_shows(lab, hub, r"submit-exit=\d", seconds=300)
    assert "submit-exit=0" in shown, shown[-3000:]
    found = re.search(r"job (\d+) \(hello\.py\)", shown)
    assert found, shown[-3000:]
    home = facility_config.state_path / "hub" / "users" / USER
    folder = home / "facility-output" / USER / "jobs" / found.group(1)
    assert (folder / "hello.txt").read_text() == "hi"
    assert (folder.stat().st_mode & 0o777, (folder / "hello.txt").stat().st_mode & 0o777) == \
        (0o700, 0o600)

    lab.goto(f"{hub}/user/{USER}/lab/tree/facility-output/{USER}/jobs")
    lab.wait_for_selector(f".jp-DirListing-item:has-text('{found.group(1)}')")


def _cell(lab: Page, index: int) -> Any:
    return lab.locator(".jp-Notebook .jp-Cell").nth(index)


def _run_cell(lab: Page, index: int) -> None:
    """Select a cell (command mode) and run it, as Shift+Enter does."""
    _cell(lab, index).locator(".jp-InputPrompt").click()
    lab.keyboard.press("Shift+Enter")


def test_the_dask_sidebar_lists_the_notebooks_cluster_and_its_code_connects(
        lab: Page, hub: str, facility_config: FacilityConfig) -> None:
    home = facility_config.state_path / "hub" / "users" / USER
    nbformat.write(nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('import facility\nmine = facility.connect("sidebar", workers=1)\n'
                                  'print("connected", mine.cluster.name)'),
        nbformat.v4.new_code_cell("client.submit(sum, [20, 22]).result()"),
        nbformat.v4.new_code_cell(f"!facility clusters stop {USER}-sidebar"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}}), home / "sidebar.ipynb")
    lab.goto(f"{hub}/user/{USER}/lab/tree/sidebar.ipynb?reset")  # only this notebook open
    lab.wait_for_selector(".jp-Notebook")
    lab.locator(".jp-StatusBar-TextItem", has_text="Idle").first.wait_for()
    _run_cell(lab, 0)
    lab.wait_for_selector(f".jp-OutputArea-output:has-text('connected {USER}-sidebar')",
                          timeout=120_000)

    lab.locator(".jp-SideBar .lm-TabBar-tab[data-id='dask-dashboard-launcher']").click()
    card = lab.locator(".dask-ClusterListingItem",
                       has=lab.locator(f".dask-ClusterListingItem-title:text-is('{USER}-sidebar')"))
    card.wait_for(timeout=30_000)
    assert f"facility://{USER}-sidebar" in card.inner_text()

    _cell(lab, 1).locator(".jp-InputPrompt").click()
    card.locator("button.dask-ClusterListingItem-code").click()  # a new cell above the active one
    lab.wait_for_function(
        "() => document.querySelectorAll('.jp-Notebook .jp-Cell')[1].innerText"
        f".includes('Client(\"facility://{USER}-sidebar\")')")
    _run_cell(lab, 1)
    _run_cell(lab, 2)
    answer = _cell(lab, 2).locator(".jp-OutputArea-output")
    answer.wait_for(timeout=60_000)
    assert answer.inner_text().strip() == "42"

    _run_cell(lab, 3)
    lab.wait_for_selector(f".jp-OutputArea-output:has-text('stopped: {USER}-sidebar')",
                          timeout=60_000)
    card.wait_for(state="detached", timeout=30_000)  # the sidebar let go of it
