"""Human durations: ``90``, ``30s``, ``10m``, ``1h``, ``1h30m``, ``2d``."""

from __future__ import annotations

import re

__all__ = ["format_duration", "parse_duration"]

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | int | float) -> float:
    """Parse a duration into seconds. A bare number is seconds.

    Raises:
        ValueError: not a duration, or negative.
    """
    if isinstance(text, bool):
        raise ValueError("a duration must be a number or a string like '10m'")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError("a duration must not be negative")
        return float(text)
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    pos = 0
    total = 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"not a duration: {text!r} (examples: 30s, 10m, 1h, 1h30m)")
    return total


def format_duration(seconds: float) -> str:
    """Format seconds compactly (``1h30m``, ``45s``)."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
    return "".join(parts)
