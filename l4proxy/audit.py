"""The audit log: one JSON object per line, for every security-relevant event.

Theory of operation: events are plain dicts with an ``event`` name; the log adds the time
(RFC 3339 UTC) and the gateway id, and writes one line, flushed, to a file (append mode,
created 0600) or to stdout. Nothing secret may be put into an event: callers pass
identities, serials and reasons, never tokens or keys. Size-based rotation arrives with
the gateway issue.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["AuditLog", "rfc3339"]


def rfc3339(ts: float) -> str:
    """Unix seconds as RFC 3339 UTC with a ``Z`` (second precision)."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AuditLog:
    """Append-only JSON-lines audit log. ``path=None`` writes to stdout."""

    def __init__(self, path: Path | None, *, gateway_id: str = "-", clock: Any = None) -> None:
        import time

        self._clock = clock or time.time
        self.gateway_id = gateway_id
        self._lock = threading.Lock()
        self._file: IO[str]
        if path is None:
            self._file = sys.stdout
            self._owned = False
        else:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
            self._owned = True
        self.path = path

    def write(self, event: str, fields: Mapping[str, Any]) -> None:
        record = {"time": rfc3339(self._clock()), "event": event, "gateway": self.gateway_id,
                  **fields}
        line = json.dumps(record, sort_keys=True, default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._owned:
            self._file.close()
