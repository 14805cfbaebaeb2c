"""Event schemas by name: how a file's columns become ``events`` for a processor.

A dataset names its schema in the catalog (``schema: physlite``); a processor may insist on its
own (a ``schema`` attribute: a name or a coffea schema class) and ``facility.run(schema=...)``
overrides both. The names are coffea's schemas, lower case, without the ``Schema`` suffix.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

from coffea.nanoevents import (
    BaseSchema,
    DelphesSchema,
    EDM4HEPSchema,
    FCCSchema,
    NanoAODSchema,
    PDUNESchema,
    PFNanoAODSchema,
    PHYSLITESchema,
    ScoutingNanoAODSchema,
    TreeMakerSchema,
)

from facility.data.catalog import checked_schema_name
from facility.errors import UsageError

# the task's schema is the processor's own class (it travels with the processor)
PROCESSOR_SCHEMA = "processor"


class FacilityNanoAODSchema(NanoAODSchema):
    """NanoAOD as skimmed files carry it: cross-references to dropped collections are normal."""

    warn_missing_crossrefs = False


class FacilityPFNanoAODSchema(PFNanoAODSchema):
    warn_missing_crossrefs = False


SCHEMAS: dict[str, type[BaseSchema]] = {
    "nanoaod": FacilityNanoAODSchema,
    "pfnano": FacilityPFNanoAODSchema,
    "scouting": ScoutingNanoAODSchema,
    "physlite": PHYSLITESchema,
    "base": BaseSchema,
    "treemaker": TreeMakerSchema,
    "delphes": DelphesSchema,
    "edm4hep": EDM4HEPSchema,
    "fcc": FCCSchema,
    "pdune": PDUNESchema,
}


def processors_choice(processor: Any) -> str | None:
    """What a processor's own ``schema`` attribute asks for: a name, PROCESSOR_SCHEMA for a
    schema class of its own, or None where it leaves the choice to the catalog."""
    chosen = getattr(processor, "schema", None)
    if chosen is None:
        return None
    if isinstance(chosen, str):
        return checked_schema_name(chosen, f"the processor's schema attribute ({type(processor)})")
    if isinstance(chosen, type) and issubclass(chosen, BaseSchema):
        return PROCESSOR_SCHEMA
    raise UsageError(f"the processor's schema attribute must be a schema name or a coffea schema "
                     f"class, not {chosen!r}")


def schema_class(name: str, processor: Any) -> type[BaseSchema]:
    """The class that builds a task's events (on a worker)."""
    if name == PROCESSOR_SCHEMA:
        chosen: type[BaseSchema] = processor.schema
        return chosen
    return SCHEMAS[name]


@contextlib.contextmanager
def quiet_schema_warnings() -> Iterator[None]:
    """Schemas warn about every branch they cannot represent (a PHYSLITE file has hundreds):
    what a processor cannot use it will find missing, and the warnings would drown its own."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping ", category=UserWarning)
        warnings.filterwarnings("ignore", message="Missing cross-reference",
                                category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="Branch .* already exists",
                                category=RuntimeWarning)
        yield
