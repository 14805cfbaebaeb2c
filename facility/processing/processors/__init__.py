"""Processors shipped with the facility, and how a name on the command line finds one."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from coffea.processor import ProcessorABC

from facility.errors import UsageError
from facility.processing.processors.dimuon import DimuonProcessor
from facility.processing.processors.ttbar import TtbarProcessor

SHIPPED: dict[str, type[ProcessorABC]] = {
    "dimuon": DimuonProcessor,
    "ttbar": TtbarProcessor,
}


class ProcessorNotFound(UsageError, LookupError):
    """The processor name is neither shipped nor an importable ``module:Class``."""


def _import_here(module_name: str) -> Any:
    """Import a module, also from the current folder: ``facility run myproc:MyProcessor`` finds
    ``myproc.py`` beside the user, as ``python -m`` would."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)
    return importlib.import_module(module_name)


def load_processor(spec: str, **options: Any) -> ProcessorABC:
    """A processor instance from a shipped name (``dimuon``) or ``package.module:ClassName``."""
    if spec in SHIPPED:
        return SHIPPED[spec](**options)
    if ":" not in spec:
        raise ProcessorNotFound(
            f"unknown processor {spec!r}; shipped: {', '.join(sorted(SHIPPED))}, "
            "or give module.path:ClassName"
        )
    module_name, _, class_name = spec.partition(":")
    try:
        cls = getattr(_import_here(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ProcessorNotFound(f"cannot load processor {spec!r}: {exc}") from exc
    instance = cls(**options)
    if not isinstance(instance, ProcessorABC):
        raise ProcessorNotFound(f"{spec!r} is not a coffea ProcessorABC")
    return instance
