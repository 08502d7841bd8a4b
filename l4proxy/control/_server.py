"""Run the control plane: state store, CA, JWKS manager, the HTTPS control listener and
the plain-HTTP ops listener, in one nursery.

The control listener requests (does not require) a client certificate: enrollment and
``GET /v1/ca`` work without one; every other ``/v1/*`` endpoint checks it in our code.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import trio

from l4proxy.audit import AuditLog
from l4proxy.config import Config
from l4proxy.http import serve_http
from l4proxy.identity import CertificateAuthority, JwksManager
from l4proxy.store import AsyncStateStore, SqliteStateStore

from ._api import ControlApi

__all__ = ["ControlAddresses", "ControlPlaneError", "control_ssl_context", "run_control_plane"]

log = logging.getLogger("l4proxy.control")

#: how often expired single-use token records and rate windows are purged (seconds)
PURGE_INTERVAL = 60.0


class ControlPlaneError(Exception):
    """The control plane cannot start (CA missing, trust domain mismatch, ...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlAddresses:
    control: tuple[str, int]
    ops: tuple[str, int]
    api: ControlApi


def control_ssl_context(ca: CertificateAuthority) -> ssl.SSLContext:
    """TLS 1.2+ with the gateway's server certificate, requesting a client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(ca.files.server_cert, ca.files.server_key)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=ca.bundle_pem(now=datetime.now(UTC)).decode())
    return ctx


async def run_control_plane(
    config: Config, *, audit: AuditLog | None = None, store: AsyncStateStore | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[ControlAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve enrollment and ops until cancelled; reports the bound addresses.

    ``audit`` and ``store`` may be shared with the gateway; when not given they are
    opened under ``gateway.state_dir`` and closed on exit.
    """
    if config.ca is None:
        raise ControlPlaneError("the configuration has no [ca] section")
    try:
        ca = CertificateAuthority.load(config.ca.dir)
    except Exception as exc:
        raise ControlPlaneError(f"cannot load the CA from {config.ca.dir}: {exc} "
                                "(run `l4proxy ca init`)") from None
    if ca.trust_domain != config.ca.trust_domain:
        raise ControlPlaneError(f"the CA in {config.ca.dir} is for trust domain "
                                f"{ca.trust_domain!r}, the configuration says "
                                f"{config.ca.trust_domain!r}")
    sqlite: SqliteStateStore | None = None
    if store is None:
        sqlite = SqliteStateStore.open(config.gateway.state_dir)
        store = AsyncStateStore(sqlite)
    astore = store
    own_audit = audit is None
    audit = audit or AuditLog.for_gateway(config.gateway)
    try:
        jwks = JwksManager(config.providers, clock=clock)
        api = ControlApi(config, store=astore, ca=ca, jwks=jwks, audit=audit, clock=clock)
        ctx = control_ssl_context(ca)
        async with trio.open_nursery() as nursery:
            host, port = config.control.listen
            control = await nursery.start(lambda task_status: serve_http(
                api.handle, host, port, ssl_context=ctx, max_body=config.control.max_body,
                task_status=task_status))
            ohost, oport = config.control.ops_listen
            ops = await nursery.start(lambda task_status: serve_http(api.handle_ops, ohost, oport,
                                                            task_status=task_status))
            api.readiness.listeners_bound = True
            log.info("control API on https://%s:%d, ops on http://%s:%d", *control, *ops)

            async def purge() -> None:
                while True:
                    await trio.sleep(PURGE_INTERVAL)
                    try:
                        removed = await api.store.purge_expired(clock())
                        log.debug("purged %d expired state records", removed)
                    except Exception:
                        log.exception("state store purge failed")

            nursery.start_soon(purge)
            nursery.start_soon(jwks.warm_up)
            task_status.started(ControlAddresses(control=control, ops=ops, api=api))
    finally:
        if sqlite is not None:
            sqlite.close()
        if own_audit:
            audit.close()
