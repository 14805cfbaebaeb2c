"""A physicist's own data: `facility data add / check / remove`, event schemas (NanoAOD of several
versions, an RNTuple, ATLAS PHYSLITE), metadata in the processor, and processors from the user's
own modules. Every result is compared with a direct uproot read of the same files."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pytest
import uproot
from coffea.processor import ProcessorABC

from facility.config import FacilityConfig
from facility.data.catalog import (
    SCHEMA_NAMES,
    Catalog,
    catalog_json_schema,
    load_catalog,
    save_catalog,
)
from facility.data.samples import generate_samples
from facility.data.servers import admin_folder, instance_name
from facility.embedded import facility as embedded
from facility.processing.bench import handwritten_dimuon
from facility.processing.runner import run
from facility.processing.schemas import SCHEMAS
from facility.processing.weights import lumi_weight
from tests.conftest import free_port, run_name, small_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cloud_facility(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FacilityConfig]:
    """A facility whose third region keeps its replicas in an S3 bucket (the embedded object
    store), beside two XRootD regions: only the DY sample. Its home is deep, as a checkout
    in a deep folder makes it: XRootD then needs its sockets elsewhere."""
    tests_home = REPO / ".facility" / "tests" / f"cloud-{run_name(tmp_path_factory)}"
    home = tests_home / "a-facility-home-in-a-folder-deep-enough-for-unix-sockets-to-matter"
    shutil.rmtree(tests_home, ignore_errors=True)
    cloud = (f"  - {{name: cloud, distance: 9, object_store: {{bucket: facility-cloud, "
             f"port: {free_port()}}}}}")
    config = small_config(home, extra_regions=cloud)
    try:  # what started before a failing start is stopped too
        generate_samples(config, ["DY"], report=lambda _: None)
        embedded.up(config, report=lambda _: None, hub=False)
        yield config
    finally:
        embedded.down(config, report=lambda _: None)
    assert not admin_folder(config, "west-cache").exists()
    shutil.rmtree(tests_home, ignore_errors=True)


def test_servers_of_a_deep_home_keep_their_sockets_in_a_short_folder(
        cloud_facility: FacilityConfig) -> None:
    states = {state.name: state for state in embedded.status(cloud_facility)}
    for name in ("east", "west", "west-cache"):
        sockets = admin_folder(cloud_facility, name) / instance_name(name) / ".xrd"
        assert not sockets.is_relative_to(cloud_facility.home)
        assert len(f"{sockets}/") < 100
        assert sockets.is_dir()
        assert states[f"xrootd-{name}"].healthy


def _only_scheme(config: FacilityConfig, source: str, scheme: str) -> str:
    """A copy of a catalogued dataset whose files have only their ``scheme`` replicas."""
    catalog = load_catalog(config.catalog_path)
    dataset = catalog.get(source)
    files = [f.model_copy(update={"replicas": [r for r in f.replicas if r.scheme == scheme]})
             for f in dataset.files]
    assert all(f.replicas for f in files), f"{source} has no {scheme}:// replica"
    name = f"{source}_{scheme}"
    save_catalog(catalog.with_dataset(dataset.model_copy(update={"name": name, "files": files})),
                 config.catalog_path)
    return name


def test_the_same_dataset_over_root_https_and_s3_gives_identical_histograms(
        cloud_facility: FacilityConfig) -> None:
    results = {}
    for scheme in ("root", "https", "s3"):
        name = _only_scheme(cloud_facility, "DY", scheme)
        result = run("dimuon", name, config=cloud_facility, output=False)
        assert {url.split("://")[0] for url in result.summary["replicas_used"]} == {scheme}
        results[scheme] = result.output["mass"][{"dataset": name}]
        assert result.summary["events"] == 40_000
    assert results["root"].values().sum() > 0
    for scheme in ("https", "s3"):
        assert np.array_equal(results[scheme].values(), results["root"].values())
        assert np.array_equal(results[scheme].variances(), results["root"].variances())
    credentials = (cloud_facility.state_path / "s3" / "credentials")
    assert oct(credentials.stat().st_mode & 0o777) == "0o600"
    secret = credentials.read_text().split("aws_secret_access_key = ")[1].strip()
    logs = "".join(p.read_text(errors="replace") for p in
                   (cloud_facility.state_path / "logs").glob("*.log"))
    assert secret not in logs


def facility_cli(config: FacilityConfig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "facility.cli", "--config", str(config.home / "facility.yaml"),
         *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=_wide_terminal())


def _wide_terminal() -> dict[str, str]:
    import os

    return {**os.environ, "COLUMNS": "250"}


def _catalogued(config: FacilityConfig) -> Catalog:
    return load_catalog(config.catalog_path)


class ElectronPt(ProcessorABC):
    """Electron transverse momenta of ATLAS PHYSLITE events, as a flat list."""

    schema = "physlite"

    def process(self, events: Any) -> dict[str, Any]:
        return {"pt": ak.to_list(ak.flatten(events.Electrons.pt)), "events": len(events)}


class MuonSums(ProcessorABC):
    """Muons per event and the sum of their pt: enough to tell every entry was read once."""

    def process(self, events: Any) -> dict[str, Any]:
        return {"muons": int(ak.sum(ak.num(events.Muon.pt))),
                "pt": float(ak.sum(events.Muon.pt)), "events": len(events)}


class MetadataSeen(ProcessorABC):
    """What each chunk found in ``events.metadata``, and the luminosity weights summed."""

    def process(self, events: Any) -> dict[str, Any]:
        meta = events.metadata
        keys = {k: meta[k] for k in ("dataset", "year", "campaign", "events_total",
                                     "sum_genweight", "cross_section_pb")}
        return {"ranges": [(meta["filename"], meta["entrystart"], meta["entrystop"])],
                "keys": {json.dumps(keys, sort_keys=True): 1},
                "weights": float(lumi_weight(events, luminosity=1000.0).sum())}


def test_add_then_run_physlite_and_nanoaod_match_direct_reads(
        facility_config: FacilityConfig, real_nanoaod: dict[str, Path]) -> None:
    physlite, nano = real_nanoaod["PHYSLITE_example.root"], real_nanoaod["nano_dy.root"]
    added = facility_cli(facility_config, "data", "add", "UserPhyslite", str(physlite),
                         "--schema", "physlite")
    assert added.returncode == 0, added.stderr
    assert "1 files, 100 events, tree CollectionTree, schema physlite" in added.stdout
    added = facility_cli(facility_config, "data", "add", "UserNano", str(nano))
    assert added.returncode == 0, added.stderr
    catalog = _catalogued(facility_config)
    assert catalog.get("UserPhyslite").schema_name == "physlite"
    assert catalog.get("UserNano").files[0].events == 40

    electrons = run(ElectronPt(), "UserPhyslite", config=facility_config, output=False,
                    chunk_size=30)
    direct = uproot.open(physlite)["CollectionTree"]["AnalysisElectronsAuxDyn.pt"].array()
    assert electrons.output["events"] == 100
    assert np.array_equal(np.sort(electrons.output["pt"]), np.sort(ak.to_numpy(ak.flatten(direct))))
    assert len(electrons.output["pt"]) > 50

    dimuon = run("dimuon", "UserNano", config=facility_config, output=False)
    _, expected = handwritten_dimuon(uproot.open(nano)["Events"])
    assert np.allclose(dimuon.output["mass"][{"dataset": "UserNano"}].values(), expected)
    assert expected.sum() != 0


@pytest.mark.parametrize("sample", ["nano_dy.root", "nano_tt_v12.root", "nano_tt_v15.root",
                                    "nano_dy_rntuple.root"])
def test_nanoaod_versions_and_rntuple_read_like_uproot(
        facility_config: FacilityConfig, real_nanoaod: dict[str, Path], sample: str) -> None:
    name = "Nano_" + sample.removesuffix(".root").replace(".", "_")
    added = facility_cli(facility_config, "data", "add", name, str(real_nanoaod[sample]),
                         "--replace")
    assert added.returncode == 0, added.stderr
    result = run(MuonSums(), name, config=facility_config, output=False, chunk_size=15)
    tree = uproot.open(real_nanoaod[sample])["Events"]
    pt = tree["Muon_pt"].array() if "rntuple" not in sample else tree.arrays(["Muon_pt"])["Muon_pt"]
    assert result.output["events"] == tree.num_entries
    assert result.output["muons"] == int(ak.sum(ak.num(pt)))
    assert result.output["pt"] == pytest.approx(float(ak.sum(pt)), rel=1e-9)


def test_a_file_that_is_unreadable_or_does_not_fit_the_schema_is_refused_and_nothing_written(
        facility_config: FacilityConfig, real_nanoaod: dict[str, Path], tmp_path: Path) -> None:
    before = facility_config.catalog_path.read_text()
    broken = tmp_path / "broken.root"
    broken.write_bytes(b"not a ROOT file" * 100)
    refused = facility_cli(facility_config, "data", "add", "Mixed", str(real_nanoaod["nano_dy.root"]),
                           str(broken))
    assert refused.returncode == 3
    assert f"{broken.as_uri()}: cannot be read" in refused.stderr
    assert "nothing was written to the catalog" in refused.stderr
    wrong = facility_cli(facility_config, "data", "add", "AtlasAsCms",
                         str(real_nanoaod["PHYSLITE_example.root"]), "--tree", "CollectionTree")
    assert wrong.returncode == 3
    assert "does not fit the nanoaod schema" in wrong.stderr
    unknown = facility_cli(facility_config, "data", "add", "X", str(broken), "--schema", "nano")
    assert unknown.returncode == 2
    assert "unknown schema 'nano'" in unknown.stderr
    assert facility_config.catalog_path.read_text() == before


def test_check_reports_missing_and_changed_files_and_remove_drops_the_dataset(
        facility_config: FacilityConfig, real_nanoaod: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    for sample in ("nano_dy.root", "nano_tt_v12.root"):
        shutil.copy(real_nanoaod[sample], folder / sample)
    added = facility_cli(facility_config, "data", "add", "Mine", str(folder))  # a directory
    assert added.returncode == 0, added.stderr
    assert "2 files, 240 events" in added.stdout
    assert facility_cli(facility_config, "data", "check", "Mine").returncode == 0

    (folder / "nano_dy.root").unlink()
    shutil.copy(real_nanoaod["nano_tt_v15.root"], folder / "nano_tt_v12.root")
    checked = facility_cli(facility_config, "data", "check", "Mine")
    assert checked.returncode == 3
    assert "missing Mine/nano_dy.root" in checked.stdout
    assert "changed Mine/nano_tt_v12.root" in checked.stdout
    assert "another file (ROOT UUID" in checked.stdout  # the same 200 entries, rewritten

    removed = facility_cli(facility_config, "data", "remove", "Mine")
    assert removed.returncode == 0, removed.stderr
    assert "Mine" not in _catalogued(facility_config).datasets
    assert (folder / "nano_tt_v12.root").exists()  # the files stay


def test_metadata_and_totals_reach_every_chunk_and_lumi_weights_add_up(
        facility_config: FacilityConfig, real_nanoaod: dict[str, Path]) -> None:
    files = [real_nanoaod["nano_dy.root"], real_nanoaod["nano_tt_v12.root"]]
    added = facility_cli(facility_config, "data", "add", "Weighted", *map(str, files), "--replace",
                         "--meta", "year=2018", "--meta", "campaign=UL18",
                         "--meta", "cross_section_pb=6077.22", "--sum-genweight")
    assert added.returncode == 0, added.stderr
    total = sum(float(uproot.open(f)["Events"]["genWeight"].array(library="np").sum(dtype="f8"))
                for f in files)
    meta = _catalogued(facility_config).get("Weighted").metadata
    assert meta.sum_genweight == pytest.approx(total, rel=1e-12)
    assert meta.model_extra == {"year": 2018, "campaign": "UL18"}

    result = run(MetadataSeen(), "Weighted", config=facility_config, output=False, chunk_size=10)
    [seen] = [json.loads(k) for k in result.output["keys"]]
    assert seen == {"dataset": "Weighted", "year": 2018, "campaign": "UL18", "events_total": 240,
                    "sum_genweight": pytest.approx(total, rel=1e-12),
                    "cross_section_pb": 6077.22}
    for path, entries in ((files[0], 40), (files[1], 200)):  # every entry once, in order
        ranges = sorted((a, b) for name, a, b in result.output["ranges"] if name == path.name)
        assert ranges[0][0] == 0
        assert ranges[-1][1] == entries
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(ranges))
    # the dataset's weights sum to cross section x luminosity, whatever the chunking
    assert result.output["weights"] == pytest.approx(6077.22 * 1000.0, rel=1e-9)


def test_a_processor_from_the_users_own_module_with_a_helper_runs_on_the_workers(
        facility_config: FacilityConfig, real_nanoaod: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "myhelpers.py").write_text(textwrap.dedent("""
        import awkward as ak

        def leading_pt(muons):
            return ak.to_numpy(ak.firsts(muons.pt)[ak.num(muons) > 0])
    """))
    (tmp_path / "myproc.py").write_text(textwrap.dedent("""
        import numpy as np
        from coffea.processor import ProcessorABC

        import myhelpers

        class LeadingMuon(ProcessorABC):
            def process(self, events):
                return {"leading": list(myhelpers.leading_pt(events.Muon))}

            def postprocess(self, accumulator):
                return accumulator
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import myproc  # type: ignore[import-not-found]

    added = facility_cli(facility_config, "data", "add", "OwnModule",
                         str(real_nanoaod["nano_dy.root"]), "--replace")
    assert added.returncode == 0, added.stderr
    result = run(myproc.LeadingMuon(), "OwnModule", config=facility_config, output=False,
                 chunk_size=10)
    pt = uproot.open(real_nanoaod["nano_dy.root"])["Events"]["Muon_pt"].array()
    expected = np.sort(ak.to_numpy(ak.firsts(pt)[ak.num(pt) > 0]))
    assert np.array_equal(np.sort(result.output["leading"]), expected)


def test_the_catalog_json_schema_in_the_docs_is_current() -> None:
    written = json.loads((REPO / "docs" / "catalog.schema.json").read_text())
    assert written == catalog_json_schema(), "regenerate: python -m facility.data.catalog"
    assert tuple(SCHEMAS) == SCHEMA_NAMES


def test_a_file_in_a_served_region_is_read_through_its_servers_and_extra_replicas_are_checked(
        facility_config: FacilityConfig, real_nanoaod: dict[str, Path]) -> None:
    east, west = facility_config.region("east"), facility_config.region("west")
    for region in (east, west):
        target = facility_config.region_root(region) / "user" / "nano_dy.root"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real_nanoaod["nano_dy.root"], target)
    assert west.serve is not None
    west_base = f"root://localhost:{west.serve.xrootd_port}//user"
    local = facility_config.region_root(east) / "user" / "nano_dy.root"
    added = facility_cli(facility_config, "data", "add", "Served", str(local),
                         "--replica", f"west={west_base}", "--replace")
    assert added.returncode == 0, added.stderr
    [entry] = _catalogued(facility_config).get("Served").files
    assert [(r.region, r.scheme) for r in entry.replicas] == [
        ("east", "root"), ("east", "https"), ("west", "root")]
    result = run(MuonSums(), "Served", config=facility_config, output=False)
    assert result.output["events"] == 40
    assert set(result.summary["replicas_used"]) == {entry.replicas[0].url}

    wrong = facility_cli(facility_config, "data", "add", "Served2", str(local),
                         "--replica", f"west={west_base}/nowhere")
    assert wrong.returncode == 3
    assert f"{west_base}/nowhere/nano_dy.root (replica of" in wrong.stderr
