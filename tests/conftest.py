"""Shared fixtures: a small embedded facility with real XRootD servers and a real Dask cluster."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import coffea
import pytest

from facility.cluster.local import local_gpus
from facility.config import FacilityConfig, load_config
from facility.data.samples import generate_samples
from facility.embedded import facility as embedded
from facility.hub.spawner import this_machine

# the browser tests' fixtures (hub, browser), for every browser test module
pytest_plugins = ("tests.browser",)

REPO = Path(__file__).resolve().parent.parent
REAL_SAMPLES = ("nano_dy.root", "nano_tt_v12.root", "nano_tt_v15.root", "nano_dy_rntuple.root",
                "PHYSLITE_example.root")

# The tests' services listen on ports from a block of this test process's own (one block per
# pytest-xdist worker), below the kernel's ephemeral range. A port is chosen when a
# configuration is written and bound when its service starts, minutes later for a hub; a port
# the kernel handed out as free could meanwhile be chosen by another test process, or become the
# source port of one of the thousands of connections the tests open.
PORT_BLOCK_START, PORT_BLOCK_SIZE = 20_000, 1_000


def _port_block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    start = PORT_BLOCK_START + int(worker.removeprefix("gw")) * PORT_BLOCK_SIZE
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if start + PORT_BLOCK_SIZE > ephemeral_low:
        raise RuntimeError(f"test ports {start}-{start + PORT_BLOCK_SIZE} reach into the kernel's "
                           f"ephemeral range (from {ephemeral_low}): run fewer test processes")
    return range(start, start + PORT_BLOCK_SIZE)


_unused_ports = itertools.cycle(_port_block())


def free_port() -> int:
    """The next port of this test process's block that nothing listens on."""
    for port in itertools.islice(_unused_ports, PORT_BLOCK_SIZE):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("every port of this test process's block is in use")


def small_config(home: Path, extra_regions: str = "", **overrides: object) -> FacilityConfig:
    """A facility configuration with free ports and small samples, rooted in ``home``."""
    text = f"""
home: {home}
regions:
  - {{name: east, distance: 0, serve: {{xrootd_port: {free_port()}, http_port: {free_port()}}}}}
  - {{name: west, distance: 5, serve: {{xrootd_port: {free_port()}, http_port: {free_port()}}},
     cache: {{xrootd_port: {free_port()}}}}}
{extra_regions}
cluster: {{min_workers: 2, max_workers: 2, memory_limit: 3GiB, dashboard_port: {free_port()}}}
processing: {{chunk_size: 5000, open_timeout: 10, checkpoint_seconds: 0.5}}
batch: {{max_running_per_user: 1, workers: 1}}
hub:
  port: {free_port()}
  hub_port: {free_port()}
  proxy_api_port: {free_port()}
  provider_port: {free_port()}
  notebooks_dir: {REPO / "notebooks"}
  access_token_seconds: 60        # short-lived tokens, renewed 50 s before they expire
  token_refresh_seconds: 50
  token_poll_seconds: 3
  support_contact: facility-support@vo.invalid
  profiles:
    - {{slug: cpu-small, display_name: "CPU, small", description: "One core for notebooks.", cpu: 1,
       memory: 2GiB, default: true}}
    - {{slug: cpu-large, display_name: "CPU, large", description: "More cores than this machine has.",
       cpu: {this_machine().cpus + 1}, memory: 2GiB}}
    - {{slug: gpu, display_name: GPU, description: "More GPUs than this machine has.", cpu: 1,
       memory: 2GiB, gpus: {local_gpus() + 1}, groups: [cms/gpu]}}
samples:
  - {{name: DY, kind: drell_yan, files: 2, events_per_file: 20000, cluster_events: 1000, seed: 5}}
  - {{name: TT, kind: ttbar, files: 1, events_per_file: 10000, cluster_events: 1000, seed: 6}}
  - {{name: Data, kind: collision_data, files: 1, events_per_file: 10000, cluster_events: 1000,
      seed: 7}}
"""
    path = home / "facility.yaml"
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return load_config(path, environ={k: str(v) for k, v in overrides.items()})


def run_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A name of this test process's own: the run's, and under pytest-xdist the worker's too, so
    that parallel workers never share a facility home."""
    base = tmp_path_factory.getbasetemp()
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return f"{base.parent.name}-{worker}" if worker else base.name


@pytest.fixture(scope="session")
def facility_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FacilityConfig]:
    """Samples generated, XRootD servers and the Dask cluster up; all stopped at the end."""
    # under the checkout, not pytest's private temporary folder: the XRootD servers run as an
    # unprivileged account that must be able to reach the files
    home = REPO / ".facility" / "tests" / run_name(tmp_path_factory)
    shutil.rmtree(home, ignore_errors=True)
    config = small_config(home)
    try:  # what started before a failing start is stopped too
        generate_samples(config, report=lambda _: None)
        embedded.up(config, report=lambda _: None, hub=False)
        yield config
    finally:
        embedded.down(config, report=lambda _: None)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def real_nanoaod(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real files written by experiments' software, from coffea's source distribution: NanoAOD
    of several versions (one as an RNTuple) and ATLAS PHYSLITE."""
    cache = REPO / ".facility" / "cache" / f"coffea-{coffea.__version__}"
    wanted = {name: cache / name for name in REAL_SAMPLES}
    if not all(p.exists() for p in wanted.values()):
        download = tmp_path_factory.mktemp("sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", ":all:", f"coffea=={coffea.__version__}", "-d",
                        str(download)], check=True)
        [archive] = download.glob("coffea-*.tar.gz")
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in wanted and "/tests/samples/" in member.name:
                    source = tar.extractfile(member)
                    assert source is not None
                    # whole or not at all: parallel test workers may fetch the same file
                    partial = cache / f".{name}.{os.getpid()}"
                    partial.write_bytes(source.read())
                    os.replace(partial, wanted[name])
    return wanted
