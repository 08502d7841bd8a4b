"""The gateway's front door: TLS listeners, our own client-certificate checks, routing,
connect access, the session registry, locks, reload and drain.

Theory of operation: each listener accepts TCP connections and hands each to
``Gateway._handle``, which runs, in order and all within ``handshake_timeout``: the TLS
handshake (``TlsStream``, which flushes the alert when a handshake fails), our own checks
of the client certificate on every connection, resumed sessions included
(``check_client``, through the state's ``CheckCache``, which keeps per certificate what
does not depend on the time: validity window, clientAuth, CA:FALSE, maximum lifetime,
identity in our trust domain, no lock on the identity, its groups or the serial), routing by SNI name
to a target, and the target's connect access. Only then does the connection count as a
session (so slow or idle handshakes never hold session capacity), get a UUIDv7 id, and
run ``run_cwp_session`` / ``run_tcp_session`` with a ``SessionControl`` in the registry.

Everything a connection needs from the configuration is read from one immutable
``GatewayState`` snapshot, which ``reload`` replaces atomically (a broken configuration
or certificate keeps the old state). Locks are checked from an in-memory view: a lock
added or removed through the same store object (the control API in this process) makes
the next connection re-read it, and a watcher polls the store's lock version (changes by
other processes) and ends the live sessions a new lock covers within a second. ``drain`` stops accepting,
sends GOAWAY to every session and ends what is left at the deadline.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import trio
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge

from l4proxy.audit import FLUSH_INTERVAL as AUDIT_FLUSH_INTERVAL
from l4proxy.audit import AuditLog
from l4proxy.config import Config, ListenerConfig, TargetConfig, TargetProtocol
from l4proxy.identity import CertificateAuthority, Identity, load_recording_keyring, trust_bundle
from l4proxy.ids import uuid7
from l4proxy.store import AsyncStateStore, SessionRecord
from l4proxy.tls import TlsHandshakeError, TlsStream, server_context
from l4proxy.wire import ErrorCode, connection_error_frame
from replay import seal_after_crash

from ._certcheck import CheckCache, ClientRejected, check_client, lock_lookup
from ._hooks import SessionInfo, SessionObserver, observe_server_parts
from ._recorder import Recorder
from ._session import SessionControl, SessionHooks, run_cwp_session, run_tcp_session
from ._upstream import open_upstream, read_credential, upstream_ssl_context

__all__ = ["Gateway", "GatewayConfigError", "GatewayState", "may_connect", "route"]

log = logging.getLogger("l4proxy.gateway")

#: how often the lock watcher polls the store's lock version (seconds)
LOCK_POLL = 0.5
#: how often active locks are re-read anyway (a lock's ``until`` may pass)
LOCK_REFRESH = 5.0
#: a lock view older than this is re-read by the connection itself before it is trusted
LOCK_STALE = 2 * LOCK_REFRESH
#: accept() errors that mean "out of descriptors or memory": wait and retry
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY = 0.1
#: handshakes in progress from one client address; more are closed at once, so one
#: source cannot pile up descriptors and buffers while others still get through
MAX_HANDSHAKES_PER_ADDRESS = 128

_REJECT_CODES = {
    "expired": ErrorCode.CERTIFICATE_EXPIRED,
    "locked": ErrorCode.IDENTITY_LOCKED,
}


class GatewayConfigError(Exception):
    """The data-path configuration cannot be put into effect (certificates, CA, ...)."""


@dataclass(frozen=True, slots=True)
class _Listener:
    config: ListenerConfig
    context: ssl.SSLContext


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayState:
    """Everything new connections need, built from one configuration and swapped whole."""

    config: Config
    listeners: Mapping[str, _Listener]
    targets: Mapping[str, TargetConfig]
    upstream_contexts: Mapping[str, ssl.SSLContext]
    ca_bundle: tuple[x509.Certificate, ...]
    trust_domain: str
    #: the client-certificate checks of this configuration's bundle and trust domain
    cert_checks: CheckCache

    @classmethod
    def build(cls, config: Config, *, now: datetime) -> GatewayState:
        """Load certificates and keys for ``config``.

        Raises:
            GatewayConfigError: a listener certificate, key or CA bundle is unusable.
        """
        if config.ca is None:
            raise GatewayConfigError("the configuration has no [ca] section")
        try:
            bundle = tuple(trust_bundle(config.ca.dir, now))
        except Exception as exc:
            raise GatewayConfigError(f"cannot read the CA in {config.ca.dir}: {exc}") from None
        listeners: dict[str, _Listener] = {}
        for lst in config.listeners:
            try:
                ctx = server_context(lst.server_cert, lst.server_key, lst.client_ca)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise GatewayConfigError(f"listener {lst.name!r}: cannot load its certificate, "
                                         f"key or client CA: {exc}") from None
            ctx.sni_callback = _remember_sni
            listeners[lst.name] = _Listener(config=lst, context=ctx)
        upstream_contexts = {}
        for target in config.targets:
            if target.upstream_tls:
                try:
                    upstream_contexts[target.name] = upstream_ssl_context(target)
                except (OSError, ssl.SSLError) as exc:
                    raise GatewayConfigError(f"target {target.name!r}: cannot load its upstream "
                                             f"CA: {exc}") from None
        return cls(config=config, listeners=listeners,
                   targets={t.name: t for t in config.targets},
                   upstream_contexts=upstream_contexts, ca_bundle=bundle,
                   trust_domain=config.ca.trust_domain,
                   cert_checks=CheckCache(ca_bundle=bundle, trust_domain=config.ca.trust_domain))


def _remember_sni(ssl_object: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
    ssl_object.l4proxy_sni = server_name


def may_connect(target: TargetConfig, identity: Identity) -> bool:
    """The target's connect access: an identity glob or a shared group."""
    if any(fnmatch.fnmatchcase(identity.name, glob) for glob in target.access.identities):
        return True
    return bool(set(identity.groups) & set(target.access.groups))


def route(listener: ListenerConfig, targets: Mapping[str, TargetConfig],
          sni: str | None) -> TargetConfig | None:
    """The target of a connection: the listener's only target, or the one whose
    ``server_names`` holds the SNI name."""
    served = [targets[name] for name in listener.targets if name in targets]
    if len(served) == 1 and not served[0].server_names:
        return served[0]
    for target in served:
        if sni is not None and sni.lower() in (n.lower() for n in target.server_names):
            return target
    return served[0] if len(served) == 1 else None


@dataclass(slots=True)
class _Live:
    info: SessionInfo
    control: SessionControl
    target: str
    cert: x509.Certificate


class _AuditObserver:
    """Writes the session's requests (one line each, with the policy's decision) and
    redactions and GOAWAYs to the audit log. Request lines are held and flushed in batches
    (``AuditLog.write(flush=False)``); every other line is flushed at once."""

    __slots__ = ("_request", "audit", "info")

    def __init__(self, audit: AuditLog, info: SessionInfo) -> None:
        self.audit = audit
        self.info = info
        #: the request whose decision has not been seen yet
        self._request: dict[str, Any] | None = None

    async def client_bytes(self, data: bytes) -> None:
        return None

    async def server_bytes(self, data: bytes) -> None:
        return None

    async def server_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        return None

    def _write_request(self, decision: Mapping[str, Any] | None) -> None:
        request, self._request = self._request, None
        if decision is not None and (request is None
                                     or decision.get("request_id") != request.get("request_id")):
            # not the held request's decision (the session does not do that today): its
            # own line, so that no decision goes unaudited
            self.audit.write("session_decision", {
                "session": self.info.session_id, "identity": self.info.identity.name,
                **decision}, flush=False)
            decision = None
        if request is not None:
            self.audit.write("session_request", {
                "session": self.info.session_id, "identity": self.info.identity.name, **request,
                "decision": None if decision is None else {
                    k: decision.get(k) for k in ("allow", "rule", "code")}}, flush=False)

    async def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        if kind == "request":
            self._write_request(None)  # refused before the policy saw it (GOAWAY)
            self._request = dict(fields)
        elif kind == "decision":
            self._write_request(fields)
        elif kind in ("redaction", "goaway"):
            self.audit.write(f"session_{kind}", {"session": self.info.session_id,
                                                 "identity": self.info.identity.name, **fields})

    async def closed(self, reason: str) -> None:
        self._write_request(None)


@dataclass(slots=True)
class _Metrics:
    sessions: Gauge
    sessions_total: Counter
    handshakes: Counter
    rejections: Counter
    bytes: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> _Metrics:
        return cls(
            sessions=Gauge("l4proxy_sessions_active", "Live sessions", ["target"], registry=registry),
            sessions_total=Counter("l4proxy_sessions_total", "Sessions started", ["target", "protocol"],
                                   registry=registry),
            handshakes=Counter("l4proxy_handshakes_total", "TLS handshakes", ["listener", "result"],
                               registry=registry),
            rejections=Counter("l4proxy_rejections_total", "Connections refused", ["reason"],
                               registry=registry),
            bytes=Counter("l4proxy_bytes_total", "Bytes relayed to and from clients",
                          ["target", "direction"], registry=registry),
        )


@dataclass(slots=True)
class _LockView:
    version: int = -1
    locks: Any = None
    refreshed: float = field(default=0.0)
    #: the store's in-process ``lock_changes`` this view has seen
    local_changes: int = 0


class Gateway:
    """The data path. ``await nursery.start(gateway.serve)`` binds every listener.

    Args:
        config: the validated configuration (listeners, targets, limits, ca).
        store: the state store (locks).
        audit: where session events go.
        registry: Prometheus registry for the gateway's metrics.
        observer_factory: an extra observer per session (the recorder plugs in here).
    """

    def __init__(self, config: Config, *, store: AsyncStateStore, audit: AuditLog,
                 registry: CollectorRegistry | None = None,
                 observer_factory: Callable[[SessionInfo], SessionObserver] | None = None) -> None:
        self.state = GatewayState.build(config, now=datetime.now(UTC))
        self.recorder: Recorder | None = None
        if config.recording is not None:
            assert config.ca is not None  # GatewayState.build checked it
            try:
                ca = CertificateAuthority.load(config.ca.dir)
            except Exception as exc:
                raise GatewayConfigError(f"cannot load the recording key from {config.ca.dir}: "
                                         f"{exc}") from None
            self.recorder = Recorder(config.recording, signing_key=ca.recording_key,
                                     gateway_id=config.gateway.id)
        self.store = store
        self.audit = audit
        self.metrics = _Metrics.create(registry or CollectorRegistry())
        self.observer_factory = observer_factory
        self.sessions: dict[str, _Live] = {}
        self.addresses: dict[str, tuple[str, int]] = {}
        self._locks = _LockView()
        self._accepting = trio.CancelScope()
        self._drained = trio.Event()
        self._no_sessions = trio.Event()
        self._no_sessions.set()
        self._handshaking: dict[str, int] = {}
        self.reload_failures = 0

    # --- configuration --------------------------------------------------------------------

    def reload(self, config: Config) -> None:
        """Swap in ``config`` for new connections; GOAWAY sessions that lost access.

        Raises:
            GatewayConfigError: nothing changed; the old state stays in effect.
        """
        try:
            new = GatewayState.build(config, now=datetime.now(UTC))
        except GatewayConfigError:
            self.reload_failures += 1
            raise
        moved = {lst.name for lst in config.listeners
                 if lst.name in self.state.listeners
                 and self.state.listeners[lst.name].config.listen != lst.listen}
        if moved or {lst.name for lst in config.listeners} != set(self.state.listeners):
            log.warning("reload: listener addresses changed (%s); they apply after a restart",
                        ", ".join(sorted(moved)) or "listeners added or removed")
        if (config.recording is None) != (self.recorder is None):
            log.warning("reload: [recording] was turned %s; that applies after a restart",
                        "off" if config.recording is None else "on")
        self.state = new
        if self.recorder is None and self.addresses:
            self._recording_off_warning()
        for live in list(self.sessions.values()):
            if not self._still_allowed(live):
                live.control.goaway(ErrorCode.DENIED_BY_POLICY,
                                    "access to this target was withdrawn; finish and disconnect")
        log.info("configuration reloaded")

    def _recording_off_warning(self) -> None:
        """Recording off is a benchmark switch (``[recording] enabled = false``); nobody
        should be able to miss that a gateway runs that way."""
        log.warning("SESSION RECORDING IS OFF ([recording] enabled = false): sessions through "
                    "this gateway are NOT recorded; this setting is for benchmarks only")
        self.audit.write("recording_disabled", {"listeners": sorted(self.addresses)})

    def _still_allowed(self, live: _Live) -> bool:
        """Whether the current state would admit this session again: its target and
        listener still route there, access still allows it, and the certificate passes
        the (possibly new) CA bundle, trust domain and lifetime checks."""
        state = self.state
        target = state.targets.get(live.target)
        listener = state.listeners.get(live.info.listener)
        if target is None or listener is None or live.target not in listener.config.targets:
            return False
        if not may_connect(target, live.info.identity):
            return False
        try:
            check_client(live.cert, ca_bundle=state.ca_bundle, trust_domain=state.trust_domain,
                         max_lifetime=timedelta(seconds=state.config.limits.max_cert_lifetime),
                         now=datetime.now(UTC), locked=lambda _identity, _serial: None)
        except ClientRejected:
            return False
        return True

    # --- serving --------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[dict[str, tuple[str, int]]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        await self.seal_crashed_sessions()
        async with trio.open_nursery() as nursery:
            await self._refresh_locks(force=True)
            # locks keep being enforced while draining: the watcher is outside `_accepting`
            nursery.start_soon(self._lock_watcher)
            nursery.start_soon(self._audit_flusher)
            with self._accepting:
                async with trio.open_nursery() as accept:
                    for lst in self.state.config.listeners:
                        host, port = lst.listen
                        listeners = await trio.open_tcp_listeners(port, host=host)
                        addr = listeners[0].socket.getsockname()
                        self.addresses[lst.name] = (addr[0], addr[1])
                        for listener in listeners:
                            accept.start_soon(self._accept_loop, lst.name, listener, nursery)
                    log.info("gateway listening: %s", ", ".join(
                        f"{n}={h}:{p}" for n, (h, p) in self.addresses.items()))
                    if self.recorder is None and self.addresses:
                        self._recording_off_warning()
                    task_status.started(dict(self.addresses))
            # accepting stopped (drain); sessions finish in `nursery`
            await self._drained.wait()
            nursery.cancel_scope.cancel()

    async def _accept_loop(self, listener_name: str, listener: trio.SocketListener,
                           connections: trio.Nursery) -> None:
        """Accept until cancelled (drain); each connection runs in ``connections`` so it
        outlives accepting. Running out of file descriptors is logged and retried."""
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                        log.error("accept on %s failed (%s); retrying in %.1f s", listener_name,
                                  exc.strerror, _ACCEPT_RETRY)
                        await trio.sleep(_ACCEPT_RETRY)
                        continue
                    raise
                connections.start_soon(self._connection, listener_name, stream)

    async def _connection(self, listener_name: str, stream: trio.SocketStream) -> None:
        try:
            await self._handle(listener_name, stream)
        except Exception:  # one connection's bug must not take the gateway down
            log.exception("connection on listener %s crashed", listener_name)
            await trio.aclose_forcefully(stream)

    async def _handle(self, listener_name: str, stream: trio.SocketStream) -> None:
        """Handshake, checks, then the session (all in this task)."""
        state = self.state
        limits = state.config.limits
        lst = state.listeners.get(listener_name)
        try:
            peer = stream.socket.getpeername()[0]
        except OSError:
            peer = "?"
        if lst is None or self._handshaking.get(peer, 0) >= MAX_HANDSHAKES_PER_ADDRESS:
            if lst is not None:
                self.metrics.rejections.labels("handshake_flood").inc()
            await trio.aclose_forcefully(stream)
            return
        tls = TlsStream(stream, lst.context, server_side=True, read_size=limits.read_size)
        self._handshaking[peer] = self._handshaking.get(peer, 0) + 1
        try:
            with trio.fail_after(limits.handshake_timeout):
                await tls.do_handshake()
        except (trio.TooSlowError, TlsHandshakeError, trio.BrokenResourceError,
                trio.ClosedResourceError, OSError) as exc:
            reason = "timeout" if isinstance(exc, trio.TooSlowError) else "tls"
            self.metrics.handshakes.labels(listener_name, reason).inc()
            log.info("handshake from %s failed: %s", peer,
                     getattr(exc, "reason", None) or type(exc).__name__)
            await trio.aclose_forcefully(tls)
            return
        finally:
            left = self._handshaking[peer] - 1
            if left:
                self._handshaking[peer] = left
            else:
                del self._handshaking[peer]
        self.metrics.handshakes.labels(listener_name, "ok").inc()
        # the handshake may have taken a while (the client sets its pace): decide on the
        # configuration in force now, not the one at accept time
        state = self.state
        der = tls.getpeercert(binary_form=True)
        sni = getattr(tls.ssl_object, "l4proxy_sni", None)
        current = state.listeners.get(listener_name)
        target = route(current.config, state.targets, sni) if current is not None else None
        view = self._locks
        if self.store.lock_changes != view.local_changes:
            # a lock added or removed in this process (the control API): in force for the
            # very next connection; other processes' changes arrive through the watcher
            await self._refresh_locks(force=True)
        elif time.time() - view.refreshed > LOCK_STALE:
            # the watcher has not managed to read the locks for a while (the store fails):
            # read them here, so that a failure refuses the connection (fail closed)
            await self._refresh_locks()
        locks = self._locks.locks
        try:
            if not der:
                raise ClientRejected("no client certificate", "malformed")
            cert, check = state.cert_checks.check(
                der, max_lifetime=timedelta(seconds=limits.max_cert_lifetime),
                now=datetime.now(UTC), locked=lock_lookup(locks, now=time.time()))
        except ClientRejected as exc:
            await self._refuse(tls, target, peer, exc.code, exc.reason,
                               _REJECT_CODES.get(exc.code, ErrorCode.DENIED_BY_POLICY))
            return
        identity = check.identity
        if target is None:
            await self._refuse(tls, None, peer, "no_route", f"no target for SNI {sni!r}",
                               ErrorCode.DENIED_BY_POLICY, identity=identity)
            return
        if not may_connect(target, identity):
            await self._refuse(tls, target, peer, "access", f"{identity.name} may not connect to "
                               f"{target.name}", ErrorCode.DENIED_BY_POLICY, identity=identity)
            return
        if self._accepting.cancel_called:
            await self._refuse(tls, target, peer, "draining", "the gateway is draining",
                               ErrorCode.SHUTTING_DOWN, identity=identity)
            return
        if self.recorder is not None and not self.recorder.free_space_ok():
            await self._refuse(tls, target, peer, "recording_space",
                               "the recording directory is low on free space",
                               ErrorCode.RECORDING_FAILED, identity=identity)
            return
        if len(self.sessions) >= limits.max_sessions:
            await self._refuse(tls, target, peer, "capacity", "max_sessions reached",
                               ErrorCode.OVER_CAPACITY, identity=identity)
            return
        info = SessionInfo(session_id=str(uuid7()), identity=identity, serial=check.serial,
                           not_after=check.not_after, target=target.name, client_address=peer,
                           listener=listener_name)
        control = SessionControl()
        self.sessions[info.session_id] = _Live(info=info, control=control, target=target.name,
                                               cert=cert)
        if self._no_sessions.is_set():
            self._no_sessions = trio.Event()
        if state is not self.state and not self._still_allowed(self.sessions[info.session_id]):
            del self.sessions[info.session_id]  # a reload landed during the checks above
            if not self.sessions:
                self._no_sessions.set()
            await self._refuse(tls, target, peer, "access", "access withdrawn by a reload",
                               ErrorCode.DENIED_BY_POLICY, identity=identity)
            return
        await self._run_session(info, tls, target, control)

    async def _refuse(self, tls: TlsStream, target: TargetConfig | None, peer: str, reason: str,
                      detail: str, code: ErrorCode, *, identity: Identity | None = None) -> None:
        self.metrics.rejections.labels(reason).inc()
        log.info("connection from %s refused (%s): %s", peer, reason, detail)
        self.audit.write("session_refused", {"client_address": peer, "reason": reason,
                                             "detail": detail,
                                             "identity": identity.name if identity else None,
                                             "target": target.name if target else None})
        if target is not None and target.protocol is TargetProtocol.CWP:
            with trio.move_on_after(2):
                try:
                    await tls.send_all(connection_error_frame(code, _PUBLIC.get(code, "refused")))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        await trio.aclose_forcefully(tls)

    async def _run_session(self, info: SessionInfo, tls: TlsStream, target: TargetConfig,
                           control: SessionControl) -> None:
        state = self.state
        self.metrics.sessions.labels(target.name).inc()
        self.metrics.sessions_total.labels(target.name, str(target.protocol)).inc()
        started = time.monotonic()
        recording = self.recorder.session(info, control) if self.recorder is not None else None
        try:
            await self.store.index_session_start(SessionRecord(
                session_id=info.session_id, identity=info.identity.name, email=info.identity.email,
                groups=info.identity.groups, target=target.name, client_address=info.client_address,
                started_at=time.time(), file=str(recording.path) if recording else None))
        except Exception:  # fail closed: a session that cannot be indexed does not run
            log.exception("session %s: cannot index the session; refusing it", info.session_id)
            self.metrics.sessions.labels(target.name).dec()
            del self.sessions[info.session_id]
            if not self.sessions:
                self._no_sessions.set()
            await self._refuse(tls, target, info.client_address, "index", "session index failed",
                               ErrorCode.RECORDING_FAILED, identity=info.identity)
            return
        self.audit.write("session_start", {**info.log_fields(), "protocol": str(target.protocol),
                                           "listener": info.listener})
        # DEBUG: on the path of every new connection, and the audit log's session_start
        # has it all; the "ended" line (with its reason) stays at INFO
        log.debug("session %s started: %s -> %s", info.session_id, info.identity.name, target.name)
        stats = _SessionStats()
        observers: list[SessionObserver] = [
            _AuditObserver(self.audit, info),
            _ByteCounter(self.metrics.bytes.labels(target.name, "from_client"),
                         self.metrics.bytes.labels(target.name, "to_client")),
            stats,
        ]
        if recording is not None:
            observers.append(recording)
        if self.observer_factory is not None:
            observers.append(self.observer_factory(info))
        hooks = SessionHooks.default()
        hooks.observer = _Observers(observers)
        ctx = state.upstream_contexts.get(target.name)
        connect_upstream = functools.partial(open_upstream, target, ctx,
                                             read_size=state.config.limits.read_size)
        reason = "error"
        trailer = None
        try:
            async with trio.open_nursery() as inner:
                if recording is not None:
                    recording.start(inner)
                if target.protocol is TargetProtocol.CWP:
                    reason = await run_cwp_session(
                        info, tls, target=target, limits=state.config.limits,
                        open_upstream=connect_upstream,
                        read_credential=lambda: read_credential(target), hooks=hooks,
                        control=control)
                else:
                    reason = await run_tcp_session(
                        info, tls, limits=state.config.limits,
                        open_upstream=connect_upstream, hooks=hooks,
                        control=control)
                inner.cancel_scope.cancel()
            if recording is not None:
                trailer = await recording.finish(reason)
                if trailer is None:
                    reason = f"{reason}; recording failed"
        finally:
            del self.sessions[info.session_id]
            self.metrics.sessions.labels(target.name).dec()
            self.audit.write("session_end", {"session": info.session_id,
                                             "identity": info.identity.name, "reason": reason,
                                             "duration_s": round(time.monotonic() - started, 3),
                                             "bytes_to_gateway": stats.to_gateway,
                                             "bytes_to_client": stats.to_client,
                                             "requests": stats.requests, "denials": stats.denials,
                                             "recording": str(recording.path) if recording else None,
                                             "trailer_head": trailer.head.hex() if trailer else None,
                                             "trailer_sig": trailer.sig.hex() if trailer else None})
            with trio.CancelScope(shield=True):
                try:
                    await self.store.index_session_end(
                        info.session_id, ended_at=time.time(), end_reason=reason,
                        bytes_to_gateway=stats.to_gateway, bytes_to_client=stats.to_client,
                        requests=stats.requests, denials=stats.denials,
                        trailer_head=trailer.head if trailer else None,
                        trailer_sig=trailer.sig if trailer else None)
                except Exception:
                    log.exception("session %s: cannot close the session in the index",
                                  info.session_id)
            if not self.sessions:
                self._no_sessions.set()

    # --- recordings after a crash ----------------------------------------------------------

    async def seal_crashed_sessions(self) -> None:
        """Close what a previous run left open: seal each recording up to its last
        checkpoint (``sealed_after_crash``) and close its index row; audited."""
        for record in await self.store.open_sessions():
            trailer = None
            outcome = "gateway stopped without closing the session"
            recorder = self.recorder
            file = record.file
            if file and recorder is not None and await trio.Path(file).exists():
                config = self.state.config
                assert config.ca is not None
                try:
                    keyring = load_recording_keyring(config.ca.dir)
                    result = await trio.to_thread.run_sync(functools.partial(
                        seal_after_crash, file, recorder.signing_key, now=time.time(),
                        trusted=keyring))
                    trailer = result.trailer
                    outcome = "sealed_after_crash" if result.sealed else trailer.reason
                except Exception as exc:
                    outcome = f"recording could not be sealed: {exc}"
                    log.error("session %s: %s", record.session_id, outcome)
            await self.store.index_session_end(
                record.session_id, ended_at=time.time(), end_reason=outcome,
                bytes_to_gateway=trailer.bytes_to_gateway if trailer else record.bytes_to_gateway,
                bytes_to_client=trailer.bytes_to_client if trailer else record.bytes_to_client,
                trailer_head=trailer.head if trailer else None,
                trailer_sig=trailer.sig if trailer else None)
            self.audit.write("session_sealed_after_crash", {
                "session": record.session_id, "identity": record.identity, "outcome": outcome,
                "recording": record.file, "trailer_head": trailer.head.hex() if trailer else None})
            log.warning("session %s (%s) left open by a previous run: %s", record.session_id,
                        record.identity, outcome)

    # --- locks ------------------------------------------------------------------------------

    async def _refresh_locks(self, *, force: bool = False) -> bool:
        """Re-read the active locks when their version changed (or periodically)."""
        view = self._locks
        now = time.time()
        changes = self.store.lock_changes
        version = await self.store.locks_version()
        if not force and version == view.version and now - view.refreshed < LOCK_REFRESH:
            return False
        view.locks = await self.store.active_locks(now=now)
        view.version = version
        view.refreshed = now
        view.local_changes = changes
        return True

    async def _audit_flusher(self) -> None:
        """Write the request lines sessions hold back (``AuditLog.write(flush=False)``)."""
        failing = False
        try:
            while True:
                await trio.sleep(AUDIT_FLUSH_INTERVAL)
                try:
                    self.audit.flush()
                except OSError as exc:
                    # the lines stay held; a session writing while it lasts ends (fail closed)
                    if not failing:
                        log.error("cannot write the audit log: %s", exc.strerror or exc)
                    failing = True
                else:
                    if failing:
                        log.warning("the audit log is writable again")
                    failing = False
        finally:
            with contextlib.suppress(OSError):
                self.audit.flush()

    async def _lock_watcher(self) -> None:
        swept = self._locks.version  # serve() read the locks before any session started
        while True:
            await trio.sleep(LOCK_POLL)
            try:
                await self._refresh_locks()
            except Exception:
                log.exception("cannot read locks from the state store")
                continue
            if self._locks.version == swept:
                continue  # no lock added or removed: the live sessions were checked already
            swept = self._locks.version
            locked = lock_lookup(self._locks.locks, now=time.time())
            for live in list(self.sessions.values()):
                reason = locked(live.info.identity, live.info.serial)
                if reason is not None:
                    log.info("session %s ended by a lock: %s", live.info.session_id, reason)
                    live.control.end(ErrorCode.IDENTITY_LOCKED, "this identity is locked")

    # --- drain ------------------------------------------------------------------------------

    async def drain(self, deadline: float | None = None) -> None:
        """Stop accepting, GOAWAY every session, end the rest after ``deadline`` seconds
        (default ``limits.drain_timeout``)."""
        if deadline is None:
            deadline = self.state.config.limits.drain_timeout
        self._accepting.cancel()
        for live in list(self.sessions.values()):
            live.control.goaway(ErrorCode.SHUTTING_DOWN, "the gateway is shutting down")
        with trio.move_on_after(deadline):
            await self._no_sessions.wait()
        for live in list(self.sessions.values()):
            live.control.end(ErrorCode.SHUTTING_DOWN, "the gateway is shutting down")
        with trio.move_on_after(5):
            await self._no_sessions.wait()
        self._drained.set()


_PUBLIC = {
    ErrorCode.CERTIFICATE_EXPIRED: "the client certificate expired; log in again",
    ErrorCode.IDENTITY_LOCKED: "this identity is locked",
    ErrorCode.DENIED_BY_POLICY: "not permitted to connect",
    ErrorCode.OVER_CAPACITY: "too many sessions; try again later",
    ErrorCode.SHUTTING_DOWN: "the gateway is shutting down",
}


class _SessionStats:
    """Per-session totals for the session index."""

    __slots__ = ("denials", "requests", "to_client", "to_gateway")

    def __init__(self) -> None:
        self.to_gateway = 0
        self.to_client = 0
        self.requests = 0
        self.denials = 0

    async def client_bytes(self, data: bytes) -> None:
        self.to_gateway += len(data)

    async def server_bytes(self, data: bytes) -> None:
        self.to_client += len(data)

    async def server_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        self.to_client += sum(len(p) for p in parts)

    async def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        if kind == "request":
            self.requests += 1
        elif kind == "decision" and not fields.get("allow", True):
            self.denials += 1

    async def closed(self, reason: str) -> None:
        return None


class _ByteCounter:
    """Counts client bytes in both directions (no identities in metric labels)."""

    __slots__ = ("received", "sent")

    def __init__(self, received: Any, sent: Any) -> None:
        self.received = received
        self.sent = sent

    async def client_bytes(self, data: bytes) -> None:
        self.received.inc(len(data))

    async def server_bytes(self, data: bytes) -> None:
        self.sent.inc(len(data))

    async def server_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        self.sent.inc(sum(len(p) for p in parts))

    async def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        return None

    async def closed(self, reason: str) -> None:
        return None


class _Observers:
    """Several observers as one."""

    __slots__ = ("observers",)

    def __init__(self, observers: list[SessionObserver]) -> None:
        self.observers = observers

    async def client_bytes(self, data: bytes) -> None:
        for obs in self.observers:
            await obs.client_bytes(data)

    async def server_bytes(self, data: bytes) -> None:
        for obs in self.observers:
            await obs.server_bytes(data)

    async def server_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        for obs in self.observers:
            await observe_server_parts(obs, parts)

    async def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        for obs in self.observers:
            await obs.event(kind, fields)

    async def closed(self, reason: str) -> None:
        for obs in self.observers:
            await obs.closed(reason)
