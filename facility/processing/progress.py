"""Live progress of a run and of a batch job, in a notebook and on a terminal.

``facility.run(..., progress=True)`` shows a bar of chunks done out of the total with events,
events per second and the time left; ``progress="mass"`` adds a plot of the histogram ``mass``
of the result merged so far, redrawn as partial results arrive. A callable instead receives
every :class:`~facility.processing.engine.Progress` itself.

Where it shows (a :class:`Screen`):

* in a notebook (a Jupyter kernel, papermill too): one output, updated in place through
  IPython's ``display_id``: the HTML bar and plot, with a plain-text line for logs;
* on a terminal: one line, rewritten in place (``\\r``) on a TTY; when the output is not a TTY
  (a log file, a pipe) nothing while it runs and the final line once at the end.

A run that fails leaves no empty bar: one that failed before any chunk was done takes its bar
away, one that failed later says where it stopped. The figures are written by :func:`figures`
and :func:`line` only; the command line's bar (``facility run``) uses the same.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeAlias

from facility.cluster.display import job_html, progress_html
from facility.errors import UsageError

if TYPE_CHECKING:  # the engine brings coffea: ``job.wait()`` shows a job without it
    from facility.processing.engine import Progress

ProgressOption: TypeAlias = "bool | str | Callable[[Progress], None] | None"
PLOT_SECONDS = 1.0  # the live plot is redrawn at most this often (drawing costs the client)
BAR_WIDTH = 20
LOG_LINES = 15


# ---------------------------------------------------------------------------------------------
# the figures, for every place that shows a run's progress


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def eta_seconds(p: Progress) -> float | None:
    """Time left, from the time the settled chunks took; None before the first one."""
    if p.chunks_done <= 0 or p.chunks_total <= 0 or p.elapsed <= 0:
        return None
    return p.elapsed / p.chunks_done * max(p.chunks_total - p.chunks_done, 0)


def figures(p: Progress) -> str:
    """``15,000 events · 4,321 events/s · ETA 4.0 s`` (the elapsed time once all are done)."""
    parts = [f"{p.events:,} events", f"{p.events_per_second:,.0f} events/s"]
    left = eta_seconds(p)
    if p.chunks_total and p.chunks_done >= p.chunks_total:
        parts.append(f"in {_duration(p.elapsed)}")
    elif left is not None:
        parts.append(f"ETA {_duration(left)}")
    return " · ".join(parts)


def chunks(p: Progress) -> str:
    return f"{p.chunks_done:,}/{p.chunks_total:,} chunks"


def line(p: Progress) -> str:
    """A compact line for a terminal: ``[#####.....] 3/8 chunks · 15,000 events · ...``."""
    filled = BAR_WIDTH * p.chunks_done // max(p.chunks_total, 1)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {chunks(p)} · {figures(p)}"


# ---------------------------------------------------------------------------------------------
# where progress shows


class Screen(Protocol):
    """One place that shows a changing state: a notebook output or a terminal line."""

    def show(self, html: str, text: str) -> None: ...

    def close(self, html: str | None, text: str | None) -> None:
        """The last state (None: take the display away)."""


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (a notebook, papermill), not a terminal."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None) if shell is not None else None
    return get is not None and getattr(get(), "kernel", None) is not None


class NotebookScreen:
    """A notebook output updated in place; text/plain beside the HTML for logs and papermill."""

    def __init__(self) -> None:
        self.handle: Any = None

    def show(self, html: str, text: str) -> None:
        from IPython.display import display

        bundle = {"text/html": html, "text/plain": text}
        if self.handle is None:
            self.handle = display(bundle, raw=True, display_id=True)
        else:
            self.handle.update(bundle, raw=True)

    def close(self, html: str | None, text: str | None) -> None:
        if self.handle is None:
            if html is not None and text is not None:
                self.show(html, text)
            return
        self.handle.update({"text/plain": ""} if html is None else
                           {"text/html": html, "text/plain": text or ""}, raw=True)


class TerminalScreen:
    """One line rewritten in place on a TTY; elsewhere only the last state, once."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.shown = False

    def show(self, html: str, text: str) -> None:
        if self.tty:
            self.stream.write(f"\r{text}\x1b[K")
            self.stream.flush()
            self.shown = True

    def close(self, html: str | None, text: str | None) -> None:
        if text is not None:
            self.stream.write(f"\r{text}\x1b[K\n" if self.tty else f"{text}\n")
        elif self.shown:
            self.stream.write("\r\x1b[K")
        self.stream.flush()


def screen() -> Screen:
    return NotebookScreen() if in_notebook() else TerminalScreen()


# ---------------------------------------------------------------------------------------------
# a run


def _one_dimensional(name: str, partial: Any) -> Any:
    """The histogram ``name`` of the result so far, summed over datasets."""
    from facility.processing.output import histograms

    found = dict(histograms(partial))
    if name not in found:
        raise UsageError(f"progress={name!r}: the result has no histogram {name!r}; it has: "
                         f"{', '.join(sorted(found)) or 'none'}")
    h = found[name]
    axes = [axis.name for axis in h.axes if axis.name != "dataset"]
    if len(axes) != 1:
        raise UsageError(f"progress={name!r}: the histogram has {len(axes)} axes besides "
                         "'dataset'; a live plot draws one")
    return h.project(axes[0])


def plot_png(name: str, partial: Any, events: int) -> bytes:
    """The histogram as it stands, as a small PNG (a figure of its own: the notebook's
    pyplot figures are left alone)."""
    from matplotlib.figure import Figure

    h = _one_dimensional(name, partial)
    axis = h.axes[0]
    figure = Figure(figsize=(6, 3.4), dpi=80)
    ax = figure.subplots()
    ax.stairs(h.values(), axis.edges, color="tab:blue")
    ax.set_xlabel(axis.label or axis.name)
    ax.set_ylabel("Events")
    ax.set_title(f"{name}: {events:,} events so far", fontsize="medium")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


class RunDisplay:
    """The progress callback of ``progress=True`` or ``progress="<histogram>"``."""

    def __init__(self, shown: Screen, histogram: str | None = None) -> None:
        self.screen, self.histogram = shown, histogram
        self.last: Progress | None = None
        self.png: bytes | None = None
        self.plotted = (-1, -float("inf"))  # (chunks done, when) of the last plot

    def __call__(self, p: Progress) -> None:
        if p.chunks_total <= 0:
            return  # nothing planned yet: no "0/?" bar
        self.last = p
        self._plot(p)
        self.screen.show(self._html(p), line(p))

    def _plot(self, p: Progress, final: bool = False) -> None:
        done, when = self.plotted
        if self.histogram is None or p.partial is None or p.chunks_done == done or (
                not final and time.monotonic() - when < PLOT_SECONDS):
            return
        self.png = plot_png(self.histogram, p.partial, p.events)
        self.plotted = (p.chunks_done, time.monotonic())

    def _html(self, p: Progress, failed: str | None = None) -> str:
        return progress_html("run", p.chunks_done, p.chunks_total,
                             f"{chunks(p)} · {figures(p)}", self.png, failed)

    def finish(self, error: BaseException | None = None) -> None:
        p = self.last
        if p is None or (error is not None and p.chunks_done == 0):
            self.screen.close(None, None)  # nothing done: no bar is left behind
            return
        if error is None:
            self._plot(p, final=True)
            self.screen.close(self._html(p), line(p))
            return
        stopped = f"stopped after {chunks(p)}: {type(error).__name__}"
        self.screen.close(self._html(p, stopped), f"{line(p)} · {stopped}")


@contextlib.contextmanager
def live_progress(option: ProgressOption, shown: Screen | None = None
                  ) -> Iterator[Callable[[Progress], None] | None]:
    """The progress callback a run's option asks for, finished (or taken away) at its end."""
    if option is None or option is False:
        yield None
        return
    if callable(option):
        yield option
        return
    if not isinstance(option, (bool, str)) or option == "":
        raise UsageError(f"progress must be True, a histogram's name or a callable, got "
                         f"{option!r}")
    display = RunDisplay(shown or screen(), option if isinstance(option, str) else None)
    try:
        yield display
    except BaseException as error:
        display.finish(error)
        raise
    display.finish()


# ---------------------------------------------------------------------------------------------
# a batch job


class JobWatch:
    """A job's state and the end of its log while ``job.wait()`` waits: an updating output in
    a notebook; on a terminal, the state as it changes and the log's new lines as they come."""

    def __init__(self, notebook: bool | None = None, stream: IO[str] | None = None) -> None:
        self.notebook = in_notebook() if notebook is None else notebook
        self.screen = NotebookScreen() if self.notebook else None
        self.stream = stream or sys.stderr
        self.printed: list[str] = []  # the log lines printed on the terminal
        self.state: str | None = None

    def update(self, headline: str, state: str, log: str) -> None:
        lines = log.splitlines()
        if self.screen is not None:
            tail = lines[-LOG_LINES:]
            self.screen.show(job_html(headline, tail), "\n".join([headline, *tail]))
            return
        if state != self.state:
            self.stream.write(f"{headline}\n")
            self.state = state
        if lines[:len(self.printed)] != self.printed:  # another log: the first, or a restart
            self.printed = []
        for text in lines[len(self.printed):]:
            self.stream.write(f"  | {text}\n")
        self.printed = lines
        self.stream.flush()


def job_headline(job_id: int, name: str, state: str, since: float | None) -> str:
    waited = f", {_duration(time.time() - since)}" if since else ""
    return f"job {job_id} ({name}): {state}{waited}"

