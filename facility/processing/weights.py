"""Normalising simulation to a luminosity: the weight every MC event carries into a histogram.

    weight = genWeight × cross section × luminosity / Σ genWeight (whole dataset)

The cross section and the sum of generator weights come from the dataset's catalog metadata
(``cross_section_pb``; ``sum_genweight``, which ``facility data add --sum-genweight`` computes
over every file), so each chunk is weighted by the *dataset's* total, never by its own.
"""

from __future__ import annotations

from typing import Any

import awkward as ak
import numpy as np

from facility.errors import UsageError


def _generator_weights(events: Any, branch: str) -> np.ndarray:
    if branch not in events.fields:
        raise UsageError(f"dataset {events.metadata.get('dataset')!r} has no {branch!r} "
                         "branch: pass generator_weight= the branch that holds them")
    return ak.to_numpy(events[branch]).astype(np.float64)


def lumi_weight(events: Any, luminosity: float, generator_weight: str = "genWeight"
                ) -> np.ndarray:
    """Per-event weights that normalise simulation to ``luminosity`` (in pb⁻¹, the unit of the
    catalog's ``cross_section_pb``); ones for collision data.

    For example, 59.7 fb⁻¹ of 2018 data::

        weight = facility.lumi_weight(events, luminosity=59_700)
        histogram.fill(mass=mass, weight=weight[selected])
    """
    metadata = events.metadata
    if metadata.get("is_data"):
        return np.ones(len(events))
    missing = [key for key in ("cross_section_pb", "sum_genweight") if metadata.get(key) is None]
    if missing:
        raise UsageError(
            f"dataset {metadata.get('dataset')!r} has no {' or '.join(missing)} in its catalog "
            "metadata: set them with `facility data add --meta cross_section_pb=... "
            "--sum-genweight`")
    if metadata["sum_genweight"] == 0:
        raise UsageError(f"dataset {metadata.get('dataset')!r}: sum_genweight is 0")
    scale = float(metadata["cross_section_pb"]) * luminosity / float(metadata["sum_genweight"])
    return _generator_weights(events, generator_weight) * scale
