"""The README's main command: `l4proxy demo` brings up the dev IdP, chunkd, the control
API and the gateway, logs in as a sample user and uses `chunk` through the gateway."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path


def _demo(work: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "l4proxy.cli", "demo", "--once",
                           "--work-dir", str(work)],
                          capture_output=True, text=True, timeout=240, check=False)


def test_demo_end_to_end_through_the_gateway(tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = _demo(work)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "demo complete." in result.stdout
    assert "logged in as dev/alice" in result.stdout
    assert "pong from l4proxy" in result.stdout  # the gateway answered, not chunkd directly
    assert "alice  true" in result.stdout  # the scan's row came back through the gateway
    assert "FORBIDDEN" in out  # the gateway's key is scoped
    assert ": intact" in result.stdout and "tampered" not in result.stdout  # replay verify
    key_file = work / "gateway.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    secret = key_file.read_text().strip()
    assert secret not in out
    for log in work.glob("*.log"):
        assert secret not in log.read_text(), log
    assert secret not in (work / "state" / "audit.jsonl").read_text()
    for recording in (work / "recordings").rglob("*.l4rec.zst"):
        assert secret.encode() not in recording.read_bytes()
    # a second run reuses the CA and the data
    again = _demo(work)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
