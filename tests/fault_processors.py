"""Processors that misbehave on purpose, for the fault tests.

They live in a module of their own, outside the facility, as a user's processor would: the
facility ships them to the workers by value.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import awkward as ak
import hist
import uproot

from facility.processing.processors.dimuon import DimuonProcessor


class SlowDimuon(DimuonProcessor):
    """Takes long enough per chunk for a fault to land while chunks are in flight."""

    def __init__(self, delay: float = 0.1) -> None:
        super().__init__()
        self.delay = delay

    def process(self, events: Any) -> dict[str, Any]:
        time.sleep(self.delay)
        return super().process(events)


class CorrectionsTypo(DimuonProcessor):
    """Opens a corrections file whose name is mistyped: an error of the user's code that is
    raised inside uproot."""

    def __init__(self, corrections: str = "/nonexistent/muon_correctoins.root") -> None:
        super().__init__()
        self.corrections = corrections

    def process(self, events: Any) -> dict[str, Any]:
        with uproot.open(self.corrections) as table:  # the line the error must point at
            table.keys()
        return super().process(events)


class KillsItsWorker(DimuonProcessor):
    """One chunk (the first of its file) ends the worker process running it, every time."""

    def process(self, events: Any) -> dict[str, Any]:
        if events.metadata["entrystart"] == 0 and events.metadata["filename"].endswith("0.root"):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().process(events)


class DiesAfterProcessing(DimuonProcessor):
    """The run's own process dies after every chunk is merged, before its outputs are written,
    once (a marker file, named by $DIES_AFTER_PROCESSING_MARKER, records the first death)."""

    def __init__(self, marker: str | None = None) -> None:
        super().__init__()
        self.marker = marker or os.environ["DIES_AFTER_PROCESSING_MARKER"]

    def postprocess(self, accumulator: dict[str, Any]) -> dict[str, Any]:
        marker = Path(self.marker)
        if not marker.exists():
            marker.write_text("died once")
            os.kill(os.getpid(), signal.SIGKILL)
        return accumulator


STORAGES = {"int64": hist.storage.Int64, "double": hist.storage.Double,
            "weight": hist.storage.Weight, "mean": hist.storage.Mean,
            "weighted_mean": hist.storage.WeightedMean, "atomic_int64": hist.storage.AtomicInt64,
            "unlimited": hist.storage.Unlimited}


class EveryStorage(DimuonProcessor):
    """The muon multiplicity in a histogram of every storage type hist offers."""

    def process(self, events: Any) -> dict[str, Any]:
        n_muons = ak.to_numpy(ak.num(events.Muon))
        out: dict[str, Any] = {}
        for name, storage in STORAGES.items():
            h = hist.Hist(hist.axis.Integer(0, 8, name="n", label="muons"), storage=storage())
            if name in ("mean", "weighted_mean"):
                h.fill(n=n_muons, sample=n_muons * 2.0)
            else:
                h.fill(n=n_muons)
            out[name] = h
        out["four_axes"] = hist.Hist(*(hist.axis.Regular(2, 0, 8, name=a) for a in "wxyz"))
        out["four_axes"].fill(n_muons, n_muons, n_muons, n_muons)
        return out

    def summarize(self, result: dict[str, Any]) -> dict[str, Any]:
        return {}
