"""The control plane end to end over real loopback HTTPS: dev IdP token -> enrollment ->
certificate, every status code, identity-checked endpoints, ops endpoints, and
`l4proxy login` producing files that complete an mTLS handshake."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import ssl
import stat
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from l4proxy.config import CaConfig, Config, ControlConfig, GatewayConfig, JwksSourceKind, ProviderConfig
from l4proxy.control import ControlAddresses, run_control_plane
from l4proxy.devidp import DevIdp, serve_dev_idp
from l4proxy.identity import init_ca, leaf_identity, read_identity_extension
from l4proxy.login import LoginError, login


def _csr(key: ec.EllipticCurvePrivateKey | None = None) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "root")])).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Plane:
    addresses: ControlAddresses
    idp: DevIdp
    issuer: str
    ca_dir: Path
    audit_path: Path
    config: Config
    tmp: Path

    @property
    def url(self) -> str:
        host, port = self.addresses.control
        return f"https://{host}:{port}"

    @property
    def ops_url(self) -> str:
        host, port = self.addresses.ops
        return f"http://{host}:{port}"

    def token(self, sub: str = "alice", **kw: Any) -> str:
        kw.setdefault("email", f"{sub}@example.com")
        kw.setdefault("groups", ("eng",))
        return self.idp.mint_token(issuer=self.issuer, sub=sub, now=time.time(), **kw)

    def context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_dir / "ca.crt"))
        if cert is not None:
            ctx.load_cert_chain(cert, key)
        return ctx


def _request(url: str, *, ctx: ssl.SSLContext | None = None, body: Any = None,
             token: str | None = None, content_type: str = "application/json",
             raw: bytes | None = None, method: str | None = None) -> tuple[int, Any, bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": content_type} if data is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()


async def call(*args: Any, **kwargs: Any) -> tuple[int, Any, bytes]:
    return await trio.to_thread.run_sync(lambda: _request(*args, **kwargs))


def _config(tmp: Path, issuer: str, ca_dir: Path, **provider: Any) -> Config:
    base = ProviderConfig(name="dev", issuer=issuer, audience="l4proxy",
                          jwks_source=JwksSourceKind.DISCOVERY, groups_claim="groups",
                          allowed_email_domains=("example.com",), max_cert_ttl=3600.0)
    return Config(
        gateway=GatewayConfig(id="gw-test", state_dir=tmp / "state"),
        control=ControlConfig(listen=("127.0.0.1", 0), ops_listen=("127.0.0.1", 0),
                              admin_groups=("admins",), rate_per_identity=5, rate_per_address=50),
        providers=(replace(base, **provider),),
        ca=CaConfig(dir=ca_dir, trust_domain="test.l4proxy"),
    )


async def _plane(nursery: trio.Nursery, tmp: Path, *, ca_age: dt.timedelta = dt.timedelta(0),
                 **provider: Any) -> Plane:
    idp_dir = tmp / "idp"
    await nursery.start(serve_dev_idp, idp_dir, "127.0.0.1", 0)
    issuer = (idp_dir / "issuer").read_text().strip()
    ca_dir = tmp / "certs"
    init_ca(ca_dir, trust_domain="test.l4proxy", server_names=["127.0.0.1"],
            now=dt.datetime.now(dt.UTC) - ca_age)
    config = _config(tmp, issuer, ca_dir, **provider)
    audit_path = config.gateway.state_dir / "audit.jsonl"
    addresses = await nursery.start(run_control_plane, config)
    return Plane(addresses=addresses, idp=DevIdp(idp_dir), issuer=issuer, ca_dir=ca_dir,
                 audit_path=audit_path, config=config, tmp=tmp)


@pytest.fixture
async def plane(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Plane]:
    yield await _plane(nursery, tmp_path)


async def test_enrollment_issues_a_certificate_for_the_token_identity(
        plane: Plane, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key, csr = _csr()
    token = plane.token("alice", groups=("eng", "admins"))
    status, _h, body = await call(plane.url + "/v1/certificates", ctx=plane.context(),
                                  body={"csr": csr}, token=token)
    assert status == 200, body
    answer = json.loads(body)
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    identity = leaf_identity(cert, trust_domain="test.l4proxy")
    assert identity is not None and identity.name == "dev/alice"
    assert identity.email == "alice@example.com"
    assert read_identity_extension(cert)["groups"] == ["admins", "eng"]  # type: ignore[index]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    # the default 10 minutes, plus at most 60 s of back-dating
    assert dt.timedelta(minutes=10) <= lifetime <= dt.timedelta(minutes=11)
    assert answer["expires_at"].endswith("Z") and "BEGIN CERTIFICATE" in answer["ca"]
    assert cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) == \
        key.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    events = [json.loads(line) for line in plane.audit_path.read_text().splitlines()]
    issued = [e for e in events if e["event"] == "certificate_issued"]
    assert issued and issued[0]["identity"] == "dev/alice" and issued[0]["serial"] == answer["serial"]
    everything = plane.audit_path.read_text() + caplog.text
    assert token not in everything and token.split(".")[2] not in everything


async def test_single_use_tokens_and_retry_with_the_same_key(plane: Plane) -> None:
    _key, csr = _csr()
    token = plane.token("bob")
    first = await call(plane.url + "/v1/certificates", ctx=plane.context(), body={"csr": csr}, token=token)
    assert first[0] == 200
    # a lost response: the same token with the same key gets the same certificate back
    again = await call(plane.url + "/v1/certificates", ctx=plane.context(), body={"csr": csr}, token=token)
    assert again[0] == 200
    assert json.loads(again[2])["certificate"] == json.loads(first[2])["certificate"]
    # any other reuse is refused
    _other_key, other_csr = _csr()
    reused = await call(plane.url + "/v1/certificates", ctx=plane.context(), body={"csr": other_csr},
                        token=token)
    assert reused[0] == 401
    assert json.loads(reused[2]) == {"error": {"code": "unauthorized", "message": "invalid token"}}


async def test_status_codes(plane: Plane) -> None:
    url = plane.url + "/v1/certificates"
    ctx = plane.context()
    _key, csr = _csr()
    cases: list[tuple[int, dict[str, Any]]] = [
        (415, {"body": {"csr": csr}, "token": plane.token("c1"), "content_type": "text/plain"}),
        (401, {"body": {"csr": csr}}),
        (401, {"body": {"csr": csr}, "token": "not.a.jwt"}),
        (401, {"body": {"csr": csr}, "token": plane.token("c2", aud="someone-else")}),
        (403, {"body": {"csr": csr}, "token": plane.token("c3", email="c3@evil.example")}),
        (400, {"raw": b"{not json", "token": plane.token("c4")}),
        (400, {"body": {"csr": csr, "admin": True}, "token": plane.token("c5")}),
        (400, {"body": {"csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                                "-----END CERTIFICATE REQUEST-----\n"}, "token": plane.token("c6")}),
        (400, {"body": {"csr": csr, "ttl_seconds": -5}, "token": plane.token("c7")}),
        (400, {"body": {"csr": csr, "ttl_seconds": "600"}, "token": plane.token("c8")}),
        (413, {"raw": json.dumps({"csr": "x" * 70_000}).encode(), "token": plane.token("c9")}),
    ]
    for expected, kwargs in cases:
        status, _h, body = await call(url, ctx=ctx, **kwargs)
        assert status == expected, (expected, kwargs.get("content_type"), body)
        assert set(json.loads(body)["error"]) == {"code", "message"}
    # nothing was issued on any of those errors
    assert "certificate_issued" not in (plane.audit_path.read_text() if plane.audit_path.exists() else "")
    status, _h, body = await call(plane.url + "/v1/nothing", ctx=ctx)
    assert status == 401  # every other /v1 endpoint wants a client certificate first


async def test_ttl_is_clamped_and_said_so(plane: Plane) -> None:
    _key, csr = _csr()
    status, _h, body = await call(plane.url + "/v1/certificates", ctx=plane.context(),
                                  body={"csr": csr, "ttl_seconds": 7 * 24 * 3600},
                                  token=plane.token("t"))
    assert status == 200
    answer = json.loads(body)
    assert answer["ttl_clamped"] is True
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(hours=1, minutes=1)


async def test_rate_limit_per_identity(plane: Plane) -> None:
    statuses = []
    headers: Any = {}
    for _ in range(7):
        _key, csr = _csr()
        status, headers, _b = await call(plane.url + "/v1/certificates", ctx=plane.context(),
                                         body={"csr": csr}, token=plane.token("rl"))
        statuses.append(status)
    assert statuses[:5] == [200] * 5 and statuses[5:] == [429, 429]
    assert int(headers["Retry-After"]) > 0


async def test_stale_provider_keys_give_503(nursery: trio.Nursery, tmp_path: Path) -> None:
    plane = await _plane(nursery, tmp_path, jwks_source=JwksSourceKind.URL,
                         jwks_location="http://127.0.0.1:9/jwks.json")
    _key, csr = _csr()
    status, _h, body = await call(plane.url + "/v1/certificates", ctx=plane.context(),
                                  body={"csr": csr}, token=plane.token("s"))
    assert status == 503, body
    status, _h, body = await call(plane.ops_url + "/readyz")
    assert status == 503 and "jwks:dev" in json.loads(body)["failing"]


async def test_client_certificate_endpoints_and_ops(plane: Plane, tmp_path: Path) -> None:
    async def enroll(sub: str, groups: tuple[str, ...]) -> tuple[Path, Path]:
        key, csr = _csr()
        status, _h, body = await call(plane.url + "/v1/certificates", ctx=plane.context(),
                                      body={"csr": csr}, token=plane.token(sub, groups=groups))
        assert status == 200
        cert_path, key_path = tmp_path / f"{sub}.crt", tmp_path / f"{sub}.key"
        cert_path.write_text(json.loads(body)["certificate"])
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    admin = await enroll("root-user", ("admins",))
    user = await enroll("plain-user", ("eng",))
    status, _h, body = await call(plane.url + "/v1/whoami", ctx=plane.context(*user))
    assert status == 200 and json.loads(body)["identity"] == "dev/plain-user"
    assert json.loads(body)["admin"] is False
    assert (await call(plane.url + "/v1/admin/status", ctx=plane.context(*user)))[0] == 403
    status, _h, body = await call(plane.url + "/v1/admin/status", ctx=plane.context(*admin))
    assert status == 200 and json.loads(body)["gateway"] == "gw-test"
    assert (await call(plane.url + "/v1/whoami", ctx=plane.context()))[0] == 401
    # GET /v1/ca needs no certificate
    status, _h, body = await call(plane.url + "/v1/ca", ctx=plane.context())
    assert status == 200 and json.loads(body)["trust_domain"] == "test.l4proxy"
    # ops
    assert (await call(plane.ops_url + "/healthz"))[0] == 200
    status, _h, body = await call(plane.ops_url + "/readyz")
    assert status == 200 and json.loads(body) == {"failing": [], "ready": True}
    status, _h, body = await call(plane.ops_url + "/metrics")
    text = body.decode()
    assert status == 200 and 'l4proxy_enrollments_total{provider="dev",result="issued"}' in text
    assert "plain-user" not in text and "root-user" not in text  # no identities in labels


async def test_expired_certificate_is_refused_by_our_checks(nursery: trio.Nursery, tmp_path: Path) -> None:
    plane = await _plane(nursery, tmp_path, ca_age=dt.timedelta(hours=3))
    from l4proxy.identity import CertificateAuthority, Identity

    ca = CertificateAuthority.load(plane.ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    cert = ca.mint_client(public_key=key.public_key(),
                          identity=Identity(provider="dev", subject="old", groups=("admins",)),
                          replay_key="jti:x", ttl=dt.timedelta(minutes=10), now=past)
    cert_path, key_path = tmp_path / "old.crt", tmp_path / "old.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    # TLS itself would refuse an expired chain during the handshake; either way no access
    try:
        status, _h, _b = await call(plane.url + "/v1/whoami", ctx=plane.context(cert_path, key_path))
    except (urllib.error.URLError, ssl.SSLError, ConnectionError):
        status = 0
    assert status in (0, 401)


async def test_login_writes_files_that_complete_an_mtls_handshake(plane: Plane, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(plane.token("carol", groups=("eng",)))
    out = tmp_path / "profile"
    result = await trio.to_thread.run_sync(lambda: login(
        enroll_url=plane.url, ca_file=plane.ca_dir / "ca.crt", id_token=token_file.read_text(),
        out_dir=out, ttl_seconds=300, gateway="127.0.0.1:7443", server_name="127.0.0.1"))
    assert result.identity == "dev/carol"
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "client.crt", "client.key", "profile.toml"]
    assert stat.S_IMODE((out / "client.key").stat().st_mode) == 0o600
    profile = (out / "profile.toml").read_text()
    assert plane.url in profile and "127.0.0.1:7443" in profile
    status, _h, body = await call(plane.url + "/v1/whoami",
                                  ctx=plane.context(out / "client.crt", out / "client.key"))
    assert status == 200 and json.loads(body)["identity"] == "dev/carol"
    # the same token again is refused (exit code 2), and the message has no token in it
    with pytest.raises(LoginError) as exc:
        await trio.to_thread.run_sync(lambda: login(
            enroll_url=plane.url, ca_file=plane.ca_dir / "ca.crt", id_token=token_file.read_text(),
            out_dir=tmp_path / "again"))
    assert exc.value.exit_code == 2 and token_file.read_text() not in str(exc.value)
    with pytest.raises(LoginError) as exc:
        await trio.to_thread.run_sync(lambda: login(
            enroll_url="https://127.0.0.1:9", ca_file=plane.ca_dir / "ca.crt", id_token="x",
            out_dir=tmp_path / "nowhere"))
    assert exc.value.exit_code == 7


def test_cli_config_check_and_ca_init(tmp_path: Path) -> None:
    import subprocess
    import sys

    sample = Path(__file__).resolve().parent.parent / "examples" / "l4proxy.toml"
    ok = subprocess.run([sys.executable, "-m", "l4proxy.cli", "config", "check", str(sample)],
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nid = "gw"\nstate_dir = "s"\ncolour = "red"\n')
    out = subprocess.run([sys.executable, "-m", "l4proxy.cli", "config", "check", str(bad)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1 and "gateway.colour: unknown key" in out.stdout
    ca_dir = tmp_path / "certs"
    first = subprocess.run([sys.executable, "-m", "l4proxy.cli", "ca", "init", "--dir", str(ca_dir)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    again = subprocess.run([sys.executable, "-m", "l4proxy.cli", "ca", "init", "--dir", str(ca_dir)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    bg = subprocess.run([sys.executable, "-m", "l4proxy.cli", "ca", "issue", "--dir", str(ca_dir),
                         "--identity", "breakglass/oncall", "--ttl", "3h", "--out", str(tmp_path / "bg")],
                        capture_output=True, text=True, timeout=60, check=False)
    assert bg.returncode == 0, bg.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "bg" / "client.crt").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(hours=1, minutes=1)
    audit = (ca_dir / "breakglass-audit.jsonl").read_text()
    assert '"identity": "breakglass/oncall"' in audit and '"ttl_clamped": true' in audit
    assert os.stat(tmp_path / "bg" / "client.key").st_mode & 0o077 == 0


async def test_replayed_token_is_refused_after_a_restart(nursery: trio.Nursery,
                                                          tmp_path: Path) -> None:
    await nursery.start(serve_dev_idp, tmp_path / "idp", "127.0.0.1", 0)
    issuer = (tmp_path / "idp" / "issuer").read_text().strip()
    init_ca(tmp_path / "certs", trust_domain="test.l4proxy", server_names=["127.0.0.1"],
            now=dt.datetime.now(dt.UTC))
    config = _config(tmp_path, issuer, tmp_path / "certs")
    token = DevIdp(tmp_path / "idp").mint_token(issuer=issuer, sub="restart", email="r@example.com",
                                                groups=("eng",), now=time.time())
    ctx = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.crt"))
    statuses = []
    for _run in range(2):  # the second control plane starts on the first one's state dir
        async with trio.open_nursery() as run:
            addresses = await run.start(run_control_plane, config)
            host, port = addresses.control
            _key, csr = _csr()
            statuses.append((await call(f"https://{host}:{port}/v1/certificates", ctx=ctx,
                                        body={"csr": csr}, token=token))[0])
            run.cancel_scope.cancel()
    assert statuses == [200, 401]
