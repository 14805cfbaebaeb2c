"""Words in messages: counts with their nouns."""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``1 worker``, ``2 workers``, ``1,000 chunks``; ``many`` where adding an s is wrong
    (``plural(2, "process", "processes")``)."""
    return f"{count:,} " + (noun if count == 1 else many or noun + "s")
