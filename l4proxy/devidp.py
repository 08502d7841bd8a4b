"""The DEVELOPMENT identity provider. NOT FOR PRODUCTION: it signs whatever it is asked to.

Anyone who can run ``l4proxy dev-idp token`` (or read ``signing.key``) can mint a token for
any subject, email and groups. It exists so that ``l4proxy demo`` and the tests can run the
real OIDC path (discovery, JWKS, signature and claim checks) on one machine without an
external identity provider. Never point a production gateway at it.

Theory of operation: one ES256 (P-256) signing key lives in ``<dir>/signing.key`` (PKCS#8
PEM, created 0600 and never overwritten; a key readable by group or others is refused).
Its ``kid`` is the key's RFC 7638 JWK thumbprint. :meth:`DevIdp.mint_token` signs ID
tokens; :func:`serve_dev_idp` serves the discovery document and the JWKS over plain HTTP on
a loopback address only, and writes its issuer URL to ``<dir>/issuer`` (atomically) once
bound, for ``l4proxy dev-idp token`` and the gateway's configuration to read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from l4proxy.http import HttpRequest, HttpResponse, json_error, json_response, serve_http
from l4proxy.netaddr import is_loopback_host

__all__ = ["DEV_AUDIENCE", "DevIdp", "DevIdpError", "read_issuer", "serve_dev_idp"]

log = logging.getLogger("l4proxy.devidp")

#: the audience tokens get by default (the gateway's default client id for the dev IdP)
DEV_AUDIENCE = "l4proxy"
KEY_FILE = "signing.key"
ISSUER_FILE = "issuer"
JWKS_PATH = "/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"
#: how long clients may cache the JWKS (seconds)
JWKS_MAX_AGE = 60


class DevIdpError(OSError):
    """The dev IdP's key or issuer file is missing, malformed or unsafe.

    An :class:`OSError`, like the file errors it stands beside, so one ``except OSError``
    reports every problem with the dev IdP's directory.
    """


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        # write a private temp file, then link it into place: another process starting at
        # the same time either wins (we use its key) or loses; nobody reads a half file
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode
    if mode & 0o077:
        raise DevIdpError(f"{path} is readable by group or others (mode {mode & 0o777:o}); "
                          "run chmod 600 on it")
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise DevIdpError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or not isinstance(loaded.curve, ec.SECP256R1):
        raise DevIdpError(f"{path} is not an EC P-256 private key")
    return loaded


class DevIdp:
    """The dev identity provider's signing key and documents. DEVELOPMENT ONLY.

    Args:
        dir: where ``signing.key`` lives (created, with the key, if missing) and where
            :func:`serve_dev_idp` writes ``issuer``.

    Raises:
        DevIdpError: the key file is unsafe (group/other-readable) or not a P-256 key.
    """

    def __init__(self, dir: Path) -> None:
        self.dir = Path(dir)
        self._key = _load_or_create_key(self.dir / KEY_FILE)
        numbers = self._key.public_key().public_numbers()
        self._public_jwk = {"crv": "P-256", "kty": "EC",
                            "x": _b64(numbers.x.to_bytes(32, "big")),
                            "y": _b64(numbers.y.to_bytes(32, "big"))}
        # RFC 7638: SHA-256 over the required members, sorted, no whitespace
        canonical = json.dumps(self._public_jwk, sort_keys=True, separators=(",", ":"))
        self.kid = _b64(hashlib.sha256(canonical.encode()).digest())

    def mint_token(self, *, issuer: str, sub: str, email: str | None = None,
                   groups: Iterable[str] = (), ttl: float = 300.0, aud: str = DEV_AUDIENCE,
                   now: float, extra_claims: Mapping[str, Any] | None = None) -> str:
        """A signed ID token with a fresh ``jti``; ``email_verified`` is true when ``email``
        is given. ``extra_claims`` are added last (they may override any claim: tests use
        that to build bad tokens).

        Args:
            issuer: the ``iss`` (use :func:`read_issuer` for a running dev IdP's).
            sub: the subject.
            email: a (verified) email address, if any.
            groups: the ``groups`` claim (always present, possibly empty).
            ttl: seconds from ``now`` to ``exp``.
            aud: the audience.
            now: Unix seconds; ``iat`` and ``nbf`` (whole seconds).
        """
        iat = int(now)
        claims: dict[str, Any] = {"iss": issuer, "sub": sub, "aud": aud, "iat": iat, "nbf": iat,
                                  "exp": int(now + ttl), "jti": secrets.token_urlsafe(16),
                                  "groups": list(groups)}
        if email is not None:
            claims["email"] = email
            claims["email_verified"] = True
        if extra_claims:
            claims.update(extra_claims)
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid, "typ": "JWT"})

    def jwks(self) -> dict[str, Any]:
        """The JWKS document: the one public key."""
        return {"keys": [{**self._public_jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}]}

    def discovery(self, issuer: str) -> dict[str, Any]:
        """The OpenID discovery document for ``issuer``."""
        return {
            "issuer": issuer,
            "jwks_uri": issuer.rstrip("/") + JWKS_PATH,
            "id_token_signing_alg_values_supported": ["ES256"],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
        }




def _issuer_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with tmp.open("x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_issuer(dir: Path) -> str:
    """The issuer URL a running (or last run) dev IdP wrote to ``<dir>/issuer``.

    Raises:
        DevIdpError: no issuer file, or an empty one.
    """
    path = Path(dir) / ISSUER_FILE
    try:
        issuer = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise DevIdpError(f"{path} not found: start the dev IdP (l4proxy dev-idp serve) first") from None
    if not issuer:
        raise DevIdpError(f"{path} is empty")
    return issuer


async def serve_dev_idp(dir: Path, host: str, port: int, *,
                        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the dev IdP's discovery document and JWKS on ``host:port`` until cancelled.

    Writes the issuer URL (``http://<bound host>:<bound port>``) to ``<dir>/issuer`` once
    bound, then reports the bound ``(host, port)`` through ``task_status``.

    Raises:
        ValueError: ``host`` is not a loopback address (the dev IdP signs anything, so it
            must never be reachable from other machines).
        DevIdpError: see :class:`DevIdp`.
    """
    if not is_loopback_host(host):
        raise ValueError(f"the dev identity provider listens on loopback only "
                         f"(127.0.0.1, ::1 or localhost), not {host!r}")
    idp = DevIdp(dir)
    issuer: str | None = None

    async def handle(request: HttpRequest) -> HttpResponse:
        if issuer is None:
            return json_error(503, "starting", "not ready")
        if request.path not in (DISCOVERY_PATH, JWKS_PATH):
            return json_error(404, "not_found", "no such resource")
        if request.method != "GET":
            return json_error(405, "method_not_allowed", "use GET")
        if request.path == DISCOVERY_PATH:
            return json_response(200, idp.discovery(issuer))
        return json_response(200, idp.jwks(), headers=[("cache-control", f"max-age={JWKS_MAX_AGE}")])

    async with trio.open_nursery() as nursery:
        bound_host, bound_port = await nursery.start(partial(serve_http, handle, host, port))
        issuer = _issuer_url(bound_host, bound_port)
        await trio.to_thread.run_sync(_write_atomically, idp.dir / ISSUER_FILE, issuer + "\n")
        log.warning("DEVELOPMENT identity provider serving %s (kid %s): it signs tokens for "
                    "anyone who can run it; never use it in production", issuer, idp.kid)
        task_status.started((bound_host, bound_port))
