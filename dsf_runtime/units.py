"""Formatting of quantities for people (used by every layer, so it depends on nothing)."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """e.g. '512 B', '6.1 MiB', '12.6 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
