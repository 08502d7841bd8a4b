"""The control API: enrollment (OIDC ID token + CSR -> short-lived client certificate),
the CA bundle, identity-checked ``/v1/*`` endpoints, and the ops endpoints.

Theory of operation: ``ControlApi.handle`` is the request handler of the HTTPS control
listener (``l4proxy.http.serve_http``); ``ControlApi.handle_ops`` serves ``/healthz``,
``/readyz`` and ``/metrics`` on the ops listener. Enrollment runs, in order: content type,
bearer token present, per-address rate limit, JSON body and CSR, provider chosen by the
token's issuer and audience, token verified (signature, claims, who may enroll), per-
identity rate limit, the single-use claim in the state store, TTL clamped, then minting
and an audit event. Every refusal is logged with its specific reason; the client gets a
generic message. Nothing is issued on any error. Tokens are never logged.

Every other ``/v1/*`` endpoint requires an l4proxy client certificate, checked in our own
code (``check_leaf``) exactly as the data path will check it; roles come from the groups
in the certificate (``control.admin_groups`` for admin actions).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from l4proxy.audit import AuditLog, rfc3339
from l4proxy.config import Config, ProviderConfig
from l4proxy.config._model import HARD_MAX_CERT_TTL
from l4proxy.gateway._certcheck import ClientRejected, check_client, lock_lookup
from l4proxy.http import HttpRequest, HttpResponse, json_error, json_response
from l4proxy.identity import (
    CertificateAuthority,
    CsrRejected,
    Identity,
    JwksManager,
    NotPermitted,
    ProviderUnavailable,
    TokenRejected,
    leaf_identity,
    load_csr,
)
from l4proxy.store import AsyncStateStore, ClaimKind

from ._locks import handle_locks

__all__ = ["ControlApi", "Readiness"]

log = logging.getLogger("l4proxy.control")

_BODY_FIELDS = {"csr", "ttl_seconds"}


@dataclass(slots=True)
class Readiness:
    """Checks outside the API that /readyz reports (set by the server that owns them)."""

    listeners_bound: bool = False
    #: None when this process runs no gateway; else whether its listeners are bound
    gateway_bound: bool | None = None
    #: further named checks (e.g. free space for recordings): False means failing
    checks: dict[str, Callable[[], bool]] = field(default_factory=dict)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class ControlApi:
    """Handlers for the control and ops listeners.

    Args:
        config: the validated configuration.
        store: the state store (single-use tokens, rate limits).
        ca: the internal CA that mints client certificates.
        jwks: verifies ID tokens against each provider's keys.
        audit: where audit events go.
        clock: Unix time, injected for tests.
    """

    def __init__(self, config: Config, *, store: AsyncStateStore, ca: CertificateAuthority,
                 jwks: JwksManager, audit: AuditLog,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.ca = ca
        self.jwks = jwks
        self.audit = audit
        self.clock = clock
        self.readiness = Readiness()
        #: set by the process that can reload (``POST /v1/admin/reload``)
        self.reload_hook: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self.registry = CollectorRegistry()
        self.m_requests = Counter("l4proxy_control_requests_total", "Control API requests",
                                  ["endpoint", "status"], registry=self.registry)
        self.m_enroll = Counter("l4proxy_enrollments_total", "Enrollment outcomes",
                                ["provider", "result"], registry=self.registry)
        self.m_ready = Gauge("l4proxy_ready", "1 when /readyz passes", registry=self.registry)

    # --- dispatch --------------------------------------------------------------------

    async def handle(self, req: HttpRequest) -> HttpResponse:
        route = (req.method, req.path)
        if route == ("POST", "/v1/certificates"):
            endpoint, response = "certificates", await self._enroll(req)
        elif route == ("GET", "/v1/ca"):
            endpoint, response = "ca", self._ca()
        elif req.path.startswith("/v1/"):
            endpoint = "authenticated"
            response = await self._authenticated(req)
        else:
            endpoint, response = "other", json_error(404, "not_found", "no such endpoint")
        self.m_requests.labels(endpoint, str(response.status)).inc()
        return response

    async def handle_ops(self, req: HttpRequest) -> HttpResponse:
        if req.method != "GET":
            return json_error(405, "method_not_allowed", "use GET")
        if req.path == "/healthz":
            return json_response(200, {"status": "ok"})
        if req.path == "/readyz":
            failing = await self.failing_checks()
            self.m_ready.set(0 if failing else 1)
            return json_response(503 if failing else 200,
                                 {"ready": not failing, "failing": failing})
        if req.path == "/metrics":
            return HttpResponse(status=200, body=generate_latest(self.registry),
                                content_type="text/plain; version=0.0.4; charset=utf-8")
        return json_error(404, "not_found", "no such endpoint")

    async def failing_checks(self) -> list[str]:
        failing: list[str] = []
        if not self.readiness.listeners_bound:
            failing.append("listeners")
        if self.readiness.gateway_bound is False:
            failing.append("gateway_listeners")
        for name, check in self.readiness.checks.items():
            try:
                ok = check()
            except Exception:
                ok = False
            if not ok:
                failing.append(name)
        try:
            await self.store.check_writable()
        except Exception:
            failing.append("state_store")
        for name, ok in self.jwks.readiness(self.clock()).items():
            if not ok:
                failing.append(f"jwks:{name}")
        return failing

    # --- enrollment ------------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _bundle_pem(self) -> str:
        return self.ca.bundle_pem(now=self._now()).decode()

    def _ca(self) -> HttpResponse:
        return json_response(200, {"ca": self._bundle_pem(), "trust_domain": self.ca.trust_domain})

    def _refuse(self, provider: str, reason: str, status: int, code: str, message: str,
                req: HttpRequest, *, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
        log.info("enrollment refused from %s: %s", req.peer[0], reason)
        self.m_enroll.labels(provider, code).inc()
        return json_error(status, code, message, headers=headers)

    def _providers_for(self, token: str) -> list[ProviderConfig]:
        """Providers whose issuer and audience the token names (unverified: routing only;
        each candidate then verifies the token fully)."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return []
        iss, aud = claims.get("iss"), claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        return [p for p in self.config.providers if p.issuer == iss and p.audience in auds]

    async def _enroll(self, req: HttpRequest) -> HttpResponse:
        now = self.clock()
        ctype = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self._refuse("-", f"content type {ctype!r}", 415, "unsupported_media_type",
                                "send application/json", req)
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return self._refuse("-", "no bearer token", 401, "unauthorized",
                                "an ID token is required (Authorization: Bearer)", req)
        control = self.config.control
        decision = await self.store.rate_limit(f"addr:{req.peer[0]}", limit=control.rate_per_address,
                                               per_seconds=60.0, now=now)
        if not decision.allowed:
            return self._refuse("-", "address rate limit", 429, "rate_limited",
                                "too many requests", req,
                                headers=(("retry-after", str(math.ceil(decision.retry_after))),))
        try:
            body = json.loads(req.body)
        except (ValueError, UnicodeDecodeError):
            return self._refuse("-", "malformed JSON", 400, "bad_request", "body is not JSON", req)
        if not isinstance(body, dict) or set(body) - _BODY_FIELDS or "csr" not in body:
            return self._refuse("-", "bad body shape", 400, "bad_request",
                                'expected {"csr": PEM, "ttl_seconds": optional integer}', req)
        ttl_req = body.get("ttl_seconds")
        if ttl_req is not None and (type(ttl_req) is not int or ttl_req <= 0):
            return self._refuse("-", "bad ttl", 400, "bad_request",
                                "ttl_seconds must be a positive integer", req)
        if not isinstance(body["csr"], str):
            return self._refuse("-", "csr not a string", 400, "bad_request", "csr must be PEM text", req)
        try:
            csr = load_csr(body["csr"])
        except CsrRejected as exc:
            return self._refuse("-", f"CSR rejected: {exc}", 400, "bad_csr", str(exc), req)
        candidates = self._providers_for(token)
        if not candidates:
            return self._refuse("-", "no provider matches the token's issuer and audience", 401,
                                "unauthorized", "invalid token", req)
        # several providers may share an issuer and audience (e.g. one per repository
        # owner, told apart by bound_claims): the first that accepts the token wins
        verified = None
        refusal: HttpResponse | None = None
        provider = candidates[0]
        for candidate in candidates:
            provider = candidate
            try:
                verified = await self.jwks.verify(token, candidate)
                break
            except NotPermitted as exc:
                refusal = self._refuse(candidate.name, f"not permitted: {exc.reason}", 403,
                                       "forbidden", "not permitted to enroll", req)
            except TokenRejected as exc:
                refusal = refusal or self._refuse(candidate.name, f"token rejected: {exc.reason}",
                                                  401, "unauthorized", "invalid token", req)
            except ProviderUnavailable as exc:
                refusal = refusal or self._refuse(
                    candidate.name, f"provider keys unavailable: {exc}", 503,
                    "provider_unavailable",
                    "the identity provider's keys are unavailable; try again later", req)
        if verified is None:
            assert refusal is not None
            return refusal
        identity = verified.identity
        # a locked identity (or group) gets no new certificate; checked before the token is
        # used up, so the same token works once the lock is lifted
        lock = (await self.store.active_locks(now=now)).match(identity.name, identity.groups, 0,
                                                               now=now)
        if lock is not None:
            self.audit.write("enrollment_refused", {
                "identity": identity.name, "reason": "locked", "lock_id": lock.id,
                "client_address": req.peer[0]})
            return self._refuse(provider.name, f"{identity.name} is locked (lock {lock.id})", 403,
                                "locked", "identity locked", req)
        decision = await self.store.rate_limit(f"identity:{identity.name}",
                                               limit=control.rate_per_identity, per_seconds=60.0,
                                               now=now)
        if not decision.allowed:
            return self._refuse(provider.name, f"identity rate limit for {identity.name}", 429,
                                "rate_limited", "too many requests",
                                req, headers=(("retry-after", str(math.ceil(decision.retry_after))),))
        # the record must outlive every moment the token still verifies (exp + leeway)
        claim = await self.store.claim_token(verified.replay_key, binding=csr.binding,
                                             expires_at=max(verified.expires_at + provider.leeway, now),
                                             now=now)
        if claim.kind is ClaimKind.REUSED:
            return self._refuse(provider.name, f"token replay for {identity.name}", 401,
                                "unauthorized", "invalid token", req)
        if claim.kind is ClaimKind.RETRY:
            assert claim.certificate_pem is not None
            cert = x509.load_pem_x509_certificate(claim.certificate_pem.encode())
            earlier = leaf_identity(cert, trust_domain=self.ca.trust_domain)
            if earlier is None or earlier.name != identity.name:
                return self._refuse(provider.name, "retry for a different identity", 401,
                                    "unauthorized", "invalid token", req)
            log.info("enrollment retry for %s: same certificate returned", identity.name)
            self.m_enroll.labels(provider.name, "retry").inc()
            return self._issued(cert, identity, clamped=False)
        max_ttl = min(provider.max_cert_ttl, HARD_MAX_CERT_TTL)
        wanted = float(ttl_req) if ttl_req is not None else provider.default_cert_ttl
        clamped = wanted > max_ttl
        ttl = min(wanted, max_ttl)
        cert = self.ca.mint_client(public_key=csr.public_key, identity=identity,
                                   replay_key=verified.replay_key, ttl=timedelta(seconds=ttl),
                                   now=datetime.fromtimestamp(now, UTC))
        await self.store.record_issued(verified.replay_key, certificate_pem=_pem(cert), now=now)
        lifetime = (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds()
        self.audit.write("certificate_issued", {
            "identity": identity.name, "email": identity.email, "groups": list(identity.groups),
            "serial": f"{cert.serial_number:x}", "lifetime_s": int(lifetime),
            "expires_at": rfc3339(cert.not_valid_after_utc.timestamp()),
            "client_address": req.peer[0], "ttl_clamped": clamped,
        })
        self.m_enroll.labels(provider.name, "issued").inc()
        return self._issued(cert, identity, clamped=clamped)

    def _issued(self, cert: x509.Certificate, identity: Identity, *, clamped: bool) -> HttpResponse:
        body: dict[str, Any] = {
            "certificate": _pem(cert),
            "ca": self._bundle_pem(),
            "expires_at": rfc3339(cert.not_valid_after_utc.timestamp()),
            "identity": identity.name,
            "serial": f"{cert.serial_number:x}",
        }
        if clamped:
            body["ttl_clamped"] = True
            body["notice"] = "requested lifetime exceeds this provider's maximum; clamped"
        return json_response(200, body)

    # --- endpoints that need a client certificate ---------------------------------------

    async def authenticate(self, req: HttpRequest) -> tuple[Identity | None, str]:
        """The identity of the request's client certificate, checked exactly as the data
        path checks it (``check_client``: chain, validity, CA:FALSE, clientAuth, lifetime,
        trust domain, and no lock on the identity, its groups or the serial).

        Returns (identity, "") or (None, reason).
        """
        cert = req.peer_certificate
        if cert is None:
            return None, "no client certificate"
        now = self._now()
        locks = await self.store.active_locks(now=now.timestamp())
        try:
            check = check_client(cert, ca_bundle=self.ca.bundle(now=now),
                                 trust_domain=self.ca.trust_domain,
                                 max_lifetime=timedelta(seconds=self.config.limits.max_cert_lifetime),
                                 now=now, locked=lock_lookup(locks, now=now.timestamp()))
        except ClientRejected as exc:
            return None, f"{exc.code}: {exc.reason}"
        return check.identity, ""

    def is_admin(self, identity: Identity) -> bool:
        return bool(set(identity.groups) & set(self.config.control.admin_groups))

    async def _authenticated(self, req: HttpRequest) -> HttpResponse:
        identity, reason = await self.authenticate(req)
        if identity is None:
            log.info("control request %s %s refused: %s", req.method, req.path, reason)
            return json_error(401, "unauthorized", "an l4proxy client certificate is required")
        if (req.method, req.path) == ("GET", "/v1/whoami"):
            return json_response(200, {"identity": identity.name, "email": identity.email,
                                       "groups": list(identity.groups),
                                       "admin": self.is_admin(identity)})
        if req.path.startswith("/v1/admin/"):
            if not self.is_admin(identity):
                return json_error(403, "forbidden", "admin role required")
            response = await handle_locks(self, req, identity)
            if response is not None:
                return response
            if (req.method, req.path) == ("GET", "/v1/admin/status"):
                return json_response(200, {"gateway": self.config.gateway.id,
                                           "failing": await self.failing_checks()})
            if (req.method, req.path) == ("POST", "/v1/admin/reload"):
                if self.reload_hook is None:
                    return json_error(404, "not_found", "this process cannot reload")
                result = await self.reload_hook()
                self.audit.write("config_reload", {"by": identity.name, **result})
                return json_response(200 if result["reloaded"] else 400, result)
        return json_error(404, "not_found", "no such endpoint")
