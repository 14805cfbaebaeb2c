"""The embedded facility's service supervisor: a service that never gets ready says why."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from facility.embedded.services import NotReady, Service, ServiceError, Supervisor


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> list[str]:
    """A process that accepts connections on ``port`` and never answers them."""
    return [sys.executable, "-c", "import socket, time; s = socket.socket(); "
            f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"]


def _refuse(reason: str) -> bool:
    raise NotReady(reason)


@pytest.mark.parametrize(("listens", "ready", "expected"), [
    (False, None, "nothing accepts connections on port {port}"),
    (True, lambda: False, "its readiness check did not pass"),
    (True, lambda: _refuse("http://127.0.0.1/.well-known did not answer: timed out"),
     "http://127.0.0.1/.well-known did not answer: timed out"),
], ids=["port closed", "check failed", "check says why"])
def test_a_service_that_never_gets_ready_says_why_and_is_stopped(
        tmp_path: Path, listens: bool, ready: Callable[[], bool] | None, expected: str) -> None:
    port = _free_port()
    argv = _listening(port) if listens else [sys.executable, "-c", "import time; time.sleep(60)"]
    supervisor = Supervisor(tmp_path)
    service = Service(name="slow", argv=argv, ports=[port], ready=ready,
                      start_timeout=1.0)
    with pytest.raises(ServiceError) as raised:
        supervisor.start(service)
    message = str(raised.value)
    assert message.startswith("slow was not ready after 1 s (")
    assert expected.format(port=port) in message
    assert f"last lines of {supervisor.log_path('slow')}" in message
    assert supervisor.process("slow") is None
