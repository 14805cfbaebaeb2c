"""The main job end to end on the embedded facility: real XRootD servers, real Dask processes."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import psutil
import pytest
import uproot

from facility.cluster.base import backend_for
from facility.config import FacilityConfig
from facility.data.catalog import (
    Catalog,
    Dataset,
    DatasetMetadata,
    FileEntry,
    Replica,
    load_catalog,
    save_catalog,
)
from facility.embedded.services import Supervisor
from facility.processing.processors.dimuon import DimuonProcessor
from facility.processing.runner import Progress, RunError, run

pytestmark = pytest.mark.integration


def test_dimuon_over_root_finds_the_z(facility_config: FacilityConfig) -> None:
    result = run("dimuon", "DY", config=facility_config)
    summary = result.summary
    assert summary["events"] == 40000
    assert summary["chunks"]["done"] == summary["chunks"]["total"] >= 8
    assert all(url.startswith("root://") for url in summary["replicas_used"])
    assert summary["workers_used"] == 2
    assert abs(summary["analysis"]["fit"]["peak"] - 91.19) < 1.0
    assert set(summary["columns_read"]) == {"nMuon", "Muon_pt", "Muon_eta", "Muon_phi",
                                           "Muon_mass", "Muon_charge", "genWeight"}
    out = result.output_dir
    assert out is not None
    assert (out / "plot.png").stat().st_size > 10_000
    saved = json.loads((out / "summary.json").read_text())
    assert saved["events"] == 40000
    with uproot.open(out / "histograms.root") as handle:
        read_back = handle["mass/DY"].to_hist()
    assert np.allclose(read_back.values(), result.output["mass"][{"dataset": "DY"}].values())
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert sum(e["events"] for e in ledger if e["state"] == "done") == 40000


def test_ttbar_and_collision_data(facility_config: FacilityConfig) -> None:
    tt = run("ttbar", "TT", config=facility_config, output=False)
    mbjj = tt.output["mbjj"].project("mbjj")
    assert tt.output["cutflow"]["TT"]["selected"] > 1000
    peak = mbjj.axes[0].centers[np.argmax(mbjj.values())]
    assert 150 < peak < 200
    data = run("dimuon", "Data", config=facility_config, output=False)
    assert "genWeight" not in data.summary["columns_read"]
    assert abs(data.summary["analysis"]["fit"]["peak"] - 91.19) < 1.0
    assert data.summary["analysis"]["pairs"] == data.output["cutflow"]["Data"]["opposite_sign"]
    no_z = run("dimuon", "TT", config=facility_config, output=False).summary["analysis"]
    assert no_z["fit"] is None
    assert "Z peak" in no_z["fit_error"] or "too few" in no_z["fit_error"]


def _z_sample(peak: float | None, weight: float, rng: np.random.Generator) -> dict[str, Any]:
    """A dimuon result: a falling continuum, a Breit-Wigner peak if asked, with genWeight-like
    weights of either sign."""
    from facility.processing.processors.dimuon import mass_histogram

    masses = 40 + rng.exponential(25.0, 20_000)
    if peak is not None:
        masses = np.concatenate([masses, peak + 1.25 * rng.standard_cauchy(8_000)])
    masses = masses[(masses > 40) & (masses < 200)]
    weights = weight * rng.choice([1.0, 1.0, 1.0, -1.0], len(masses))
    histogram = mass_histogram()
    histogram.fill(dataset="S", mass=masses, weight=weights)
    return {"mass": histogram, "cutflow": {"S": {"opposite_sign": len(masses)}}}


def test_the_dimuon_summary_counts_pairs_and_fits_only_a_z_peak() -> None:
    from facility.processing.processors.dimuon import summarize_z_peak

    with_z = _z_sample(91.19, 26_000.0, np.random.default_rng(7))
    z = summarize_z_peak(with_z)
    assert z["pairs"] == with_z["cutflow"]["S"]["opposite_sign"]  # a count, not a sum of weights
    assert z["weighted_pairs"] != z["pairs"]
    assert abs(z["fit"]["peak"] - 91.19) < 0.5
    shifted = summarize_z_peak(_z_sample(99.4, 1.0, np.random.default_rng(7)))
    assert shifted["fit"] is None
    assert shifted["fit_error"].startswith("no Z peak: the fit put a peak at 99.")
    continuum = summarize_z_peak(_z_sample(None, 1.0, np.random.default_rng(7)))
    assert continuum["fit"] is None
    assert "Z peak" in continuum["fit_error"]


def _catalog_with(config: FacilityConfig, name: str, files: list[tuple[str, int]],
                  is_data: bool = False) -> Path:
    """A catalog that adds ``name`` with local files to the facility's catalog."""
    catalog = load_catalog(config.catalog_path)
    entries = [FileEntry(name=Path(p).name, events=n,
                         replicas=[Replica(region="east", url=Path(p).resolve().as_uri())])
               for p, n in files]
    dataset = Dataset(name=name, metadata=DatasetMetadata(is_data=is_data), files=entries)
    save_catalog(catalog.with_dataset(dataset), config.catalog_path)
    return config.catalog_path


def test_processors_run_on_real_nanoaod(facility_config: FacilityConfig,
                                        real_nanoaod: dict[str, Path]) -> None:
    files = [(str(real_nanoaod["nano_dy.root"]), 40), (str(real_nanoaod["nano_tt_v12.root"]), 200)]
    _catalog_with(facility_config, "RealNano", files)
    try:
        dimuon = run("dimuon", "RealNano", config=facility_config, output=False)
        ttbar = run("ttbar", "RealNano", config=facility_config, output=False)
    finally:
        _drop(facility_config, "RealNano")
    assert dimuon.summary["events"] == 240
    assert dimuon.output["cutflow"]["RealNano"]["all"] == 240
    assert ttbar.output["cutflow"]["RealNano"]["all"] == 240


def test_pair_mass_is_the_four_vector_sum(facility_config: FacilityConfig) -> None:
    import awkward as ak
    from coffea.nanoevents import NanoEventsFactory

    from facility.processing.processors.dimuon import pair_mass
    from facility.processing.schemas import FacilityNanoAODSchema

    source = sorted((facility_config.data_path / "east" / "DY").glob("*.root"))[0]
    events = NanoEventsFactory.from_root(f"{source}:Events", mode="eager",
                                         schemaclass=FacilityNanoAODSchema).events()
    pairs = events.Muon[ak.num(events.Muon) == 2]
    summed = ak.to_numpy((pairs[:, 0] + pairs[:, 1]).mass)
    assert len(pairs) > 5000
    assert np.allclose(pair_mass(pairs), summed, rtol=1e-4, atol=1e-3)


def test_a_files_base_form_is_built_once_and_each_chunk_gets_its_own_copy(
        facility_config: FacilityConfig) -> None:
    import awkward as ak

    from facility.processing import reader
    from facility.processing.plan import Chunk, FileTask

    first, second = sorted((facility_config.data_path / "east" / "DY").glob("*.root"))
    reader._base_forms.clear()

    def events(path: Path, start: int, stop: int) -> Any:
        task = FileTask("DY", path.name, "Events", (str(path),), 20000)
        return reader._events(None, Chunk(task, start, stop, 20000), str(path),
                              uproot.open(path), [], [])

    one, two = events(first, 0, 1000), events(first, 1000, 2000)
    assert len(reader._base_forms) == 1
    assert one.metadata["entrystart"] == 0
    assert two.metadata["entrystart"] == 1000
    assert ak.fields(one) == ak.fields(two)
    assert ak.to_list(two.Muon.pt) == ak.to_list(
        uproot.open(first)["Events"]["Muon_pt"].array(entry_start=1000, entry_stop=2000))
    events(second, 0, 1000)
    assert len(reader._base_forms) == 2  # another file (another ROOT UUID) has its own


def test_different_files_written_with_one_uuid_each_get_their_own_form(tmp_path: Path) -> None:
    import uuid

    import awkward as ak

    from facility.processing import reader
    from facility.processing.schemas import FacilityNanoAODSchema

    shared = uuid.uuid4()
    muons = ak.zip({"pt": ak.Array([[30.0], [40.0, 50.0]])})
    ids = {name: np.array([1, 2]) for name in ("run", "luminosityBlock", "event")}
    contents = {"muons.root": {**ids, "Muon": muons},
                "muons_and_electrons.root": {**ids, "Muon": muons, "Electron": muons}}
    for name, branches in contents.items():
        with uproot.recreate(tmp_path / name, uuid_function=lambda: shared) as out:
            out["Events"] = branches
    handles = [uproot.open(tmp_path / name) for name in contents]
    assert handles[0].file.uuid == handles[1].file.uuid
    fields = [ak.fields(reader.build_events(h, "Events", 0, 2, FacilityNanoAODSchema))
              for h in handles]
    assert "Electron" not in fields[0]
    assert "Electron" in fields[1]


def test_a_files_schema_is_built_once_and_gives_the_events_a_fresh_build_gives(
        facility_config: FacilityConfig) -> None:
    import awkward as ak
    from coffea.nanoevents import NanoEventsFactory

    from facility.processing import reader
    from facility.processing.schemas import FacilityNanoAODSchema

    path = sorted((facility_config.data_path / "east" / "DY").glob("*.root"))[0]
    handle = uproot.open(path)
    reader._schemas.clear()

    def kept(start: int, stop: int) -> Any:
        return reader.build_events(handle, "Events", start, stop, FacilityNanoAODSchema,
                                   metadata={"dataset": "DY", "entrystart": start})

    first, second = kept(0, 1000), kept(1000, 3000)
    assert len(reader._schemas) == 1
    fresh = NanoEventsFactory.from_root(handle, treepath="Events", entry_start=1000,
                                        entry_stop=3000, mode="virtual",
                                        schemaclass=FacilityNanoAODSchema,
                                        metadata={"dataset": "DY", "entrystart": 1000}).events()
    assert second.metadata == fresh.metadata  # the chunk's own, and what the schema adds
    assert first.metadata["entrystart"] == 0
    assert ak.fields(second) == ak.fields(fresh)
    assert ak.fields(second.Muon) == ak.fields(fresh.Muon)
    assert ak.to_list(second.Muon.pt) == ak.to_list(fresh.Muon.pt)
    assert ak.to_list(second.GenPart.distinctParent.pdgId) == ak.to_list(
        fresh.GenPart.distinctParent.pdgId)
    first.attrs["@form"]["parameters"]["metadata"]["entrystart"] = -1  # one chunk's copy only
    assert kept(3000, 4000).metadata["entrystart"] == 3000

    class OwnSchema(FacilityNanoAODSchema):
        """A processor's own class may build from the metadata: built afresh each chunk."""

    reader.build_events(handle, "Events", 0, 1000, OwnSchema, metadata={"dataset": "DY"})
    assert len(reader._schemas) == 1


def test_an_open_files_tree_answers_its_type_names_from_memory(
        facility_config: FacilityConfig) -> None:
    from facility.processing import reader

    path = sorted((facility_config.data_path / "east" / "DY").glob("*.root"))[0]
    reader.forget_file(str(path))
    tree = reader.cached_open(str(path), "Events", 30)["Events"]
    fresh = uproot.open(path)["Events"]
    assert tree.typenames() == fresh.typenames()
    assert len(tree.typenames()) > 100
    tree.typenames()["Muon_pt"] = "changed"  # each caller gets its own copy
    assert tree.typenames()["Muon_pt"] == fresh.typenames()["Muon_pt"]
    assert tree.typenames(filter_name="Muon_*") == fresh.typenames(filter_name="Muon_*")
    assert "Jet_pt" not in tree.typenames(filter_name="Muon_*")
    reader.forget_file(str(path))


def test_the_benchmarks_hand_written_dimuon_is_the_processors_histogram(
        facility_config: FacilityConfig) -> None:
    from coffea.nanoevents import NanoEventsFactory

    from facility.processing.bench import handwritten_dimuon
    from facility.processing.schemas import FacilityNanoAODSchema

    source = sorted((facility_config.data_path / "east" / "DY").glob("*.root"))[0]
    events = NanoEventsFactory.from_root(f"{source}:Events", mode="eager",
                                         schemaclass=FacilityNanoAODSchema,
                                         metadata={"dataset": "DY"}).events()
    expected = DimuonProcessor().process(events)["mass"][{"dataset": "DY"}].values()
    entries, contents = handwritten_dimuon(uproot.open(source)["Events"])
    assert entries == 20000
    assert expected.sum() > 0
    assert np.allclose(contents, expected, rtol=1e-9)


def test_the_benchmarks_facility_without_dask_merges_every_planned_chunk_once(
        facility_config: FacilityConfig) -> None:
    """The "no Dask" way does the workers' whole job on every chunk: the histogram of the file
    in chunks, merged, is the processor's over the whole file."""
    from coffea.nanoevents import NanoEventsFactory

    from facility.processing import bench, reader
    from facility.processing.plan import FileTask
    from facility.processing.schemas import FacilityNanoAODSchema

    source = sorted((facility_config.data_path / "east" / "DY").glob("*.root"))[0]
    task = FileTask("DY", source.name, "Events", (source.as_uri(),), 20000)
    try:
        bench.warm_reader([task], chunk_size=4000)
        entries, merged = bench.merged_chunks(task.label)
    finally:  # this process is no worker: what the reader learnt goes
        reader.forget_file(source.as_uri())
        reader._columns_touched.clear()
    events = NanoEventsFactory.from_root(f"{source}:Events", mode="eager",
                                         schemaclass=FacilityNanoAODSchema,
                                         metadata={"dataset": "DY"}).events()
    expected = DimuonProcessor().process(events)
    assert len(bench._planned_chunks[task.label]) > 1
    assert entries == 20000
    assert merged["cutflow"] == expected["cutflow"]
    assert np.allclose(merged["mass"].values(), expected["mass"].values(), rtol=1e-9)


def test_the_benchmark_finds_a_chunks_fixed_cost_from_two_chunk_sizes() -> None:
    """Runs whose time is ``events * a + chunks * f`` over two workers give back ``f``."""
    from facility.processing.bench import SMALL_CHUNK, Row

    events, per_event, fixed, workers = 2_000_000, 4e-7, 0.030, 2

    def rate(chunk: int) -> float:
        return events / ((events * per_event + events / chunk * fixed) / workers)

    row = Row("root://", facility=rate(200_000), facility_small_chunks=rate(SMALL_CHUNK))
    assert row.fixed_chunk_ms(workers, 200_000) == pytest.approx(30.0)
    assert np.isnan(row.fixed_chunk_ms(workers, SMALL_CHUNK))


def _drop(config: FacilityConfig, name: str) -> None:
    catalog = load_catalog(config.catalog_path)
    save_catalog(Catalog(datasets={k: v for k, v in catalog.datasets.items() if k != name}),
                 config.catalog_path)


def _slow_dimuon() -> DimuonProcessor:
    """A dimuon processor that takes long enough per chunk for a worker to die mid-run."""
    import tests.fault_processors as slow

    cloudpickle.register_pickle_by_value(slow)
    return slow.SlowDimuon(delay=0.3)


def test_the_scale_harness_bundles_chunks_and_merges_each_exactly_once(
        facility_config: FacilityConfig) -> None:
    from facility.processing import scale_sim

    config = facility_config.model_copy(update={"processing": facility_config.processing.model_copy(
        update={"max_tasks_per_second": 20.0})})
    row = scale_sim.measure(config, slots=8, seconds=0.1, bins=100, waves=25)
    assert row.chunks == 200  # and the harness checked one histogram entry per chunk
    assert row.tasks < row.chunks / 2  # 8 slots of 0.1 s chunks exceed 20 tasks a second
    assert 0 < row.utilisation <= 1
    assert row.collections >= 1
    assert row.first_merge_seconds is not None


def test_worker_killed_mid_run_gives_identical_results(facility_config: FacilityConfig) -> None:
    reference = run("dimuon", "DY", config=facility_config, output=False, chunk_size=2000)
    client = backend_for(facility_config).client()
    killed: list[int] = []

    def kill_one_worker(progress: Progress) -> None:
        if progress.chunks_done >= 3 and not killed:
            pids = client.run(os.getpid)
            victim = sorted(pids.values())[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    try:
        faulty = run(_slow_dimuon(), "DY", config=facility_config, client=client, output=False,
                     chunk_size=2000, progress=kill_one_worker)
        client.wait_for_workers(2, timeout=60)
        survivors = set(client.run(os.getpid).values())
    finally:
        client.close()
    assert killed
    assert killed[0] not in survivors
    assert faulty.summary["events"] == reference.summary["events"] == 40000
    assert faulty.summary["chunks"]["done"] == reference.summary["chunks"]["done"] == 20
    for key in ("values", "variances"):
        assert np.array_equal(getattr(faulty.output["mass"], key)(),
                              getattr(reference.output["mass"], key)())
    assert faulty.output["cutflow"] == reference.output["cutflow"]


def _damaged_copy(config: FacilityConfig, how: str) -> Path:
    source = next((config.data_path / "east" / "DY").glob("*.root"))
    target = config.data_path / "east" / "Broken" / f"{how}.root"
    target.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray(source.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:  # overwrite the compressed baskets of the muon momenta, keep all metadata intact
        with uproot.open(source) as handle:
            branch = handle["Events"]["Muon_pt"]
            seeks = [int(x) for x in branch.member("fBasketSeek")[: branch.num_baskets]]
        noise = random.Random(how)  # the same damage every run
        for seek in seeks:
            data[seek + 120: seek + 2120] = noise.randbytes(2000)
    target.write_bytes(bytes(data))
    for region in ("west",):
        copy = config.data_path / region / "Broken" / target.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, copy)
    return target


def _broken_dataset(config: FacilityConfig, how: str) -> None:
    _damaged_copy(config, how)
    good = load_catalog(config.catalog_path).get("DY").files[0]
    ports = {r.name: r.serve.xrootd_port for r in config.regions if r.serve}
    bad = FileEntry(name=f"{how}.root", events=20000, replicas=[
        Replica(region=region, url=f"root://localhost:{port}//Broken/{how}.root")
        for region, port in ports.items()])
    dataset = Dataset(name="Broken", files=[good, bad])
    save_catalog(load_catalog(config.catalog_path).with_dataset(dataset), config.catalog_path)


@pytest.mark.parametrize("how", ["corrupt", "truncated", "missing"])
def test_bad_file_stops_the_run_naming_it(facility_config: FacilityConfig, how: str) -> None:
    _broken_dataset(facility_config, how)
    if how == "missing":
        for region in ("east", "west"):
            (facility_config.data_path / region / "Broken" / "missing.root").unlink()
    with pytest.raises(RunError, match=rf"Broken/{how}\.root") as err:
        run("dimuon", "Broken", config=facility_config, output=False)
    assert "on_bad_input='skip'" in str(err.value)


def test_skip_policy_reports_exactly_what_was_skipped(facility_config: FacilityConfig) -> None:
    _broken_dataset(facility_config, "corrupt")
    result = run("dimuon", "Broken", config=facility_config, output=False, on_bad_input="skip",
                 max_skipped_fraction=1.0)
    summary = result.summary
    skipped = summary["skipped"]
    assert skipped
    assert {s["file"] for s in skipped} == {"Broken/corrupt.root"}
    skipped_events = sum(e[1] - e[0] if isinstance(e := s["entries"], list) else 20000
                         for s in skipped)
    counts = summary["per_dataset"]["Broken"]
    assert counts["events_processed"] + skipped_events == 40000
    assert summary["events"] == counts["events_processed"] >= 20000
    assert summary["chunks"]["done"] + summary["chunks"]["skipped"] == summary["chunks"]["total"]


def test_unreachable_region_fails_over_to_the_next(facility_config: FacilityConfig) -> None:
    supervisor = Supervisor(facility_config.state_path)
    from facility.embedded.facility import data_services, up

    assert supervisor.stop("xrootd-east")
    try:
        result = run("dimuon", "DY", config=facility_config, output=False)
    finally:
        up(facility_config, report=lambda _: None)
    assert result.summary["events"] == 40000, result.summary
    west = facility_config.region("west")
    assert west.cache is not None
    through_west_cache = f"root://localhost:{west.cache.xrootd_port}/"  # west is read through it
    used = result.summary["replicas_used"]
    assert all(url.startswith(through_west_cache) for url in used), used
    assert all(supervisor.state(s).healthy for s in data_services(facility_config))


def test_second_up_is_harmless(facility_config: FacilityConfig) -> None:
    from facility.embedded.facility import status, up

    up(facility_config, report=lambda _: None)  # everything, the hub's services included
    before = {s.name: s.pid for s in status(facility_config)}
    lines: list[str] = []
    up(facility_config, report=lines.append)
    after = {s.name: s.pid for s in status(facility_config)}
    assert before == after
    running = {name for name, pid in before.items() if pid is not None}
    assert {"xrootd-east", "xrootd-west", "xrootd-west-cache", "dask-default", "jupyterhub",
            "identity-provider", "hub-proxy"} <= running
    assert [line for line in lines if line.startswith("started")] == []
    assert sum("already running" in line for line in lines) == 7


def test_rerun_plans_from_remembered_files_with_identical_results(
        facility_config: FacilityConfig) -> None:
    source = sorted((facility_config.data_path / "east" / "DY").glob("*.root"))[0]
    _catalog_with(facility_config, "Again", [(str(source), 20000)])
    try:
        first = run("dimuon", "Again", config=facility_config, output=False)
        second = run("dimuon", "Again", config=facility_config, output=False)
    finally:
        _drop(facility_config, "Again")
    assert (first.summary["files"]["inspected"], first.summary["files"]["remembered"]) == (1, 0)
    assert (second.summary["files"]["inspected"], second.summary["files"]["remembered"]) == (0, 1)
    assert first.summary["events"] == second.summary["events"] == 20000
    assert np.array_equal(first.output["mass"].values(), second.output["mass"].values())


def test_a_file_that_changed_since_it_was_inspected_is_named(
        facility_config: FacilityConfig) -> None:
    from facility.processing.plan import FileInfo, FileTask, plan_chunks
    from facility.processing.reader import inspect_file, process_chunk
    from facility.processing.receipts import Failure, Inspected

    source = sorted((facility_config.data_path / "east" / "DY").glob("*.root"))[0]
    task = FileTask("DY", source.name, "Events", (source.resolve().as_uri(),), 20000)
    inspected = inspect_file(task, timeout=10)
    assert isinstance(inspected, Inspected)
    assert inspected.info.entries == 20000
    stale = FileInfo(task, inspected.info.url, 25000, inspected.info.cluster_starts)
    [chunk, *_] = plan_chunks(stale, 5000)
    failure = process_chunk(DimuonProcessor(), chunk)
    assert isinstance(failure, Failure)
    assert failure.every_replica_damaged
    assert "20000 entries, the run planned for 25000" in failure.describe_replicas()


def test_unknown_dataset_and_processor_are_named(facility_config: FacilityConfig) -> None:
    from facility.data.catalog import CatalogError
    from facility.processing.processors import ProcessorNotFound

    with pytest.raises(CatalogError, match=r"unknown dataset 'DYY'.*DY"):
        run("dimuon", "DYY", config=facility_config)
    with pytest.raises(ProcessorNotFound, match="unknown processor 'dimoun'"):
        run("dimoun", "DY", config=facility_config)


def test_command_line_run_and_data(facility_config: FacilityConfig, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from facility.cli import main

    config_file = str(facility_config.home / "facility.yaml")
    assert main(["--config", config_file, "data", "list"]) == 0
    assert main(["--config", config_file, "data", "show", "DY"]) == 0
    out_dir = tmp_path / ("a-folder-deep-enough-that-its-paths-pass-80-columns-" * 2) / "cli-run"
    assert main(["--config", config_file, "run", "dimuon", "-d", "DY", "--output",
                 str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Z peak" in printed
    assert "40,000" in printed
    for name in ("histograms.root", "summary.json"):  # piped output keeps paths whole
        assert any(str(out_dir / name) in line for line in printed.splitlines())
    assert json.loads((out_dir / "summary.json").read_text())["events"] == 40000
    assert main(["--config", config_file, "run", "dimuon", "-d", "Nope"]) == 2
    assert "unknown dataset 'Nope'" in capsys.readouterr().err



def test_stopping_the_hub_leaves_none_of_its_processes(facility_config: FacilityConfig) -> None:
    """JupyterHub starts its idle culler in a session of its own: it must end with the hub."""
    from facility.embedded.facility import up

    up(facility_config, report=lambda _: None)
    supervisor = Supervisor(facility_config.state_path)
    hub = supervisor.process("jupyterhub")
    assert hub is not None
    deadline = time.monotonic() + 30
    descendants: list[psutil.Process] = []
    while time.monotonic() < deadline and not any(
            "jupyterhub_idle_culler" in " ".join(p.cmdline()) for p in descendants):
        time.sleep(0.5)
        descendants = hub.children(recursive=True)
    assert any(os.getpgid(p.pid) != os.getpgid(hub.pid) for p in descendants)
    try:
        assert supervisor.stop("jupyterhub")
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert alive == []
    finally:
        up(facility_config, report=lambda _: None)
