"""The NanoAOD layout the generator writes: branch names, ROOT types and counters.

The names and types follow CMS NanoAOD v12 (checked by the tests against a real file written by
CMS software). A collection ``X`` is stored as a counter ``nX`` (int32) and one jagged branch
``X_field`` per field; event-level quantities are flat branches.
"""

from __future__ import annotations

from dataclasses import dataclass

F4, I4, U1, I2, U2, B1, U4, U8 = "f4", "i4", "u1", "i2", "u2", "?", "u4", "u8"


@dataclass(frozen=True)
class Field:
    """One branch of a collection, or one flat event-level branch."""

    name: str
    dtype: str
    mc_only: bool = False


MUON_FIELDS = (
    Field("pt", F4), Field("eta", F4), Field("phi", F4), Field("mass", F4), Field("charge", I4),
    Field("dxy", F4), Field("dxyErr", F4), Field("dz", F4), Field("dzErr", F4),
    Field("pfRelIso03_all", F4), Field("pfRelIso04_all", F4), Field("miniPFRelIso_all", F4),
    Field("tkRelIso", F4), Field("tightId", B1), Field("mediumId", B1), Field("looseId", B1),
    Field("softId", B1), Field("isGlobal", B1), Field("isTracker", B1), Field("isPFcand", B1),
    Field("highPurity", B1), Field("sip3d", F4), Field("ip3d", F4), Field("ptErr", F4),
    Field("nStations", U1), Field("nTrackerLayers", U1), Field("jetIdx", I2), Field("pdgId", I4),
    Field("genPartIdx", I2, mc_only=True),
)

ELECTRON_FIELDS = (
    Field("pt", F4), Field("eta", F4), Field("phi", F4), Field("mass", F4), Field("charge", I4),
    Field("dxy", F4), Field("dz", F4), Field("pfRelIso03_all", F4), Field("miniPFRelIso_all", F4),
    Field("cutBased", U1), Field("mvaIso_WP80", B1), Field("mvaIso_WP90", B1), Field("sip3d", F4),
    Field("deltaEtaSC", F4), Field("r9", F4), Field("sieie", F4), Field("hoe", F4),
    Field("convVeto", B1), Field("lostHits", U1), Field("pdgId", I4), Field("jetIdx", I2),
    Field("genPartIdx", I2, mc_only=True),
)

JET_FIELDS = (
    Field("pt", F4), Field("eta", F4), Field("phi", F4), Field("mass", F4),
    Field("btagDeepFlavB", F4), Field("btagDeepFlavCvB", F4), Field("btagDeepFlavCvL", F4),
    Field("btagDeepFlavQG", F4), Field("btagPNetB", F4), Field("btagPNetCvB", F4),
    Field("btagPNetCvL", F4), Field("btagPNetQvG", F4), Field("btagRobustParTAK4B", F4),
    Field("jetId", U1), Field("nConstituents", U1), Field("nElectrons", U1), Field("nMuons", U1),
    Field("area", F4), Field("chEmEF", F4), Field("chHEF", F4), Field("neEmEF", F4),
    Field("neHEF", F4), Field("muEF", F4), Field("rawFactor", F4),
    Field("hadronFlavour", U1, mc_only=True), Field("partonFlavour", I2, mc_only=True),
    Field("genJetIdx", I2, mc_only=True),
)

GENPART_FIELDS = (
    Field("pt", F4), Field("eta", F4), Field("phi", F4), Field("mass", F4), Field("pdgId", I4),
    Field("status", I4), Field("statusFlags", U2), Field("genPartIdxMother", I2),
)

COLLECTIONS: dict[str, tuple[tuple[Field, ...], bool]] = {
    # name: (fields, mc_only)
    "Muon": (MUON_FIELDS, False),
    "Electron": (ELECTRON_FIELDS, False),
    "Jet": (JET_FIELDS, False),
    "GenPart": (GENPART_FIELDS, True),
}

EVENT_FIELDS = (
    Field("run", U4), Field("luminosityBlock", U4), Field("event", U8), Field("bunchCrossing", U4),
    Field("genWeight", F4, mc_only=True),
    Field("MET_pt", F4), Field("MET_phi", F4), Field("MET_sumEt", F4), Field("MET_significance", F4),
    Field("MET_covXX", F4), Field("MET_covXY", F4), Field("MET_covYY", F4),
    Field("MET_sumPtUnclustered", F4), Field("MET_MetUnclustEnUpDeltaX", F4),
    Field("MET_MetUnclustEnUpDeltaY", F4),
    Field("MET_fiducialGenPt", F4, mc_only=True), Field("MET_fiducialGenPhi", F4, mc_only=True),
    Field("PuppiMET_pt", F4), Field("PuppiMET_phi", F4), Field("PuppiMET_sumEt", F4),
    Field("PV_npvs", U1), Field("PV_npvsGood", U1), Field("PV_ndof", F4), Field("PV_x", F4),
    Field("PV_y", F4), Field("PV_z", F4), Field("PV_chi2", F4), Field("PV_score", F4),
    Field("Pileup_nPU", I4, mc_only=True), Field("Pileup_nTrueInt", F4, mc_only=True),
    Field("Pileup_pudensity", F4, mc_only=True), Field("Pileup_gpudensity", F4, mc_only=True),
    Field("Generator_weight", F4, mc_only=True), Field("Generator_id1", I4, mc_only=True),
    Field("Generator_id2", I4, mc_only=True), Field("Generator_x1", F4, mc_only=True),
    Field("Generator_x2", F4, mc_only=True), Field("Generator_scalePDF", F4, mc_only=True),
)

FLAG_NAMES = (
    "goodVertices", "globalSuperTightHalo2016Filter", "HBHENoiseFilter", "HBHENoiseIsoFilter",
    "EcalDeadCellTriggerPrimitiveFilter", "BadPFMuonFilter", "BadPFMuonDzFilter",
    "hfNoisyHitsFilter", "eeBadScFilter", "ecalBadCalibFilter", "METFilters",
    "BadChargedCandidateFilter", "CSCTightHaloFilter", "HcalStripHaloFilter",
    "ecalLaserCorrFilter", "trkPOGFilters", "muonBadTrackFilter", "globalTightHalo2016Filter",
)
FLAG_FIELDS = tuple(Field(f"Flag_{name}", B1) for name in FLAG_NAMES)


def root_typename(dtype: str, jagged: bool) -> str:
    """The C++ type name uproot reports for a branch of this numpy dtype."""
    names = {F4: "float", I4: "int32_t", U1: "uint8_t", I2: "int16_t", U2: "uint16_t",
             B1: "bool", U4: "uint32_t", U8: "uint64_t"}
    return names[dtype] + ("[]" if jagged else "")


def expected_branches(is_data: bool) -> dict[str, str]:
    """Every branch a generated file holds, with its ROOT type name."""
    branches: dict[str, str] = {}
    for field in (*EVENT_FIELDS, *FLAG_FIELDS):
        if not (is_data and field.mc_only):
            branches[field.name] = root_typename(field.dtype, jagged=False)
    for collection, (fields, mc_only) in COLLECTIONS.items():
        if is_data and mc_only:
            continue
        branches[f"n{collection}"] = "int32_t"
        for field in fields:
            if not (is_data and field.mc_only):
                branches[f"{collection}_{field.name}"] = root_typename(field.dtype, jagged=True)
    return branches
