"""``facility data add / check / remove``: a user's own files into the catalog, inspected first.

Every file is opened *on the cluster* (where runs will read it, with the workers' credentials
and network), its tree found, its entries counted and a few events built with the dataset's
schema. A file that cannot be read, has no such tree or does not fit the schema is refused,
with its name and the reason, before anything is written: a catalog never lists a file that a
run would stumble on. Extra replicas (``--replica REGION=BASE``) are inspected too and must
hold the same number of entries.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from facility.config import FacilityConfig
from facility.data.catalog import (
    Catalog,
    Dataset,
    DatasetMetadata,
    FileEntry,
    Replica,
    checked_schema_name,
    load_catalog,
    region_urls,
    save_catalog,
)
from facility.errors import DataError, UsageError

KNOWN_TREES = ("Events", "CollectionTree")  # NanoAOD, ATLAS (PHYSLITE)
SCHEMA_CHECK_EVENTS = 10
URL_SCHEMES = ("root", "http", "https", "s3", "file")


class RefusedFiles(DataError):
    """Some files cannot be added: each is named with its reason."""


@dataclass(frozen=True)
class Inspection:
    """What opening one file on a worker found, or why it could not be used."""

    url: str
    tree: str = ""
    entries: int = -1
    form: str = ""  # TTree or RNTuple
    uuid: str | None = None
    sum_genweight: float | None = None
    problem: str | None = None


# ---------------------------------------------------------------------------------------------
# on a worker


def _tree_name(handle: Any, asked: str | None) -> str:
    """The tree (or RNTuple) asked for, else the one tree there is, else a known name."""
    trees = sorted({key.split(";")[0] for key, cls in handle.classnames().items()
                    if cls in ("TTree", "ROOT::RNTuple", "ROOT::Experimental::RNTuple")})
    if asked:
        if asked not in trees:
            raise LookupError(f"no tree {asked!r} in the file (it has: {', '.join(trees) or 'none'})")
        return asked
    if len(trees) == 1:
        return trees[0]
    for known in KNOWN_TREES:
        if known in trees:
            return known
    raise LookupError(f"the file has {len(trees)} trees ({', '.join(trees) or 'none'}): "
                      "say which with --tree")


def _sum_of(tree: Any, branch: str) -> float:
    if branch not in tree:
        raise LookupError(f"no branch {branch!r} to sum generator weights from")
    total = 0.0
    for chunk in tree.iterate([branch], library="np", step_size="100 MB"):
        total += float(chunk[branch].astype("float64").sum())
    return total


def inspect_source(url: str, tree: str | None, schema: str, sum_branch: str | None,
                   timeout: int = 30) -> Inspection:
    """Open ``url``, find its tree, count entries, build a few events with ``schema``."""
    import uproot

    from facility.processing.reader import build_events, open_options
    from facility.processing.receipts import short
    from facility.processing.schemas import SCHEMAS

    try:
        with uproot.open(url, **open_options(url, timeout)) as handle:
            name = _tree_name(handle, tree)
            found = handle[name]
            entries = int(found.num_entries)
            form = "RNTuple" if hasattr(found, "cluster_summaries") else "TTree"
            try:
                events = build_events(handle, name, 0, min(entries, SCHEMA_CHECK_EVENTS),
                                      SCHEMAS[schema])
                len(events.fields)
            except Exception as exc:  # noqa: BLE001 (any schema failure refuses the file)
                return Inspection(url, name, entries, form,
                                  problem=f"does not fit the {schema} schema: {short(exc)}")
            total = _sum_of(found, sum_branch) if sum_branch else None
            uuid = str(handle.file.uuid)
    except Exception as exc:  # noqa: BLE001 (whatever stops reading it is the reason given)
        return Inspection(url, problem=f"cannot be read: {short(exc)}")
    return Inspection(url, name, entries, form, uuid, total)


# ---------------------------------------------------------------------------------------------
# on the client


def _is_url(source: str) -> bool:
    return urlsplit(source).scheme in URL_SCHEMES and "://" in source


def _expand_url(source: str) -> list[str]:
    if not glob.has_magic(urlsplit(source).path):
        return [source]
    import fsspec

    filesystem, _ = fsspec.core.url_to_fs(source)
    protocol = source.split("://", 1)[0]
    found = sorted(filesystem.glob(filesystem._strip_protocol(source)))
    prefix = source[: source.index("://") + 3]
    if protocol == "root":  # XRootD paths keep the server in the URL
        netloc = urlsplit(source).netloc
        prefix = f"root://{netloc}/"
    return [f"{prefix}{path}" if "://" not in path else path for path in found]


def _expand_path(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*.root") if p.is_file())
    if glob.has_magic(source):
        return sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)
                      if Path(p).is_file())
    if not path.exists():
        raise UsageError(f"{source}: no such file or directory")
    return [path]


def expand_sources(sources: list[str]) -> list[str]:
    """Files, globs, directories (every ``*.root`` below) and URLs, as URLs, each once."""
    urls: list[str] = []
    for source in sources:
        found = (_expand_url(source) if _is_url(source)
                 else [p.resolve().as_uri() for p in _expand_path(source)])
        if not found:
            raise UsageError(f"{source}: matches no file")
        urls += [url for url in found if url not in urls]
    return urls


def _file_name(url: str) -> str:
    return Path(urlsplit(url).path).name


def _served_region(config: FacilityConfig, url: str) -> tuple[str, list[str]] | None:
    """A local file inside a served region's directory is read through that region's servers,
    as every other replica there."""
    if urlsplit(url).scheme != "file":
        return None
    path = Path(urlsplit(url).path)
    for region in config.regions:
        root = config.region_root(region).resolve()
        if region.serve and path.is_relative_to(root):
            return region.name, region_urls(config, region.name, str(path.relative_to(root)))
    return None


def _region_of(config: FacilityConfig, url: str, asked: str | None) -> str:
    if asked:
        config.region(asked)  # an unknown region is an error naming the configured ones
        return asked
    parts = urlsplit(url)
    if parts.scheme == "file":
        return "local"
    for region in config.regions:
        ports = {region.serve.xrootd_port, region.serve.http_port} if region.serve else set()
        if parts.hostname == region.host and parts.port in ports:
            return region.name
    return parts.hostname or "remote"


def parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    """``key=value`` options, each checked."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{what} {pair!r}: expected KEY=VALUE")
        parsed[key.strip()] = value.strip()
    return parsed


def parse_metadata(pairs: list[str]) -> DatasetMetadata:
    """``--meta key=value``: numbers and true/false become values of their type."""
    import yaml

    values: dict[str, Any] = {}
    for key, text in parse_pairs(pairs, "--meta").items():
        value = yaml.safe_load(text) if text else ""
        values[key] = value if isinstance(value, str | int | float | bool) else text
    try:
        return DatasetMetadata.model_validate(values)
    except ValueError as exc:
        raise UsageError(f"--meta: {exc}") from None


@dataclass
class AddRequest:
    """What ``facility data add`` was asked for."""

    name: str
    sources: list[str]
    tree: str | None = None
    schema: str = "nanoaod"
    metadata: list[str] | None = None
    replicas: list[str] | None = None
    region: str | None = None
    sum_genweight: str | None = None
    replace: bool = False


Inspect = Callable[[list[str], str | None, str, str | None], list[Inspection]]


def _refuse(problems: list[str]) -> None:
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise RefusedFiles(f"{len(problems)} file(s) cannot be added:\n  {shown}{more}\n"
                           "nothing was written to the catalog")


def _replica_urls(url: str, replicas: dict[str, str]) -> dict[str, str]:
    return {region: f"{base.rstrip('/')}/{_file_name(url)}" for region, base in replicas.items()}


def add_dataset(config: FacilityConfig, request: AddRequest, inspect: Inspect) -> Dataset:
    """Inspect every file (and extra replica) with ``inspect``, then catalog them together."""
    schema = checked_schema_name(request.schema, "--schema")
    catalog = load_catalog(config.catalog_path) if config.catalog_path.exists() else None
    if catalog and request.name in catalog.datasets and not request.replace:
        raise UsageError(f"dataset {request.name!r} is already in the catalog; "
                         "`facility data remove` it first or pass --replace")
    urls = expand_sources(request.sources)
    extra = parse_pairs(request.replicas or [], "--replica")
    for region in extra:
        config.region(region)
    metadata = parse_metadata(request.metadata or [])
    found = inspect(urls, request.tree, schema, request.sum_genweight)
    _refuse([f"{i.url}: {i.problem}" for i in found if i.problem])
    trees = {i.tree for i in found}
    if len(trees) > 1:
        raise UsageError(f"the files hold different trees ({', '.join(sorted(trees))}): "
                         "say which with --tree")
    copies = {i.url: _replica_urls(i.url, extra) for i in found}
    checked = inspect([u for c in copies.values() for u in c.values()], found[0].tree, schema,
                      None) if extra else []
    _refuse(_replica_problems(found, copies, checked))
    files = [_entry(config, i, copies[i.url], request.region) for i in found]
    if request.sum_genweight:
        metadata.sum_genweight = sum(i.sum_genweight or 0.0 for i in found)
    dataset = Dataset(name=request.name, tree=found[0].tree, schema_name=schema, metadata=metadata,
                      files=files)
    _check_unique_names(dataset)
    save_catalog((catalog or Catalog()).with_dataset(dataset), config.catalog_path)
    return dataset


def _replica_problems(found: list[Inspection], copies: dict[str, dict[str, str]],
                      checked: list[Inspection]) -> list[str]:
    by_url = {i.url: i for i in checked}
    problems = []
    for primary in found:
        for url in copies[primary.url].values():
            copy = by_url[url]
            if copy.problem:
                problems.append(f"{url} (replica of {primary.url}): {copy.problem}")
            elif copy.entries != primary.entries:
                problems.append(f"{url} holds {copy.entries:,} entries, {primary.url} "
                                f"{primary.entries:,}: not the same file")
    return problems


def _entry(config: FacilityConfig, found: Inspection, copies: dict[str, str],
           region: str | None) -> FileEntry:
    served = None if region else _served_region(config, found.url)
    if served:
        replicas = [Replica(region=served[0], url=u) for u in served[1]]
    else:
        replicas = [Replica(region=_region_of(config, found.url, region), url=found.url)]
    replicas += [Replica(region=r, url=u) for r, u in copies.items()]
    return FileEntry(name=_file_name(found.url), events=found.entries, uuid=found.uuid,
                     replicas=replicas)


def _check_unique_names(dataset: Dataset) -> None:
    names = [f.name for f in dataset.files]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"several files are named {twice[0]!r}: a dataset's files need distinct "
                         "names (add them as separate datasets)")


@dataclass(frozen=True)
class FileCheck:
    """One replica re-inspected: ``ok``, ``changed`` (entries differ) or ``missing``."""

    dataset: str
    file: str
    url: str
    status: str
    detail: str = ""


def check_dataset(config: FacilityConfig, name: str, inspect: Inspect) -> list[FileCheck]:
    """Every replica of every file of a dataset opened again and compared with the catalog."""
    dataset = load_catalog(config.catalog_path).get(name)
    urls = [r.url for f in dataset.files for r in f.replicas]
    found = {i.url: i for i in inspect(urls, dataset.tree, dataset.schema_name, None)}
    checks = []
    for entry in dataset.files:
        for replica in entry.replicas:
            seen = found[replica.url]
            if seen.problem:
                checks.append(FileCheck(name, entry.name, replica.url, "missing", seen.problem))
            elif seen.entries != entry.events:
                checks.append(FileCheck(name, entry.name, replica.url, "changed",
                                        f"{seen.entries:,} entries, the catalog says "
                                        f"{entry.events:,}"))
            elif entry.uuid and seen.uuid != entry.uuid:
                checks.append(FileCheck(name, entry.name, replica.url, "changed",
                                        f"another file (ROOT UUID {seen.uuid}, the catalog "
                                        f"says {entry.uuid})"))
            else:
                checks.append(FileCheck(name, entry.name, replica.url, "ok"))
    return checks


def remove_dataset(config: FacilityConfig, name: str) -> Dataset:
    """Drop a dataset from the catalog (its files are left where they are)."""
    catalog = load_catalog(config.catalog_path)
    dataset = catalog.get(name)
    save_catalog(catalog.without(name), config.catalog_path)
    return dataset


def inspect_on_cluster(client: Any, timeout: int) -> Inspect:
    """``inspect`` that opens the files on the cluster's workers, all at once."""
    def inspect(urls: list[str], tree: str | None, schema: str, sum_branch: str | None
                ) -> list[Inspection]:
        if not urls:
            return []
        futures = client.map(inspect_source, urls, tree=tree, schema=schema,
                             sum_branch=sum_branch, timeout=timeout, pure=False)
        return list(client.gather(futures))
    return inspect

