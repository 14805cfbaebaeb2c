"""A deliberately slow processor, so a test can kill a worker while chunks are in flight."""

from __future__ import annotations

import time
from typing import Any

from facility.processing.processors.dimuon import DimuonProcessor


class SlowDimuon(DimuonProcessor):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def process(self, events: Any) -> dict[str, Any]:
        time.sleep(self.delay)
        return super().process(events)
