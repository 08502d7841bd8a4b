"""The gateway's TLS front door: ``TlsStream`` as the server and ``check_client``.

Real loopback sockets on port 0 with Python's ``ssl`` (blocking, in a worker thread) or
trio's ``SSLStream`` as the client; and the gateway's TLS upstreams (``open_upstream``)
against trio's ``SSLStream`` as the service. ``TlsStream``'s own semantics and its client
side are in ``test_tls.py``. Every test is bounded (``trio.fail_after``, socket timeouts); nothing
sleeps. The CA is real
(``init_ca`` in a temp dir) and valid at the real time, since OpenSSL checks certificates
against the real clock; ``check_client`` gets its time injected.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

import l4proxy.gateway
from l4proxy.config import LimitsConfig, TargetConfig, TargetProtocol
from l4proxy.gateway import (
    CheckCache,
    ClientCheck,
    ClientRejected,
    RejectCode,
    SessionInfo,
    check_client,
    run_tcp_session,
)
from l4proxy.gateway._upstream import connect_tcp, open_upstream, upstream_ssl_context
from l4proxy.identity import L4PROXY_IDENTITY_OID, CertificateAuthority, Identity, identity_uri, init_ca
from l4proxy.tls import TlsHandshakeError, TlsStream

from .conftest import TLS_TRUST_DOMAIN
from .test_tls import _on_loopback, _receive_exactly

TD = TLS_TRUST_DOMAIN  # the conftest CA's
ALICE = Identity(provider="github", subject="alice", email="alice@example.com", groups=("eng",))
BOB = Identity(provider="github", subject="bob", groups=("ops",))
TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3
VERSIONS = pytest.mark.parametrize("version", [TLS12, TLS13], ids=["tls1.2", "tls1.3"])
MAX_LIFETIME = timedelta(hours=1)
BIG = 4 * 1024 * 1024
RECORD = 16 * 1024
DEADLINE = 15  # seconds, for every networked test
SOCKET_TIMEOUT = 10.0

T = TypeVar("T")


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def other_ca(tmp_path: Path, now: datetime) -> CertificateAuthority:
    """Another CA of the same trust domain: its certificates must not get in."""
    d = tmp_path / "other"
    init_ca(d, trust_domain=TD, now=now)
    return CertificateAuthority.load(d)


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _mint(ca: CertificateAuthority, now: datetime, identity: Identity = ALICE, *,
          ttl: timedelta = timedelta(minutes=10), key: ec.EllipticCurvePrivateKey | None = None,
          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = key or _p256()
    cert = ca.mint_client(public_key=key.public_key(), identity=identity, replay_key="jti:t", ttl=ttl,
                          now=now)
    return key, cert


def _write_pair(dir: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
                ) -> tuple[Path, Path]:
    crt, pem_key = dir / f"{name}.crt", dir / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pem_key.chmod(0o600)
    return crt, pem_key


def _client_ctx(ca_dir: Path, version: ssl.TLSVersion, pair: tuple[Path, Path] | None = None
                ) -> ssl.SSLContext:
    """A plain stdlib client context (independent of our own context helpers)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca_dir / "ca.crt")
    ctx.maximum_version = version
    if pair is not None:
        ctx.load_cert_chain(*pair)
    return ctx


def _ca_key(ca_dir: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _reissue(ca_dir: Path, cert: x509.Certificate, *, drop: tuple[x509.ObjectIdentifier, ...] = (),
             add: tuple[tuple[x509.ExtensionType, bool], ...] = (),
             not_after: datetime | None = None) -> x509.Certificate:
    """Re-sign ``cert`` with the real CA key, with extensions dropped/replaced or a new notAfter."""
    replaced = {value.oid for value, _ in add}
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(cert.not_valid_before_utc)
               .not_valid_after(not_after or cert.not_valid_after_utc))
    for ext in cert.extensions:
        if ext.oid not in drop and ext.oid not in replaced:
            builder = builder.add_extension(ext.value, critical=ext.critical)
    for value, critical in add:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(_ca_key(ca_dir), hashes.SHA256())


def _no_locks(identity: Identity, serial: int) -> str | None:
    return None


def _outcome(call: Callable[[], ClientCheck]) -> tuple[Any, ...]:
    try:
        return ("ok", call())
    except ClientRejected as exc:
        return ("rejected", exc.code, exc.reason)
    except ValueError as exc:
        return ("error", str(exc))


def _check(ca: CertificateAuthority, cert: x509.Certificate, now: datetime,
           locked: Callable[[Identity, int], str | None] = _no_locks) -> ClientCheck:
    """check_client -- and the gateway's CheckCache, cold and then warm, must agree (the
    cache gets the lock answers check_client got, and may ask only what it asked)."""
    bundle = ca.bundle(now=now)
    answers: dict[tuple[Identity, int], str | None] = {}

    def asked(identity: Identity, serial: int) -> str | None:
        answers[(identity, serial)] = locked(identity, serial)
        return answers[(identity, serial)]

    direct = _outcome(lambda: check_client(cert, ca_bundle=bundle, trust_domain=TD,
                                           max_lifetime=MAX_LIFETIME, now=now, locked=asked))
    cache = CheckCache(ca_bundle=bundle, trust_domain=TD)
    der = cert.public_bytes(serialization.Encoding.DER)
    for _ in ("cold", "warm"):
        cached = _outcome(lambda: cache.check(der, max_lifetime=MAX_LIFETIME, now=now,
                                              locked=lambda i, s: answers[(i, s)])[1])
        assert cached == direct
    if direct[0] == "rejected":
        raise ClientRejected(direct[2], direct[1])
    if direct[0] == "error":
        raise ValueError(direct[1])
    result: ClientCheck = direct[1]
    return result


def _connect(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    try:
        return ctx.wrap_socket(sock, server_hostname="localhost", session=session)
    except BaseException:
        sock.close()
        raise


def _recv_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def _serve_one_client(server: Callable[[trio.SocketListener], Awaitable[T]],
                            client: Callable[[int], Any]) -> tuple[T, Any]:
    """Run ``server(listener)`` on a loopback port and ``client(port)`` in a thread."""
    return await _on_loopback(server, lambda port: trio.to_thread.run_sync(client, port))


def _client_error(port: int, ctx: ssl.SSLContext) -> ssl.SSLError:
    """Connect, send and read: the server's rejection must arrive as a TLS alert.

    With TLS 1.2 it fails the handshake; with TLS 1.3 the client's handshake completes
    before the server checks its certificate, so the alert shows on the first read.
    """
    try:
        with _connect(port, ctx) as sock:
            sock.sendall(b"hello")
            data = sock.recv(100)
    except ssl.SSLError as exc:
        return exc
    raise AssertionError(f"the client was not refused with a TLS alert (read {data!r})")


async def _refused_handshake(listener: trio.SocketListener, ctx: ssl.SSLContext) -> TlsHandshakeError:
    stream = await listener.accept()
    async with TlsStream(stream, ctx, server_side=True) as tls:
        with pytest.raises(TlsHandshakeError) as info:
            await tls.do_handshake()
        # the stream stays broken
        with pytest.raises(trio.BrokenResourceError):
            await tls.receive_some()
    return info.value


# --- the public surface ----------------------------------------------------------------------


def test_public_surface_is_explicit() -> None:
    names = l4proxy.gateway.__all__
    assert len(names) == len(set(names))
    assert all(hasattr(l4proxy.gateway, name) for name in names)
    assert {"TlsStream", "TlsHandshakeError", "server_context", "check_client", "ClientCheck",
            "ClientRejected"} <= set(names)


# --- contexts ----------------------------------------------------------------------------------


def test_server_context_is_strict(server_ctx: ssl.SSLContext) -> None:
    assert server_ctx.minimum_version is TLS12
    assert server_ctx.maximum_version is TLS13
    assert server_ctx.verify_mode is ssl.CERT_REQUIRED
    assert server_ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert server_ctx.options & ssl.OP_NO_RENEGOTIATION
    assert server_ctx.options & ssl.OP_NO_COMPRESSION
    assert not server_ctx.options & ssl.OP_NO_TICKET  # resumption on: check_client catches it
    tls12 = [c for c in server_ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    assert all(c["aead"] and c["kea"] == "kx-ecdhe" for c in tls12)


# --- real handshakes ---------------------------------------------------------------------------


@VERSIONS
async def test_good_client_exchanges_data_both_ways(tmp_path: Path, ca_dir: Path, ca: CertificateAuthority,
                                                    server_ctx: ssl.SSLContext, now: datetime,
                                                    version: ssl.TLSVersion) -> None:
    key, cert = _mint(ca, now)
    ctx = _client_ctx(ca_dir, version, _write_pair(tmp_path, "alice", key, cert))
    payload = hashlib.shake_256(b"payload").digest(BIG)

    async def server(listener: trio.SocketListener) -> dict[str, Any]:
        stream = await listener.accept()
        async with TlsStream(stream, server_ctx, server_side=True) as tls:
            await tls.do_handshake()
            peer = tls.peer_certificate()
            assert peer is not None
            check = _check(ca, peer, datetime.now(UTC))
            assert await _receive_exactly(tls, 4) == b"ping"
            await tls.send_all(b"pong")
            sizes: list[int] = []
            data = await _receive_exactly(tls, BIG, sizes)
            await tls.send_all(hashlib.sha256(data).digest())
            await tls.send_all(data[::-1])
            eof = await tls.receive_some()  # the client's close_notify
            return {"check": check, "version": tls.version(), "der": tls.getpeercert(),
                    "reused": tls.session_reused, "sizes": sizes, "eof": eof}

    def client(port: int) -> tuple[bytes, bytes]:
        with _connect(port, ctx) as sock:
            sock.sendall(b"ping")
            assert _recv_exactly(sock, 4) == b"pong"
            sock.sendall(payload)
            digest = _recv_exactly(sock, 32)
            back = _recv_exactly(sock, BIG)
            sock.unwrap()  # close_notify both ways: the server's aclose answers
            return digest, back

    got, (digest, back) = await _serve_one_client(server, client)
    assert got["version"] == ("TLSv1.2" if version is TLS12 else "TLSv1.3")
    assert got["check"] == ClientCheck(identity=ALICE, serial=cert.serial_number,
                                       not_after=cert.not_valid_after_utc)
    assert got["der"] == cert.public_bytes(serialization.Encoding.DER)
    assert got["reused"] is False
    assert got["eof"] == b""
    assert digest == hashlib.sha256(payload).digest()
    assert back == payload[::-1]
    # large reads: more than one 16 KiB record per receive_some
    assert max(got["sizes"]) > RECORD


@VERSIONS
async def test_concurrent_send_and_receive(tmp_path: Path, ca_dir: Path, ca: CertificateAuthority,
                                           server_ctx: ssl.SSLContext, now: datetime,
                                           version: ssl.TLSVersion) -> None:
    """An echo whose two directions run in two tasks on each side, interleaving freely."""
    key, cert = _mint(ca, now)
    ctx = _client_ctx(ca_dir, version, _write_pair(tmp_path, "alice", key, cert))
    payload = hashlib.shake_256(b"echo").digest(BIG)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    assert isinstance(listeners[0], trio.SocketListener)
    port = listeners[0].socket.getsockname()[1]
    echoed = bytearray()

    async def server() -> None:
        stream = await listeners[0].accept()
        send, receive = trio.open_memory_channel[bytes | bytearray](4)
        async with TlsStream(stream, server_ctx, server_side=True) as tls:

            async def pump_in() -> None:
                async with send:
                    while data := await tls.receive_some():
                        await send.send(data)

            async def pump_out() -> None:
                async with receive:
                    async for data in receive:
                        await tls.send_all(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump_in)
                nursery.start_soon(pump_out)

    async def client() -> None:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        async with trio.SSLStream(tcp, ctx, server_hostname="localhost") as tls:

            async def sender() -> None:
                view = memoryview(payload)
                for off in range(0, BIG, 100_000):
                    await tls.send_all(view[off:off + 100_000])

            async def receiver() -> None:
                while len(echoed) < BIG:
                    data = await tls.receive_some()
                    assert data
                    echoed.extend(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                nursery.start_soon(receiver)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            nursery.start_soon(client)
    for lst in listeners:
        await lst.aclose()
    assert bytes(echoed) == payload


@VERSIONS
async def test_client_without_certificate_gets_an_alert(ca_dir: Path, server_ctx: ssl.SSLContext,
                                                        version: ssl.TLSVersion) -> None:
    ctx = _client_ctx(ca_dir, version)
    refused, err = await _serve_one_client(lambda lst: _refused_handshake(lst, server_ctx),
                                           lambda port: _client_error(port, ctx))
    assert refused.reason == "peer did not return a certificate"
    assert refused.alert is True
    assert isinstance(refused.__cause__, ssl.SSLError)
    # the cause on the client's side: the alert itself, not a reset or a bare EOF
    if version is TLS12:
        assert err.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"
    else:
        assert err.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"


@VERSIONS
async def test_certificate_from_another_ca_gets_unknown_ca(tmp_path: Path, ca_dir: Path, now: datetime,
                                                           other_ca: CertificateAuthority,
                                                           server_ctx: ssl.SSLContext,
                                                           version: ssl.TLSVersion) -> None:
    key, cert = _mint(other_ca, now)
    ctx = _client_ctx(ca_dir, version, _write_pair(tmp_path, "foreign", key, cert))
    refused, err = await _serve_one_client(lambda lst: _refused_handshake(lst, server_ctx),
                                           lambda port: _client_error(port, ctx))
    assert refused.reason.startswith("certificate verify failed")
    assert refused.alert is True
    assert isinstance(refused.__cause__, ssl.SSLCertVerificationError)
    assert err.reason == "TLSV1_ALERT_UNKNOWN_CA"


@VERSIONS
async def test_resumed_session_with_an_expired_certificate_is_refused(
        tmp_path: Path, ca_dir: Path, ca: CertificateAuthority, server_ctx: ssl.SSLContext, now: datetime,
        version: ssl.TLSVersion) -> None:
    """OpenSSL does not check the certificate of a resumed session again: we do."""
    key, cert = _mint(ca, now, ttl=timedelta(minutes=5))
    ctx = _client_ctx(ca_dir, version, _write_pair(tmp_path, "alice", key, cert))
    later = cert.not_valid_after_utc + timedelta(seconds=1)  # the injected clock, after expiry

    async def server(listener: trio.SocketListener) -> list[dict[str, Any]]:
        seen = []
        for clock in (now, later):
            stream = await listener.accept()
            async with TlsStream(stream, server_ctx, server_side=True) as tls:
                await tls.do_handshake()
                peer = tls.peer_certificate()
                assert peer is not None
                try:
                    outcome: ClientCheck | ClientRejected = _check(ca, peer, clock)
                except ClientRejected as exc:
                    outcome = exc
                await tls.send_all(b"refused" if isinstance(outcome, ClientRejected) else b"welcome")
                seen.append({"reused": tls.session_reused, "outcome": outcome, "peer": peer})
                assert await tls.receive_some() == b""
        return seen

    def client(port: int) -> list[tuple[bool | None, bytes]]:
        out: list[tuple[bool | None, bytes]] = []
        session = None
        for _ in range(2):
            with _connect(port, ctx, session) as sock:
                answer = _recv_exactly(sock, 7)  # TLS 1.3: the tickets arrive before this
                out.append((sock.session_reused, answer))
                session = sock.session
                sock.unwrap()  # a clean shutdown keeps the session resumable
        return out

    seen, answers = await _serve_one_client(server, client)
    assert answers == [(False, b"welcome"), (True, b"refused")]
    first, second = seen
    assert first["reused"] is False
    assert isinstance(first["outcome"], ClientCheck)
    assert second["reused"] is True  # OpenSSL let the session back in...
    assert second["peer"] == cert  # ...with the original certificate...
    outcome = second["outcome"]
    assert isinstance(outcome, ClientRejected)  # ...and our check refuses it
    assert outcome.code == RejectCode.EXPIRED
    assert "expired at" in outcome.reason
    # the same resumed certificate at the real time is fine: the clock made the difference
    assert _check(ca, second["peer"], now).identity == ALICE


@VERSIONS
async def test_locked_identity_is_refused(tmp_path: Path, ca_dir: Path, ca: CertificateAuthority,
                                          server_ctx: ssl.SSLContext, now: datetime,
                                          version: ssl.TLSVersion) -> None:
    key, cert = _mint(ca, now)
    ctx = _client_ctx(ca_dir, version, _write_pair(tmp_path, "alice", key, cert))
    asked: list[tuple[Identity, int]] = []

    def locked(identity: Identity, serial: int) -> str | None:
        asked.append((identity, serial))
        return "locked by admin: incident 42" if identity.name == "github/alice" else None

    async def server(listener: trio.SocketListener) -> ClientRejected:
        stream = await listener.accept()
        async with TlsStream(stream, server_ctx, server_side=True) as tls:
            await tls.do_handshake()
            peer = tls.peer_certificate()
            assert peer is not None
            with pytest.raises(ClientRejected) as info:
                _check(ca, peer, datetime.now(UTC), locked)
            return info.value

    def client(port: int) -> bytes:
        with _connect(port, ctx) as sock:
            return sock.recv(10)  # the server closes

    refused, data = await _serve_one_client(server, client)
    assert refused.code == RejectCode.LOCKED
    assert "incident 42" in refused.reason
    assert asked == [(ALICE, cert.serial_number)]
    assert data == b""  # close_notify, then the transport closed


# --- check_client ------------------------------------------------------------------------------


def test_check_client_accepts_a_minted_certificate(ca: CertificateAuthority, now: datetime) -> None:
    _, cert = _mint(ca, now, ttl=MAX_LIFETIME)  # exactly the maximum lifetime
    result = _check(ca, cert, now)
    assert result == ClientCheck(identity=ALICE, serial=cert.serial_number,
                                 not_after=cert.not_valid_after_utc)
    assert result.not_after.tzinfo is not None


def _bad_certificates(ca_dir: Path, ca: CertificateAuthority, other_ca: CertificateAuthority,
                      now: datetime) -> dict[str, x509.Certificate]:
    _, good = _mint(ca, now)
    server_eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    foreign_uri = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier(identity_uri("other.example", "github", "alice"))])
    return {
        "ca_leaf": _reissue(ca_dir, good, add=((x509.BasicConstraints(ca=True, path_length=None), True),)),
        "ca_leaf_no_bc": _reissue(ca_dir, good, drop=(x509.BasicConstraints.oid,)),
        "no_client_auth": _reissue(ca_dir, good, add=((server_eku, False),)),
        "no_client_auth_no_eku": _reissue(ca_dir, good, drop=(x509.ExtendedKeyUsage.oid,)),
        "foreign_ca": _mint(other_ca, now)[1],
        "lifetime": _reissue(ca_dir, good, not_after=good.not_valid_before_utc + timedelta(hours=25)),
        "lifetime_minted": _mint(ca, now, ttl=MAX_LIFETIME + timedelta(minutes=1))[1],
        "trust_domain": _reissue(ca_dir, good, add=((foreign_uri, False),)),
        "malformed": _reissue(ca_dir, good, drop=(L4PROXY_IDENTITY_OID,)),
        "trust_domain_no_san": _reissue(ca_dir, good, drop=(x509.SubjectAlternativeName.oid,)),
        "malformed_unknown_critical": _reissue(ca_dir, good, add=((x509.OCSPNoCheck(), True),)),
        # several problems: the documented priority decides
        "foreign_ca_and_ca_leaf": _reissue(ca_dir, _mint(other_ca, now)[1],
                                           add=((x509.BasicConstraints(ca=True, path_length=None), True),)),
    }


#: each crafted certificate -> the code it must be refused with
BAD_CERTIFICATES = {
    "ca_leaf": "ca_leaf", "ca_leaf_no_bc": "ca_leaf",
    "no_client_auth": "no_client_auth", "no_client_auth_no_eku": "no_client_auth",
    "foreign_ca": "foreign_ca", "foreign_ca_and_ca_leaf": "foreign_ca",
    "lifetime": "lifetime", "lifetime_minted": "lifetime",
    "trust_domain": "trust_domain", "trust_domain_no_san": "trust_domain",
    "malformed": "malformed", "malformed_unknown_critical": "malformed",
}


@pytest.mark.parametrize("name", sorted(BAD_CERTIFICATES))
def test_check_client_rejects_bad_certificates(ca_dir: Path, ca: CertificateAuthority,
                                               other_ca: CertificateAuthority, now: datetime,
                                               name: str) -> None:
    cert = _bad_certificates(ca_dir, ca, other_ca, now)[name]
    expected = BAD_CERTIFICATES[name]
    with pytest.raises(ClientRejected) as info:
        _check(ca, cert, now)
    assert info.value.code == expected
    assert isinstance(info.value.code, RejectCode)
    assert info.value.reason


def test_check_client_validity_window(ca: CertificateAuthority, now: datetime) -> None:
    _, cert = _mint(ca, now)
    with pytest.raises(ClientRejected) as info:
        _check(ca, cert, cert.not_valid_after_utc + timedelta(seconds=1))
    assert info.value.code == RejectCode.EXPIRED
    with pytest.raises(ClientRejected) as info:
        _check(ca, cert, cert.not_valid_before_utc - timedelta(seconds=1))
    assert info.value.code == RejectCode.NOT_YET_VALID
    # the edges are inside
    assert _check(ca, cert, cert.not_valid_after_utc).serial == cert.serial_number
    assert _check(ca, cert, cert.not_valid_before_utc).serial == cert.serial_number


@pytest.mark.parametrize("lock", ["identity", "group", "serial"])
def test_check_client_asks_the_lock_lookup(ca: CertificateAuthority, now: datetime, lock: str) -> None:
    _, cert = _mint(ca, now)
    _, bobs = _mint(ca, now, BOB)

    def locked(identity: Identity, serial: int) -> str | None:
        hit = {"identity": identity.name == ALICE.name, "group": "eng" in identity.groups,
               "serial": serial == cert.serial_number}[lock]
        return f"{lock} lock" if hit else None

    with pytest.raises(ClientRejected) as info:
        _check(ca, cert, now, locked)
    assert info.value.code == RejectCode.LOCKED
    assert f"{lock} lock" in info.value.reason
    assert _check(ca, bobs, now, locked).identity == BOB


def test_lock_lookup_runs_only_for_otherwise_good_certificates(ca: CertificateAuthority,
                                                               now: datetime) -> None:
    _, cert = _mint(ca, now)
    calls: list[int] = []

    def locked(identity: Identity, serial: int) -> str | None:
        calls.append(serial)
        return None

    with pytest.raises(ClientRejected):
        _check(ca, cert, cert.not_valid_after_utc + timedelta(hours=1), locked)
    assert calls == []


def test_check_client_refuses_caller_bugs(ca: CertificateAuthority, now: datetime) -> None:
    _, cert = _mint(ca, now)
    with pytest.raises(ValueError, match="timezone-aware"):
        _check(ca, cert, now.replace(tzinfo=None))
    with pytest.raises(ValueError, match="positive"):
        check_client(cert, ca_bundle=ca.bundle(now=now), trust_domain=TD, max_lifetime=timedelta(0),
                     now=now, locked=_no_locks)


def test_the_check_cache_keeps_only_what_does_not_depend_on_the_time(
        ca: CertificateAuthority, now: datetime) -> None:
    _, cert = _mint(ca, now)
    der = cert.public_bytes(serialization.Encoding.DER)
    cache = CheckCache(ca_bundle=ca.bundle(now=now), trust_domain=TD, size=2)
    first, result = cache.check(der, max_lifetime=MAX_LIFETIME, now=now, locked=_no_locks)
    assert result.identity == ALICE
    again, _ = cache.check(der, max_lifetime=MAX_LIFETIME, now=now, locked=_no_locks)
    assert again is first  # parsed and verified once
    # still decided at every check: the time, the lifetime limit, the locks
    with pytest.raises(ClientRejected) as info:
        cache.check(der, max_lifetime=MAX_LIFETIME, now=cert.not_valid_after_utc + timedelta(seconds=1),
                    locked=_no_locks)
    assert info.value.code == RejectCode.EXPIRED
    with pytest.raises(ClientRejected) as info:
        cache.check(der, max_lifetime=timedelta(minutes=1), now=now, locked=_no_locks)
    assert info.value.code == RejectCode.LIFETIME
    with pytest.raises(ClientRejected) as info:
        cache.check(der, max_lifetime=MAX_LIFETIME, now=now, locked=lambda i, s: "locked now")
    assert info.value.code == RejectCode.LOCKED
    # bounded: the least recently used certificate goes
    others = [_mint(ca, now, BOB)[1], _mint(ca, now, BOB)[1]]
    for other in others:
        cache.check(other.public_bytes(serialization.Encoding.DER), max_lifetime=MAX_LIFETIME,
                    now=now, locked=_no_locks)
    assert len(cache) == 2
    assert cache.check(der, max_lifetime=MAX_LIFETIME, now=now, locked=_no_locks)[0] is not first
    with pytest.raises(ClientRejected) as info:
        cache.check(b"\x30\x03not a certificate", max_lifetime=MAX_LIFETIME, now=now, locked=_no_locks)
    assert info.value.code == RejectCode.MALFORMED
    with pytest.raises(ValueError):
        CheckCache(ca_bundle=(), trust_domain=TD, size=0)


def test_a_rotated_away_ca_stops_counting(ca_dir: Path, ca: CertificateAuthority,
                                          other_ca: CertificateAuthority, now: datetime) -> None:
    _, cert = _mint(ca, now)
    with pytest.raises(ClientRejected) as info:
        check_client(cert, ca_bundle=other_ca.bundle(now=now), trust_domain=TD,
                     max_lifetime=MAX_LIFETIME, now=now, locked=_no_locks)
    assert info.value.code == RejectCode.FOREIGN_CA


# --- TLS upstreams (the gateway as a TLS client) -------------------------------------------------


def _upstream_target(ca_dir: Path, port: int, server_name: str | None = "localhost") -> TargetConfig:
    return TargetConfig(name="tls-up", upstream=("127.0.0.1", port), protocol=TargetProtocol.TCP,
                        upstream_tls=True, upstream_ca=ca_dir / "ca.crt", upstream_server_name=server_name)


def _upstream_server_ctx(ca_dir: Path) -> ssl.SSLContext:
    """A plain TLS service (no client certificates), as most upstreams are."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(ca_dir / "server.crt", ca_dir / "server.key")
    return ctx


async def _one_tls_upstream(ca_dir: Path, serve: Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[T]],
                            use: Callable[[int], Awaitable[Any]]) -> tuple[T, Any]:
    """``serve`` one connection with trio's SSLStream (https_compatible=False: a missing
    close_notify is an error) while ``use(port)`` runs."""
    ctx = _upstream_server_ctx(ca_dir)

    async def server(listener: trio.SocketListener) -> T:
        tls = trio.SSLStream(await listener.accept(), ctx, server_side=True, https_compatible=False)
        try:
            return await serve(tls)
        finally:
            await trio.aclose_forcefully(tls)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    assert isinstance(listener, trio.SocketListener)
    results: dict[str, Any] = {}

    async def run_server() -> None:
        results["server"] = await server(listener)

    async def run_use() -> None:
        results["use"] = await use(listener.socket.getsockname()[1])

    try:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_server)
                nursery.start_soon(run_use)
    finally:
        await listener.aclose()
    return results["server"], results["use"]


def test_upstream_context_refuses_renegotiation(ca_dir: Path) -> None:
    ctx = upstream_ssl_context(_upstream_target(ca_dir, 1))
    assert ctx.options & ssl.OP_NO_RENEGOTIATION  # TlsStream sends without reading
    assert ctx.check_hostname and ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.minimum_version is TLS12


@pytest.mark.parametrize("server_name", ["localhost", None], ids=["server_name", "host"])
async def test_tls_upstream_is_a_tls_stream(ca_dir: Path, server_name: str | None) -> None:
    """open_upstream: TlsStream, the name checked (upstream_server_name, else the host),
    close_notify on aclose."""

    async def serve(tls: trio.SSLStream[trio.SocketStream]) -> tuple[bytes | bytearray, bytes | bytearray]:
        request = await tls.receive_some()
        await tls.send_all(b"pong")
        return request, await tls.receive_some()

    async def use(port: int) -> tuple[str | None, bytes | bytearray]:
        upstream = await open_upstream(_upstream_target(ca_dir, port, server_name), read_size=4096)
        assert isinstance(upstream, TlsStream)
        async with upstream:
            await upstream.send_all(b"ping")
            return upstream.server_hostname, await upstream.receive_some()

    (request, eof), (sni, answer) = await _one_tls_upstream(ca_dir, serve, use)
    assert sni == (server_name or "127.0.0.1")
    assert (request, answer) == (b"ping", b"pong")
    assert eof == b""  # close_notify


async def test_tls_upstream_with_the_wrong_name_fails_typed(ca_dir: Path) -> None:
    """The error the sessions catch (BrokenResourceError), typed, and the upstream got our alert."""

    async def serve(tls: trio.SSLStream[trio.SocketStream]) -> BaseException:
        with pytest.raises(trio.BrokenResourceError) as info:
            await tls.do_handshake()
        return info.value

    async def use(port: int) -> TlsHandshakeError:
        with pytest.raises(TlsHandshakeError) as info:
            await open_upstream(_upstream_target(ca_dir, port, "other.internal"))
        return info.value

    seen, err = await _one_tls_upstream(ca_dir, serve, use)
    assert "hostname mismatch" in err.reason.lower()
    assert isinstance(err, trio.BrokenResourceError)
    assert isinstance(seen.__cause__, ssl.SSLError)
    assert seen.__cause__.reason == "SSLV3_ALERT_BAD_CERTIFICATE"


async def test_tcp_session_half_close_reaches_a_tls_upstream(ca_dir: Path) -> None:
    """A tcp target over TLS: the client's EOF reaches the upstream as close_notify (as it
    reaches a plain upstream as a FIN), the upstream answers after it, and its close_notify
    comes back to the client as EOF. (With trio's SSLStream, which cannot half-close, the
    upstream never saw the EOF.)"""
    client_end, gateway_end = trio.testing.memory_stream_pair()
    session = SessionInfo(session_id="s-1", identity=ALICE, serial=1,
                          not_after=datetime.now(UTC) + timedelta(hours=1), target="tls-up",
                          client_address="127.0.0.1")
    limits = LimitsConfig(upstream_connect_timeout=5.0)

    async def serve(tls: trio.SSLStream[trio.SocketStream]) -> bytes:
        got = bytearray()
        while data := await tls.receive_some():
            got += data
        await tls.send_all(b"got: " + bytes(got))
        await tls.aclose()
        return bytes(got)

    async def use(port: int) -> tuple[str, bytes]:
        target = _upstream_target(ca_dir, port)
        reason: list[str] = []

        async def run() -> None:
            reason.append(await run_tcp_session(session, gateway_end, limits=limits,
                                                open_upstream=lambda: open_upstream(target)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await client_end.send_all(b"the request")
            await client_end.send_eof()
            answer = bytearray()
            while data := await client_end.receive_some():
                answer += data
        return reason[0], bytes(answer)

    request, (reason, answer) = await _one_tls_upstream(ca_dir, serve, use)
    assert request == b"the request"
    assert answer == b"got: the request"
    assert reason == "closed"


# --- the plain TCP connect under every upstream ------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
async def test_connect_tcp_reaches_ip_literals_directly_and_names_through_resolution(host: str) -> None:
    family = socket.AF_INET6 if host == "::1" else socket.AF_INET
    try:
        listeners = await trio.open_tcp_listeners(0, host="::1" if host == "::1" else "127.0.0.1")
    except OSError:
        pytest.skip(f"no loopback for {host} here")
    listener = listeners[0]
    assert isinstance(listener, trio.SocketListener)
    port = listener.socket.getsockname()[1]
    with trio.fail_after(10):
        stream = await connect_tcp(host, port)
        server = await listener.accept()
        await stream.send_all(b"ping")
        assert await server.receive_some(4) == b"ping"
        assert stream.socket.family == family
        # like open_tcp_stream: no Nagle delay on the data path
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await stream.aclose()
        await server.aclose()
        port_gone = port
        await listener.aclose()
        with pytest.raises(OSError):
            await connect_tcp(host if host != "localhost" else "127.0.0.1", port_gone)
