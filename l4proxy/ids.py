"""Identifiers: UUIDv7 session ids (time-ordered, so sorting by id sorts by start time)."""

from __future__ import annotations

import os
import time
import uuid

__all__ = ["uuid7"]


def uuid7(*, now_ms: int | None = None) -> uuid.UUID:
    """Return a UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then 74 random bits.

    Args:
        now_ms: the timestamp to use (for tests); default the current time.
    """
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    if not 0 <= ms < 1 << 48:
        raise ValueError("timestamp out of range for UUIDv7")
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return uuid.UUID(int=value)
