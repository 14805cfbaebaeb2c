"""The job store: one SQLite file under the facility's state folder.

Every change of state is one transaction that names the state it expects (``... WHERE
state='running'``), so a job that was cancelled while it finished, or finished while it was
reaped, keeps the first outcome and is never counted twice. Taking a queued job and counting
the user's running ones happen in one ``BEGIN IMMEDIATE`` transaction: two processes that free
a slot at the same moment cannot start more jobs than the user's limit.
"""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from facility.batch.model import ACTIVE, Job, JobAccessError, JobState, job_from_row
from facility.cluster.limits import WorkerRequest
from facility.config import FacilityConfig

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    parameters TEXT NOT NULL,
    args TEXT NOT NULL,
    request TEXT NOT NULL,
    runner TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    submitted REAL NOT NULL,
    output TEXT NOT NULL DEFAULT '',
    started REAL,
    finished REAL,
    handle TEXT,
    exit_code INTEGER,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs (user, state);
"""
BUSY_TIMEOUT = 60.0


def batch_path(config: FacilityConfig) -> Path:
    return config.state_path / "batch"


class JobStore:
    """Jobs of every user of this facility; callers filter by user."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)  # users' jobs, parameters and reasons: not for other accounts
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            path.chmod(0o600)
        except PermissionError:
            raise JobAccessError(self._not_ours()) from None
        with self._transaction() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def _not_ours(self) -> str:
        """Another local account's store: whose it is, rather than a permission traceback."""
        for folder in (self.path.parent, *self.path.parent.parents):
            try:
                owner = pwd.getpwuid(folder.stat().st_uid).pw_name
                break
            except OSError:
                continue
        me = pwd.getpwuid(os.getuid()).pw_name
        return (f"the batch jobs in {self.path.parent} belong to local account {owner!r}: account "
                f"{me!r} may not see, cancel or read them")

    @classmethod
    def for_config(cls, config: FacilityConfig) -> JobStore:
        return cls(batch_path(config) / "jobs.sqlite")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: the write lock from the first statement, so what a transaction
        reads is still true when it writes."""
        with closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def adding(self, user: str, kind: str, path: str, parameters: dict[str, Any], args: list[str],
               request: WorkerRequest | None, runner: str, name: str,
               output_for: Callable[[int], Path]) -> Iterator[int]:
        """A new queued job; its id is handed to the caller, who prepares the job's files before
        the row is committed (an exception leaves no job behind)."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO jobs (user, kind, path, parameters, args, request, runner, name, "
                "state, submitted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?)",
                (user, kind, path, json.dumps(parameters), json.dumps(args),
                 json.dumps(asdict(request) if request else None), runner, name, time.time()))
            job_id = int(cursor.lastrowid or 0)
            db.execute("UPDATE jobs SET output = ? WHERE id = ?", (str(output_for(job_id)), job_id))
            yield job_id

    def get(self, job_id: int) -> Job | None:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_row(dict(row)) if row else None

    def jobs(self, user: str | None = None, states: tuple[JobState, ...] | None = None) -> list[Job]:
        """Jobs in submission order, of one user or of all."""
        query, values = "SELECT * FROM jobs WHERE 1=1", []
        if user is not None:
            query, values = query + " AND user = ?", [user]
        if states:
            query += f" AND state IN ({', '.join('?' * len(states))})"
            values += list(states)
        with self._transaction() as db:
            rows = db.execute(query + " ORDER BY id", values).fetchall()
        return [job_from_row(dict(row)) for row in rows]

    def claim_next(self, user: str, limit: int) -> Job | None:
        """The user's oldest queued job, now ``running``, if fewer than ``limit`` run."""
        with self._transaction() as db:
            running = db.execute("SELECT COUNT(*) FROM jobs WHERE user = ? AND state = 'running'",
                                 (user,)).fetchone()[0]
            if running >= limit:
                return None
            row = db.execute("SELECT id FROM jobs WHERE user = ? AND state = 'queued' "
                             "ORDER BY id LIMIT 1", (user,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', started = ? WHERE id = ?",
                       (time.time(), row["id"]))
            claimed = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return job_from_row(dict(claimed))

    def set_handle(self, job_id: int, handle: dict[str, Any] | None) -> bool:
        """Where the running job can be found (a pid, a DaskJob), unless known already; False
        if the job no longer runs (cancelled before it started)."""
        with self._transaction() as db:
            if handle is not None:
                db.execute("UPDATE jobs SET handle = ? WHERE id = ? AND state = 'running' "
                           "AND handle IS NULL", (json.dumps(handle), job_id))
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["state"] == "running")

    def finish(self, job_id: int, state: JobState, exit_code: int | None = None,
               error: str | None = None, finished: float | None = None) -> bool:
        """Record how a running job ended (at ``finished``, default now); False if it had
        already ended (e.g. cancelled)."""
        ended = time.time() if finished is None else finished
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, finished = ?, exit_code = ?, error = ? "
                "WHERE id = ? AND state = 'running'", (state, ended, exit_code, error, job_id))
        return cursor.rowcount == 1

    def cancel(self, job_id: int, reason: str) -> JobState | None:
        """Cancel a queued or running job; returns the state it had (None: no such job)."""
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] in ACTIVE:
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, error = ? "
                           "WHERE id = ?", (time.time(), reason, job_id))
            return cast(JobState, row["state"])
