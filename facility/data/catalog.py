"""The dataset catalog: dataset -> files -> replicas in named regions.

The catalog is a YAML file::

    datasets:
      DYJetsToMuMu:
        tree: Events
        schema: nanoaod
        metadata: {is_data: false, cross_section_pb: 2025.0, sum_genweight: 4.1e8, year: 2018}
        files:
          - name: DYJetsToMuMu_0000.root
            events: 100000
            replicas:
              - {region: east, url: "root://localhost:11094//DYJetsToMuMu/DYJetsToMuMu_0000.root"}
              - {region: west, url: "https://localhost:18095/DYJetsToMuMu/DYJetsToMuMu_0000.root"}

docs/data.md describes every field; ``docs/catalog.schema.json`` (made from these models) lets an
editor check a catalog as it is typed. Replicas are ordered for reading by the distance of their
region (configuration), then by protocol preference; unreachable endpoints move to the back so
that a run fails over to the next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from facility.config import FacilityConfig
from facility.errors import UsageError

SCHEMES = ("file", "root", "https", "http", "s3")
# coffea's event schemas, by the name a catalog uses (facility.processing.schemas has the classes)
SCHEMA_NAMES = ("nanoaod", "pfnano", "scouting", "physlite", "base", "treemaker", "delphes",
                "edm4hep", "fcc", "pdune")
MetadataValue = str | int | float | bool


class CatalogError(UsageError, ValueError):
    """The catalog is missing, malformed, or does not hold what was asked for."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Replica(_Strict):
    """One copy of a file at a region's endpoint."""

    region: str
    url: str = Field(pattern=r"^(file|root|https?|s3)://")

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def endpoint(self) -> str:
        """Host and port of the server (``local`` for files)."""
        parts = urlsplit(self.url)
        return parts.netloc if parts.scheme != "file" else "local"


class FileEntry(_Strict):
    """A logical file of a dataset, with the event count recorded when it was registered."""

    name: str
    events: int = Field(ge=0)
    uuid: str | None = Field(default=None, description="the ROOT file's UUID when it was added: a "
                                                       "rewritten file has another")
    replicas: list[Replica] = Field(min_length=1)


def checked_schema_name(name: str, where: str) -> str:
    """A known schema name (any case, ``Schema`` suffix allowed), or an error naming ``where``
    it came from and the known names."""
    key = name.strip().lower().removesuffix("schema")
    if key not in SCHEMA_NAMES:
        raise CatalogError(f"{where}: unknown schema {name!r}; known schemas: "
                           f"{', '.join(SCHEMA_NAMES)}")
    return key


class DatasetMetadata(BaseModel):
    """What a processor finds in ``events.metadata``: the keys below, checked, and any other
    key of the user's (``year``, ``era``, ``campaign``...) as a plain value."""

    model_config = ConfigDict(extra="allow")

    is_data: bool = False
    cross_section_pb: float | None = Field(default=None, gt=0)
    sum_genweight: float | None = Field(
        default=None, description="sum of the generator weights of every event of the dataset "
                                  "(`facility data add --sum-genweight` computes it)")
    kind: str | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _extra_values_are_plain(self) -> DatasetMetadata:
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, MetadataValue):
                raise ValueError(f"metadata {key!r} must be a string, number or true/false, "
                                 f"not {type(value).__name__}")
        return self


class Dataset(_Strict):
    name: str = ""
    tree: str = "Events"
    schema_name: str = Field(default="nanoaod", alias="schema",
                             description="coffea schema of the files (any case)",
                             json_schema_extra={"enum": list(SCHEMA_NAMES)})
    metadata: DatasetMetadata = Field(default_factory=DatasetMetadata)
    files: list[FileEntry] = Field(min_length=1)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_name")
    @classmethod
    def _known_schema(cls, value: str) -> str:
        return checked_schema_name(value, "schema")

    @property
    def events(self) -> int:
        return sum(f.events for f in self.files)


class Catalog(_Strict):
    datasets: dict[str, Dataset] = Field(default_factory=dict)

    def get(self, name: str) -> Dataset:
        try:
            return self.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.datasets)) or "none (run `facility data generate`)"
            raise CatalogError(f"unknown dataset {name!r}; the catalog holds: {known}") from None

    def with_dataset(self, dataset: Dataset) -> Catalog:
        merged = dict(self.datasets)
        merged[dataset.name] = dataset
        return Catalog(datasets=merged)

    def without(self, name: str) -> Catalog:
        self.get(name)  # an unknown name is an error that lists the known ones
        return Catalog(datasets={n: ds for n, ds in self.datasets.items() if n != name})


def catalog_json_schema() -> dict[str, Any]:
    """The JSON schema of a catalog file, for editors (docs/catalog.schema.json)."""
    schema = Catalog.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "facility dataset catalog"
    return schema


# A site catalog lists many thousands of files: the C parser reads it several times faster.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_catalog(path: Path) -> Catalog:
    """Read and validate a catalog file; errors name the file and the offending entry."""
    if not path.exists():
        raise CatalogError(f"dataset catalog {path} does not exist; run `facility data generate` "
                           "or set `catalog` in the configuration")
    try:
        raw: Any = yaml.load(path.read_text(), Loader=SAFE_LOADER) or {}
        catalog = Catalog.model_validate(raw)
    except yaml.YAMLError as exc:
        raise CatalogError(f"dataset catalog {path} is not valid YAML: {exc}") from exc
    except ValidationError as exc:
        where = "; ".join(".".join(map(str, e["loc"])) + ": " + e["msg"] for e in exc.errors())
        raise CatalogError(f"dataset catalog {path} is invalid: {where}") from None
    for name, dataset in catalog.datasets.items():
        dataset.name = name
    return catalog


def save_catalog(catalog: Catalog, path: Path) -> None:
    """Write atomically so a reader never sees half a catalog."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"datasets": {name: ds.model_dump(exclude={"name"}, exclude_none=True, by_alias=True)
                         for name, ds in sorted(catalog.datasets.items())}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


def region_urls(config: FacilityConfig, region_name: str, relative: str) -> list[str]:
    """Every URL under which a region serves a relative path, preferred first.

    A served region is reached only through its servers (its XCache when it has one, then
    root://, then https:// through the server's HTTP plugin), as a remote site would be; a
    region without servers is a local path.
    """
    region = config.region(region_name)
    if region.object_store:
        return [f"s3://{region.object_store.bucket}/{relative}"]
    if not region.serve:
        return [(config.region_root(region) / relative).resolve().as_uri()]
    urls = [f"root://{region.host}:{region.serve.xrootd_port}//{relative}"]
    if region.cache:
        urls.insert(0, f"root://{region.cache.host}:{region.cache.xrootd_port}//{relative}")
    if region.serve.http_port:
        urls.append(f"https://{region.host}:{region.serve.http_port}/{relative}")
    return urls


SCHEME_PREFERENCE = {"root": 0, "https": 1, "http": 1, "s3": 2, "file": 3}


def rank_replicas(replicas: list[Replica], config: FacilityConfig,
                  unhealthy: set[str] | frozenset[str] = frozenset()) -> list[Replica]:
    """Nearest region first, then protocol preference; unhealthy endpoints go last."""
    distance = {r.name: r.distance for r in config.regions}
    far = max(distance.values(), default=0) + 1

    def key(replica: Replica) -> tuple[int, int, int]:
        return (replica.endpoint in unhealthy, distance.get(replica.region, far),
                SCHEME_PREFERENCE.get(replica.scheme, 9))

    return sorted(replicas, key=key)


if __name__ == "__main__":  # docs/catalog.schema.json
    import json

    print(json.dumps(catalog_json_schema(), indent=2))
