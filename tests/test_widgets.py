"""What notebooks show: the cluster and client widgets with their dashboard link, a run's progress
bar and live plot, a batch job's state; and the same on a terminal.

The HTML is parsed (never matched as text) so that a link's target and every escaped value are
checked as a browser would read them.
"""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
from distributed import Client

from facility.cluster.base import ClusterInfo
from facility.cluster.connect import FacilityCluster, connect
from facility.cluster.display import ClusterView, cluster_html, job_html, progress_html
from facility.config import FacilityConfig

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
