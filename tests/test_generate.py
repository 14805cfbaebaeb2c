"""Generated NanoAOD: real schema, checkable physics, deterministic, selectable compression."""

from __future__ import annotations

from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import uproot

from facility.data.generate import FileSpec, write_file
from facility.data.nanoaod import expected_branches


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("gen")
    paths = {}
    for kind in ("drell_yan", "ttbar", "collision_data"):
        paths[kind] = base / f"{kind}.root"
        write_file(FileSpec(paths[kind], kind, 20000, seed=3, file_index=0, cluster_events=5000))
    return paths


def _branch_types(path: Path) -> dict[str, str]:
    with uproot.open(path) as handle:
        tree = handle["Events"]
        return {branch.name: branch.typename for branch in tree.branches}


def test_schema_matches_real_nanoaod(samples: dict[str, Path],
                                     real_nanoaod: dict[str, Path]) -> None:
    real = _branch_types(real_nanoaod["nano_tt_v12.root"])
    for kind, path in samples.items():
        generated = _branch_types(path)
        assert generated == expected_branches(kind == "collision_data")
        assert len(generated) > 100
        missing = sorted(set(generated) - set(real))
        assert missing == [], f"{kind}: branches absent from real NanoAOD: {missing}"
        wrong = {n: (t, real[n]) for n, t in generated.items() if real[n] != t}
        assert wrong == {}, f"{kind}: types differ from real NanoAOD: {wrong}"


def test_counters_match_collections(samples: dict[str, Path]) -> None:
    with uproot.open(samples["ttbar"]) as handle:
        tree = handle["Events"]
        for collection in ("Muon", "Electron", "Jet", "GenPart"):
            counts = tree[f"n{collection}"].array(library="np")
            pts = tree[f"{collection}_pt"].array()
            assert np.array_equal(ak.to_numpy(ak.num(pts)), counts)


def test_data_has_no_generator_information(samples: dict[str, Path]) -> None:
    names = set(_branch_types(samples["collision_data"]))
    assert "genWeight" not in names
    assert not any(n.startswith("GenPart") for n in names)


def _dimuon_mass(path: Path) -> np.ndarray:
    with uproot.open(path) as handle:
        mu = handle["Events"].arrays(["Muon_pt", "Muon_eta", "Muon_phi", "Muon_charge"])
    two = mu[(ak.num(mu.Muon_pt) == 2) & (ak.sum(mu.Muon_charge, axis=1) == 0)]
    pt, eta, phi = (ak.to_numpy(two[f]) for f in ("Muon_pt", "Muon_eta", "Muon_phi"))
    m2 = 2 * pt[:, 0] * pt[:, 1] * (np.cosh(eta[:, 0] - eta[:, 1]) - np.cos(phi[:, 0] - phi[:, 1]))
    return np.sqrt(m2)


def test_drell_yan_peaks_at_the_z_over_a_continuum(samples: dict[str, Path]) -> None:
    mass = _dimuon_mass(samples["drell_yan"])
    counts, edges = np.histogram(mass, bins=np.arange(40, 200, 1.0))
    peak = edges[np.argmax(counts)] + 0.5
    assert abs(peak - 91.19) < 1.5
    assert np.mean(np.abs(mass - 91.19) < 5) > 0.5
    assert np.sum(mass < 70) > 0.03 * len(mass)
    assert np.sum((mass > 120) & (mass < 160)) > np.sum(mass > 160)


def test_ttbar_has_jets_and_b_tags(samples: dict[str, Path]) -> None:
    with uproot.open(samples["ttbar"]) as handle:
        jets = handle["Events"].arrays(["Jet_pt", "Jet_btagDeepFlavB"])
    good = jets.Jet_pt > 25
    n_jets = ak.sum(good, axis=1)
    n_b = ak.sum(good & (jets.Jet_btagDeepFlavB > 0.5), axis=1)
    assert np.mean(n_jets >= 4) > 0.5
    assert np.mean((n_jets >= 4) & (n_b >= 2)) > 0.3


def test_deterministic_by_seed(tmp_path: Path) -> None:
    arrays = []
    for name, seed in (("a", 9), ("b", 9), ("c", 10)):
        path = tmp_path / f"{name}.root"
        write_file(FileSpec(path, "drell_yan", 3000, seed=seed, file_index=0))
        with uproot.open(path) as handle:
            arrays.append(handle["Events"]["Muon_pt"].array())
    assert ak.array_equal(arrays[0], arrays[1])
    assert not ak.array_equal(arrays[0], arrays[2])


@pytest.mark.parametrize(("compression", "algorithm"),
                         [("zstd", "ZSTD"), ("lz4", "LZ4"), ("zlib", "ZLIB"), ("lzma", "LZMA")])
def test_compression_is_selectable(tmp_path: Path, compression: str, algorithm: str) -> None:
    path = tmp_path / f"{compression}.root"
    write_file(FileSpec(path, "drell_yan", 1000, seed=1, file_index=0, compression=compression))
    with uproot.open(path) as handle:
        assert type(handle.file.compression).__name__ == algorithm
