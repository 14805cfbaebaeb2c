"""A run's folder: its journal while it runs, its outputs once it is complete.

The folder exists from the run's first moment (``run.json``, the journal, checkpoints), so a
run interrupted at any point can be resumed by name. Outputs are first written into a staging
folder inside it, then moved into place, and only then is the ``COMPLETE`` marker written: a
folder without the marker is never read as a result, whatever files it holds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from facility.config import FacilityConfig
from facility.errors import UsageError
from facility.processing.journal import (
    CHECKPOINT_FILE,
    JOURNAL_FILE,
    PROCESSOR_FILE,
    SPEC_FILE,
    now,
    write_atomically,
)
from facility.processing.output import HIST_FILE, LEDGER_FILE, PLOT_FILE, SUMMARY_FILE

COMPLETE_MARKER = "COMPLETE"
STAGING = ".outputs.incomplete"
OWN_FILES = (COMPLETE_MARKER, HIST_FILE, PLOT_FILE, SUMMARY_FILE, LEDGER_FILE, JOURNAL_FILE,
             CHECKPOINT_FILE, SPEC_FILE, PROCESSOR_FILE)


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def complete(self) -> bool:
        return (self.path / COMPLETE_MARKER).exists()

    @property
    def started(self) -> bool:
        return (self.path / SPEC_FILE).exists()

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @classmethod
    def for_new_run(cls, config: FacilityConfig, name: str | None, output: Path | None,
                    default_name: str) -> RunFolder:
        """The folder of a new run: an explicit path, else ``name`` in the output area.

        An explicit path that holds a complete run is reused (the old run's files are replaced);
        a named run that exists is refused, and an interrupted run is never overwritten.
        """
        if name is not None and not _plain_name(name):
            raise UsageError(f"run name {name!r} must be a plain folder name (letters, digits, "
                             "'.', '_', '-')")
        folder = cls(output if output is not None else config.output_path / (name or default_name))
        if folder.started and not folder.complete:
            raise UsageError(f"{folder.path} holds an interrupted run; resume it with "
                             f"`facility run --resume {folder.reference(config)}` (Python: "
                             "resume=...), or remove the folder to start afresh")
        if folder.complete and output is None:
            raise UsageError(f"a run named {folder.name!r} already exists at {folder.path}; choose "
                             f"another name, or `--resume {folder.name}` to read its result")
        if folder.complete:
            folder.clear()
        return folder

    @classmethod
    def for_resume(cls, config: FacilityConfig, reference: str | Path) -> RunFolder:
        """A run to resume: its name in the output area, or the path of its folder."""
        given = Path(reference).expanduser()
        candidates = [given] if given.is_absolute() else [config.output_path / given, given]
        for candidate in candidates:
            if (candidate / SPEC_FILE).exists():
                return cls(candidate.resolve())
        interrupted = sorted(p.name for p in config.output_path.glob(f"*/{SPEC_FILE}")
                             if not (p.parent / COMPLETE_MARKER).exists())[-5:] \
            if config.output_path.exists() else []
        hint = f"; interrupted runs: {', '.join(interrupted)}" if interrupted else ""
        raise UsageError(f"no run {str(reference)!r} to resume: no {SPEC_FILE} in "
                         f"{' or '.join(str(c) for c in candidates)}{hint}")

    def reference(self, config: FacilityConfig) -> str:
        """How to name this run on the command line: its name in the output area, else its path."""
        return self.name if self.path.parent == config.output_path else str(self.path)

    def clear(self) -> None:
        """Remove this folder's run files (marker first); other files in it are left alone."""
        for name in OWN_FILES:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / STAGING, ignore_errors=True)

    def publish(self, write: Callable[[Path], None]) -> None:
        """``write(staging)`` the outputs, move them into place, then mark the run complete."""
        (self.path / COMPLETE_MARKER).unlink(missing_ok=True)
        staging = self.path / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write(staging)
        for written in sorted(staging.iterdir()):
            written.replace(self.path / written.name)
        staging.rmdir()
        write_atomically(self.path / COMPLETE_MARKER,
                         json.dumps({"completed": now()}).encode())


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and all(
        ch.isalnum() or ch in "._-+" for ch in name)
