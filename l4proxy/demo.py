"""``l4proxy demo``: bring the system up on one machine and show a round trip.

Theory of operation: everything lives under a work directory (default ``./demo-work``):
a generated API key (0600), chunkd's data directory, and a sample file. chunkd runs as a
child process on loopback; the demo then runs real ``chunk`` commands against it, printing
each command and its output, so what you see is exactly what you can type. It keeps
chunkd running until Ctrl-C (or exits after the round trip with ``--once``).

Later issues grow this into the full story (identity provider, CA, gateway).
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_demo"]


def _say(text: str) -> None:
    print(text, flush=True)


def _key_file(work: Path) -> Path:
    path = work / "chunkd.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("ck_" + secrets.token_urlsafe(32) + "\n")
    return path


def _start_chunkd(work: Path, key: Path, port: int) -> tuple[subprocess.Popen[bytes], int]:
    port_file = work / "chunkd.port"
    port_file.unlink(missing_ok=True)
    log = open(work / "chunkd.log", "ab")  # noqa: SIM115 - lives as long as the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4proxy.chunkd.cli", "--listen", f"127.0.0.1:{port}",
         "--data", str(work / "data"), "--api-key-file", str(key), "--port-file", str(port_file)],
        stdout=log, stderr=log,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if port_file.exists():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"chunkd exited ({proc.returncode}); see {work / 'chunkd.log'}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("chunkd did not start within 20 s")


def _chunk(env: dict[str, str], *args: str) -> int:
    _say(f"\n$ chunk {shlex.join(args)}")
    result = subprocess.run([sys.executable, "-m", "l4proxy.client.cli", *args], env=env,
                            check=False, timeout=60)
    return result.returncode


def run_demo(work: Path, *, port: int = 0, once: bool = False) -> int:
    """Run the demo. Returns the exit status (non-zero if a step failed)."""
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = _key_file(work)
    sample = work / "sample.txt"
    if not sample.exists():
        sample.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                                  for i in range(20_000)))
    rows = work / "events.jsonl"
    rows.write_text('{"id": 1, "who": "alice", "ok": true}\n{"id": 2, "who": "bob", "ok": false}\n')
    proc, bound = _start_chunkd(work, key, port)
    env = dict(os.environ, CHUNK_SERVER=f"127.0.0.1:{bound}", CHUNK_API_KEY_FILE=str(key))
    _say(f"chunkd is listening on 127.0.0.1:{bound} (data in {work / 'data'}, "
         f"log in {work / 'chunkd.log'})")
    failed = 0
    try:
        steps: list[tuple[str, ...]] = [
            ("ping",),
            ("create-bucket", "demo"),
            ("put", "demo", "sample.txt", str(sample)),
            ("list", "demo"),
            ("chunk", "demo", "sample.txt", "--strategy", "cdc", "--avg-size", "16KiB"),
            ("create-table", "events", "id:int", "who:text", "ok:bool"),
            ("insert", "events", str(rows)),
            ("scan", "events", "--where", "ok=true"),
            ("drop-table", "events"),
            ("delete-bucket", "demo", "--force"),
        ]
        for step in steps:
            if _chunk(env, *step) != 0:
                failed += 1
        _say("\n" + ("round trip complete." if not failed else f"{failed} step(s) failed."))
        if once:
            return 1 if failed else 0
        _say("\nTry it yourself (Ctrl-C here stops chunkd):\n"
             f"  export CHUNK_SERVER=127.0.0.1:{bound} CHUNK_API_KEY_FILE={key}\n"
             "  chunk create-bucket mine && chunk put mine hello.txt README.md && "
             "chunk get mine hello.txt | head")
        try:
            while proc.poll() is None:
                time.sleep(0.5)
            _say(f"chunkd exited unexpectedly ({proc.returncode}); see {work / 'chunkd.log'}")
            return 1
        except KeyboardInterrupt:
            _say("\nstopping.")
            return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
