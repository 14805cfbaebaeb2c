"""Synthetic NanoAOD with physics that can be checked.

* ``drell_yan``: Z/γ* -> μμ. The opposite-sign dimuon mass peaks at the Z (91.19 GeV, width
  2.5 GeV, smeared by a 1.5 % muon momentum resolution) over a falling continuum.
* ``ttbar``: semileptonic tt̄. The hadronic top gives three jets (two light, one b) whose mass
  peaks near 172.5 GeV; the other top gives a b jet, a muon or electron and missing momentum.
  b jets carry high b-tag scores, light jets low ones.
* ``collision_data``: a mixture of both, without any generator-level branch, as real data files.

Generation is deterministic for a seed and vectorised, so a benchmark's millions of events take
seconds. Files are written in clusters of ``cluster_events`` events with the chosen compression.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

from facility.config import Compression, SampleKind
from facility.data import physics as ph
from facility.data.nanoaod import (
    COLLECTIONS,
    EVENT_FIELDS,
    FLAG_FIELDS,
    Field,
)

COMPRESSORS: dict[str, Callable[[], object]] = {
    "zstd": lambda: uproot.ZSTD(5),
    "lz4": lambda: uproot.LZ4(4),
    "zlib": lambda: uproot.ZLIB(4),
    "lzma": lambda: uproot.LZMA(6),
}
MUON_PDG, ELECTRON_PDG, B_PDG, TOP_PDG, W_PDG, Z_PDG = 13, 11, 5, 6, 24, 23
TREE_NAME = "Events"


@dataclass
class Objects:
    """Flat physics objects of one collection, each tagged with the event it belongs to."""

    event: np.ndarray
    p4: ph.FourVectors
    charge: np.ndarray
    pdg: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @staticmethod
    def concat(parts: list[Objects]) -> Objects:
        keys = set().union(*(p.extra for p in parts))
        n = [p.event.shape[0] for p in parts]

        def extra(key: str) -> np.ndarray:
            return np.concatenate([
                p.extra[key] if key in p.extra else np.full(k, -1) for p, k in zip(parts, n, strict=True)
            ])

        return Objects(
            event=np.concatenate([p.event for p in parts]),
            p4=ph.FourVectors(*(np.concatenate([getattr(p.p4, a) for p in parts])
                                for a in ("px", "py", "pz", "e"))),
            charge=np.concatenate([p.charge for p in parts]),
            pdg=np.concatenate([p.pdg for p in parts]),
            extra={key: extra(key) for key in keys},
        )

    def select(self, mask: np.ndarray) -> Objects:
        return Objects(
            event=self.event[mask],
            p4=ph.FourVectors(self.p4.px[mask], self.p4.py[mask], self.p4.pz[mask], self.p4.e[mask]),
            charge=self.charge[mask],
            pdg=self.pdg[mask],
            extra={k: v[mask] for k, v in self.extra.items()},
        )


@dataclass
class EventContent:
    """What a block of events holds before it is laid out as NanoAOD branches."""

    n: int
    muons: list[Objects] = field(default_factory=list)
    electrons: list[Objects] = field(default_factory=list)
    jets: list[Objects] = field(default_factory=list)
    genparts: list[Objects] = field(default_factory=list)
    met_px: np.ndarray | None = None
    met_py: np.ndarray | None = None


def _objects(event: np.ndarray, p4: ph.FourVectors, charge: np.ndarray | int, pdg: int,
             **extra: np.ndarray) -> Objects:
    n = event.shape[0]
    return Objects(event, p4, np.broadcast_to(np.asarray(charge), (n,)).astype(np.int32),
                   np.full(n, pdg, dtype=np.int32), dict(extra))


def _gen(content: EventContent, event: np.ndarray, p4: ph.FourVectors, pdg: np.ndarray | int,
         mother: np.ndarray | None = None) -> np.ndarray:
    """Record generator particles; returns their global ids for later matching."""
    start = sum(g.event.shape[0] for g in content.genparts)
    n = event.shape[0]
    gid = np.arange(start, start + n)
    pdg_arr = np.broadcast_to(np.asarray(pdg), (n,)).astype(np.int32)
    content.genparts.append(Objects(event, p4, np.zeros(n, np.int32), pdg_arr,
                                    {"mother_gid": mother if mother is not None else np.full(n, -1),
                                     "gid": gid}))
    return gid


def _soft_objects(rng: np.random.Generator, n_events: int, offset: int, mean: float,
                  pt_min: float, pt_scale: float, mass: float, pdg: int) -> Objects:
    """Non-prompt leptons or pile-up jets: a Poisson number per event, falling spectrum."""
    counts = rng.poisson(mean, n_events)
    event = np.repeat(np.arange(n_events) + offset, counts)
    k = event.shape[0]
    pt = pt_min + rng.exponential(pt_scale, k)
    p4 = ph.FourVectors.from_pt_eta_phi_m(pt, rng.uniform(-2.5, 2.5, k),
                                          rng.uniform(-np.pi, np.pi, k), np.full(k, mass))
    charge = rng.choice(np.array([-1, 1]), k)
    flavour = rng.choice(np.array([0, 4, 5]), k, p=[0.85, 0.1, 0.05])
    return _objects(event, p4, charge, pdg, flavour=flavour, prompt=np.zeros(k, dtype=np.int8))


def drell_yan(rng: np.random.Generator, n: int, offset: int, content: EventContent) -> None:
    """Z/γ* -> μ+μ-: 85 % Breit-Wigner around the Z, 15 % falling continuum."""
    event = np.arange(n) + offset
    is_peak = rng.uniform(size=n) < 0.85
    mass = np.where(
        is_peak,
        ph.breit_wigner(rng, ph.Z_MASS, ph.Z_WIDTH, n, 50.0, 150.0),
        ph.falling_spectrum(rng, 40.0, 200.0, 25.0, n),
    )
    boson = ph.produce(rng, mass, mean_pt=9.0, rapidity_sigma=1.6)
    z_gid = _gen(content, event, boson, Z_PDG)
    mu_minus, mu_plus = ph.two_body_decay(rng, boson, ph.MUON_MASS, ph.MUON_MASS)
    for lepton, charge in ((mu_minus, -1), (mu_plus, 1)):
        gid = _gen(content, event, lepton, -charge * MUON_PDG, mother=z_gid)
        reco = ph.FourVectors.from_pt_eta_phi_m(ph.smear_pt(rng, lepton.pt, 0.015), lepton.eta,
                                                lepton.phi, np.full(n, ph.MUON_MASS))
        content.muons.append(_objects(event, reco, charge, MUON_PDG, gen_gid=gid,
                                      prompt=np.ones(n, dtype=np.int8)))
    content.muons.append(_soft_objects(rng, n, offset, 0.15, 3.0, 4.0, ph.MUON_MASS, MUON_PDG))
    content.electrons.append(_soft_objects(rng, n, offset, 0.1, 5.0, 5.0, ph.ELECTRON_MASS,
                                           ELECTRON_PDG))
    content.jets.append(_soft_objects(rng, n, offset, 1.6, 15.0, 18.0, 5.0, 0))
    _recoil_met(rng, n, offset, content, scale=12.0)


def _jet_from_quark(rng: np.random.Generator, event: np.ndarray, quark: ph.FourVectors,
                    flavour: int, gen_gid: np.ndarray) -> Objects:
    n = event.shape[0]
    pt = ph.smear_pt(rng, quark.pt, 0.10)
    mass = np.abs(0.12 * pt * (1 + 0.2 * rng.standard_normal(n)))
    p4 = ph.FourVectors.from_pt_eta_phi_m(pt, quark.eta, quark.phi, mass)
    return _objects(event, p4, 0, 0, flavour=np.full(n, flavour), gen_gid=gen_gid,
                    prompt=np.ones(n, dtype=np.int8))


def ttbar(rng: np.random.Generator, n: int, offset: int, content: EventContent) -> None:
    """Semileptonic tt̄: t -> b W(qq'), t̄ -> b̄ W(ℓν)."""
    event = np.arange(n) + offset
    met_px, met_py = np.zeros(n), np.zeros(n)
    for hadronic in (True, False):
        top = ph.produce(rng, ph.breit_wigner(rng, ph.TOP_MASS, ph.TOP_WIDTH, n, 150.0, 195.0),
                         mean_pt=90.0, rapidity_sigma=1.0)
        top_gid = _gen(content, event, top, TOP_PDG if hadronic else -TOP_PDG)
        w_mass = ph.breit_wigner(rng, ph.W_MASS, ph.W_WIDTH, n, 60.0, 100.0)
        b_quark, w_boson = ph.two_body_decay(rng, top, ph.B_MASS, w_mass)
        b_gid = _gen(content, event, b_quark, B_PDG, mother=top_gid)
        w_gid = _gen(content, event, w_boson, W_PDG, mother=top_gid)
        content.jets.append(_jet_from_quark(rng, event, b_quark, 5, b_gid))
        if hadronic:
            q1, q2 = ph.two_body_decay(rng, w_boson, 0.3, 0.3)
            for quark in (q1, q2):
                gid = _gen(content, event, quark, 1, mother=w_gid)
                content.jets.append(_jet_from_quark(rng, event, quark, 0, gid))
            continue
        is_muon = rng.uniform(size=n) < 0.5
        lepton, neutrino = ph.two_body_decay(rng, w_boson, ph.MUON_MASS, 0.0)
        charge = np.full(n, -1)
        gid = _gen(content, event, lepton, np.where(is_muon, MUON_PDG, ELECTRON_PDG), mother=w_gid)
        for mask, bucket, mass, pdg, resolution in (
            (is_muon, content.muons, ph.MUON_MASS, MUON_PDG, 0.015),
            (~is_muon, content.electrons, ph.ELECTRON_MASS, ELECTRON_PDG, 0.025),
        ):
            k = int(mask.sum())
            reco = ph.FourVectors.from_pt_eta_phi_m(
                ph.smear_pt(rng, lepton.pt[mask], resolution), lepton.eta[mask], lepton.phi[mask],
                np.full(k, mass))
            bucket.append(_objects(event[mask], reco, charge[mask], pdg, gen_gid=gid[mask],
                                   prompt=np.ones(k, dtype=np.int8)))
        met_px += neutrino.px
        met_py += neutrino.py
    content.jets.append(_soft_objects(rng, n, offset, 1.2, 15.0, 25.0, 6.0, 0))
    content.muons.append(_soft_objects(rng, n, offset, 0.2, 3.0, 4.0, ph.MUON_MASS, MUON_PDG))
    _recoil_met(rng, n, offset, content, scale=20.0, px=met_px, py=met_py)


def _recoil_met(rng: np.random.Generator, n: int, offset: int, content: EventContent, scale: float,
                px: np.ndarray | None = None, py: np.ndarray | None = None) -> None:
    base_x = rng.normal(0, scale, n) + (px if px is not None else 0)
    base_y = rng.normal(0, scale, n) + (py if py is not None else 0)
    if content.met_px is None or content.met_py is None:
        content.met_px, content.met_py = np.zeros(offset + n), np.zeros(offset + n)
    if content.met_px.shape[0] < offset + n:
        content.met_px = np.resize(content.met_px, offset + n)
        content.met_py = np.resize(content.met_py, offset + n)
    content.met_px[offset:offset + n] = base_x
    content.met_py[offset:offset + n] = base_y


GENERATORS: dict[str, Callable[[np.random.Generator, int, int, EventContent], None]] = {
    "drell_yan": drell_yan,
    "ttbar": ttbar,
}


def simulate(kind: SampleKind, n: int, rng: np.random.Generator) -> EventContent:
    """Generate ``n`` events of a sample kind; collision data mixes and shuffles both processes."""
    content = EventContent(n=n)
    if kind != "collision_data":
        GENERATORS[kind](rng, n, 0, content)
        return content
    n_dy = round(0.8 * n)
    drell_yan(rng, n_dy, 0, content)
    ttbar(rng, n - n_dy, n_dy, content)
    permutation = rng.permutation(n)
    for bucket in (content.muons, content.electrons, content.jets, content.genparts):
        for objects in bucket:
            objects.event = permutation[objects.event]
    assert content.met_px is not None
    assert content.met_py is not None
    met_px, met_py = np.empty(n), np.empty(n)
    met_px[permutation], met_py[permutation] = content.met_px, content.met_py
    content.met_px, content.met_py = met_px, met_py
    return content


# ---------------------------------------------------------------------------------------------
# layout as NanoAOD branches


@dataclass
class Laid:
    """A collection after acceptance cuts, sorted as NanoAOD stores it."""

    objects: Objects
    counts: np.ndarray
    local_index: np.ndarray


def _layout(objects: Objects, n: int, by_pt: bool) -> Laid:
    order = np.lexsort((-objects.p4.pt, objects.event)) if by_pt else np.argsort(objects.event,
                                                                                  kind="stable")
    sorted_objects = objects.select(order)
    counts = np.bincount(sorted_objects.event, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    local = np.arange(sorted_objects.event.shape[0]) - starts[sorted_objects.event]
    return Laid(sorted_objects, counts, local)


def _accept(objects: Objects, pt_min: float, eta_max: float) -> Objects:
    return objects.select((objects.p4.pt > pt_min) & (np.abs(objects.p4.eta) < eta_max))


def _gen_index(gen: Laid | None, gen_gid: np.ndarray) -> np.ndarray:
    """Map generator global ids to positions inside their event's GenPart list (-1: none)."""
    if gen is None:
        return np.full(gen_gid.shape[0], -1)
    lookup = np.full(int(gen.objects.extra["gid"].max()) + 2, -1)
    lookup[gen.objects.extra["gid"]] = gen.local_index
    return np.where(gen_gid >= 0, lookup[np.clip(gen_gid, 0, None)], -1)


def _uniform(rng: np.random.Generator, k: int, low: float, high: float) -> np.ndarray:
    return rng.uniform(low, high, k)


def _muon_columns(rng: np.random.Generator, laid: Laid, gen: Laid | None) -> dict[str, np.ndarray]:
    o, k = laid.objects, laid.objects.event.shape[0]
    prompt = o.extra.get("prompt", np.zeros(k)) > 0
    iso = np.where(prompt, rng.exponential(0.03, k), rng.exponential(0.4, k))
    dxy = rng.normal(0, np.where(prompt, 0.002, 0.03), k)
    dz = rng.normal(0, np.where(prompt, 0.005, 0.05), k)
    tight = prompt | (rng.uniform(size=k) < 0.3)
    return {
        "pt": o.p4.pt, "eta": o.p4.eta, "phi": o.p4.phi, "mass": o.p4.mass, "charge": o.charge,
        "dxy": dxy, "dxyErr": np.abs(rng.normal(0.002, 0.0005, k)), "dz": dz,
        "dzErr": np.abs(rng.normal(0.004, 0.001, k)), "pfRelIso03_all": iso * 0.8,
        "pfRelIso04_all": iso, "miniPFRelIso_all": iso * 0.7, "tkRelIso": iso * 0.5,
        "tightId": tight, "mediumId": tight | (rng.uniform(size=k) < 0.5), "looseId": np.ones(k, bool),
        "softId": rng.uniform(size=k) < 0.9, "isGlobal": rng.uniform(size=k) < 0.95,
        "isTracker": np.ones(k, bool), "isPFcand": np.ones(k, bool), "highPurity": tight,
        "sip3d": np.abs(rng.normal(0, 2, k)), "ip3d": np.abs(dxy) + np.abs(dz),
        "ptErr": o.p4.pt * 0.015, "nStations": rng.integers(1, 5, k),
        "nTrackerLayers": rng.integers(8, 18, k), "jetIdx": np.full(k, -1), "pdgId": -13 * o.charge,
        "genPartIdx": _gen_index(gen, o.extra.get("gen_gid", np.full(k, -1))),
    }


def _electron_columns(rng: np.random.Generator, laid: Laid, gen: Laid | None) -> dict[str, np.ndarray]:
    o, k = laid.objects, laid.objects.event.shape[0]
    prompt = o.extra.get("prompt", np.zeros(k)) > 0
    iso = np.where(prompt, rng.exponential(0.03, k), rng.exponential(0.4, k))
    return {
        "pt": o.p4.pt, "eta": o.p4.eta, "phi": o.p4.phi, "mass": o.p4.mass, "charge": o.charge,
        "dxy": rng.normal(0, 0.005, k), "dz": rng.normal(0, 0.01, k), "pfRelIso03_all": iso,
        "miniPFRelIso_all": iso * 0.7, "cutBased": np.where(prompt, 4, rng.integers(0, 5, k)),
        "mvaIso_WP80": prompt, "mvaIso_WP90": prompt | (rng.uniform(size=k) < 0.3),
        "sip3d": np.abs(rng.normal(0, 2, k)), "deltaEtaSC": rng.normal(0, 0.01, k),
        "r9": _uniform(rng, k, 0.5, 1.0), "sieie": _uniform(rng, k, 0.005, 0.03),
        "hoe": rng.exponential(0.02, k), "convVeto": np.ones(k, bool),
        "lostHits": rng.integers(0, 2, k), "pdgId": -11 * o.charge, "jetIdx": np.full(k, -1),
        "genPartIdx": _gen_index(gen, o.extra.get("gen_gid", np.full(k, -1))),
    }


def _btag(rng: np.random.Generator, flavour: np.ndarray) -> np.ndarray:
    """b jets score high, charm in between, light jets low (a DeepJet-like shape)."""
    k = flavour.shape[0]
    return np.select([flavour == 5, flavour == 4], [rng.beta(6.0, 1.2, k), rng.beta(2.0, 4.0, k)],
                     rng.beta(0.6, 12.0, k))


def _jet_columns(rng: np.random.Generator, laid: Laid, gen: Laid | None) -> dict[str, np.ndarray]:
    o, k = laid.objects, laid.objects.event.shape[0]
    flavour = np.clip(o.extra.get("flavour", np.zeros(k)), 0, 5).astype(np.int64)
    score = _btag(rng, flavour)
    fractions = rng.dirichlet([4.0, 2.0, 2.0, 2.0, 0.3], k)
    return {
        "pt": o.p4.pt, "eta": o.p4.eta, "phi": o.p4.phi, "mass": o.p4.mass,
        "btagDeepFlavB": score, "btagDeepFlavCvB": _uniform(rng, k, 0, 1),
        "btagDeepFlavCvL": _uniform(rng, k, 0, 1), "btagDeepFlavQG": _uniform(rng, k, 0, 1),
        "btagPNetB": np.clip(score + rng.normal(0, 0.05, k), 0, 1),
        "btagPNetCvB": _uniform(rng, k, 0, 1), "btagPNetCvL": _uniform(rng, k, 0, 1),
        "btagPNetQvG": _uniform(rng, k, 0, 1),
        "btagRobustParTAK4B": np.clip(score + rng.normal(0, 0.05, k), 0, 1),
        "jetId": np.where(rng.uniform(size=k) < 0.97, 6, 2),
        "nConstituents": rng.integers(5, 60, k), "nElectrons": rng.integers(0, 2, k),
        "nMuons": rng.integers(0, 2, k), "area": rng.normal(0.5, 0.03, k),
        "chEmEF": fractions[:, 3], "chHEF": fractions[:, 0], "neEmEF": fractions[:, 1],
        "neHEF": fractions[:, 2], "muEF": fractions[:, 4], "rawFactor": _uniform(rng, k, 0.0, 0.2),
        "hadronFlavour": flavour, "partonFlavour": flavour,
        "genJetIdx": np.where(o.extra.get("gen_gid", np.full(k, -1)) >= 0, laid.local_index, -1),
    }


def _genpart_columns(rng: np.random.Generator, laid: Laid, gen: Laid | None) -> dict[str, np.ndarray]:
    o = laid.objects
    k = o.event.shape[0]
    return {
        "pt": o.p4.pt, "eta": o.p4.eta, "phi": o.p4.phi, "mass": o.p4.mass, "pdgId": o.pdg,
        "status": np.where(np.isin(np.abs(o.pdg), [11, 13]), 1, 62),
        "statusFlags": np.full(k, 8449), "genPartIdxMother": _gen_index(laid, o.extra["mother_gid"]),
    }


COLUMN_MAKERS = {
    "Muon": (_muon_columns, 3.0, 2.4, True),
    "Electron": (_electron_columns, 5.0, 2.5, True),
    "Jet": (_jet_columns, 15.0, 4.7, True),
    "GenPart": (_genpart_columns, 0.0, np.inf, False),
}


def _event_columns(rng: np.random.Generator, content: EventContent, first_event: int, run: int,
                   is_data: bool) -> dict[str, np.ndarray]:
    n = content.n
    assert content.met_px is not None
    assert content.met_py is not None
    met_pt = np.hypot(content.met_px, content.met_py)
    npv = rng.poisson(30, n).clip(1, 255)
    columns: dict[str, np.ndarray] = {
        "run": np.full(n, run), "luminosityBlock": (first_event + np.arange(n)) // 1000 + 1,
        "event": first_event + np.arange(n) + 1, "bunchCrossing": rng.integers(1, 3564, n),
        "genWeight": np.full(n, 1.0),
        "MET_pt": met_pt, "MET_phi": np.arctan2(content.met_py, content.met_px),
        "MET_sumEt": met_pt + rng.gamma(8, 120, n), "MET_significance": rng.exponential(3, n),
        "MET_covXX": rng.gamma(4, 50, n), "MET_covXY": rng.normal(0, 20, n),
        "MET_covYY": rng.gamma(4, 50, n), "MET_sumPtUnclustered": rng.gamma(6, 60, n),
        "MET_MetUnclustEnUpDeltaX": rng.normal(0, 1, n),
        "MET_MetUnclustEnUpDeltaY": rng.normal(0, 1, n),
        "MET_fiducialGenPt": met_pt * 0.95, "MET_fiducialGenPhi": np.arctan2(content.met_py,
                                                                          content.met_px),
        "PuppiMET_pt": met_pt * rng.normal(1.0, 0.05, n),
        "PuppiMET_phi": np.arctan2(content.met_py, content.met_px),
        "PuppiMET_sumEt": met_pt + rng.gamma(8, 100, n),
        "PV_npvs": npv, "PV_npvsGood": np.maximum(npv - rng.integers(0, 3, n), 1),
        "PV_ndof": rng.gamma(20, 5, n), "PV_x": rng.normal(0.0, 0.01, n),
        "PV_y": rng.normal(0.04, 0.01, n), "PV_z": rng.normal(0.0, 3.5, n),
        "PV_chi2": rng.gamma(3, 0.4, n), "PV_score": rng.gamma(5, 2000, n),
        "Pileup_nPU": npv, "Pileup_nTrueInt": npv + rng.normal(0, 2, n),
        "Pileup_pudensity": rng.gamma(3, 0.3, n), "Pileup_gpudensity": rng.gamma(3, 0.3, n),
        "Generator_weight": np.full(n, 1.0), "Generator_id1": rng.choice([-2, -1, 1, 2, 21], n),
        "Generator_id2": rng.choice([-2, -1, 1, 2, 21], n), "Generator_x1": rng.beta(0.5, 8, n),
        "Generator_x2": rng.beta(0.5, 8, n), "Generator_scalePDF": np.full(n, 91.19),
    }
    for flag in FLAG_FIELDS:
        columns[flag.name] = rng.uniform(size=n) > 0.002
    return {f.name: columns[f.name] for f in (*EVENT_FIELDS, *FLAG_FIELDS)
            if not (is_data and f.mc_only)}


def _cast(name: str, values: np.ndarray, spec: Field) -> np.ndarray:
    return np.asarray(values).astype(np.dtype(spec.dtype), copy=False)


def layout(content: EventContent, rng: np.random.Generator, first_event: int, run: int,
           is_data: bool) -> dict[str, np.ndarray | ak.Array]:
    """Turn generated objects into NanoAOD branches (collections as zipped jagged records)."""
    n = content.n
    buckets = {"Muon": content.muons, "Electron": content.electrons, "Jet": content.jets,
               "GenPart": content.genparts}
    gen = _layout(Objects.concat(content.genparts), n, by_pt=False) if content.genparts else None
    branches: dict[str, np.ndarray | ak.Array] = {}
    for name, flat in _event_columns(rng, content, first_event, run, is_data).items():
        spec = next(f for f in (*EVENT_FIELDS, *FLAG_FIELDS) if f.name == name)
        branches[name] = _cast(name, flat, spec)
    for collection, (fields, mc_only) in COLLECTIONS.items():
        if is_data and mc_only:
            continue
        maker, pt_min, eta_max, by_pt = COLUMN_MAKERS[collection]
        objects = Objects.concat(buckets[collection]) if buckets[collection] else None
        if objects is None:
            continue
        laid = gen if collection == "GenPart" and gen is not None else _layout(
            _accept(objects, pt_min, eta_max), n, by_pt)
        columns = maker(rng, laid, gen)
        record = {f.name: _cast(f.name, columns[f.name], f) for f in fields
                  if not (is_data and f.mc_only)}
        branches[collection] = ak.unflatten(ak.zip(record), laid.counts)
    return branches


# ---------------------------------------------------------------------------------------------
# files


@dataclass(frozen=True)
class FileSpec:
    """One file to write."""

    path: Path
    kind: SampleKind
    events: int
    seed: int
    file_index: int
    compression: Compression = "zstd"
    cluster_events: int = 50_000


def _blocks(spec: FileSpec) -> Iterator[tuple[int, int]]:
    """One block of events per ROOT cluster (each ``extend`` writes one basket per branch)."""
    for start in range(0, spec.events, spec.cluster_events):
        yield start, min(spec.events, start + spec.cluster_events)


def write_file(spec: FileSpec) -> int:
    """Write one NanoAOD file atomically (temporary name, then rename); returns events written."""
    is_data = spec.kind == "collision_data"
    run = 362_000 + spec.file_index if is_data else 1
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    partial = spec.path.with_name(f".{spec.path.name}.partial-{os.getpid()}")
    try:
        # a random ROOT UUID of its own: time-based ones repeat in processes forked together
        with uproot.recreate(partial, compression=COMPRESSORS[spec.compression](),
                             uuid_function=uuid.uuid4) as out:
            tree = None
            for block, (start, stop) in enumerate(_blocks(spec)):
                rng = np.random.default_rng([spec.seed, spec.file_index, block])
                content = simulate(spec.kind, stop - start, rng)
                first = spec.file_index * 100_000_000 + start
                branches = layout(content, rng, first, run, is_data)
                if tree is None:
                    tree = out.mktree(
                        TREE_NAME,
                        {name: array.type if isinstance(array, ak.Array) else array.dtype
                         for name, array in branches.items()},
                        counter_name=lambda collection: f"n{collection}",
                        field_name=lambda outer, inner: inner if outer == "" else f"{outer}_{inner}",
                        title="Events",
                    )
                tree.extend(branches)
        partial.replace(spec.path)
    finally:
        partial.unlink(missing_ok=True)
    return spec.events
