"""A run loses nothing when parts of the facility break: real SIGKILLs of workers, data servers,
the client and the scheduler, damaged replicas, broken workers and failing user code, each
compared bin by bin with a fault-free run, or ending with a clear error and a non-zero exit."""

from __future__ import annotations

import inspect
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uproot

import tests.fault_processors as faulty
from facility.cluster.base import backend_for
from facility.config import FacilityConfig
from facility.data.catalog import Dataset, FileEntry, Replica, load_catalog, save_catalog
from facility.embedded.chaos import FAULTS, Chaos, describe
from facility.embedded.facility import data_services, up
from facility.embedded.services import Supervisor
from facility.errors import UsageError
from facility.processing.compare import differences
from facility.processing.runner import BadInputError, ProcessorError, RunInterrupted, run

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def _cli(config: FacilityConfig, *arguments: str, env: dict[str, str] | None = None,
         **kwargs: Any) -> subprocess.CompletedProcess:
    """``facility`` in a process of its own, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "facility.cli", "--config", str(config.home / "facility.yaml"),
         *arguments], capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "COLUMNS": "200", **(env or {})}, check=False, **kwargs)


@pytest.fixture(scope="module")
def reference(facility_config: FacilityConfig) -> Any:
    """The dimuon result over DY with nothing broken."""
    return run("dimuon", "DY", config=facility_config, output=False).output


@pytest.fixture(scope="module")
def chaos(facility_config: FacilityConfig) -> Iterator[Chaos]:
    harness = Chaos(facility_config, facility_config.home / "facility.yaml",
                    "tests.fault_processors:SlowDimuon", ["DY"], chunk_size=1000, seed=7,
                    report=lambda _: None)
    harness.run_reference()
    yield harness
    assert harness.reference is not None
    shutil.rmtree(harness.reference.folder, ignore_errors=True)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_part_killed_mid_run_changes_nothing(chaos: Chaos, fault: str) -> None:
    verdict = chaos.run_one(FAULTS.index(fault) + 1, fault)
    assert verdict.identical, describe(verdict, len(FAULTS))
    assert (verdict.lost, verdict.doubled) == (0, 0)
    summary = verdict.summary
    assert summary["chunks"]["done"] == summary["chunks"]["total"] == 40
    if fault == "server":
        assert summary["endpoints_unhealthy"], verdict.what
        east = chaos.config.region("east").serve
        assert east is not None
        assert any(f":{east.xrootd_port}/" not in url for url in summary["replicas_used"])
    if fault in ("client", "scheduler"):
        assert summary["run"]["resumed"]


def test_a_restarted_data_server_is_read_again(facility_config: FacilityConfig) -> None:
    """Workers holding open files on a server that was killed and started again read from it
    again, once the client library's error window (XRD_STREAMERRORWINDOW) has passed."""
    supervisor = Supervisor(facility_config.state_path)
    run("dimuon", "DY", config=facility_config, output=False)  # workers hold east files open
    east = supervisor.process("xrootd-east")
    assert east is not None
    os.kill(east.pid, signal.SIGKILL)
    east.wait(10)
    up(facility_config, report=lambda _: None, hub=False)
    time.sleep(int(os.environ["XRD_STREAMERRORWINDOW"]) + 1)
    again = run("dimuon", "DY", config=facility_config, output=False)
    port = facility_config.region("east").serve.xrootd_port  # type: ignore[union-attr]
    assert again.summary["endpoints_unhealthy"] == [], again.summary["replicas_failed"]
    assert all(f":{port}/" in url for url in again.summary["replicas_used"]), (
        again.summary["replicas_used"], again.summary["replicas_failed"])


def test_the_reduction_on_workers_equals_a_serial_merge_chunk_by_chunk(
        facility_config: FacilityConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    from coffea.processor import accumulate

    from facility.data.access import reader_environment
    from facility.processing.reader import process_chunk
    from facility.processing.receipts import ChunkDone

    for name, value in reader_environment(facility_config).items():  # read here, as a worker
        monkeypatch.setenv(name, value)
    result = run("dimuon", "DY", config=facility_config, output=False, chunk_size=1000)
    entries = list(result.ledger.entries.values())
    assert len(entries) == 40
    assert all(e.state == "done" for e in entries)
    serial = None
    for entry in sorted(entries, key=lambda e: e.chunk.chunk_id):
        done = process_chunk(faulty.SlowDimuon(0), entry.chunk)
        assert isinstance(done, ChunkDone)
        serial = accumulate([serial, done.output])
    assert differences(serial, result.output) == []
    assert result.summary["chunks"]["duplicates_refused"] == 0


def test_chunks_held_by_a_killed_worker_are_done_again_and_counted_once(
        facility_config: FacilityConfig, reference: Any) -> None:
    """With collections only at the end, every result waits on the workers; one is SIGKILLed
    while it holds chunks."""
    late = facility_config.model_copy(update={"processing": facility_config.processing.model_copy(
        update={"checkpoint_seconds": 120.0})})
    client = backend_for(facility_config).client()
    killed: list[int] = []

    def kill_a_holder(progress: Any) -> None:
        if progress.chunks_done >= 12 and not killed:
            victim = sorted(client.run(os.getpid).values())[0]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    try:
        result = run(faulty.SlowDimuon(0.1), "DY", config=late, client=client, output=False,
                     chunk_size=1000, progress=kill_a_holder)
        client.wait_for_workers(2, timeout=60)
    finally:
        client.close()
    assert killed
    chunks = result.summary["chunks"]
    assert chunks["redone"] > 0
    assert chunks["done"] == chunks["total"] == 40
    assert differences(reference, result.output) == []


def test_resume_after_the_client_is_killed_processes_only_what_is_missing(
        facility_config: FacilityConfig, reference: Any) -> None:
    name = "killed-client"
    proc = subprocess.Popen(
        [sys.executable, "-m", "facility.cli", "--config", str(facility_config.home / "facility.yaml"),
         "run", "tests.fault_processors:SlowDimuon", "-d", "DY", "--chunk-size", "1000",
         "--name", name], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = facility_config.output_path / name / "journal.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and '"checkpoint"' not in _text(journal):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    folder = facility_config.output_path / name
    assert not (folder / "COMPLETE").exists()
    with pytest.raises(UsageError, match="holds an interrupted run; resume it with"):
        run("dimuon", "DY", config=facility_config, name=name)

    resumed = run(resume=name, config=facility_config)
    chunks = resumed.summary["chunks"]
    assert 0 < chunks["resumed"] < chunks["total"] == 40
    assert chunks["done"] == 40
    assert differences(reference, resumed.output) == []
    assert (folder / "COMPLETE").exists()
    again = run(resume=name, config=facility_config)  # complete: read back, nothing processed
    assert differences(reference, again.output) == []
    assert again.summary == json.loads((folder / "summary.json").read_text())
    with pytest.raises(UsageError, match="no run 'no-such-run' to resume"):
        run(resume="no-such-run", config=facility_config)


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_killed_while_writing_outputs_leaves_no_result_and_resume_writes_it(
        facility_config: FacilityConfig, reference: Any, tmp_path: Path) -> None:
    name = "killed-at-outputs"
    done = _cli(facility_config, "run", "tests.fault_processors:DiesAfterProcessing", "-d", "DY",
                "--name", name,
                env={"DIES_AFTER_PROCESSING_MARKER": str(tmp_path / "died")})
    assert done.returncode == -signal.SIGKILL
    folder = facility_config.output_path / name
    assert not (folder / "COMPLETE").exists()
    assert not (folder / "summary.json").exists()
    resumed = run(resume=name, config=facility_config)
    assert resumed.summary["chunks"]["resumed"] == resumed.summary["chunks"]["total"]
    assert differences(reference, resumed.output) == []
    assert (folder / "COMPLETE").exists()
    with uproot.open(folder / "histograms.root") as handle:
        assert handle["mass/DY"].values().sum() == reference["mass"].values().sum()


def test_outputs_that_cannot_be_written_do_not_lose_the_result(
        facility_config: FacilityConfig, reference: Any) -> None:
    def small_files_only() -> None:  # the plot (~50 kB) does not fit; the checkpoint does
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    name = "disk-full"
    done = _cli(facility_config, "run", "dimuon", "-d", "DY", "--name", name,
                preexec_fn=small_files_only)
    assert done.returncode == 5, done.stderr
    assert "Z peak fitted" in done.stdout  # the result was there, and shown
    assert "writing the outputs to" in done.stderr
    assert "File too large" in done.stderr
    folder = facility_config.output_path / name
    assert not (folder / "COMPLETE").exists()
    resumed = run(resume=name, config=facility_config)
    assert resumed.summary["chunks"]["resumed"] == resumed.summary["chunks"]["total"]
    assert resumed.output_error is None
    assert differences(reference, resumed.output) == []
    assert (folder / "plot.png").stat().st_size > 30_000


def test_every_storage_type_is_saved(facility_config: FacilityConfig) -> None:
    result = run(faulty.EveryStorage(), "DY", config=facility_config, name="storages")
    assert result.output_error is None
    assert result.output_dir is not None
    with uproot.open(result.output_dir / "histograms.root") as handle:
        for name in faulty.STORAGES:
            saved = handle[name].to_hist()
            assert saved.values().sum() == result.output[name].values().sum(), name
    assert result.summary["outputs"]["not_in_root_file"] == [
        {"histogram": "four_axes", "reason": "4 axes: ROOT histograms have 1 to 3"}]


def _replicated(config: FacilityConfig, name: str, folder: str) -> Path:
    """Dataset ``name``: one DY file with copies of its own in ``folder`` of east (read first)
    and of west; returns the east copy."""
    source = sorted((config.data_path / "east" / "DY").glob("*.root"))[0]
    ports = {r.name: r.serve.xrootd_port for r in config.regions if r.serve}
    for region in ports:
        target = config.data_path / region / folder / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    entry = FileEntry(name=source.name, events=20000, replicas=[
        Replica(region=region, url=f"root://localhost:{port}//{folder}/{source.name}")
        for region, port in ports.items()])
    save_catalog(load_catalog(config.catalog_path).with_dataset(Dataset(name=name, files=[entry])),
                 config.catalog_path)
    return config.data_path / "east" / folder / source.name


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        with uproot.open(path) as handle:
            branch = handle["Events"]["Muon_pt"]
            seeks = [int(x) for x in branch.member("fBasketSeek")[: branch.num_baskets]]
        for seek in seeks:
            data[seek + 120: seek + 2120] = bytes(2000)
    path.unlink()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["corrupt", "truncated"])
def test_a_damaged_nearest_replica_fails_over_to_an_intact_copy(
        facility_config: FacilityConfig, how: str) -> None:
    name = f"Replicated{how.title()}"
    _replicated(facility_config, name, f"{name}-intact")
    intact = run("dimuon", name, config=facility_config, output=False)
    _damage(_replicated(facility_config, name, name), how)  # files no worker has open yet
    failed_over = run("dimuon", name, config=facility_config, output=False)
    assert differences(intact.output, failed_over.output) == []
    assert failed_over.summary["skipped"] == []
    west = facility_config.region("west").serve
    assert west is not None
    assert all(f":{west.xrootd_port}/" in url for url in failed_over.summary["replicas_used"])


def test_every_server_down_is_not_bad_input_even_with_skip(facility_config: FacilityConfig,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    from facility.cli import main

    supervisor = Supervisor(facility_config.state_path)
    for service in data_services(facility_config):
        supervisor.stop(service.name)
    try:
        with pytest.raises(RunInterrupted, match="not a problem of the file") as err:
            run("dimuon", "DY", config=facility_config, on_bad_input="skip", output=False)
        code = main(["--config", str(facility_config.home / "facility.yaml"), "run", "dimuon",
                     "-d", "DY", "--skip-bad-input", "--name", "servers-down"])
    finally:
        up(facility_config, report=lambda _: None, hub=False)
    for region in facility_config.regions:
        assert region.serve is not None
        assert f"root://localhost:{region.serve.xrootd_port}//DY/" in str(err.value)
    assert "server unavailable" in str(err.value)
    assert code == 5
    printed = capsys.readouterr()
    assert "error (the facility)" in printed.err
    assert "--resume servers-down" in printed.err
    assert not (facility_config.output_path / "servers-down" / "COMPLETE").exists()


def test_an_error_in_user_code_inside_uproot_names_the_processor_line(
        facility_config: FacilityConfig) -> None:
    source, first = inspect.getsourcelines(faulty.CorrectionsTypo.process)
    line = first + next(i for i, text in enumerate(source) if "uproot.open(self.corrections)" in text)
    with pytest.raises(ProcessorError, match="FileNotFoundError") as err:
        run(faulty.CorrectionsTypo(), "DY", config=facility_config, on_bad_input="skip",
            output=False)
    assert err.value.where is not None
    assert err.value.where.startswith(f"{faulty.__file__}:{line} in process")
    done = _cli(facility_config, "run", "tests.fault_processors:CorrectionsTypo", "-d", "DY",
                "--skip-bad-input")
    assert done.returncode == 4
    assert "error (your code)" in done.stderr
    assert f"fault_processors.py:{line} in process" in done.stderr
    assert "muon_correctoins.root" in done.stderr


def test_a_chunk_that_kills_its_worker_is_named(facility_config: FacilityConfig) -> None:
    with pytest.raises(ProcessorError,
                       match=r"chunk DY/DY_0000\.root:0-\d+ killed its worker \d+ times: likely "
                             r"memory; try a smaller chunk_size"):
        run(faulty.KillsItsWorker(), "DY", config=facility_config, output=False)
    client = backend_for(facility_config).client()
    try:
        client.wait_for_workers(2, timeout=60)
    finally:
        client.close()


def _break_reads() -> int:
    """On one worker: every read fails as on a host whose network card died."""
    import facility.processing.reader as reader

    def broken(url: str, tree: str, timeout: int) -> Any:
        raise OSError(f"XRootD error: [FATAL] Socket error: network is unreachable ({url})")

    reader.cached_open = broken  # type: ignore[assignment]
    return os.getpid()


def test_a_blackhole_worker_is_retired_and_the_result_is_identical(
        facility_config: FacilityConfig, reference: Any) -> None:
    client = backend_for(facility_config).client()
    try:
        client.wait_for_workers(2, timeout=60)
        victim = sorted(client.scheduler_info(n_workers=-1)["workers"])[0]
        client.run(_break_reads, workers=[victim])
        result = run(faulty.SlowDimuon(0.05), "DY", config=facility_config, client=client,
                     output=False, chunk_size=1000)
        client.wait_for_workers(2, timeout=60)
    finally:
        client.close()
    assert [w["worker"] for w in result.summary["workers_retired"]] == [victim]
    assert differences(reference, result.output) == []
    assert result.summary["skipped"] == []


def test_skipping_more_than_allowed_fails_and_skipping_everything_fails(
        facility_config: FacilityConfig) -> None:
    from tests.test_processing import _broken_dataset

    _broken_dataset(facility_config, "corrupt")
    with pytest.raises(BadInputError, match=r"20,000 of 40,000 events \(50\.0%\) were skipped"):
        run("dimuon", "Broken", config=facility_config, on_bad_input="skip", output=False)
    catalog = load_catalog(facility_config.catalog_path)
    only_bad = Dataset(name="OnlyBad", files=catalog.get("Broken").files[1:])
    save_catalog(catalog.with_dataset(only_bad), facility_config.catalog_path)
    with pytest.raises(BadInputError, match="no events were processed: every input was skipped"):
        run("dimuon", "OnlyBad", config=facility_config, on_bad_input="skip", output=False,
            max_skipped_fraction=1.0)


def test_a_file_skipped_at_preflight_is_counted_everywhere(facility_config: FacilityConfig
                                                           ) -> None:
    from tests.test_processing import _broken_dataset

    _broken_dataset(facility_config, "truncated")
    result = run("dimuon", "Broken", config=facility_config, on_bad_input="skip",
                 max_skipped_fraction=1.0, name="preflight-skip")
    assert result.summary["per_dataset"]["Broken"]["events_skipped"] == 20000
    assert result.summary["events_skipped"] == 20000
    assert result.summary["files"]["skipped"] == 1
    [skipped] = result.summary["skipped"]
    assert (skipped["file"], skipped["stage"], skipped["entries"]) == (
        "Broken/truncated.root", "preflight", "all")
    assert "truncated" in skipped["reason"]
    assert result.output_dir is not None
    ledger = [json.loads(line) for line in (result.output_dir / "ledger.jsonl").read_text()
              .splitlines()]
    assert {"file": "Broken/truncated.root", "state": "skipped", "stage": "preflight",
            "events": 20000} in [{k: e.get(k) for k in ("file", "state", "stage", "events")}
                                 for e in ledger]


def test_a_catalog_that_miscounts_a_file_is_reported(facility_config: FacilityConfig) -> None:
    catalog = load_catalog(facility_config.catalog_path)
    entry = catalog.get("DY").files[0]
    miscounted = Dataset(name="Miscounted", files=[entry.model_copy(update={"events": 25000})])
    save_catalog(catalog.with_dataset(miscounted), facility_config.catalog_path)
    done = _cli(facility_config, "run", "dimuon", "-d", "Miscounted", "--name", "miscounted")
    assert done.returncode == 0, done.stderr
    assert f"catalog differs Miscounted/{entry.name}: the catalog says 25,000 events, the file " \
           "has 20,000" in done.stdout
    summary = json.loads((facility_config.output_path / "miscounted" / "summary.json").read_text())
    assert summary["files"]["entries_differ_from_catalog"] == [
        {"file": f"Miscounted/{entry.name}", "catalog": 25000, "file_has": 20000}]


def test_a_chunk_size_that_is_not_positive_is_refused(facility_config: FacilityConfig,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from facility.cli import main

    with pytest.raises(UsageError, match=r"chunk_size must be a positive number of events, got 0"):
        run("dimuon", "DY", config=facility_config, chunk_size=0)
    with pytest.raises(SystemExit) as exited:
        main(["run", "dimuon", "-d", "DY", "--chunk-size", "-5"])
    assert exited.value.code == 2
    assert "--chunk-size: must be a positive number of events, got -5" in capsys.readouterr().err


def test_runs_started_together_on_a_stopped_cluster_all_succeed(
        facility_config: FacilityConfig) -> None:
    backend_for(facility_config).stop()
    config_file = str(facility_config.home / "facility.yaml")
    procs = [subprocess.Popen([sys.executable, "-m", "facility.cli", "--config", config_file,
                               "run", "dimuon", "-d", "DY", "--name", f"together-{i}"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(4)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output
    for i in range(4):
        summary = json.loads((facility_config.output_path / f"together-{i}" / "summary.json")
                             .read_text())
        assert summary["events"] == 40000
    assert backend_for(facility_config).running() is not None
