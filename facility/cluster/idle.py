"""When a cluster counts as idle: no work, and nobody arriving or leaving, for a while.

Dask's scheduler counts idle time from the moment it is built and restarts the count only when
tasks change state. A cluster then stops while it is still being set up for its user: the
scheduler's own imports, the first workers starting (seconds here, minutes for pods waiting on
a new node) and the client connecting all count as idle time, and a short ``idle_timeout`` ends
the cluster before its first task. Scheduler processes preload this module (local ones and pods
alike, where the dask operator asks the same scheduler whether it is idle), so the count also
restarts when the scheduler starts serving, a worker joins, or a client comes or goes, and it
does not run while a client waits on a cluster with no worker yet.
"""

from __future__ import annotations

from typing import Any

from distributed import Scheduler
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.ioloop import PeriodicCallback


class ActivityKeepsAwake(SchedulerPlugin):
    """Restart the scheduler's idle count on the events that mean someone uses the cluster."""

    name = "facility-activity"
    check_ms = 250  # as often as the scheduler checks its idle count

    @staticmethod
    def _restart_count(scheduler: Scheduler) -> None:
        # the scheduler's own check sets a fresh start of the count at its next pass
        scheduler.idle_since = None

    @classmethod
    def _waiting_for_workers(cls, scheduler: Scheduler) -> None:
        users = [c for c in scheduler.clients if c != "fire-and-forget"]
        if users and not scheduler.workers:
            cls._restart_count(scheduler)

    async def start(self, scheduler: Scheduler) -> None:
        self._restart_count(scheduler)
        # among the scheduler's own callbacks: started with them, stopped when it closes
        scheduler.periodic_callbacks[self.name] = PeriodicCallback(
            lambda: self._waiting_for_workers(scheduler), self.check_ms)

    def add_worker(self, scheduler: Scheduler, worker: str) -> None:
        self._restart_count(scheduler)

    def add_client(self, scheduler: Scheduler, client: str) -> None:
        self._restart_count(scheduler)

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        self._restart_count(scheduler)


def dask_setup(server: Any) -> None:
    """Run by schedulers that preload this module; workers have no idle count to keep."""
    if isinstance(server, Scheduler):
        server.add_plugin(ActivityKeepsAwake())
