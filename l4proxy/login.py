"""``l4proxy login``: exchange an OIDC ID token for a short-lived client certificate.

Theory of operation: the private key is generated here (EC P-256) and written 0600; only
a CSR leaves the machine. The ID token comes from a file or an environment variable (CI
systems put workload tokens there), never from a command-line argument, and is sent once
as a bearer token over TLS verified against ``--ca-file``. The answer's certificate, the
CA bundle and a ``profile.toml`` (enroll URL, control URL, gateway address and server
name) are written to the output directory, each atomically, so ``chunk --profile DIR``
and the admin commands can use them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["LoginError", "LoginResult", "default_profile_dir", "login", "write_private_file"]

#: the largest response we read from the enrollment endpoint
MAX_RESPONSE = 256 << 10


class LoginError(Exception):
    """Login failed. ``exit_code``: 1 local problem, 2 refused by the server, 7 connection."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginResult:
    identity: str
    expires_at: str
    out_dir: Path
    ttl_clamped: bool


def default_profile_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "l4proxy"


def write_private_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def login(*, enroll_url: str, ca_file: Path, id_token: str, out_dir: Path,
          ttl_seconds: int | None = None, gateway: str | None = None,
          server_name: str | None = None, timeout: float = 30.0) -> LoginResult:
    """Enroll and write ``client.key client.crt ca.crt profile.toml`` to ``out_dir``.

    Raises:
        LoginError: with the exit code to use; its message never contains the token.
    """
    url = urlsplit(enroll_url)
    if url.scheme != "https" or not url.hostname:
        raise LoginError(f"--enroll must be an https:// URL, got {enroll_url!r}")
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise LoginError(f"cannot use --ca-file {ca_file}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "l4proxy-client")]))
           .sign(key, hashes.SHA256()))
    body: dict[str, object] = {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    base = f"{url.scheme}://{url.netloc}"
    endpoint = base + (url.path.rstrip("/") if url.path not in ("", "/") else "") + "/v1/certificates"
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {id_token}"})
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=timeout) as resp:
            raw = resp.read(MAX_RESPONSE + 1)
    except urllib.error.HTTPError as exc:
        detail = ""
        try:
            detail = json.loads(exc.read(MAX_RESPONSE))["error"]["message"]
        except Exception:
            detail = exc.reason if isinstance(exc.reason, str) else ""
        hint = f" (retry after {exc.headers.get('Retry-After')} s)" if exc.code == 429 else ""
        raise LoginError(f"enrollment refused: HTTP {exc.code}: {detail}{hint}",
                         exit_code=2) from None
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LoginError(f"cannot reach {base}: {reason}", exit_code=7) from None
    if len(raw) > MAX_RESPONSE:
        raise LoginError("enrollment response too large", exit_code=2)
    try:
        answer = json.loads(raw)
        cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
        ca_pem = answer["ca"]
        x509.load_pem_x509_certificates(ca_pem.encode())
    except (ValueError, KeyError, TypeError) as exc:
        raise LoginError(f"malformed enrollment response ({type(exc).__name__})", exit_code=2) from None
    if cert.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo):
        raise LoginError("the issued certificate is not for our key", exit_code=2)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private_file(out_dir / "client.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    write_private_file(out_dir / "client.crt", cert.public_bytes(serialization.Encoding.PEM),
                       mode=0o644)
    write_private_file(out_dir / "ca.crt", ca_pem.encode(), mode=0o644)
    profile = [
        "# written by `l4proxy login`; read by `chunk --profile` and the l4proxy admin commands",
        f"enroll_url = {_toml_str(enroll_url)}",
        f"control_url = {_toml_str(base)}",
        f"gateway = {_toml_str(gateway or '')}",
        f"server_name = {_toml_str(server_name or (url.hostname or ''))}",
        f"identity = {_toml_str(str(answer.get('identity', '')))}",
        f"expires_at = {_toml_str(str(answer.get('expires_at', '')))}",
        "",
    ]
    write_private_file(out_dir / "profile.toml", "\n".join(profile).encode(), mode=0o644)
    expires = cert.not_valid_after_utc.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return LoginResult(identity=str(answer.get("identity", "")), expires_at=expires,
                       out_dir=out_dir, ttl_clamped=bool(answer.get("ttl_clamped")))
