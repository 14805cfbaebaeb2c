"""``facility data generate``: write the configured synthetic samples and register them.

Each file is written once, then placed in every configured region (hard link where possible,
copy otherwise) and recorded in the catalog with one replica per region endpoint.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import uproot

from facility.config import FacilityConfig, SampleConfig
from facility.data.catalog import (
    Catalog,
    CatalogError,
    Dataset,
    DatasetMetadata,
    FileEntry,
    Replica,
    load_catalog,
    region_urls,
    save_catalog,
)
from facility.data.generate import TREE_NAME, FileSpec, write_file
from facility.machine import usable_cores


def file_name(sample: SampleConfig, index: int) -> str:
    return f"{sample.name}_{index:04d}.root"


def _existing_shape(path: Path) -> tuple[int, int] | None:
    """Events and first cluster's size of an already generated file; None if absent or
    unreadable."""
    try:
        with uproot.open(path) as handle:
            tree = handle[TREE_NAME]
            offsets = [int(x) for x in tree.common_entry_offsets()]
            return int(tree.num_entries), offsets[1] if len(offsets) > 1 else 0
    except Exception:  # noqa: BLE001 (unreadable for any reason: written again)
        return None


def _place(source: Path, target: Path) -> None:
    if target.exists() and target.stat().st_size == source.stat().st_size:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def generate_samples(config: FacilityConfig, names: list[str] | None = None, *,
                     force: bool = False, workers: int | None = None,
                     report: Callable[[str], None] = print) -> Catalog:
    """Write missing sample files into every region and record them in the catalog."""
    samples = [config.sample(n) for n in names] if names else config.samples
    home_region = config.regions[0]
    home = config.region_root(home_region)
    specs = []
    for sample in samples:
        for index in range(sample.files):
            path = home / sample.name / file_name(sample, index)
            shape = (sample.events_per_file, min(sample.cluster_events, sample.events_per_file))
            if force or _existing_shape(path) != shape:
                specs.append(FileSpec(path, sample.kind, sample.events_per_file, sample.seed,
                                      index, sample.compression, sample.cluster_events))
    if specs:
        report(f"generating {len(specs)} files ({sum(s.events for s in specs):,} events)")
        with ProcessPoolExecutor(max_workers=workers or min(len(specs), usable_cores())) as pool:
            for spec, _ in zip(specs, pool.map(write_file, specs), strict=True):
                report(f"  wrote {spec.path.name}")
    try:
        catalog = load_catalog(config.catalog_path)
    except CatalogError:
        catalog = Catalog()
    for sample in samples:
        catalog = catalog.with_dataset(_register(config, sample, home))
    save_catalog(catalog, config.catalog_path)
    return catalog


def _register(config: FacilityConfig, sample: SampleConfig, home: Path) -> Dataset:
    files = []
    for index in range(sample.files):
        name = file_name(sample, index)
        relative = f"{sample.name}/{name}"
        replicas = []
        for region in config.regions:
            _place(home / relative, config.region_root(region) / relative)
            replicas += [Replica(region=region.name, url=u) for u in region_urls(config, region.name,
                                                                                  relative)]
        files.append(FileEntry(name=name, events=sample.events_per_file, replicas=replicas))
    metadata = DatasetMetadata(is_data=sample.kind == "collision_data",
                               cross_section_pb=sample.cross_section_pb, kind=sample.kind)
    return Dataset(name=sample.name, tree=TREE_NAME, metadata=metadata, files=files)
