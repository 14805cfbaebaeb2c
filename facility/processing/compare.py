"""Compare two run results bin by bin: the check behind ``facility chaos`` and the fault tests.

Two results are identical when they have the same keys, every histogram has the same axes and
the same contents in every bin (flow bins and variances included), and every other value is
equal. The differences are listed by path so that a report can say exactly what moved.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import hist
import numpy as np


def differences(expected: Any, actual: Any, path: str = "result") -> list[str]:
    """Where ``actual`` differs from ``expected``; empty when they are identical."""
    if isinstance(expected, hist.Hist) or isinstance(actual, hist.Hist):
        return _histogram_differences(expected, actual, path)
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = [f"{path}/{key}: only in the reference" for key in expected.keys() - actual.keys()]
        found += [f"{path}/{key}: not in the reference" for key in actual.keys() - expected.keys()]
        for key in expected.keys() & actual.keys():
            found += differences(expected[key], actual[key], f"{path}/{key}")
        return found
    if isinstance(expected, np.ndarray) or isinstance(actual, np.ndarray):
        same = np.array_equal(np.asarray(expected), np.asarray(actual))
        return [] if same else [f"{path}: arrays differ"]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


def _categories_sorted(h: hist.Hist) -> hist.Hist:
    """The same histogram with its category axes in sorted order: categories that grow as chunks
    arrive are ordered by arrival, which says nothing about the contents."""
    order = {ax.name: sorted(ax) for ax in h.axes
             if isinstance(ax, hist.axis.StrCategory | hist.axis.IntCategory)}
    if not order or all(list(h.axes[name]) == values for name, values in order.items()):
        return h
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "List indexing selection is experimental")
        return cast(hist.Hist, h[cast(Any, order)])


def _histogram_differences(expected: Any, actual: Any, path: str) -> list[str]:
    if not (isinstance(expected, hist.Hist) and isinstance(actual, hist.Hist)):
        return [f"{path}: a histogram on one side only"]
    expected, actual = _categories_sorted(expected), _categories_sorted(actual)
    if expected.axes != actual.axes:
        return [f"{path}: the axes differ"]
    want, got = expected.view(flow=True), actual.view(flow=True)
    if want.dtype != got.dtype:
        return [f"{path}: storage {want.dtype} != {got.dtype}"]
    fields = want.dtype.names or (None,)
    found = []
    for name in fields:
        a, b = (want, got) if name is None else (want[name], got[name])
        if not np.array_equal(a, b):
            bins = int(np.count_nonzero(a != b))
            found.append(f"{path}{'' if name is None else '.' + name}: {bins} bins differ")
    return found


def total_entries(result: Any) -> float:
    """The sum of every histogram's contents: more than the reference means double counting."""
    if isinstance(result, hist.Hist):
        values = result.values(flow=True)
        return float(np.sum(values)) if values is not None else 0.0
    if isinstance(result, dict):
        return sum(total_entries(value) for value in result.values())
    return 0.0
