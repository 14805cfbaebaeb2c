"""``facility chaos``: an operator's check that a running facility loses nothing when parts die.

It runs one analysis N times as a user would (``facility run`` in a process of its own) and, at
a random moment of each run, SIGKILLs one part of the facility:

========== ===========================================================================
worker     one Dask worker process (its nanny starts a new one)
workers    every worker process at once
server     the nearest region's data server (the run must read the other region)
client     the ``facility run`` process itself, then ``facility run --resume``
scheduler  the Dask scheduler (the cluster process), then the cluster is started again
           and the run resumed
========== ===========================================================================

Every result is compared bin by bin with a fault-free run of the same analysis. What was
killed is started again before the next run. The last line says how many runs gave identical
results and how many events were lost or counted twice.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cloudpickle

from facility.cluster.base import backend_for
from facility.cluster.local import LocalBackend
from facility.config import FacilityConfig
from facility.data.catalog import load_catalog
from facility.data.servers import data_server, served_regions
from facility.embedded.services import Supervisor
from facility.errors import UsageError

FAULTS = ("worker", "workers", "server", "client", "scheduler")
RUN_TIMEOUT = 600.0
MISSED_TRIES = 3


@dataclass
class Outcome:
    """One run of the analysis: how it ended and what it produced."""

    exit_code: int
    folder: Path
    output: str = ""
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return (self.folder / "COMPLETE").exists()

    def summary(self) -> dict[str, Any]:
        return json.loads((self.folder / "summary.json").read_text())

    def accumulator(self) -> Any:
        return cloudpickle.loads((self.folder / "checkpoint.pkl").read_bytes())["accumulator"]


@dataclass
class Verdict:
    """A chaos run compared with the fault-free reference."""

    index: int
    fault: str
    what: str
    identical: bool
    lost: int = 0
    doubled: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)  # of the run, when it completed


class Chaos:
    """Runs the analysis under faults against the embedded facility described by ``config``."""

    def __init__(self, config: FacilityConfig, config_file: Path | None, processor: str,
                 datasets: list[str], chunk_size: int | None, seed: int | None,
                 report: Callable[[str], None]) -> None:
        self.config, self.config_file = config, config_file
        self.processor, self.datasets = processor, datasets
        self.chunk_size = chunk_size or self._default_chunk_size()
        self.random = random.Random(seed)
        self.report = report
        self.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        self.supervisor = Supervisor(config.state_path)
        backend = backend_for(config)
        if not isinstance(backend, LocalBackend):
            raise UsageError("facility chaos kills processes of the embedded facility: it needs "
                             f"cluster.backend local, not {backend.backend_name}")
        self.backend = backend
        self.reference: Outcome | None = None
        self.reference_seconds = 1.0

    def _default_chunk_size(self) -> int:
        """About 40 chunks over the datasets: enough for a fault to land between two."""
        catalog = load_catalog(self.config.catalog_path)
        events = sum(catalog.get(name).events for name in self.datasets)
        return max(1000, events // 40)

    # -- running the analysis as a user would --------------------------------------------------

    def _command(self, *arguments: str) -> list[str]:
        config = ["--config", str(self.config_file)] if self.config_file else []
        return [sys.executable, "-m", "facility.cli", *config, "run", *arguments]

    def _start(self, name: str, resume: bool = False) -> subprocess.Popen[str]:
        if resume:
            arguments = ["--resume", name]
        else:
            arguments = [self.processor, *(f"-d{d}" for d in self.datasets), "--chunk-size",
                         str(self.chunk_size), "--name", name]
        return subprocess.Popen(self._command(*arguments), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=Path.cwd(),
                                env={**os.environ, "COLUMNS": "200"})

    def _wait(self, proc: subprocess.Popen[str], name: str, started: float) -> Outcome:
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        return Outcome(proc.returncode, self.config.output_path / name, output or "",
                       time.monotonic() - started)

    def run_reference(self) -> Outcome:
        name = f"chaos-{self.stamp}-reference"
        started = time.monotonic()
        outcome = self._wait(self._start(name), name, started)
        if outcome.exit_code != 0 or not outcome.complete:
            raise UsageError(f"the fault-free run failed (exit {outcome.exit_code}); chaos needs a "
                             f"working facility:\n{outcome.output[-3000:]}")
        self.reference = outcome
        self.reference_seconds = max(float(outcome.summary()["wall_seconds"]), 0.5)
        return outcome

    # -- faults --------------------------------------------------------------------------------

    def _workers(self) -> list[int]:
        client = self.backend.client()
        try:
            return sorted(client.run(os.getpid).values())
        finally:
            client.close()

    def _kill(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue

    def _nearest_server(self) -> str:
        regions = sorted(served_regions(self.config), key=lambda r: r.distance)
        if len(regions) < 2:
            raise UsageError("the server fault needs two served regions: one to kill, one to read")
        return regions[0].name

    def _inject(self, fault: str, run: subprocess.Popen[str]) -> str:
        if fault == "worker":
            victim = self.random.choice(self._workers())
            self._kill([victim])
            return f"killed worker pid {victim}"
        if fault == "workers":
            victims = self._workers()
            self._kill(victims)
            return f"killed all {len(victims)} workers"
        if fault == "server":
            region = self._nearest_server()
            proc = self.supervisor.process(f"xrootd-{region}")
            self._kill([proc.pid] if proc else [])
            return f"killed the data server of region {region}"
        if fault == "client":
            self._kill([run.pid])
            return "killed the client"
        proc = self.supervisor.process(self.backend.service_name)
        self._kill([proc.pid] if proc else [])
        return "killed the scheduler"

    def _restore(self) -> None:
        """Start again whatever a fault stopped: data servers, the cluster, its workers."""
        for region in served_regions(self.config):
            self.supervisor.start(data_server(self.config, region))
        self.backend.start()
        client = self.backend.client()
        try:
            self.backend.wait_for_workers(client, max(1, self.config.cluster.min_workers))
        finally:
            client.close()

    # -- one chaos run -------------------------------------------------------------------------

    def _started(self, folder: Path, proc: subprocess.Popen[str]) -> bool:
        """Wait until the run has planned its first file (its journal says so)."""
        journal = folder / "journal.jsonl"
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.stat().st_size > 0:
                return True
            time.sleep(0.02)
        return False

    def _attempt(self, name: str, fault: str, fraction: float) -> tuple[Outcome, str] | None:
        """One run with the fault injected ``fraction`` of the way in; None if it finished first."""
        started = time.monotonic()
        proc = self._start(name)
        folder = self.config.output_path / name
        if not self._started(folder, proc):
            return self._wait(proc, name, started), "no fault: the run ended before planning"
        moment = fraction * self.reference_seconds
        time.sleep(moment)
        if proc.poll() is not None or '"settled"' in _text(folder / "journal.jsonl"):
            self._wait(proc, name, started)  # every chunk was in: the fault would miss the run
            shutil.rmtree(folder, ignore_errors=True)
            return None
        what = f"{self._inject(fault, proc)} at {moment:.1f} s"
        outcome = self._wait(proc, name, started)
        if fault == "server" and outcome.complete:
            unhealthy = outcome.summary()["endpoints_unhealthy"]
            what += (f"; the run read on elsewhere ({', '.join(unhealthy)} unhealthy)" if unhealthy
                     else "; the run had already read what it needed from it")
        if fault in ("client", "scheduler"):
            if fault == "scheduler":
                what += f" (the run exited {outcome.exit_code})"
            self._restore()
            outcome = self._wait(self._start(name, resume=True), name, started)
            if outcome.complete:
                what += f", resumed: {outcome.summary()['chunks']['resumed']} chunks from the journal"
        return outcome, what

    def run_one(self, index: int, fault: str) -> Verdict:
        name = f"chaos-{self.stamp}-{index:03d}-{fault}"
        fraction = self.random.uniform(0.1, 0.7)
        for _ in range(MISSED_TRIES):
            attempted = self._attempt(name, fault, fraction)
            self._restore()
            if attempted is not None:
                return self._verdict(index, fault, *attempted)
            fraction /= 3  # the run was faster than the reference: strike earlier
        return Verdict(index, fault, "every try ended before the fault", False,
                       problems=["the runs were too short to inject a fault into; use a smaller "
                                 "--chunk-size or a larger dataset"])

    def _verdict(self, index: int, fault: str, outcome: Outcome, what: str) -> Verdict:
        assert self.reference is not None
        if outcome.exit_code != 0 or not outcome.complete:
            last = outcome.output.strip().splitlines()[-6:]
            return Verdict(index, fault, what, False, seconds=outcome.seconds,
                           problems=[f"the run ended with exit code {outcome.exit_code} and no "
                                     "complete result", *last])
        from facility.processing.compare import differences, total_entries

        expected, actual = self.reference.accumulator(), outcome.accumulator()
        problems = differences(expected, actual)
        want, got = self.reference.summary()["events"], outcome.summary()["events"]
        surplus = total_entries(actual) - total_entries(expected)
        verdict = Verdict(index, fault, what, not problems and want == got,
                          lost=max(0, want - got), doubled=max(0, got - want), problems=problems,
                          seconds=outcome.seconds, summary=outcome.summary())
        if surplus > 0 and not verdict.doubled:
            verdict.problems.append(f"histograms hold {surplus:g} more entries than the reference")
        if verdict.identical:
            shutil.rmtree(outcome.folder, ignore_errors=True)
        return verdict


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def faults_for(runs: int, chosen: list[str], rng: random.Random) -> list[str]:
    """Every chosen fault in turn, in a shuffled order, so ten runs cover each of five twice."""
    order = list(chosen)
    rng.shuffle(order)
    return [order[i % len(order)] for i in range(runs)]


def run_chaos(chaos: Chaos, runs: int, faults: list[str]) -> list[Verdict]:
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise UsageError(f"unknown fault {', '.join(sorted(unknown))}; faults: {', '.join(FAULTS)}")
    chaos._restore()
    reference = chaos.run_reference()
    chaos.report(f"reference: {reference.summary()['events']:,} events in "
                 f"{reference.summary()['chunks']['total']} chunks of {chaos.chunk_size:,}, "
                 f"{chaos.reference_seconds:.1f} s, no fault")
    verdicts = []
    for index, fault in enumerate(faults_for(runs, faults, chaos.random), start=1):
        verdict = chaos.run_one(index, fault)
        verdicts.append(verdict)
        chaos.report(describe(verdict, runs))
    shutil.rmtree(reference.folder, ignore_errors=True)
    return verdicts


def describe(verdict: Verdict, runs: int) -> str:
    state = "identical" if verdict.identical else "DIFFERENT"
    line = (f"run {verdict.index:>3}/{runs}  {verdict.fault:<9}  {state:<9}  {verdict.what}; "
            f"{verdict.seconds:.1f} s")
    return "\n".join([line, *(f"      {problem}" for problem in verdict.problems[:8])])


def final_line(verdicts: list[Verdict]) -> str:
    identical = sum(v.identical for v in verdicts)
    return (f"chaos: {identical}/{len(verdicts)} identical, {sum(v.lost for v in verdicts)} lost, "
            f"{sum(v.doubled for v in verdicts)} double-counted")
