"""`l4proxy serve` as a real process: SIGHUP and POST /v1/admin/reload re-read the
configuration (a broken one keeps the old state), SIGTERM drains live sessions."""

from __future__ import annotations

import datetime as dt
import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from l4proxy.client import ChunkClient, ClientError, DeniedByPolicy
from l4proxy.identity import CertificateAuthority, Identity, init_ca
from l4proxy.netaddr import free_loopback_port
from l4proxy.wire import ErrorCode

from .conftest import spawn_chunkd, stop_process, write_private

TRUST = "serve.test"


def _config(chunkd_port: int, control: int, ops: int, gateway: int, groups: str) -> str:
    return f"""
[recording]
dir = "recordings"
min_free_bytes = 0
[gateway]
id = "gw-serve"
state_dir = "state"
[control]
listen = "127.0.0.1:{control}"
ops_listen = "127.0.0.1:{ops}"
admin_groups = ["admins"]
[ca]
dir = "certs"
trust_domain = "{TRUST}"
[limits]
drain_timeout = "2s"
[[targets]]
name = "chunks"
upstream = "127.0.0.1:{chunkd_port}"
credential = {{ file = "chunkd.key" }}
[targets.access]
groups = [{groups}]
[targets.credential_scope]
buckets = ["data-*"]
tables = []
access = ["read"]
[[listeners]]
name = "main"
listen = "127.0.0.1:{gateway}"
server_cert = "certs/server.crt"
server_key = "certs/server.key"
client_ca = "certs/bundle.pem"
targets = ["chunks"]
"""


def _client_files(ca: CertificateAuthority, tmp: Path, sub: str,
                  groups: tuple[str, ...]) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.mint_client(public_key=key.public_key(),
                          identity=Identity(provider="dev", subject=sub, groups=groups),
                          replay_key=f"jti:{sub}", ttl=dt.timedelta(minutes=10),
                          now=dt.datetime.now(dt.UTC))
    cert_path, key_path = tmp / f"{sub}.crt", tmp / f"{sub}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _admin_post(url: str, ctx: ssl.SSLContext) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture
def served(tmp_path: Path) -> Any:
    init_ca(tmp_path / "certs", trust_domain=TRUST, server_names=["127.0.0.1"],
            now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    key = write_private(tmp_path / "chunkd.key", "ck_serve_secret_value\n")
    chunkd, chunkd_port = spawn_chunkd(tmp_path, ["--data", str(tmp_path / "data"),
                                                  "--api-key-file", str(key)])
    ports = {"control": free_loopback_port(), "ops": free_loopback_port(), "gateway": free_loopback_port()}
    config = tmp_path / "l4proxy.toml"
    config.write_text(_config(chunkd_port, **ports, groups='"eng", "admins"'))
    server = subprocess.Popen([sys.executable, "-m", "l4proxy.cli", "serve", "--config", str(config)],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['ops']}/readyz", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(server.stderr.read().decode() if server.stderr else "no start") from None
            time.sleep(0.1)
    try:
        yield tmp_path, config, chunkd_port, ports, server
    finally:
        stop_process(server)
        stop_process(chunkd)


async def test_reload_and_drain(served: Any) -> None:
    tmp, config, _chunkd_port, ports, server = served
    ca = CertificateAuthority.load(tmp / "certs")
    ctx = ssl.create_default_context(cafile=str(tmp / "certs" / "ca.crt"))
    ctx.load_cert_chain(*_client_files(ca, tmp, "ivy", ("eng",)))
    admin_ctx = ssl.create_default_context(cafile=str(tmp / "certs" / "ca.crt"))
    admin_ctx.load_cert_chain(*_client_files(ca, tmp, "root", ("admins",)))
    reload_url = f"https://127.0.0.1:{ports['control']}/v1/admin/reload"

    async with ChunkClient.connect("127.0.0.1", ports["gateway"], ssl_context=ctx,
                                   server_name="127.0.0.1") as c:
        assert "time" in await c.ping()
        # a broken configuration is refused by the admin endpoint and by SIGHUP; old state stays
        good = config.read_text()
        config.write_text(good + "\n[nonsense]\n")
        status, body = await trio.to_thread.run_sync(_admin_post, reload_url, admin_ctx)
        assert status == 400 and body["reloaded"] is False and body["problems"]
        server.send_signal(signal.SIGHUP)
        await trio.sleep(0.5)
        assert "time" in await c.ping()
        # withdraw eng's access, reload by SIGHUP: the live session gets GOAWAY
        config.write_text(good.replace('groups = ["eng", "admins"]', 'groups = ["admins"]'))
        server.send_signal(signal.SIGHUP)
        with trio.fail_after(5):
            while c.goaway is None:
                await trio.sleep(0.05)
        assert c.goaway.code is ErrorCode.DENIED_BY_POLICY
    with pytest.raises(DeniedByPolicy):
        async with ChunkClient.connect("127.0.0.1", ports["gateway"], ssl_context=ctx,
                                       server_name="127.0.0.1") as c:
            await c.ping()
    # the admin endpoint reloads too
    config.write_text(good)
    status, body = await trio.to_thread.run_sync(_admin_post, reload_url, admin_ctx)
    assert status == 200 and body == {"problems": [], "reloaded": True}
    # metrics: sessions, bytes, handshakes, rejections; never the credential or identities
    def metrics() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['ops']}/metrics", timeout=10) as resp:
            return str(resp.read().decode())

    text = await trio.to_thread.run_sync(metrics)
    for name in ("l4proxy_sessions_total", "l4proxy_bytes_total", "l4proxy_handshakes_total",
                 "l4proxy_rejections_total", "l4proxy_sessions_active"):
        assert name in text, name
    assert "ck_serve_secret_value" not in text and "dev/ivy" not in text
    # SIGTERM drains: the live session gets GOAWAY(SHUTTING_DOWN), the process exits 0
    async with ChunkClient.connect("127.0.0.1", ports["gateway"], ssl_context=ctx,
                                   server_name="127.0.0.1") as c:
        assert "time" in await c.ping()
        server.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            while c.goaway is None:
                await trio.sleep(0.05)
        assert c.goaway.code is ErrorCode.SHUTTING_DOWN
        with pytest.raises(ClientError):
            await c.ping()
    assert await trio.to_thread.run_sync(lambda: server.wait(timeout=20)) == 0
    assert server.stderr is not None
    logs = server.stderr.read().decode()
    assert "ck_serve_secret_value" not in logs
    assert all(json.loads(line) for line in logs.splitlines() if line.strip())  # JSON logs
    assert "allocator" in logs  # what l4proxy._alloc did (or why not), once at start
    audit = (tmp / "state" / "audit.jsonl").read_text()
    assert '"event": "config_reload"' in audit and "ck_serve_secret_value" not in audit


async def test_kill_9_mid_session_then_restart_seals_the_recording(tmp_path: Path) -> None:
    init_ca(tmp_path / "certs", trust_domain=TRUST, server_names=["127.0.0.1"],
            now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    key = write_private(tmp_path / "chunkd.key", "ck_serve_secret_value\n")
    chunkd, chunkd_port = spawn_chunkd(tmp_path, ["--data", str(tmp_path / "data"),
                                                  "--api-key-file", str(key)])
    ports = {"control": free_loopback_port(), "ops": free_loopback_port(), "gateway": free_loopback_port()}
    config = tmp_path / "l4proxy.toml"
    config.write_text(_config(chunkd_port, **ports, groups='"eng"'))

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "l4proxy.cli", "serve", "--config",
                                 str(config)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports['ops']}/readyz", timeout=2):
                    return proc
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("l4proxy serve did not start") from None
                time.sleep(0.1)

    server = await trio.to_thread.run_sync(start)
    try:
        ca = CertificateAuthority.load(tmp_path / "certs")
        ctx = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.crt"))
        ctx.load_cert_chain(*_client_files(ca, tmp_path, "kim", ("eng",)))
        with pytest.raises(ClientError):
            async with ChunkClient.connect("127.0.0.1", ports["gateway"], ssl_context=ctx,
                                           server_name="127.0.0.1") as c:
                await c.create_bucket("data-kill")
                await c.put("data-kill", "k", b"recorded before the crash")
                await trio.sleep(1.5)  # past a flush and an fsync
                session = c.session_id
                server.kill()  # kill -9 mid-session
                await trio.to_thread.run_sync(lambda: server.wait(timeout=10))
                await c.ping()
        server = await trio.to_thread.run_sync(start)  # the restart seals what was left open
        from l4proxy.store import SqliteStateStore

        with SqliteStateStore.open(tmp_path / "state") as store:
            record = store.get_session(session)
        assert record is not None and record.end_reason == "sealed_after_crash"
        assert record.file is not None and record.trailer_head is not None
        verify = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "replay.cli", "verify", "--keyring", str(tmp_path / "certs"),
             "--index", str(tmp_path / "state" / "state.sqlite3"), "--json", record.file],
            capture_output=True, text=True, timeout=60, check=False))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "sealed_after_crash" in verify.stdout
        audit = (tmp_path / "state" / "audit.jsonl").read_text()
        assert "session_sealed_after_crash" in audit
    finally:
        stop_process(server)
        stop_process(chunkd)
