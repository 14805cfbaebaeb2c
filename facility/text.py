"""Words in messages: counts with their nouns."""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """``1 worker``, ``2 workers``, ``1,000 chunks``."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")
