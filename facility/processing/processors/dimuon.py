"""Opposite-sign dimuon invariant mass: the Z peak over the Drell-Yan continuum."""

from __future__ import annotations

from typing import Any

import awkward as ak
import hist
import numpy as np
from coffea.processor import ProcessorABC


def mass_histogram(low: float = 40.0, high: float = 200.0, bins: int = 320) -> hist.Hist:
    return (
        hist.Hist.new.StrCat([], name="dataset", label="Dataset", growth=True)
        .Reg(bins, low, high, name="mass", label=r"$m_{\mu\mu}$ [GeV]")
        .Weight()
    )


def pair_mass(pairs: Any) -> np.ndarray:
    """Invariant mass of exactly-two-muon lists, in closed form on plain numpy columns.

    The same number as ``(pairs[:, 0] + pairs[:, 1]).mass``; the generic four-vector record
    addition costs more than reading the muons, so the physics is written out here.
    """
    def legs(name: str) -> tuple[np.ndarray, np.ndarray]:
        flat = ak.to_numpy(ak.flatten(pairs[name])).astype(np.float64)
        return flat[0::2], flat[1::2]

    (pt1, pt2), (eta1, eta2), (phi1, phi2), (m1, m2) = (legs(n) for n in ("pt", "eta", "phi", "mass"))
    energy1 = np.sqrt((pt1 * np.cosh(eta1)) ** 2 + m1**2)
    energy2 = np.sqrt((pt2 * np.cosh(eta2)) ** 2 + m2**2)
    momenta = pt1 * pt2 * (np.cos(phi1 - phi2) + np.sinh(eta1) * np.sinh(eta2))
    return np.sqrt(np.maximum(m1**2 + m2**2 + 2.0 * (energy1 * energy2 - momenta), 0.0))


Z_MASS = 91.1876  # GeV
Z_WINDOW = 5.0  # GeV: detector scale and resolution shift a Z peak by far less
MIN_SIGNIFICANCE = 5.0
MIN_PAIRS_TO_FIT = 50


class DimuonProcessor(ProcessorABC):
    """Events with exactly two muons of opposite charge; fills their invariant mass."""

    def __init__(self, low: float = 40.0, high: float = 200.0, bins: int = 320) -> None:
        self.low, self.high, self.bins = low, high, bins

    def process(self, events: Any) -> dict[str, Any]:
        dataset = events.metadata["dataset"]
        muons = events.Muon
        two = ak.num(muons, axis=1) == 2
        pairs = muons[two]
        opposite = ak.sum(pairs.charge, axis=1) == 0
        pairs = pairs[opposite]
        weight = (np.ones(len(pairs)) if events.metadata.get("is_data")
                  else ak.to_numpy(events.genWeight[two][opposite]))
        histogram = mass_histogram(self.low, self.high, self.bins)
        histogram.fill(dataset=dataset, mass=pair_mass(pairs), weight=weight)
        n_two = int(ak.sum(two))
        return {
            "mass": histogram,
            "cutflow": {dataset: {"all": len(events), "two_muons": n_two,
                                  "opposite_sign": len(pairs)}},
        }

    def postprocess(self, accumulator: dict[str, Any]) -> dict[str, Any]:
        return accumulator

    def summarize(self, result: dict[str, Any]) -> dict[str, Any]:
        """The figure a physicist looks for first: where the Z peak sits."""
        return summarize_z_peak(result)


def summarize_z_peak(result: dict[str, Any]) -> dict[str, Any]:
    """Fit the Z peak of the summed mass histogram (all datasets), and report it only when there
    is one: a sample without a Z (top pairs, a narrow mass window) gets the reason instead."""
    from facility.processing.output import fit_peak

    mass = result["mass"].project("mass")
    pairs = sum(int(flow.get("opposite_sign", 0)) for flow in result.get("cutflow", {}).values())
    analysis: dict[str, Any] = {"histogram": "mass", "pairs": pairs,
                                "weighted_pairs": float(mass.values().sum())}
    if pairs < MIN_PAIRS_TO_FIT:
        analysis["fit"] = None
        analysis["fit_error"] = f"too few dimuon pairs to fit ({pairs}, at least {MIN_PAIRS_TO_FIT})"
        return analysis
    try:
        fit = fit_peak(mass, low=70.0, high=112.0, guess=Z_MASS, width=2.5)
    except RuntimeError as exc:
        analysis["fit"], analysis["fit_error"] = None, str(exc)
        return analysis
    problem = not_a_z_peak(fit)
    analysis["fit"] = None if problem else fit
    if problem:
        analysis["fit_error"], analysis["rejected_fit"] = problem, fit
    return analysis


def not_a_z_peak(fit: dict[str, Any]) -> str | None:
    """Why a fit is not a Z peak: too far from the Z mass, or no significant peak at all."""
    if abs(fit["peak"] - Z_MASS) > Z_WINDOW:
        return (f"no Z peak: the fit put a peak at {fit['peak']:.1f} GeV, more than {Z_WINDOW:.0f} "
                f"GeV from the Z mass ({Z_MASS} GeV)")
    if fit["significance"] < MIN_SIGNIFICANCE:
        return (f"no significant Z peak: its amplitude is {fit['significance']:.1f} standard "
                f"deviations (at least {MIN_SIGNIFICANCE:.0f})")
    return None
