"""Shared fixtures: real chunkd instances in temp dirs (in-process on trio, or a subprocess).

Everything listens on 127.0.0.1 with port 0; every wait is bounded.
"""

from __future__ import annotations

import os
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from l4proxy.chunkd import ChunkdConfig, load_key_file, load_keys_toml, serve
from l4proxy.client import ChunkClient
from l4proxy.identity import CertificateAuthority, init_ca
from l4proxy.tls import server_context

# --- chunkd fixtures (shared by the service, client and CLI tests) ------------------------


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to a new 0600 file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@dataclass
class ChunkdHandle:
    host: str
    port: int
    api_key: str
    data_dir: Path

    @asynccontextmanager
    async def connect(self, api_key: str | None = None, **kwargs: object) -> AsyncIterator[ChunkClient]:
        async with ChunkClient.connect(self.host, self.port,
                                       api_key=self.api_key if api_key is None else api_key,
                                       **kwargs) as client:  # type: ignore[arg-type]
            yield client


@pytest.fixture
def api_key() -> str:
    return "ck_" + secrets.token_urlsafe(24)


@pytest.fixture
def api_key_file(tmp_path: Path, api_key: str) -> Path:
    return write_private(tmp_path / "api.key", api_key + "\n")


async def start_chunkd(nursery: trio.Nursery, tmp_path: Path, *, key_file: Path | None = None,
                       keys_toml: Path | None = None, api_key: str = "",
                       **config: object) -> ChunkdHandle:
    ring = load_key_file(key_file) if key_file else load_keys_toml(keys_toml)  # type: ignore[arg-type]
    data = tmp_path / f"data-{secrets.token_hex(4)}"
    cfg = ChunkdConfig(host="127.0.0.1", port=0, data_dir=data, keys=ring, **config)  # type: ignore[arg-type]
    addrs = await nursery.start(serve, cfg)
    host, port = addrs[0]
    return ChunkdHandle(host=host, port=port, api_key=api_key, data_dir=data)


@pytest.fixture
async def chunkd(nursery: trio.Nursery, tmp_path: Path, api_key_file: Path,
                 api_key: str) -> ChunkdHandle:
    """An in-process chunkd with one all-powerful key, on a fresh data dir."""
    return await start_chunkd(nursery, tmp_path, key_file=api_key_file, api_key=api_key)


@dataclass
class ChunkdProcess:
    host: str
    port: int
    api_key: str
    api_key_file: Path
    data_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def spawn_chunkd(tmp_path: Path, args: list[str], *,
                 timeout: float = 20.0) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``chunkd`` as a subprocess on port 0 and wait (bounded) for its port."""
    port_file = tmp_path / f"chunkd-{secrets.token_hex(4)}.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4proxy.chunkd.cli", "--listen", "127.0.0.1:0",
         "--port-file", str(port_file), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"chunkd exited with {proc.returncode}: {err}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("chunkd did not start in time")


@pytest.fixture
def chunkd_process(tmp_path: Path, api_key_file: Path, api_key: str) -> Iterator[ChunkdProcess]:
    """chunkd as a real subprocess (for CLI tests, which run trio themselves)."""
    data = tmp_path / "proc-data"
    proc, port = spawn_chunkd(tmp_path, ["--data", str(data), "--api-key-file", str(api_key_file)])
    try:
        yield ChunkdProcess(host="127.0.0.1", port=port, api_key=api_key,
                            api_key_file=api_key_file, data_dir=data, proc=proc)
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a child (kill it after 10 s) and close its pipes."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


class TaskSteps(trio.abc.Instrument):
    """Counts the steps (wake-ups) of the tasks whose name contains ``name``; install with
    ``trio.lowlevel.add_instrument``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.name in task.name:
            self.steps += 1


# --- a CA for TLS tests (modules may define their own fixtures of these names) -------------

TLS_TRUST_DOMAIN = "test.l4proxy"


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def trust_domain() -> str:
    """The trust domain of :func:`ca_dir` (a test module may override it, with ``now``)."""
    return TLS_TRUST_DOMAIN


@pytest.fixture
def ca_dir(tmp_path: Path, now: datetime, trust_domain: str) -> Path:
    """A fresh CA (``init_ca``) whose server certificate names localhost and 127.0.0.1."""
    d = tmp_path / "certs"
    init_ca(d, trust_domain=trust_domain, server_names=["localhost", "127.0.0.1"], now=now)
    return d


@pytest.fixture
def ca(ca_dir: Path) -> CertificateAuthority:
    return CertificateAuthority.load(ca_dir)


@pytest.fixture
def server_ctx(ca_dir: Path) -> ssl.SSLContext:
    """The server side of ``ca_dir``: its certificate, client certificates required."""
    return server_context(ca_dir / "server.crt", ca_dir / "server.key", ca_dir / "bundle.pem")
