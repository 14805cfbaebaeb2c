"""The HTML that notebooks show: the cluster widget, a run's progress, a batch job's state.

Every page of HTML the facility writes is built here, and every value in it goes through
:func:`html.escape` (names, addresses, links, log lines): a cluster or job name, a dataset or a
log line holding ``<`` or ``"`` shows as text and never becomes markup. The look follows
distributed's own widgets (the grey square, the name under the title, a table of figures), so
that ``client`` in a cell reads like it does on every Dask installation; distributed's Client
widget embeds :func:`cluster_html` as its "Cluster Info".
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from html import escape
from typing import Any

from dask.utils import format_bytes

ICON = ('<div style="width: 24px; height: 24px; background-color: #e1e1e1; '
        'border: 3px solid #9D9D9D; border-radius: 5px; position: absolute;"></div>')


@dataclass(frozen=True)
class ClusterView:
    """What the cluster widget shows, gathered by the cluster (see ``FacilityCluster``)."""

    name: str
    backend: str
    scheduler_address: str
    dashboard_link: str | None  # what the browser follows (the hub's proxy path behind the hub)
    dashboard_url: str | None  # the same, absolute: what a terminal prints
    workers: Mapping[str, Mapping[str, Any]] | None  # None: the scheduler cannot be reached
    request: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


def link(href: str | None, text: str | None = None) -> str:
    """A link that opens in a new tab, or a dash for none."""
    if not href:
        return "-"
    return (f'<a href="{escape(href)}" target="_blank" rel="noopener">'
            f"{escape(text or href)}</a>")


def _row(*cells: str) -> str:
    return "<tr>" + "".join(f'<td style="text-align: left;">{cell}</td>' for cell in cells) + \
        "</tr>"


def _worker_cells(workers: Mapping[str, Mapping[str, Any]] | None) -> tuple[str, str, str]:
    if workers is None:
        return ("<strong>Workers:</strong> ? (scheduler not reachable)", "", "")
    threads = sum(int(w.get("nthreads", 0)) for w in workers.values())
    memory = sum(int(w.get("memory_limit", 0) or 0) for w in workers.values())
    return (f"<strong>Workers:</strong> {len(workers)}",
            f"<strong>Total threads:</strong> {threads}",
            f"<strong>Total memory:</strong> {escape(format_bytes(memory))}")


def cluster_html(view: ClusterView) -> str:
    """The cluster widget: name, backend, clickable dashboard, workers, threads, memory."""
    workers, threads, memory = _worker_cells(view.workers)
    rows = [
        _row(f"<strong>Dashboard:</strong> {link(view.dashboard_link, view.dashboard_url)}",
             workers),
        _row(threads, memory),
        _row(f"<strong>Backend:</strong> {escape(view.backend)}",
             f"<strong>Asked for:</strong> {escape(view.request)}" if view.request else ""),
        _row(f"<strong>Scheduler:</strong> <code>{escape(view.scheduler_address)}</code>", ""),
    ]
    rows += [_row(f"<strong>Limit:</strong> {escape(note)}", "") for note in view.notes]
    return (f'<div class="facility-cluster">{ICON}<div style="margin-left: 48px;">'
            '<h3 style="margin-bottom: 0px; margin-top: 0px;">FacilityCluster</h3>'
            f'<p style="color: #9D9D9D; margin-bottom: 0px;">{escape(view.name)}</p>'
            f'<table style="width: 100%; text-align: left;">{"".join(rows)}</table>'
            "</div></div>")


def progress_html(title: str, done: int, total: int, figures: str, png: bytes | None = None,
                  failed: str | None = None) -> str:
    """A run's progress: a bar of chunks done out of the total, the figures beside it, and
    under them the live plot (a PNG) when there is one."""
    bar = (f'<progress class="facility-progress-bar" value="{int(done)}" max="{max(int(total), 1)}"'
           ' style="width: 20em; vertical-align: middle;"></progress>')
    parts = [f'<div class="facility-progress"><strong>{escape(title)}</strong> {bar} '
             f'<span class="facility-progress-figures">{escape(figures)}</span>']
    if failed:
        parts.append(f'<div class="facility-progress-error" style="color: #b00;">'
                     f"{escape(failed)}</div>")
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<div><img class="facility-progress-plot" alt="{escape(title)} plot" '
                     f'src="data:image/png;base64,{data}"/></div>')
    parts.append("</div>")
    return "".join(parts)


def job_html(headline: str, log_lines: Iterable[str]) -> str:
    """A batch job as it runs: its state, then the end of its log."""
    log = escape("\n".join(log_lines))
    return (f'<div class="facility-job"><strong>{escape(headline)}</strong>'
            f'<pre class="facility-job-log" style="max-height: 16em; overflow: auto;">{log}</pre>'
            "</div>")
