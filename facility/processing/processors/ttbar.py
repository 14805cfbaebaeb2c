"""Semileptonic tt̄ selection in the style of the Analysis Grand Challenge.

One isolated lepton, at least four jets, at least two of them b-tagged; the trijet with the
largest transverse momentum among those holding a b-tagged jet reconstructs the hadronic top.
"""

from __future__ import annotations

from typing import Any

import awkward as ak
import hist
import numpy as np
from coffea.processor import ProcessorABC

B_TAG_CUT = 0.5


def _histograms() -> dict[str, hist.Hist]:
    dataset = hist.axis.StrCategory([], name="dataset", label="Dataset", growth=True)
    return {
        "mbjj": hist.Hist(dataset, hist.axis.Regular(25, 50, 550, name="mbjj",
                                                     label=r"$m_{bjj}$ [GeV]"),
                          storage=hist.storage.Weight()),
        "ht": hist.Hist(dataset, hist.axis.Regular(25, 50, 1050, name="ht",
                                                   label=r"$H_T$ [GeV]"),
                        storage=hist.storage.Weight()),
    }


class TtbarProcessor(ProcessorABC):
    """Jet and b-tag selection and the trijet mass."""

    def __init__(self, lepton_pt: float = 30.0, jet_pt: float = 25.0) -> None:
        self.lepton_pt, self.jet_pt = lepton_pt, jet_pt

    def process(self, events: Any) -> dict[str, Any]:
        dataset = events.metadata["dataset"]
        muons = events.Muon
        electrons = events.Electron
        good_muons = (muons.pt > self.lepton_pt) & (abs(muons.eta) < 2.1) & muons.tightId & (
            muons.pfRelIso04_all < 0.15)
        good_electrons = (electrons.pt > self.lepton_pt) & (abs(electrons.eta) < 2.1) & (
            electrons.cutBased == 4)
        jets = events.Jet
        jets = jets[(jets.pt > self.jet_pt) & (abs(jets.eta) < 2.4) & (jets.jetId >= 2)]
        one_lepton = (ak.sum(good_muons, axis=1) + ak.sum(good_electrons, axis=1)) == 1
        n_btag = ak.sum(jets.btagDeepFlavB > B_TAG_CUT, axis=1)
        selected = one_lepton & (ak.num(jets, axis=1) >= 4) & (n_btag >= 2)
        jets = jets[selected]
        weight = (np.ones(len(jets)) if events.metadata.get("is_data")
                  else ak.to_numpy(events.genWeight[selected]))

        trijet = ak.combinations(jets, 3, fields=["j1", "j2", "j3"])
        p4 = trijet.j1 + trijet.j2 + trijet.j3
        max_btag = np.maximum(trijet.j1.btagDeepFlavB,
                              np.maximum(trijet.j2.btagDeepFlavB, trijet.j3.btagDeepFlavB))
        candidates = p4[max_btag > B_TAG_CUT]
        best = ak.argmax(candidates.pt, axis=1, keepdims=True)
        mbjj = ak.flatten(candidates[best].mass)

        histograms = _histograms()
        histograms["mbjj"].fill(dataset=dataset, mbjj=ak.to_numpy(mbjj), weight=weight)
        histograms["ht"].fill(dataset=dataset, ht=ak.to_numpy(ak.sum(jets.pt, axis=1)),
                              weight=weight)
        return {
            **histograms,
            "cutflow": {dataset: {"all": len(events), "one_lepton": int(ak.sum(one_lepton)),
                                  "selected": int(ak.sum(selected))}},
        }

    def postprocess(self, accumulator: dict[str, Any]) -> dict[str, Any]:
        return accumulator
