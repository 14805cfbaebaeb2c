"""What a run leaves behind: histograms (ROOT file), a plot, a summary and the chunk ledger.

Histograms are written with uproot as ROOT histograms, which both uproot (``.to_hist()``) and
ROOT read back; one histogram per dataset, named ``<key>/<dataset>``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import hist
import numpy as np
import uproot

from facility.processing.ledger import ChunkLedger

HIST_FILE = "histograms.root"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "plot.png"
LEDGER_FILE = "ledger.jsonl"


def histograms(result: Any, prefix: str = "") -> Iterator[tuple[str, hist.Hist]]:
    """Every hist in a (nested) accumulator, with a path-like name."""
    if isinstance(result, hist.Hist):
        yield prefix or "hist", result
    elif isinstance(result, dict):
        for key, value in result.items():
            yield from histograms(value, f"{prefix}/{key}" if prefix else str(key))


def per_dataset(h: hist.Hist) -> Iterator[tuple[str | None, hist.Hist]]:
    """Split off a string category axis named ``dataset`` (ROOT histograms have none)."""
    names = [ax.name for ax in h.axes]
    if "dataset" not in names or len(names) == 1:
        yield None, h
        return
    for value in h.axes["dataset"]:
        yield str(value), cast(hist.Hist, h[{"dataset": value}])


ROOT_MAX_AXES = 3


def _root_axis(axis: Any) -> Any:
    """ROOT has no integer axes: one becomes the regular axis of unit bins it is."""
    if not isinstance(axis, hist.axis.Integer):
        return axis
    return hist.axis.Regular(len(axis), axis.edges[0], axis.edges[-1], name=axis.name,
                             label=axis.label, underflow=axis.traits.underflow,
                             overflow=axis.traits.overflow)


def writable(h: hist.Hist) -> hist.Hist:
    """The histogram as ROOT can hold it: the same contents bin by bin, with floating-point
    counts (ROOT's TH* have no integer storage) and regular instead of integer axes."""
    if len(h.axes) > ROOT_MAX_AXES:
        raise ValueError(f"{len(h.axes)} axes: ROOT histograms have 1 to {ROOT_MAX_AXES}")
    axes = [_root_axis(axis) for axis in h.axes]
    integer = np.issubdtype(h.view(flow=True).dtype, np.integer)
    if not integer and all(new is old for new, old in zip(axes, h.axes, strict=True)):
        return h
    storage = hist.storage.Double() if integer else h.storage_type()
    converted = hist.Hist(*axes, storage=storage, name=h.name, label=h.label)
    converted.view(flow=True)[...] = h.view(flow=True)
    return converted


def save_histograms(result: Any, path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Every histogram of the result as a ROOT histogram; those ROOT cannot hold are listed."""
    written, refused = [], []
    with uproot.recreate(path) as out:
        for key, h in histograms(result):
            for dataset, single in per_dataset(h):
                name = f"{key}/{dataset}" if dataset else key
                try:
                    out[name] = writable(single)
                except (ValueError, TypeError) as exc:
                    refused.append({"histogram": name, "reason": str(exc)})
                    continue
                written.append(name)
    return written, refused


def plot(result: Any, path: Path, summary: dict[str, Any]) -> bool:
    """One panel per one-dimensional histogram, datasets overlaid, in the mplhep CMS style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mplhep

    panels = [(k, h) for k, h in histograms(result) if len(h.axes) - ("dataset" in
              [a.name for a in h.axes]) == 1]
    if not panels:
        return False
    plt.style.use(mplhep.style.CMS)
    fig, axes = plt.subplots(1, len(panels), figsize=(10 * len(panels), 8), squeeze=False)
    for ax, (key, h) in zip(axes[0], panels, strict=True):
        for dataset, single in per_dataset(h):
            mplhep.histplot(single, ax=ax, label=dataset or key, histtype="step")
        fit = summary.get("analysis", {}).get("fit")
        if fit and key == summary.get("analysis", {}).get("histogram"):
            draw_fit(ax, fit)
        ax.set_ylabel("Events")
        ax.legend(fontsize="small")
    mplhep.cms.label(ax=axes[0][0], data=False, text="Facility",
                     rlabel=f"{summary['events']:,} events")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def draw_fit(ax: Any, fit: dict[str, Any]) -> None:
    """The fitted line shape over its window, labelled with the peak: the run's plot and the
    quick-start notebook draw the same line from the summary's fit."""
    x = np.linspace(fit["low"], fit["high"], 400)
    ax.plot(x, line_shape(x, *fit["parameters"]), color="black", lw=1.5,
            label=f"fit: peak {fit['peak']:.3f} ± {fit['peak_error']:.3f} GeV")


def line_shape(x: np.ndarray, amplitude: float, peak: float, sigma: float, gamma: float,
               background: float, slope: float) -> np.ndarray:
    """Voigt peak (Breit-Wigner width ``gamma`` smeared by a Gaussian ``sigma``) over an
    exponentially falling background."""
    from scipy.special import voigt_profile

    return amplitude * voigt_profile(x - peak, abs(sigma), abs(gamma)) + background * np.exp(
        -slope * (x - peak))


def fit_peak(h: hist.Hist, low: float, high: float, guess: float, width: float) -> dict[str, Any]:
    """Fit a resonance peak with a Voigt profile over an exponential background."""
    from scipy.optimize import curve_fit

    centers = h.axes[0].centers
    window = (centers >= low) & (centers <= high)
    x, y = centers[window], h.values()[window]
    variances = h.variances()
    errors = np.sqrt(np.maximum(variances[window] if variances is not None else y, 1.0))
    bin_width = float(np.mean(h.axes[0].widths))
    start = [float(y.sum() * bin_width), guess, 1.0, width / 2, float(max(y.min(), 1.0)), 0.02]
    params, cov = curve_fit(line_shape, x, y, p0=start, sigma=errors, maxfev=20000)
    chi2 = float(np.sum(((y - line_shape(x, *params)) / errors) ** 2))
    return {
        "peak": float(params[1]), "peak_error": float(np.sqrt(cov[1, 1])),
        "significance": float(abs(params[0]) / np.sqrt(cov[0, 0])) if cov[0, 0] > 0 else 0.0,
        "sigma": float(abs(params[2])), "width": 2 * float(abs(params[3])),
        "chi2_per_dof": chi2 / max(len(x) - len(params), 1),
        "low": low, "high": high, "parameters": [float(p) for p in params],
    }


def write_outputs(staging: Path, final: Path, result: Any, summary: dict[str, Any],
                  ledger: ChunkLedger) -> None:
    """Histograms, plot, ledger and summary into ``staging``, naming their ``final`` places.

    A histogram ROOT cannot hold or a plot that cannot be drawn is reported in the summary and
    the rest is written; an error of the file system (disk full, no permission) propagates.
    """
    outputs: dict[str, Any] = {"directory": str(final), "histograms": str(final / HIST_FILE)}
    summary["outputs"] = outputs
    outputs["histogram_names"], refused = save_histograms(result, staging / HIST_FILE)
    if refused:
        outputs["not_in_root_file"] = refused
    try:
        if plot(result, staging / PLOT_FILE, summary):
            outputs["plot"] = str(final / PLOT_FILE)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 (a plot that cannot be drawn must not cost the result)
        outputs["plot_error"] = f"{type(exc).__name__}: {exc}"
    ledger.write(staging / LEDGER_FILE)
    outputs["ledger"] = str(final / LEDGER_FILE)
    (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
