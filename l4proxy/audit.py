"""The audit log: one JSON object per line, for every security-relevant event.

Theory of operation: events are plain dicts with an ``event`` name; the log adds the time
(RFC 3339 UTC) and the gateway id, and writes one line to a file (append mode, created
0600) or to stdout. Nothing secret may be put into an event: callers pass identities,
serials and reasons, never tokens or keys.

Most events are written and flushed at once. The per-request events of live sessions
(``write(..., flush=False)``) are held in memory, in order, until the next flushed event,
an explicit :meth:`AuditLog.flush` (the gateway calls it every ``FLUSH_INTERVAL``), or
``MAX_PENDING_BYTES``: a request then costs no system call on the data path, and a crash
loses at most the last interval of request lines (the session's recording has them too).

A file rotates by size: when the next line would take it past ``max_bytes``, it becomes
``<name>.1`` (older ones shift up to ``<name>.<backups>``, the oldest is dropped) and a new
file starts. No line is ever split across files.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from l4proxy.config import GatewayConfig

__all__ = ["FLUSH_INTERVAL", "AuditLog", "rfc3339"]

#: how often the gateway flushes request lines held by ``write(..., flush=False)`` (seconds)
FLUSH_INTERVAL = 0.1
#: held request lines beyond this many characters are written at once
MAX_PENDING_BYTES = 64 << 10


def _format_second(second: int) -> str:
    return dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_last_second: tuple[int, str] = (0, _format_second(0))


def rfc3339(ts: float) -> str:
    """Unix seconds as RFC 3339 UTC with a ``Z`` (second precision); the text of the
    current second is reused (formatting a datetime costs more than the rest of a line)."""
    global _last_second
    second = int(ts // 1)
    cached = _last_second
    if cached[0] != second:
        cached = _last_second = (second, _format_second(second))
    return cached[1]


class AuditLog:
    """Append-only JSON-lines audit log. ``path=None`` writes to stdout."""

    def __init__(self, path: Path | None, *, gateway_id: str = "-", clock: Any = None,
                 max_bytes: int = 100 << 20, backups: int = 5) -> None:
        import time

        if max_bytes < 1024 or backups < 1:
            raise ValueError("max_bytes must be >= 1 KiB and backups >= 1")
        self._clock = clock or time.time
        self.gateway_id = gateway_id
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._file: IO[str]
        self._size = 0
        self._pending: list[str] = []
        self._pending_bytes = 0
        self.path = path
        if path is None:
            self._file = sys.stdout
            self._owned = False
        else:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._file = self._open(path)
            self._owned = True

    @classmethod
    def for_gateway(cls, gateway: GatewayConfig) -> AuditLog:
        """The audit log ``[gateway]`` configures (file or stdout, rotation)."""
        return cls(gateway.audit_path, gateway_id=gateway.id, max_bytes=gateway.audit_max_bytes,
                   backups=gateway.audit_backups)

    def _open(self, path: Path) -> IO[str]:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(fd).st_size
        return os.fdopen(fd, "a", encoding="utf-8")

    def _rotate(self, path: Path) -> None:
        self._file.close()
        for n in range(self.backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{n}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
        os.replace(path, path.with_name(f"{path.name}.1"))
        self._file = self._open(path)

    def write(self, event: str, fields: Mapping[str, Any], *, flush: bool = True) -> None:
        """Add one event. ``flush=False``: hold it (in order) until the next flush."""
        record = {"time": rfc3339(self._clock()), "event": event, "gateway": self.gateway_id,
                  **fields}
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with self._lock:
            self._pending.append(line)
            self._pending_bytes += len(line)
            if flush or self._pending_bytes >= MAX_PENDING_BYTES:
                self._write_pending()

    def flush(self) -> None:
        """Write the held lines, if any."""
        if self._pending:
            with self._lock:
                self._write_pending()

    def _write_pending(self) -> None:
        """Write the held lines in order. A line leaves the queue only once written: after
        an ``OSError`` the rest stay held (for the next flush) and the error is raised."""
        lines = self._pending
        done = 0
        try:
            for line in lines:
                size = len(line.encode("utf-8"))
                if self.path is not None and self._size and self._size + size > self.max_bytes:
                    self._rotate(self.path)
                self._file.write(line)
                self._size += size
                done += 1
            self._file.flush()
        finally:
            del lines[:done]
            self._pending_bytes = sum(len(line) for line in lines)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._owned:
                self._file.close()
