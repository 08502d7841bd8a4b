"""Identity end to end with the real command line, every part a separate process:
`ca init` -> `dev-idp serve` -> `config check` -> `serve` -> `dev-idp token` -> `login`
-> an mTLS request with the files login wrote -> `chunk --profile` over TLS."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from l4proxy.netaddr import free_loopback_port

from .conftest import spawn_chunkd, stop_process, write_private

L4 = [sys.executable, "-m", "l4proxy.cli"]
CHUNK = [sys.executable, "-m", "l4proxy.client.cli"]


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, **kw)  # type: ignore[call-overload, no-any-return]


def _wait_for(predicate: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        stop_process(proc)

def test_login_through_the_command_line(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    certs, idp = tmp_path / "certs", tmp_path / "idp"
    init = _run(
        [
            *L4,
            "ca",
            "init",
            "--dir",
            str(certs),
            "--trust-domain",
            "e2e.l4proxy",
            "--server-name",
            "127.0.0.1",
        ]
    )
    assert init.returncode == 0, init.stderr
    processes.append(
        subprocess.Popen(
            [*L4, "dev-idp", "serve", "--dir", str(idp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    )
    _wait_for(lambda: (idp / "issuer").exists(), "the dev IdP")
    issuer = (idp / "issuer").read_text().strip()
    control, ops = free_loopback_port(), free_loopback_port()
    config = tmp_path / "l4proxy.toml"
    config.write_text(f"""
[gateway]
id = "gw-e2e"
state_dir = "state"

[control]
listen = "127.0.0.1:{control}"
ops_listen = "127.0.0.1:{ops}"
admin_groups = ["admins"]

[ca]
dir = "certs"
trust_domain = "e2e.l4proxy"

[[identity.providers]]
name = "dev"
issuer = "{issuer}"
audience = "l4proxy"
jwks = "discovery"
groups_claim = "groups"
allowed_email_domains = ["example.com"]
""")
    check = _run([*L4, "config", "check", str(config)])
    assert check.returncode == 0, check.stdout + check.stderr
    server = subprocess.Popen(
        [*L4, "serve", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    processes.append(server)

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{ops}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)

    _wait_for(ready, "/readyz")
    token = _run(
        [
            *L4,
            "dev-idp",
            "token",
            "--dir",
            str(idp),
            "--sub",
            "alice",
            "--email",
            "alice@example.com",
            "--groups",
            "eng,admins",
        ]
    )
    assert token.returncode == 0, token.stderr
    token_file = write_private(tmp_path / "token", token.stdout.strip())
    profile = tmp_path / "profile"
    env = dict(os.environ, CI_ID_TOKEN=token.stdout.strip())
    login = _run(
        [
            *L4,
            "login",
            "--enroll",
            f"https://127.0.0.1:{control}",
            "--ca-file",
            str(certs / "ca.crt"),
            "--id-token-env",
            "CI_ID_TOKEN",
            "--out",
            str(profile),
            "--ttl",
            "5m",
            "--gateway",
            "127.0.0.1:1",
            "--server-name",
            "127.0.0.1",
        ],
        env=env,
    )
    assert login.returncode == 0, login.stderr
    assert "logged in as dev/alice" in login.stdout
    assert token.stdout.strip() not in login.stdout + login.stderr
    # the files complete an mTLS handshake with a server that trusts the CA
    ctx = ssl.create_default_context(cafile=str(profile / "ca.crt"))
    ctx.load_cert_chain(profile / "client.crt", profile / "client.key")
    with urllib.request.urlopen(f"https://127.0.0.1:{control}/v1/whoami", context=ctx, timeout=10) as resp:
        who = json.loads(resp.read())
    assert who["identity"] == "dev/alice" and who["admin"] is True
    # the token was single use
    again = _run(
        [
            *L4,
            "login",
            "--enroll",
            f"https://127.0.0.1:{control}",
            "--ca-file",
            str(certs / "ca.crt"),
            "--id-token-file",
            str(token_file),
            "--out",
            str(tmp_path / "again"),
        ]
    )
    assert again.returncode == 2 and "401" in again.stderr
    # `chunk --profile` takes its TLS settings from the login directory
    key_file = write_private(tmp_path / "chunkd.key", "ck_e2e_secret\n")
    chunkd, port = spawn_chunkd(
        tmp_path,
        [
            "--data",
            str(tmp_path / "data"),
            "--api-key-file",
            str(key_file),
            "--tls-cert",
            str(certs / "server.crt"),
            "--tls-key",
            str(certs / "server.key"),
        ],
    )
    processes.append(chunkd)
    ping = _run(
        [
            *CHUNK,
            "--profile",
            str(profile),
            "--server",
            f"127.0.0.1:{port}",
            "--api-key-file",
            str(key_file),
            "ping",
        ]
    )
    assert ping.returncode == 0, ping.stderr
    no_profile = _run(
        [*CHUNK, "--server", f"127.0.0.1:{port}", "--api-key-file", str(key_file), "--tls", "ping"]
    )
    assert no_profile.returncode == 7  # our CA is not in the system trust store
    # the audit log recorded the issuance, without the token
    audit = (tmp_path / "state" / "audit.jsonl").read_text()
    assert '"identity": "dev/alice"' in audit and token.stdout.strip() not in audit
    # SIGTERM stops the control plane cleanly
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=15) == 0
    assert server.stderr is not None
    logs = server.stderr.read().decode()
    server.stderr.close()
    assert token.stdout.strip() not in logs
