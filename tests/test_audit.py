"""The audit log: JSON lines, 0600, size-based rotation without split lines."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from l4proxy.audit import MAX_PENDING_BYTES, AuditLog, rfc3339


def test_lines_are_json_with_time_event_and_gateway(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a" / "audit.jsonl", gateway_id="gw", clock=lambda: 0.0)
    log.write("thing", {"identity": "dev/alice", "n": 1})
    log.close()
    path = tmp_path / "a" / "audit.jsonl"
    assert json.loads(path.read_text()) == {"time": "1970-01-01T00:00:00Z", "event": "thing",
                                            "gateway": "gw", "identity": "dev/alice", "n": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_rotation_by_size_keeps_whole_lines_and_n_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=1024, backups=2)
    for i in range(100):
        log.write("e", {"i": i, "pad": "x" * 40})
    log.close()
    files = [path, path.with_name("audit.jsonl.1"), path.with_name("audit.jsonl.2")]
    assert all(f.exists() for f in files)
    assert not path.with_name("audit.jsonl.3").exists()
    seen = []
    for f in reversed(files):
        assert f.stat().st_size <= 1024
        seen += [json.loads(line)["i"] for line in f.read_text().splitlines()]
    assert seen == sorted(seen) and seen[-1] == 99  # newest last, nothing split or reordered
    with pytest.raises(ValueError):
        AuditLog(path, max_bytes=10)


def test_reopening_appends_and_counts_the_existing_size(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path, max_bytes=2048)
    first.write("e", {"pad": "x" * 1500})
    first.close()
    again = AuditLog(path, max_bytes=2048)
    again.write("e", {"pad": "y" * 1000})  # would exceed: rotates first
    again.close()
    assert "x" * 1500 in path.with_name("audit.jsonl.1").read_text()
    assert "y" * 1000 in path.read_text()


def test_held_lines_keep_their_order_and_reach_the_file_on_flush(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.write("request", {"n": 1}, flush=False)
    log.write("request", {"n": 2}, flush=False)
    assert path.read_text() == ""  # held: no system call per request
    log.flush()
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 2]
    log.write("request", {"n": 3}, flush=False)
    log.write("session_end", {"n": 4})  # a flushed event writes what was held before it
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    log.write("request", {"n": 5}, flush=False)
    log.close()  # and closing writes the rest
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_held_lines_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(5000):  # ~400 KB of lines: written in pieces of at most MAX_PENDING_BYTES
        log.write("request", {"i": i, "pad": "x" * 40}, flush=False)
        assert log._pending_bytes < MAX_PENDING_BYTES
    assert path.stat().st_size > 300_000
    log.close()
    assert len(path.read_text().splitlines()) == 5000


def test_time_text_follows_the_clock_across_seconds() -> None:
    assert [rfc3339(t) for t in (0.0, 0.999, 1.0, 86399.5, 86400.0, 0.5)] == [
        "1970-01-01T00:00:00Z", "1970-01-01T00:00:00Z", "1970-01-01T00:00:01Z",
        "1970-01-01T23:59:59Z", "1970-01-02T00:00:00Z", "1970-01-01T00:00:00Z"]


class _FailingFile:
    """A file whose writes fail (a full disk) until ``broken`` is cleared."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.broken = True

    def write(self, text: str) -> int:
        if self.broken:
            raise OSError(28, "No space left on device")
        return int(self.real.write(text))

    def flush(self) -> None:
        self.real.flush()

    def close(self) -> None:
        self.real.close()


def test_a_failed_write_keeps_the_held_lines_for_the_next_flush(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    failing = _FailingFile(log._file)
    log._file = failing
    log.write("request", {"n": 1}, flush=False)
    log.write("request", {"n": 2}, flush=False)
    with pytest.raises(OSError):
        log.flush()
    with pytest.raises(OSError):  # a flushed event fails too, and its line is held as well
        log.write("session_end", {"n": 3})
    failing.broken = False
    log.flush()
    log.close()
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 2, 3]
