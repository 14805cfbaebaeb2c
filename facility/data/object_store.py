"""The embedded facility's object store: an S3-compatible server holding a region's replicas.

The server is moto's standalone S3 server (what s3fs and fsspec test against), started as a
service like the XRootD servers. It keeps objects in memory, so every ``facility up`` uploads
the region's files into its bucket (only those not there yet). Workers read ``s3://`` replicas
through s3fs at ``AWS_ENDPOINT_URL_S3``; the embedded store's access key is written to a
credentials file of the facility's state (mode 0600) that workers are pointed at, unless the
user's environment has credentials of its own. No key is ever printed or logged.
"""

from __future__ import annotations

import configparser
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from facility.config import FacilityConfig, RegionConfig
from facility.embedded.services import Service

CREDENTIALS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def store_regions(config: FacilityConfig) -> list[RegionConfig]:
    """Regions whose object store the embedded facility runs."""
    return [r for r in config.regions if r.object_store and r.object_store.port]


def store_service(config: FacilityConfig, region: RegionConfig) -> Service:
    store = region.object_store
    if store is None or store.port is None:
        raise ValueError(f"region {region.name!r} has no embedded object store")
    base = config.state_path / "s3" / region.name
    base.mkdir(parents=True, exist_ok=True)
    return Service(name=f"s3-{region.name}",
                   argv=[sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                         "-p", str(store.port)],
                   ports=[store.port], cwd=base,
                   description=f"S3-compatible object store of region {region.name}",
                   start_timeout=60)


def credentials_file(config: FacilityConfig) -> Path:
    """The embedded store's credentials (made once, readable by the facility's account only)."""
    path = config.state_path / "s3" / "credentials"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"[default]\naws_access_key_id = facility-{secrets.token_hex(4)}\n"
                         f"aws_secret_access_key = {secrets.token_urlsafe(24)}\n")
    return path


def worker_credentials(config: FacilityConfig) -> dict[str, str]:
    """What points workers at the embedded store's credentials, unless the user has their own."""
    if not store_regions(config) or all(os.environ.get(v) for v in CREDENTIALS_ENV):
        return {}
    return {"AWS_SHARED_CREDENTIALS_FILE": str(credentials_file(config))}


def _client(config: FacilityConfig, region: RegionConfig) -> Any:
    import boto3

    if all(os.environ.get(v) for v in CREDENTIALS_ENV):
        session = boto3.Session()
    else:
        parser = configparser.ConfigParser()
        parser.read(credentials_file(config))
        keys = parser["default"]
        session = boto3.Session(aws_access_key_id=keys["aws_access_key_id"],
                                aws_secret_access_key=keys["aws_secret_access_key"])
    return session.client("s3", endpoint_url=region.s3_endpoint(), region_name="us-east-1")


def upload_region(config: FacilityConfig, region: RegionConfig,
                  report: Callable[[str], None] = print) -> int:
    """Put the region's files into its bucket (those missing or of another size); how many."""
    assert region.object_store is not None
    client = _client(config, region)
    bucket = region.object_store.bucket
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)
    stored = {o["Key"]: o["Size"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket) for o in page.get("Contents", [])}
    root = config.region_root(region)
    uploaded = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = path.relative_to(root).as_posix()
        if stored.get(key) != path.stat().st_size:
            client.upload_file(str(path), bucket, key)
            uploaded += 1
    if uploaded:
        report(f"uploaded {uploaded} files into s3://{bucket} (region {region.name})")
    return uploaded
