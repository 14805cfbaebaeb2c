"""The notebook's widgets in a real browser, through the hub: the client widget with the cluster
inside and a dashboard link that opens the Dask dashboard through the hub; a run's progress bar
advancing and its live plot redrawn while the run goes on.

Headless Debian chromium driven by Playwright; the hub, the user's server, the kernel and the
Dask cluster are the embedded facility's real processes. One server start serves the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import nbformat
import pytest
from playwright.sync_api import Browser, Page

from facility.config import FacilityConfig
from tests.browser import login, start_server

pytestmark = pytest.mark.integration

USER, PASSWORD = "alice", "alice-dev"
NOTEBOOK = "widgets.ipynb"

# Every state of the progress output, as the page showed it: the bar's value and maximum and
# which plot was on show (the end of its data), recorded by the page itself as the kernel
# updates the output, so that no state is missed between two looks from the test.
RECORD_PROGRESS = """
() => {
  window.progressSeen = [];
  const look = () => {
    const bars = document.querySelectorAll(".jp-Notebook .facility-progress-bar");
    if (!bars.length) { return; }
    const bar = bars[bars.length - 1];
    const plot = bar.closest(".facility-progress").querySelector("img.facility-progress-plot");
    const state = {value: Number(bar.getAttribute("value")), max: Number(bar.getAttribute("max")),
                   plot: plot ? plot.getAttribute("src").slice(-64) : null};
    const last = window.progressSeen[window.progressSeen.length - 1];
    if (!last || last.value !== state.value || last.max !== state.max || last.plot !== state.plot) {
      window.progressSeen.push(state);
    }
  };
  new MutationObserver(look).observe(document.body, {subtree: true, childList: true,
                                                     attributes: true});
}
"""


def _notebook() -> Any:
    return nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(
            "import facility\n\n"
            "config = facility.load_config()\n"
            "dataset = next(s.name for s in config.samples if s.kind == 'drell_yan')\n"
            "client = facility.connect('widgets', workers=1)\n"
            "client"),
        nbformat.v4.new_code_cell(
            "import time\n"
            "from facility.processing.processors.dimuon import DimuonProcessor\n\n\n"
            "class PacedDimuon(DimuonProcessor):\n"
            "    # at least 0.1 s a chunk: the run lasts seconds, long enough to watch it\n"
            "    def process(self, events):\n"
            "        time.sleep(0.1)\n"
            "        return super().process(events)\n\n\n"
            "result = facility.run(PacedDimuon(), dataset, progress='mass', chunk_size=1000, "
            "output=False)\n"
            "print('run done:', result.summary['events'], 'events')"),
        nbformat.v4.new_code_cell("client.cluster.close()\nprint('closed')"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                "language": "python"}})


@pytest.fixture(scope="module")
def notebook(hub: str, browser: Browser, facility_config: FacilityConfig) -> Iterator[Page]:
    """The user's server (started here unless it runs already) with the module's notebook open;
    the server is stopped at the end."""
    page = login(browser, hub, USER, PASSWORD)
    if "/hub/spawn" in page.url:
        start_server(page, "cpu-small")
    page.wait_for_url(f"**/user/{USER}/lab**", timeout=180_000)
    nbformat.write(_notebook(), facility_config.state_path / "hub" / "users" / USER / NOTEBOOK)
    page.goto(f"{hub}/user/{USER}/lab/tree/{NOTEBOOK}?reset")  # only this notebook open
    page.wait_for_selector(".jp-Notebook")
    page.locator(".jp-StatusBar-TextItem", has_text="Idle").first.wait_for()
    yield page
    page.evaluate("""async ([hub, user]) => {
      const xsrf = (document.cookie.match(/(?:^|; )_xsrf=([^;]*)/) || [])[1] || "";
      await fetch(`${hub}/hub/api/users/${user}/server`,
                  {method: "DELETE", headers: {"X-XSRFToken": decodeURIComponent(xsrf)}});
    }""", [hub, USER])
    page.context.close()


def _run_cell(page: Page, index: int) -> Any:
    """Run one cell as Shift+Enter does; its output area."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.locator(".jp-InputPrompt").click()
    page.keyboard.press("Shift+Enter")
    return cell.locator(".jp-OutputArea")


def test_the_client_widget_links_the_dashboard_through_the_hub(notebook: Page, hub: str) -> None:
    output = _run_cell(notebook, 0)
    output.locator("text=FacilityCluster").first.wait_for(state="attached", timeout=180_000)
    assert "UndefinedError" not in output.inner_text()
    link = output.locator(f"a[href^='/user/{USER}/proxy/']").first
    href = link.get_attribute("href")
    assert href is not None
    assert href.endswith("/status")
    assert link.get_attribute("target") == "_blank"

    output.locator("summary", has_text="Cluster Info").click()  # the cluster inside the client
    cluster = output.locator(".facility-cluster")
    cluster.wait_for()
    assert f"{USER}-widgets" in cluster.inner_text()
    assert "Workers: 1" in cluster.inner_text()
    assert cluster.locator(f"a[href='{href}']").count() == 1

    with notebook.context.expect_page() as opened:
        link.click()
    dashboard = opened.value
    dashboard.wait_for_load_state()
    assert dashboard.url == f"{hub}{href}"
    assert "Dask" in dashboard.title()
    dashboard.locator("text=Workers").first.wait_for(timeout=60_000)
    dashboard.close()


def test_a_run_shows_its_progress_bar_advance_and_its_plot_redrawn(notebook: Page) -> None:
    notebook.evaluate(RECORD_PROGRESS)
    output = _run_cell(notebook, 1)
    output.locator("text=run done: 40000 events").wait_for(timeout=300_000)
    seen: list[dict[str, Any]] = notebook.evaluate("window.progressSeen")
    total = seen[-1]["max"]
    assert total == 40  # 40,000 events in chunks of 1,000
    assert seen[-1]["value"] == total
    assert seen[-1]["plot"] is not None
    running = [s for s in seen if s["value"] < total]
    assert len({s["value"] for s in running}) >= 2, seen  # the bar advanced while it ran
    plots_while_running = {s["plot"] for s in running if s["plot"] is not None}
    assert plots_while_running, seen  # the plot showed before the end
    assert len(plots_while_running | {seen[-1]["plot"]}) >= 2, seen  # and was redrawn
    assert notebook.locator(".jp-Notebook .facility-progress").count() == 1  # one output, updated

    closed = _run_cell(notebook, 2)
    closed.locator("text=closed").wait_for(timeout=60_000)
