"""Batch jobs with real processes: notebooks through papermill, scripts, detached job processes
that outlive their submitter, the per-user queue, cancellation, failure reports, who sees what,
and the Kubernetes DaskJob validated against the operator's CRD and the Kubernetes schemas.

Each test submits as a user of its own (``JUPYTERHUB_USER``), so that the per-user limit of the
test configuration (one running job) is each test's own.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import nbformat
import psutil
import pytest

import facility
from facility.batch import JobAccessError, JobHandle, JobInputError, job, jobs
from facility.batch.base import runner_for
from facility.batch.kubernetes import KubernetesRunner, runner_failure, unwatchable
from facility.batch.model import Job, JobError
from facility.cli import main
from facility.cluster.base import cluster_folder
from facility.cluster.limits import WorkerRequest
from facility.cluster.local import LocalBackend
from facility.config import FacilityConfig
from tests.test_clusters import PEER, peer_account
from tests.test_kubernetes import NOTEBOOK_ENV, crd_schema, kubernetes_config, pod, validate_k8s

pytestmark = pytest.mark.integration
WAIT = 180.0
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def notebook(path: Path, parameters: str | None, *cells: str) -> Path:
    """A notebook file: an optional ``parameters`` cell, then the given code cells."""
    book = nbformat.v4.new_notebook()
    if parameters is not None:
        tagged = nbformat.v4.new_code_cell(parameters)
        tagged.metadata["tags"] = ["parameters"]
        book.cells.append(tagged)
    book.cells += [nbformat.v4.new_code_cell(source) for source in cells]
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.metadata["language_info"] = {"name": "python"}
    nbformat.write(book, path)
    return path


WAIT_FOR_MARKER = """
import os, sys, time
marker = sys.argv[1]
while not os.path.exists(marker):
    time.sleep(0.1)
with open(os.path.join(os.environ["FACILITY_JOB_OUTPUT"], "args.txt"), "w") as out:
    out.write(" ".join(sys.argv[2:]))
"""


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch, facility_config: FacilityConfig) -> Callable[[str], None]:
    """Submit and look as the given user (the hub sets JUPYTERHUB_USER in notebooks)."""
    monkeypatch.setenv("FACILITY_CONFIG", str(facility_config.home / "facility.yaml"))

    def become(user: str) -> None:
        monkeypatch.setenv("JUPYTERHUB_USER", user)

    return become


@pytest.fixture
def marker_script(tmp_path: Path) -> Path:
    script = tmp_path / "wait_for_marker.py"
    script.write_text(WAIT_FOR_MARKER)
    return script


def ended(handle: JobHandle) -> Job:
    record = handle.wait(timeout=WAIT, poll=0.5)
    assert record.state in ("succeeded", "failed", "cancelled"), f"job {record.id} is {record.state}"
    return record


def wait_until(predicate: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.2)


def cli(config: FacilityConfig, *argv: str) -> int:
    return main(["--config", str(config.home / "facility.yaml"), *argv])


def test_a_notebook_runs_with_its_parameters_on_its_own_cluster(
        facility_config: FacilityConfig, as_user: Callable[[str], None], tmp_path: Path) -> None:
    as_user("nb-user")
    path = notebook(tmp_path / "analysis.ipynb", "factor = 1\nlabel = 'default'", (
        "import json, os\n"
        "import facility\n"
        "from facility.batch import output_folder\n"
        "client = facility.connect('interactive-name', workers=3)\n"
        "total = client.submit(sum, [factor, 2]).result()\n"
        "(output_folder() / 'result.json').write_text(json.dumps({\n"
        "    'cluster': client.cluster.name, 'total': total, 'label': label,\n"
        "    'cwd': os.getcwd()}))"))
    handle = facility.submit(path, {"factor": 40, "label": "zpeak"}, workers=1)
    record = ended(handle)
    assert record.state == "succeeded", handle.logs()
    assert record.exit_code == 0
    result = json.loads((record.output_dir / "result.json").read_text())
    assert result == {"cluster": f"nb-user-job-{record.id}", "total": 42, "label": "zpeak",
                      "cwd": str(tmp_path)}
    executed = nbformat.read(record.output_dir / "analysis.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    summary = json.loads((record.output_dir / "job.json").read_text())
    assert summary["state"] == "succeeded"
    assert set(summary["outputs"]) >= {"analysis.ipynb", "job.log", "result.json"}
    assert {p.name for p in handle.outputs()} >= {"analysis.ipynb", "job.json", "job.log", "result.json"}
    cluster = LocalBackend(facility_config, f"nb-user-job-{record.id}")
    assert cluster.running() is None
    assert not cluster_folder(facility_config, cluster.name).exists()


SUBMITTER = """
import sys
import facility
job = facility.submit(sys.argv[1], args=sys.argv[2:], workers=0)
print(job.id, flush=True)
"""


def test_a_job_outlives_the_process_that_submitted_it(
        facility_config: FacilityConfig, as_user: Callable[[str], None], marker_script: Path,
        tmp_path: Path) -> None:
    as_user("script-user")
    marker = tmp_path / "go"
    submitter = subprocess.run([sys.executable, "-c", SUBMITTER, str(marker_script), str(marker),
                                "all", "datasets"], capture_output=True, text=True, timeout=120,
                               env=dict(os.environ), check=True)
    handle = job(int(submitter.stdout.split()[-1]))
    assert handle.state == "running"
    process = psutil.Process(handle.record.handle["pid"])
    assert process.is_running()
    assert process.ppid() != os.getpid()
    assert os.getsid(process.pid) == process.pid  # a session of its own
    marker.touch()
    record = ended(handle)
    assert record.state == "succeeded", handle.logs()
    assert (record.output_dir / "args.txt").read_text() == "all datasets"


def test_cancel_stops_the_job_its_kernel_and_its_cluster(
        facility_config: FacilityConfig, as_user: Callable[[str], None], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    as_user("cancel-user")
    path = notebook(tmp_path / "forever.ipynb", None, (
        "import json, os, time\n"
        "import facility\n"
        "from facility.batch import output_folder\n"
        "client = facility.connect()\n"
        "pids = [os.getpid(), client.run_on_scheduler(os.getpid), *client.run(os.getpid).values()]\n"
        "(output_folder() / 'pids.json').write_text(json.dumps(pids))\n"
        "while True:\n"
        "    time.sleep(0.2)"))
    handle = facility.submit(path, workers=1)
    pids_file = handle.output_dir / "pids.json"
    wait_until(pids_file.exists, "the notebook reported its processes")
    job_process = psutil.Process(handle.record.handle["pid"])
    processes = [job_process, *(psutil.Process(pid) for pid in json.loads(pids_file.read_text()))]
    cluster = LocalBackend(facility_config, f"cancel-user-job-{handle.id}")
    assert cluster.running() is not None

    assert cli(facility_config, "jobs", "cancel", str(handle.id)) == 0
    assert f"job {handle.id}: cancelled (it was running)" in capsys.readouterr().out
    _gone, alive = psutil.wait_procs(processes, timeout=60)
    assert alive == []
    assert handle.state == "cancelled"
    assert handle.record.error == "cancelled by cancel-user"
    assert cluster.running() is None
    assert cli(facility_config, "jobs", "cancel", str(handle.id)) == 0
    assert f"job {handle.id} had already ended: cancelled" in capsys.readouterr().out


def test_a_failing_cell_fails_the_job_and_its_logs_show_the_cell(
        facility_config: FacilityConfig, as_user: Callable[[str], None], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    as_user("failing-user")
    path = notebook(tmp_path / "broken.ipynb", "events = 10", "empty = 0",
                    "rate = events / empty  # the broken line", "print('never reached')")
    handle = facility.submit(path, {"events": 20}, workers=0)
    record = ended(handle)
    assert record.state == "failed"
    assert record.exit_code == 1
    assert record.error == "In [4] raised ZeroDivisionError: division by zero"
    assert cli(facility_config, "jobs", "logs", str(record.id)) == 0
    logs = capsys.readouterr().out
    assert "--- the failing cell, In [4]" in logs
    assert "    rate = events / empty  # the broken line" in logs
    assert "ZeroDivisionError" in logs
    assert "----> 1 rate = events / empty" in logs
    assert "never reached" not in logs
    failure = json.loads((record.output_dir / "job.json").read_text())["failure"]
    assert failure["source"] == "rate = events / empty  # the broken line"
    assert (record.output_dir / "broken.ipynb").exists()  # executed up to the failure


def test_logs_follow_a_running_job_to_its_end(
        facility_config: FacilityConfig, as_user: Callable[[str], None], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    as_user("follow-user")
    script = tmp_path / "talk.py"
    script.write_text("import time\nfor n in range(3):\n"
                      "    print(f'line {n}', flush=True)\n    time.sleep(1)\n")
    handle = facility.submit(script, workers=0)
    assert cli(facility_config, "jobs", "logs", str(handle.id), "--follow") == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("line ")] == \
        ["line 0", "line 1", "line 2"]  # each once, in order
    assert f"job {handle.id}: succeeded" in out


def test_job_records_logs_and_outputs_are_their_users_only(
        facility_config: FacilityConfig, as_user: Callable[[str], None], tmp_path: Path) -> None:
    from facility.batch.store import JobStore

    as_user("private-user")
    script = tmp_path / "write.py"
    script.write_text("from facility.batch import output_folder\n"
                      "(output_folder() / 'result.txt').write_text('42')\n")
    record = ended(facility.submit(script, workers=0))
    assert record.state == "succeeded"
    store = JobStore.for_config(facility_config).path

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    assert (mode(store.parent), mode(store)) == (0o700, 0o600)
    assert mode(record.output_dir) == 0o700
    assert mode(record.output_dir / "result.txt") == 0o600
    assert mode(record.log_path) == 0o600


def test_outputs_of_a_users_server_land_in_its_home_and_jobs_stay_private(
        facility_config: FacilityConfig, as_user: Callable[[str], None],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The hub points a server's output area into its home (FACILITY_OUTPUT_DIR, see
    hub.user_output_dir): runs, jobs and a notebook's outputs are where its file browser looks."""
    from facility.batch import output_folder
    from facility.config import load_config
    from facility.processing.runfolder import RunFolder

    as_user("home-user")
    area = tmp_path / "home" / "facility-output"
    monkeypatch.setenv("FACILITY_OUTPUT_DIR", str(area))
    script = tmp_path / "write.py"
    script.write_text("from facility.batch import output_folder\n"
                      "(output_folder() / 'result.txt').write_text('42')\n")
    handle = facility.submit(script, workers=0)
    record = ended(handle)
    assert record.state == "succeeded", handle.logs()
    assert record.output_dir == area / "home-user" / "jobs" / str(record.id)
    assert (record.output_dir / "result.txt").read_text() == "42"
    assert [oct(p.stat().st_mode & 0o777) for p in (record.output_dir, record.output_dir /
            "result.txt", record.log_path)] == ["0o700", "0o600", "0o600"]
    assert output_folder() == area / "home-user" / "interactive"
    assert RunFolder.for_new_run(load_config(), "zpeak", None, "run").path == area / "zpeak"


def test_bad_input_is_refused_naming_the_culprit(
        facility_config: FacilityConfig, as_user: Callable[[str], None], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    as_user("careless-user")
    path = notebook(tmp_path / "zpeak.ipynb", "dataset = 'DY'\nchunk_size = 5000", "print(dataset)")
    missing = tmp_path / "zpaek.ipynb"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no notebook or script {missing}")):
        facility.submit(missing)
    with pytest.raises(JobInputError, match=r"unknown parameter 'chunksize' \(did you mean "
                                            r"'chunk_size'\?\) for zpeak\.ipynb; its parameters: "
                                            r"dataset, chunk_size"):
        facility.submit(path, {"dataset": "DY", "chunksize": 100})
    bare = notebook(tmp_path / "bare.ipynb", None, "print(1)")
    with pytest.raises(JobInputError, match=r"bare\.ipynb has no cell tagged 'parameters'"):
        facility.submit(bare, {"dataset": "DY"})
    with pytest.raises(JobInputError, match=r"zpeak\.ipynb is a notebook: give it parameters"):
        facility.submit(path, args=["--fast"])
    assert cli(facility_config, "submit", str(path), "-p", "datset", "DY") == 2
    assert "unknown parameter 'datset' (did you mean 'dataset'?)" in capsys.readouterr().err
    assert cli(facility_config, "submit", str(path), "-p", "dataset", "2018-01-01") == 2
    assert "parameter 'dataset': datetime.date(2018, 1, 1) (date) cannot be passed" in \
        capsys.readouterr().err
    assert cli(facility_config, "submit", str(path), "-p", "dataset", "[DY") == 2
    assert "parameter 'dataset': '[DY' is not a YAML value" in capsys.readouterr().err
    assert cli(facility_config, "submit", str(path), "-p", "dataset", "DYY") == 2
    assert "parameter dataset: unknown dataset 'DYY'; the catalog holds: " in capsys.readouterr().err
    with pytest.raises(JobInputError, match=r"parameter dataset: unknown dataset 'Nope'"):
        facility.submit(path, {"dataset": ["DY", "Nope"]})
    assert jobs() == []


def test_a_second_job_waits_for_a_free_slot_then_runs(
        facility_config: FacilityConfig, as_user: Callable[[str], None], marker_script: Path,
        tmp_path: Path) -> None:
    as_user("queue-user")
    marker = tmp_path / "first-may-end"
    first = facility.submit(marker_script, args=[str(marker), "first"], workers=0)
    second = facility.submit(marker_script, args=[str(tmp_path), "second"], workers=0)
    assert (first.state, second.state) == ("running", "queued")
    marker.touch()
    done = ended(second)
    assert done.state == "succeeded", second.logs()
    assert first.refresh().state == "succeeded"
    assert done.started is not None
    assert first.record.finished is not None
    assert done.started >= first.record.finished
    assert (done.output_dir / "args.txt").read_text() == "second"
    assert [j.id for j in jobs()] == [first.id, second.id]


def test_a_jobs_record_is_among_its_outputs_once_it_has_ended(
        facility_config: FacilityConfig, as_user: Callable[[str], None], marker_script: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``job.json`` is written before the store says the job ended, so that ``job.wait()`` then
    ``job.outputs()`` finds it; a job cancelled meanwhile gets the store's record."""
    from facility.batch.job import Outcome, record

    marker = tmp_path / "may-end"
    handles = []
    for name in ("ends", "cancelled"):  # one user each: a user runs one job at a time here
        as_user(f"record-user-{name}")
        handles.append(facility.submit(marker_script, args=[str(marker), name], workers=0))
    wait_until(lambda: all(h.refresh().state != "queued" for h in handles), "both jobs running")
    runner = runner_for(facility_config)
    on_disk_when_ended: dict[int, Any] = {}
    finish = runner.store.finish

    def finish_and_look(job_id: int, *args: Any) -> bool:
        record_file = runner.store.get(job_id).output_dir / "job.json"  # type: ignore[union-attr]
        on_disk_when_ended[job_id] = json.loads(record_file.read_text())["state"]
        return finish(job_id, *args)

    monkeypatch.setattr(runner.store, "finish", finish_and_look)
    first, second = (runner.store.get(h.id) for h in handles)
    assert first is not None
    assert second is not None
    record(runner, first, Outcome("succeeded", 0))
    runner.store.cancel(second.id, "cancelled meanwhile")
    record(runner, second, Outcome("succeeded", 0))
    assert on_disk_when_ended == {first.id: "succeeded", second.id: "succeeded"}
    assert json.loads((first.output_dir / "job.json").read_text())["state"] == "succeeded"
    assert json.loads((second.output_dir / "job.json").read_text())["state"] == "cancelled"
    marker.touch()  # the jobs' own processes end, and leave the store as it is
    assert [ended(h).state for h in handles] == ["succeeded", "cancelled"]


def test_a_job_killed_behind_the_facilitys_back_is_reported_failed(
        facility_config: FacilityConfig, as_user: Callable[[str], None], marker_script: Path,
        tmp_path: Path) -> None:
    as_user("unlucky-user")
    handle = facility.submit(marker_script, args=[str(tmp_path / "never")], workers=0)
    process = psutil.Process(handle.record.handle["pid"])
    os.killpg(process.pid, signal.SIGKILL)
    psutil.wait_procs([process], timeout=30)
    assert handle.state == "failed"
    assert f"the job process (pid {process.pid}) ended without recording how" in str(
        handle.record.error)


# a script that starts a daemon (a session of its own) writing into the job's folder, then
# waits (or fails when told)
WRITER = """
import json, os, subprocess, sys, time
out = os.environ["FACILITY_JOB_OUTPUT"]
keeps_writing = ("import sys, time\\nwhile True:\\n"
                 "    with open(sys.argv[1], 'a') as f: f.write('x')\\n    time.sleep(0.05)")
daemon = subprocess.Popen([sys.executable, "-c", keeps_writing, os.path.join(out, "daemon.txt")],
                          start_new_session=True)
with open(os.path.join(out, "pids.json"), "w") as f:
    json.dump([os.getpid(), daemon.pid], f)
while not os.path.exists(os.path.join(out, "daemon.txt")):
    time.sleep(0.05)
if sys.argv[1] == "fail":  # once the test has found every process
    while not os.path.exists(os.path.join(out, "fail-now")):
        time.sleep(0.05)
    sys.exit(3)
while True:
    time.sleep(0.1)
"""


def folder_contents(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("end", ["sigkill", "cancel", "fail"])
def test_nothing_of_a_job_outlives_it(
        facility_config: FacilityConfig, as_user: Callable[[str], None], tmp_path: Path,
        end: str) -> None:
    """Its daemon in a session of its own too, whether the job process is SIGKILLed, the job
    is cancelled or its script fails: no process of the job is left, its folder stops changing."""
    as_user(f"tree-{end}-user")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    handle = facility.submit(script, args=["fail" if end == "fail" else "wait"], workers=0)
    pids_file = handle.output_dir / "pids.json"
    wait_until(lambda: (handle.output_dir / "daemon.txt").exists(), "the daemon wrote")
    job_process = psutil.Process(handle.record.handle["pid"])
    keeper = psutil.Process(handle.record.handle["keeper"])
    processes = [job_process, keeper, *map(psutil.Process, json.loads(pids_file.read_text()))]
    assert os.getsid(processes[-1].pid) != os.getsid(job_process.pid)  # it left the job's session
    if end == "sigkill":
        job_process.kill()
    elif end == "cancel":
        assert cli(facility_config, "jobs", "cancel", str(handle.id)) == 0
    else:
        (handle.output_dir / "fail-now").touch()
    _gone, alive = psutil.wait_procs(processes, timeout=60)
    assert alive == []
    before = folder_contents(handle.output_dir)
    time.sleep(0.5)  # ten times the daemon's pace
    assert folder_contents(handle.output_dir) == before
    record = ended(handle)
    assert record.state == {"sigkill": "failed", "cancel": "cancelled", "fail": "failed"}[end]
    log = handle.logs()
    if end == "sigkill":
        assert f"the job process (pid {job_process.pid}) was killed by SIGKILL; stopped what it " \
               f"left running: pid" in log
    if end == "fail":
        assert record.error == "writer.py exited with code 3"
        assert "stopped 1 process it left running" in log


def test_the_job_list_fits_100_columns_and_prints_reasons_whole(
        facility_config: FacilityConfig, as_user: Callable[[str], None], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    as_user("listing-user")
    script = tmp_path / "a_script_with_a_rather_long_descriptive_name_for_the_2018_skim.py"
    script.write_text("import sys\nsys.exit(4)\n")
    failed = ended(facility.submit(script, workers=0))
    capsys.readouterr()
    assert cli(facility_config, "jobs", "list") == 0
    listing = capsys.readouterr().out
    reason = f"job {failed.id}: {script.name} exited with code 4"
    assert reason in listing.splitlines()
    assert max(len(line) for line in listing.splitlines() if line != reason) <= 100


def test_users_see_and_cancel_only_their_own_jobs(
        facility_config: FacilityConfig, as_user: Callable[[str], None], marker_script: Path,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    as_user("owner-user")
    marker = tmp_path / "done"
    handle = facility.submit(marker_script, args=[str(marker)], workers=0)
    as_user("other-user")
    assert jobs() == []
    refusal = f"job {handle.id} belongs to user 'owner-user', not to 'other-user'"
    with pytest.raises(JobAccessError, match=refusal):
        job(handle.id)
    for command in ("cancel", "logs", "status"):
        assert cli(facility_config, "jobs", command, str(handle.id)) == 2, command
        assert refusal in capsys.readouterr().err
    assert cli(facility_config, "jobs", "logs", "999999") == 2
    assert "no job 999999" in capsys.readouterr().err
    as_user("owner-user")
    assert handle.state == "running"
    marker.touch()
    assert ended(handle).state == "succeeded"


def as_another_account(config: FacilityConfig, *argv: str) -> tuple[int, str]:
    """``facility ...`` in a forked process that runs as another local account (the facility's
    code is loaded already: that account may not read the project's files); its exit code and
    what it wrote to stderr."""
    import facility.cli

    peer = peer_account()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the forked account)
        os.close(read)
        try:
            os.setgid(peer.pw_gid)
            os.setuid(peer.pw_uid)
            sys.stderr = os.fdopen(write, "w")
            facility.cli._config = lambda _args: config  # type: ignore[assignment]
            code = main(list(argv))
            sys.stderr.flush()
        finally:
            os._exit(locals().get("code", 99))
    os.close(write)
    with os.fdopen(read) as err:
        text = err.read()
    return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), text


def test_another_local_account_is_refused_a_users_job_clearly(
        facility_config: FacilityConfig, as_user: Callable[[str], None],
        marker_script: Path, tmp_path: Path) -> None:
    as_user("private-user")
    marker = tmp_path / "done"
    handle = facility.submit(marker_script, args=[str(marker)], workers=0)
    store = runner_for(facility_config).store.path
    for action in ("status", "logs", "cancel"):
        code, err = as_another_account(facility_config, "jobs", action, str(handle.id))
        assert code == 2, err
        assert f"job {handle.id}: the batch jobs in {store.parent} belong to local account " \
               f"'{pwd.getpwuid(os.getuid()).pw_name}': account '{PEER}' may not see, cancel " \
               "or read them" in err
        assert "Traceback" not in err
    assert handle.state == "running"
    marker.touch()
    assert ended(handle).state == "succeeded"


def test_the_batch_notebook_submits_the_zpeak_job_and_collects_its_outputs(
        facility_config: FacilityConfig, as_user: Callable[[str], None], tmp_path: Path) -> None:
    as_user("example-user")
    subprocess.run([sys.executable, "-m", "papermill", str(NOTEBOOKS / "batch.ipynb"),
                    str(tmp_path / "batch.ipynb"), "--cwd", str(NOTEBOOKS), "--no-progress-bar"],
                   check=True, capture_output=True, timeout=600, env=dict(os.environ))
    [handle] = jobs()
    record = handle.record
    assert record.state == "succeeded"
    assert record.path == str(NOTEBOOKS / "zpeak_job.ipynb")
    assert {p.name for p in handle.outputs()} >= {
        "zpeak_job.ipynb", "histograms.root", "plot.png", "summary.json", "job.json", "job.log"}
    executed = nbformat.read(tmp_path / "batch.ipynb", as_version=4)
    printed = "".join(output.get("text", "") for cell in executed.cells
                      for output in cell.get("outputs", []))
    found = re.search(r"Z peak fitted at ([\d.]+) GeV", printed)
    assert found, printed
    assert abs(float(found.group(1)) - 91.19) < 1.0


# -- Kubernetes: the DaskJob, rendered and validated ---------------------------------------------


@pytest.fixture
def k8s_config(tmp_path: Path) -> FacilityConfig:
    return kubernetes_config(tmp_path, """
batch:
  kubernetes:
    service_account: facility-user
    cpu: 2
    memory: 6GiB
    volumes: [{name: home, persistentVolumeClaim: {claimName: "claim-{username}"}}]
    volume_mounts: [{name: home, mountPath: /home/jovyan}]
""")


def daskjob_manifests(config: FacilityConfig, workers: int) -> dict[str, dict[str, Any]]:
    request = WorkerRequest(workers, workers, threads=2, memory=8 * 2**30) if workers else None
    record = Job(id=7, user="alice", kind="notebook", path="/home/jovyan/zpeak_job.ipynb",
                 parameters={"dataset": "DY"}, args=[], request=request, runner="kubernetes",
                 name="zpeak", state="running", submitted=time.time(),
                 output="/home/jovyan/output/alice/jobs/7")
    token = config.home / "bt"
    token.write_text("eyJ.token")
    environ = {**NOTEBOOK_ENV, "BEARER_TOKEN_FILE": str(token), "X509_USER_PROXY": "/nonexistent"}
    manifests = KubernetesRunner(config).manifests(record, environ=environ)
    return {m["kind"] + ("/credentials" if m["metadata"]["name"].endswith("-credentials") else ""): m
            for m in manifests}


@pytest.mark.parametrize("workers", [3, 0])
def test_the_daskjob_validates_against_the_crd_and_kubernetes_schemas(
        k8s_config: FacilityConfig, workers: int) -> None:
    objects = daskjob_manifests(k8s_config, workers)
    assert list(objects) == ["Secret", "Secret/credentials", "DaskJob"]
    daskjob = objects["DaskJob"]
    jsonschema.validate(daskjob, crd_schema("DaskJob"))
    for secret in ("Secret", "Secret/credentials"):
        validate_k8s(objects[secret])
    validate_k8s(pod(daskjob["spec"]["job"]["spec"], "alice-job-7-runner"))
    cluster = daskjob["spec"]["cluster"]["spec"]
    validate_k8s(pod(cluster["scheduler"]["spec"], "scheduler"))
    validate_k8s(pod(cluster["worker"]["spec"], "worker"))
    assert cluster["worker"]["replicas"] == workers


def test_the_job_pod_runs_the_job_in_the_user_image_with_the_users_credentials(
        k8s_config: FacilityConfig) -> None:
    daskjob = daskjob_manifests(k8s_config, 3)["DaskJob"]
    assert daskjob["metadata"]["name"] == "alice-job-7"
    assert daskjob["metadata"]["namespace"] == "analysis"
    assert daskjob["metadata"]["labels"] == {"facility.dev/user": "alice", "facility.dev/job": "7"}
    job_pod = daskjob["spec"]["job"]["spec"]
    assert job_pod["serviceAccountName"] == "facility-user"
    assert job_pod["restartPolicy"] == "Never"
    [container] = job_pod["containers"]
    assert container["image"] == NOTEBOOK_ENV["JUPYTER_IMAGE_SPEC"]
    assert container["args"] == ["python", "-m", "facility.batch.job", "7"]
    assert container["resources"] == {"requests": {"cpu": "2.0", "memory": str(6 * 2**30)},
                                      "limits": {"memory": str(6 * 2**30)}}
    assert "readinessProbe" not in container
    assert "ports" not in container
    env = {e["name"]: e for e in container["env"]}
    assert env["JUPYTERHUB_USER"]["value"] == "alice"
    assert env["DASK_SCHEDULER_ADDRESS"]["value"] == "tls://alice-job-7-scheduler.analysis:8786"
    assert "JUPYTERHUB_API_TOKEN" not in env
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[str(cluster_folder(k8s_config, "alice-job-7"))]["name"] == "tls"
    assert mounts[str(k8s_config.home / "bt")]["subPath"] == "BEARER_TOKEN_FILE"
    assert mounts["/home/jovyan"]["name"] == "home"
    assert {"name": "home", "persistentVolumeClaim": {"claimName": "claim-alice"}} in job_pod["volumes"]
    workers = daskjob["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]
    assert workers["image"] == container["image"]
    assert workers["resources"]["limits"] == {"cpu": "2", "memory": str(8 * 2**30)}


def test_the_runner_follows_the_cluster_backend(k8s_config: FacilityConfig,
                                                facility_config: FacilityConfig) -> None:
    assert runner_for(k8s_config).runner_name == "kubernetes"
    assert runner_for(facility_config).runner_name == "local"


def test_stopping_the_facility_cancels_every_users_jobs(
        facility_config: FacilityConfig, as_user: Callable[[str], None], marker_script: Path,
        tmp_path: Path) -> None:
    as_user("stopping-user")
    running = facility.submit(marker_script, args=[str(tmp_path / "never")], workers=0)
    queued = facility.submit(marker_script, args=[str(tmp_path / "never")], workers=0)
    wait_until(lambda: running.record.handle, "the first job recorded its process")
    process = psutil.Process(running.record.handle["pid"])

    cancelled = runner_for(facility_config).cancel_all("the facility was stopped")
    assert [j.id for j in cancelled] == [queued.id, running.id]
    _gone, alive = psutil.wait_procs([process], timeout=60)
    assert alive == []
    assert (running.state, queued.state) == ("cancelled", "cancelled")
    assert running.record.error == "the facility was stopped"
    assert runner_for(facility_config).cancel_all("again") == []


def test_an_adaptive_job_gets_an_autoscaler_for_its_cluster(k8s_config: FacilityConfig) -> None:
    objects = daskjob_manifests(k8s_config, 3)
    assert "DaskAutoscaler" not in objects  # a fixed size
    request = WorkerRequest(1, 8, threads=2, memory=2**30)
    record = Job(id=8, user="alice", kind="script", path="/home/jovyan/skim.py", parameters={},
                 args=[], request=request, runner="kubernetes", name="skim", state="running",
                 submitted=time.time(), output="/home/jovyan/output/alice/jobs/8")
    manifests = KubernetesRunner(k8s_config).manifests(record, environ=NOTEBOOK_ENV)
    [autoscaler] = [m for m in manifests if m["kind"] == "DaskAutoscaler"]
    jsonschema.validate(autoscaler, crd_schema("DaskAutoscaler"))
    assert autoscaler["spec"] == {"cluster": "alice-job-8", "minimum": 1, "maximum": 8}


def test_kubernetes_jobs_need_a_volume_for_their_state(k8s_config: FacilityConfig, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    k8s_config.batch.kubernetes.volumes = []
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    script = tmp_path / "skim.py"
    script.write_text("print(1)")
    with pytest.raises(JobError, match=r"batch\.kubernetes\.volumes is empty: a job pod must mount"):
        KubernetesRunner(k8s_config).submit(script)
    assert KubernetesRunner(k8s_config).store.jobs() == []


def runner_pod(reason: str | None, phase: str = "Pending") -> dict[str, Any]:
    waiting = {"state": {"waiting": {"reason": reason, "message": "pull access denied"}}} if reason else {}
    return {"metadata": {"name": "alice-job-7-runner"},
            "status": {"phase": phase, "containerStatuses": [waiting] if waiting else []}}


def test_a_job_pod_that_can_never_start_fails_the_job_with_the_reason() -> None:
    assert runner_failure(runner_pod("ImagePullBackOff"), [], 5, 900) == \
        "the job pod cannot start: ImagePullBackOff: pull access denied"
    assert runner_failure(runner_pod(None), [], 5, 900) is None  # waiting for a node, for now
    unschedulable = [{"involvedObject": {"name": "alice-job-7-runner"}, "type": "Warning",
                      "reason": "FailedScheduling", "message": "0/3 nodes are available"}]
    late = runner_failure(runner_pod(None), unschedulable, 901, 900)
    assert late is not None
    assert late.startswith("the job pod is still pending after 901 s")
    assert "0/3 nodes are available" in late
    refused = [{"reason": "FailedCreate", "message": "exceeded quota: facility-user"}]
    assert runner_failure(None, refused, 5, 900) == \
        "the job pod could not be created: exceeded quota: facility-user"
    assert runner_failure(runner_pod(None, "Running"), [], 5000, 900) is None


def test_a_job_whose_pod_may_not_be_looked_at_fails_once_patience_is_out() -> None:
    why = 'pods "alice-job-7-runner" is forbidden'
    assert unwatchable(403, why, "alice-job-7-runner", "facility-alice", 5, 900) is None
    late = unwatchable(403, why, "alice-job-7-runner", "facility-alice", 901, 900)
    assert late is not None
    assert why in late
    assert "get and list on pods and events in namespace facility-alice" in late
    assert unwatchable(503, "unavailable", "alice-job-7-runner", "facility-alice", 5000, 900) is None


# -- the command line of batch jobs ------------------------------------------------------------


def test_script_arguments_after_the_double_dash_reach_the_script() -> None:
    from facility.cli import parse

    args = parse(["submit", "skim.py", "--workers", "2", "--", "--year", "2018", "--out", "s.root"])
    assert (args.path, args.workers, args.args) == ("skim.py", 2, ["--year", "2018", "--out", "s.root"])
    plain = parse(["submit", "skim.py", "2018"])
    assert plain.args == ["2018"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--threads", "0"], "argument --threads: 0 is less than 1"),
    (["--workers", "-1"], "argument --workers: -1 is less than 0"),
    (["--gpus", "two"], "argument --gpus: 'two' is not a whole number"),
])
def test_impossible_cluster_sizes_are_refused_at_submit(argv: list[str], message: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["submit", "skim.py", *argv])
    assert refused.value.code == 2
    assert message in capsys.readouterr().err


def test_more_minimum_than_maximum_workers_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "skim.py", "--min-workers", "3", "--max-workers", "1"]) == 2
    assert "--min-workers 3 is more than --max-workers 1" in capsys.readouterr().err


def test_requests_read_as_english() -> None:
    assert WorkerRequest(1, 1, threads=1, memory=2**30).describe() == "1 worker of 1 thread, 1.00 GiB"
    assert WorkerRequest(2, 8, threads=4, memory=2**30, gpus=1).describe() == \
        "2..8 workers of 4 threads, 1.00 GiB, 1 GPU"


def test_the_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    from facility import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"facility {__version__}"


def test_the_help_describes_every_command_and_shows_examples(
        capsys: pytest.CaptureFixture[str]) -> None:
    from facility.cli import parse, parser

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text
    assert "examples:" in text
    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    described = {c.dest: c.help for c in commands._choices_actions}
    assert set(described) == set(commands.choices)
    assert all(described.values())
    examples = [line.strip().split("  ")[0].split()[1:] for line in
                text.split("examples:")[1].splitlines() if line.strip().startswith("facility ")]
    assert len(examples) >= 5
    for argv in examples:  # each example is a command line the parser takes
        assert parse(argv).command == argv[0]
