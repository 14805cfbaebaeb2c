"""What notebooks show: the cluster and client widgets with their dashboard link, a run's progress
bar and live plot, a batch job's state; and the same on a terminal.

The HTML is parsed (never matched as text) so that a link's target and every escaped value are
checked as a browser would read them.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import hist
import pytest
from distributed import Client

import facility
from facility.cluster.base import ClusterInfo
from facility.cluster.connect import FacilityCluster, connect
from facility.cluster.display import ClusterView, cluster_html, job_html, progress_html
from facility.config import FacilityConfig
from facility.errors import UsageError
from facility.processing.engine import Progress
from facility.processing.progress import JobWatch, RunDisplay, TerminalScreen, figures, line, live_progress
from facility.processing.runner import run

HUB_ENV = {"JUPYTERHUB_SERVICE_PREFIX": "/user/alice/",
           "JUPYTERHUB_PUBLIC_URL": "https://hub.example.org/user/alice/"}
HOSTILE = '<script>alert("x")</script>&"'


class Page(HTMLParser):
    """The elements of an HTML fragment: tags with their attributes, links, text."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.links: list[tuple[str | None, str]] = []
        self.text: list[str] = []
        self._open_link: str | None = None
        self._link_text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "a":
            self._open_link, self._link_text = dict(attrs).get("href"), []

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self.links.append((self._open_link, "".join(self._link_text)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        self._link_text.append(data)

    def names(self) -> list[str]:
        return [tag for tag, _ in self.tags]

    def all_text(self) -> str:
        return "".join(self.text)


def _view(info: ClusterInfo, environ: dict[str, str], name: str = "alice-zpeak") -> ClusterView:
    workers = {"tls://10.0.0.1:1": {"nthreads": 2, "memory_limit": 2 * 2**30},
               "tls://10.0.0.2:1": {"nthreads": 2, "memory_limit": 2 * 2**30}}
    return ClusterView(name, "local", info.scheduler_address, info.dashboard_link(environ),
                       info.dashboard_url("http://127.0.0.1:8000", environ), workers,
                       "2 workers", ("max workers 5 -> 2",))


LOCAL = ClusterInfo("alice-zpeak", "local", "tls://127.0.0.1:41000", "127.0.0.1", 41001, "alice")


def test_behind_the_hub_the_widget_links_the_proxied_dashboard_and_shows_it_absolute() -> None:
    page = Page(cluster_html(_view(LOCAL, HUB_ENV)))
    [(href, text)] = page.links
    assert href == "/user/alice/proxy/41001/status"
    assert text == "https://hub.example.org/user/alice/proxy/41001/status"
    anchor = dict(page.tags)["a"]
    assert anchor["target"] == "_blank"
    assert "Workers: 2" in page.all_text()
    assert "Total threads: 4" in page.all_text()
    assert "tls://127.0.0.1:41000" in page.all_text()
    assert "max workers 5 -> 2" in page.all_text()


def test_without_a_public_url_the_printed_link_is_on_the_hub_address() -> None:
    only_prefix = {"JUPYTERHUB_SERVICE_PREFIX": "/user/alice/"}
    assert LOCAL.dashboard_url("http://127.0.0.1:8000", only_prefix) == \
        "http://127.0.0.1:8000/user/alice/proxy/41001/status"


def test_standalone_the_widget_links_the_dashboard_itself() -> None:
    page = Page(cluster_html(_view(LOCAL, {})))
    [(href, text)] = page.links
    assert href == text == "http://127.0.0.1:41001/status"


def test_every_value_in_the_widget_is_escaped() -> None:
    info = ClusterInfo(HOSTILE, "local", f"tls://{HOSTILE}", "127.0.0.1", 41001, "alice")
    view = ClusterView(HOSTILE, HOSTILE, info.scheduler_address, f"/x?a=1&b={HOSTILE}",
                       HOSTILE, {HOSTILE: {"nthreads": 1}}, HOSTILE, (HOSTILE,))
    page = Page(cluster_html(view))
    assert "script" not in page.names()
    assert page.all_text().count(HOSTILE) >= 4  # the name, backend, request, note as text
    [(href, _)] = page.links
    assert href == f"/x?a=1&b={HOSTILE}"
    for html in (progress_html(HOSTILE, 1, 2, HOSTILE, failed=HOSTILE),
                 job_html(HOSTILE, [HOSTILE, "</pre><b>bold</b>"])):
        parsed = Page(html)
        assert not {"script", "b"} & set(parsed.names())
        assert HOSTILE in parsed.all_text()


def test_a_cluster_without_a_dashboard_shows_a_dash() -> None:
    info = ClusterInfo("alice-x", "local", "tls://127.0.0.1:1", None, None, "alice")
    view = ClusterView("alice-x", "local", info.scheduler_address, info.dashboard_link(HUB_ENV),
                       info.dashboard_url("http://h", HUB_ENV), None)
    page = Page(cluster_html(view))
    assert page.links == []
    assert "Dashboard: -" in page.all_text()
    assert "scheduler not reachable" in page.all_text()


# ---------------------------------------------------------------------------------------------
# a run's progress


class Recorded:
    """A screen that keeps what it was shown, as a notebook output would."""

    def __init__(self) -> None:
        self.shown: list[tuple[str, str]] = []
        self.closed: list[tuple[str | None, str | None]] = []

    def show(self, html: str, text: str) -> None:
        self.shown.append((html, text))

    def close(self, html: str | None, text: str | None) -> None:
        self.closed.append((html, text))


def _mass(events: int) -> Any:
    h = hist.Hist.new.StrCat([], name="dataset", growth=True).Reg(
        10, 60, 120, name="mass", label="dimuon mass [GeV]").Weight()
    h.fill(dataset="DY", mass=[91.0] * events)
    return {"mass": h, "cutflow": {"DY": {"all": events}}}


def _bar(html: str) -> dict[str, str | None]:
    return next(attrs for tag, attrs in Page(html).tags if tag == "progress")


def test_progress_shows_a_bar_figures_and_a_plot_redrawn_as_results_arrive() -> None:
    screen = Recorded()
    display = RunDisplay(screen, "mass")
    display(Progress(0, 0, 0, 0.1))  # nothing planned yet: nothing shown
    assert screen.shown == []
    display(Progress(1, 4, 5_000, 1.0, _mass(5)))
    display.plotted = (display.plotted[0], float("-inf"))  # the next report redraws
    display(Progress(3, 4, 15_000, 3.0, _mass(15)))
    display.finish()
    first, later = (html for html, _ in screen.shown)
    assert (_bar(first)["value"], _bar(first)["max"]) == ("1", "4")
    assert (_bar(later)["value"], _bar(later)["max"]) == ("3", "4")
    plots = [attrs["src"] for html in (first, later) for tag, attrs in Page(html).tags
             if tag == "img"]
    assert len(plots) == 2
    assert plots[0] != plots[1]
    assert all(src and src.startswith("data:image/png;base64,") for src in plots)
    assert "5,000 events" in Page(first).all_text()
    [(final, text)] = screen.closed
    assert final is not None
    assert text is not None
    assert _bar(final)["value"] == "3"
    assert text.startswith("[")
    assert "3/4 chunks" in text


def _fail_after(reported: Progress, screen: Recorded, reason: str) -> None:
    """A run that reported once, then failed."""
    with live_progress(True, screen) as report:
        assert report is not None
        report(reported)
        raise RuntimeError(reason)


def test_a_run_that_fails_before_any_chunk_leaves_no_bar() -> None:
    screen = Recorded()
    with pytest.raises(RuntimeError, match="no data server"):
        _fail_after(Progress(0, 8, 0, 0.5), screen, "no data server")
    assert screen.closed == [(None, None)]


def test_a_run_that_fails_midway_says_where_it_stopped() -> None:
    screen = Recorded()
    with pytest.raises(RuntimeError, match="lost"):
        _fail_after(Progress(2, 8, 10_000, 2.0), screen, "lost")
    [(html, text)] = screen.closed
    assert html is not None
    assert text is not None
    assert "stopped after 2/8 chunks: RuntimeError" in Page(html).all_text()
    assert text.endswith("stopped after 2/8 chunks: RuntimeError")


def test_a_plot_of_a_histogram_the_result_lacks_names_those_it_has() -> None:
    display = RunDisplay(Recorded(), "pt")
    with pytest.raises(UsageError, match=r"no histogram 'pt'; it has: mass"):
        display(Progress(1, 2, 5, 1.0, _mass(5)))


@pytest.mark.parametrize("option", ["", 3, 1.5])
def test_a_progress_option_that_is_not_understood_is_refused(option: Any) -> None:
    with pytest.raises(UsageError, match="progress must be True"), live_progress(option):
        pass


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_line_is_rewritten_in_place_and_ends_with_a_newline() -> None:
    stream = Tty()
    with live_progress(True, TerminalScreen(stream)) as report:
        assert report is not None
        report(Progress(1, 2, 5_000, 1.0))
        report(Progress(2, 2, 10_000, 2.0))
    written = stream.getvalue()
    assert written.count("\r") == 3
    assert written.endswith(f"\r{line(Progress(2, 2, 10_000, 2.0))}\x1b[K\n")
    assert "in 2.0 s" in written


def test_not_on_a_tty_only_the_final_line_is_written() -> None:
    stream = io.StringIO()
    with live_progress(True, TerminalScreen(stream)) as report:
        assert report is not None
        report(Progress(1, 2, 5_000, 1.0))
        report(Progress(2, 2, 10_000, 2.0))
    assert stream.getvalue() == line(Progress(2, 2, 10_000, 2.0)) + "\n"


def test_the_figures_give_the_rate_and_the_time_left() -> None:
    assert figures(Progress(1, 4, 5_000, 2.0)) == "5,000 events · 2,500 events/s · ETA 6.0 s"
    assert figures(Progress(4, 4, 20_000, 125.0)) == "20,000 events · 160 events/s · in 2 min 05 s"


def test_job_wait_on_a_terminal_prints_each_state_once_and_each_log_line_once() -> None:
    stream = io.StringIO()
    watch = JobWatch(notebook=False, stream=stream)
    watch.update("job 7 (zpeak): queued", "queued", "(job 7 has written no log yet)\n")
    watch.update("job 7 (zpeak): running", "running", "reading\n")
    watch.update("job 7 (zpeak): running, 5.0 s", "running", "reading\nmerging\n")
    watch.update("job 7 (zpeak): succeeded", "succeeded", "reading\nmerging\ndone\n")
    assert stream.getvalue().splitlines() == [
        "job 7 (zpeak): queued", "  | (job 7 has written no log yet)",
        "job 7 (zpeak): running", "  | reading", "  | merging",
        "job 7 (zpeak): succeeded", "  | done"]


# ---------------------------------------------------------------------------------------------
# a real cluster and its client


@pytest.fixture(scope="module")
def client(facility_config: FacilityConfig) -> Iterator[Client]:
    connected = connect("widgets", workers=1, config=facility_config)
    yield connected
    assert isinstance(connected.cluster, FacilityCluster)
    connected.cluster.close()


@pytest.mark.integration
def test_the_client_widget_embeds_the_cluster_with_its_dashboard_link(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = client.cluster
    assert isinstance(cluster, FacilityCluster)
    info = cluster.info
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/alice/")
    page = Page(client._repr_html_())
    proxied = f"/user/alice/proxy/{info.dashboard_port}/status"
    assert proxied in [href for href, _ in page.links]
    assert "FacilityCluster" in page.all_text()
    assert "Workers: 1" in page.all_text()
    assert cluster.name in page.all_text()
    text = repr(cluster)
    assert "\n" not in text
    assert text.startswith(f"<FacilityCluster {cluster.name!r} local, 1 worker, dashboard http")
    assert text.endswith(f"{proxied}>")


def _progress_panel(dask_scheduler: Any) -> str:
    """The title of the dashboard's Progress panel, computed on the scheduler as the panel
    does it (from the scheduler's task prefixes)."""
    from distributed.dashboard.components.scheduler import TaskProgress

    panel = TaskProgress(dask_scheduler)
    panel.update()
    return str(panel.root.title.text)


@pytest.mark.integration
def test_a_run_after_connect_shows_on_that_clusters_dashboard_progress_panel(
        client: Client, facility_config: FacilityConfig) -> None:
    """A run without ``client=`` goes to the cluster ``connect()`` made current: the one whose
    dashboard the notebook links. Its Progress panel counts the run's tasks while it runs."""
    panels: list[str] = []
    display = RunDisplay(Recorded(), "mass")

    def watch(p: Progress) -> None:
        display(p)
        if p.chunks_done < p.chunks_total and not panels:
            panels.append(client.run_on_scheduler(_progress_panel))

    result = run("dimuon", "DY", config=facility_config, output=False, progress=watch)
    display.finish()
    assert panels, "no progress was reported while chunks were still running"
    total = re.search(r"total: (\d+)", panels[0])
    assert total, panels[0]
    assert int(total.group(1)) > 0, panels[0]
    assert result.summary["events"] == 40_000
    shown = [html for html, _ in display.screen.shown]  # type: ignore[attr-defined]
    [(final, _)] = display.screen.closed  # type: ignore[attr-defined]
    assert final is not None
    assert any(tag == "img" for tag, _ in Page(final).tags)
    assert "40,000 events" in Page(final).all_text()
    assert _bar(final)["max"] == str(result.summary["chunks"]["total"])
    maxima = [int(_bar(html)["max"] or 0) for html in shown]  # grows as files are planned
    assert maxima == sorted(maxima)


@pytest.mark.integration
def test_a_run_with_progress_not_on_a_tty_prints_one_final_line(
        client: Client, facility_config: FacilityConfig,
        capsys: pytest.CaptureFixture[str]) -> None:
    run("dimuon", "DY", config=facility_config, output=False, progress=True, client=client)
    [written] = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\[#{20}\] (\d+)/\1 chunks · 40,000 events · [\d,]+ events/s · in .+",
                        written), written


@pytest.mark.integration
def test_job_wait_shows_the_jobs_states_and_its_log_as_it_runs(
        facility_config: FacilityConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FACILITY_CONFIG", str(facility_config.home / "facility.yaml"))
    monkeypatch.setenv("JUPYTERHUB_USER", "widget-watcher")
    script = tmp_path / "steps.py"
    script.write_text("import time\nprint('step one', flush=True)\ntime.sleep(2)\n"
                      "print('step two', flush=True)\n")
    job = facility.submit(script, workers=0)
    record = job.wait(timeout=180, poll=0.5)
    assert record.state == "succeeded"
    lines = capsys.readouterr().err.splitlines()
    states = [text for text in lines if text.startswith(f"job {job.id} (steps.py): ")]
    assert states[-1].startswith(f"job {job.id} (steps.py): succeeded")
    assert any(": running" in text for text in states)
    assert lines.count("  | step one") == lines.count("  | step two") == 1
    assert lines.index("  | step one") < lines.index("  | step two")


@pytest.mark.integration
def test_the_quickstart_notebook_plots_the_mass_with_its_fit_and_labelled_axes(
        facility_config: FacilityConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("FACILITY_CONFIG", str(facility_config.home / "facility.yaml"))
    book = nbformat.read(Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb",
                         as_version=4)
    book.cells.append(nbformat.v4.new_code_cell(
        "print('labels:', ax.get_xlabel(), '|', ax.get_ylabel())\n"
        "print('lines:', [line.get_label() for line in ax.get_lines()])"))
    NotebookClient(book, timeout=300, kernel_name="python3").execute()
    texts = {index: "".join(o.get("text", "") for o in cell.outputs)
             for index, cell in enumerate(book.cells) if cell.cell_type == "code"}
    bundles = [o.get("data", {}) for cell in book.cells if cell.cell_type == "code"
               for o in cell.outputs]
    widget = next(b["text/html"] for b in bundles if "FacilityCluster" in b.get("text/html", ""))
    assert any("/status" in (href or "") for href, _ in Page(widget).links)
    progress = next(b for b in bundles if "facility-progress" in b.get("text/html", ""))
    assert re.match(r"\[#{20}\] (\d+)/\1 chunks", progress["text/plain"])
    assert any("image/png" in b for b in bundles)
    probe = texts[len(book.cells) - 1]
    assert "labels: dimuon mass [GeV] | events" in probe
    assert re.search(r"'fit: peak \d+\.\d+ ± \d+\.\d+ GeV'", probe), probe
