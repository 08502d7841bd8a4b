"""The README's main command: `l4proxy demo` brings chunkd up and completes a round trip."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path


def test_demo_round_trip(tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "l4proxy.cli", "demo", "--once",
                             "--work-dir", str(work)],
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "round trip complete." in result.stdout
    assert "alice" in result.stdout  # the scan's row came back
    key = work / "chunkd.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().strip() not in result.stdout + result.stderr
