"""``l4proxy.tls.TlsStream`` in both roles: the client side on real loopback sockets, and
the stream's semantics on trio memory streams.

The client side (what ``ChunkClient``, the gateway's TLS upstreams and our benchmarks
run) is checked against two servers: trio's ``SSLStream`` (an independent
implementation, with ``https_compatible=False`` so a missing close_notify is an error
there too) and a ``TlsStream`` server; both with :func:`server_context`, so the client
also presents a certificate. The gateway's server side against other clients is in
``test_gateway_tls.py``. The CA is real (``init_ca`` in a temp dir) and valid at the real
time, since OpenSSL checks certificates against the real clock. Every networked test is
bounded by ``trio.fail_after``; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import l4proxy.gateway
import l4proxy.tls
from l4proxy.identity import CertificateAuthority, Identity, init_ca
from l4proxy.tls import TlsHandshakeError, TlsStream, client_context, server_context

from .conftest import TLS_TRUST_DOMAIN

TD = TLS_TRUST_DOMAIN  # the conftest CA's
ALICE = Identity(provider="github", subject="alice", email="alice@example.com", groups=("eng",))
TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3
VERSIONS = pytest.mark.parametrize("version", [TLS12, TLS13], ids=["tls1.2", "tls1.3"])
ServerKind = Literal["trio", "tlsstream"]
SERVERS = pytest.mark.parametrize("server_kind", ["trio", "tlsstream"])
LARGE = 8 * 1024 * 1024
RECORD = 16 * 1024
DEADLINE = 15  # seconds, for every networked test

T = TypeVar("T")
U = TypeVar("U")


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def client_pair(tmp_path: Path, ca: CertificateAuthority, now: datetime) -> tuple[Path, Path]:
    """A minted client certificate and its key, as files (what ``client_context`` loads)."""
    return _client_files(tmp_path, ca, now)


def _client_files(tmp_path: Path, ca: CertificateAuthority, now: datetime) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.mint_client(public_key=key.public_key(), identity=ALICE, replay_key="jti:t",
                          ttl=timedelta(minutes=10), now=now)
    crt, pem_key = tmp_path / "alice.crt", tmp_path / "alice.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pem_key.chmod(0o600)
    return crt, pem_key


def _client_ctx(ca_dir: Path, pair: tuple[Path, Path], version: ssl.TLSVersion = TLS13) -> ssl.SSLContext:
    ctx = client_context(ca_dir / "ca.crt", cert=pair[0], key=pair[1])
    ctx.maximum_version = version
    return ctx


def _server_stream(kind: ServerKind, tcp: trio.SocketStream, ctx: ssl.SSLContext
                   ) -> trio.SSLStream[trio.SocketStream] | TlsStream:
    if kind == "trio":
        return trio.SSLStream(tcp, ctx, server_side=True, https_compatible=False)
    return TlsStream(tcp, ctx, server_side=True)


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int, sizes: list[int] | None = None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))  # never past n: more may follow
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        if sizes is not None:
            sizes.append(len(chunk))
        buf += chunk
    return bytes(buf)


async def _on_loopback(server: Callable[[trio.SocketListener], Awaitable[T]],
                       client: Callable[[int], Awaitable[U]]) -> tuple[T, U]:
    """Run ``server(listener)`` and ``client(port)`` side by side on a loopback port."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    assert isinstance(listener, trio.SocketListener)
    port = listener.socket.getsockname()[1]
    results: dict[str, Any] = {}

    async def run_server() -> None:
        results["server"] = await server(listener)

    async def run_client() -> None:
        results["client"] = await client(port)

    try:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_server)
                nursery.start_soon(run_client)
    finally:
        for lst in listeners:
            await lst.aclose()
    return results["server"], results["client"]


async def _connect(port: int, ctx: ssl.SSLContext, *, server_hostname: str = "localhost",
                   session: ssl.SSLSession | None = None) -> TlsStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    return TlsStream(tcp, ctx, server_side=False, server_hostname=server_hostname, session=session)


def test_public_surface_is_explicit() -> None:
    names = l4proxy.tls.__all__
    assert len(names) == len(set(names))
    assert all(hasattr(l4proxy.tls, name) for name in names)
    # the gateway still re-exports the same objects
    assert l4proxy.gateway.TlsStream is TlsStream
    assert l4proxy.gateway.TlsHandshakeError is TlsHandshakeError


def test_client_context_is_strict(ca_dir: Path) -> None:
    ctx = client_context(ca_dir / "ca.crt")
    assert ctx.minimum_version is TLS12 and ctx.maximum_version is TLS13
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.options & ssl.OP_NO_RENEGOTIATION


def test_server_context_is_strict_and_sends_one_ticket(ca_dir: Path) -> None:
    ctx = server_context(ca_dir / "server.crt", ca_dir / "server.key", ca_dir / "bundle.pem")
    assert ctx.minimum_version is TLS12 and ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert ctx.options & ssl.OP_NO_RENEGOTIATION and ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.num_tickets == 1  # resumption works with one (test_client_resumes_a_session)


# --- the client side on loopback ----------------------------------------------------------------


@SERVERS
@VERSIONS
async def test_client_moves_large_data_both_ways(ca_dir: Path, client_pair: tuple[Path, Path],
                                                 server_ctx: ssl.SSLContext, server_kind: ServerKind,
                                                 version: ssl.TLSVersion) -> None:
    """8 MiB each way, byte-exact, then close_notify from the client's aclose."""
    up = hashlib.shake_256(b"up").digest(LARGE)
    down = hashlib.shake_256(b"down").digest(LARGE)
    sizes: list[int] = []

    async def server(listener: trio.SocketListener) -> dict[str, Any]:
        tls = _server_stream(server_kind, await listener.accept(), server_ctx)
        async with tls:
            got = await _receive_exactly(tls, LARGE)
            await tls.send_all(hashlib.sha256(got).digest())
            await tls.send_all(down)
            eof = await tls.receive_some()  # close_notify, or BrokenResourceError for a bare close
            der = tls.getpeercert(binary_form=True)
            return {"eof": eof, "der": der, "got": got}

    async def client(port: int) -> dict[str, Any]:
        tls = await _connect(port, _client_ctx(ca_dir, client_pair, version))
        async with tls:
            await tls.do_handshake()
            out: dict[str, Any] = {"version": tls.version(), "server_cert": tls.peer_certificate(),
                   "alpn": tls.selected_alpn_protocol(), "cipher": tls.cipher()}
            await tls.send_all(memoryview(up))
            digest = await _receive_exactly(tls, 32)
            out["down"] = await _receive_exactly(tls, LARGE, sizes)
            out["digest"] = digest
        return out

    got, out = await _on_loopback(server, client)
    assert got["got"] == up
    assert out["digest"] == hashlib.sha256(up).digest()
    assert out["down"] == down
    assert got["eof"] == b""
    assert out["version"] == ("TLSv1.2" if version is TLS12 else "TLSv1.3")
    server_cert = out["server_cert"]
    assert isinstance(server_cert, x509.Certificate)
    assert server_cert == x509.load_pem_x509_certificate((ca_dir / "server.crt").read_bytes())
    assert got["der"] == x509.load_pem_x509_certificate(client_pair[0].read_bytes()).public_bytes(
        serialization.Encoding.DER)  # the client presented its certificate
    assert out["alpn"] is None and out["cipher"] is not None
    # large reads on the client side too: more than one record per receive_some
    assert max(sizes) > RECORD


@SERVERS
@pytest.mark.parametrize("close", ["aclose", "aclose_forcefully", "transport"])
async def test_client_close_sends_close_notify(ca_dir: Path, client_pair: tuple[Path, Path],
                                               server_ctx: ssl.SSLContext, server_kind: ServerKind,
                                               close: str) -> None:
    """``aclose`` sends close_notify; the other two closes do not, and the server can tell
    (which is what makes the first case a real check)."""

    async def server(listener: trio.SocketListener) -> bytes | bytearray | BaseException:
        tls = _server_stream(server_kind, await listener.accept(), server_ctx)
        async with tls:
            assert await _receive_exactly(tls, 3) == b"bye"
            try:
                return await tls.receive_some()
            except trio.BrokenResourceError as exc:
                return exc

    async def client(port: int) -> None:
        tls = await _connect(port, _client_ctx(ca_dir, client_pair))
        await tls.send_all(b"bye")
        if close == "aclose":
            await tls.aclose()
        elif close == "aclose_forcefully":
            await trio.aclose_forcefully(tls)
        else:
            await tls.transport_stream.aclose()
            await tls.aclose()  # the transport is gone: nothing to send, no error
        with pytest.raises(trio.ClosedResourceError):
            await tls.send_all(b"x")

    outcome, _ = await _on_loopback(server, client)
    if close == "aclose":
        assert outcome == b""
    else:
        # a bare EOF (SSLEOFError), or a reset when the client's kernel still held unread
        # bytes (TLS 1.3 session tickets): either way no close_notify
        assert isinstance(outcome, trio.BrokenResourceError)


@SERVERS
@VERSIONS
async def test_client_half_close_keeps_receiving(ca_dir: Path, client_pair: tuple[Path, Path],
                                                 server_ctx: ssl.SSLContext, server_kind: ServerKind,
                                                 version: ssl.TLSVersion) -> None:
    """``send_eof`` is close_notify; the server answers after it (a tcp target's half-close)."""

    async def server(listener: trio.SocketListener) -> None:
        tls = _server_stream(server_kind, await listener.accept(), server_ctx)
        async with tls:
            request = bytearray()
            while data := await tls.receive_some():
                request += data
            await tls.send_all(b"answer to " + bytes(request))

    async def client(port: int) -> bytes:
        async with await _connect(port, _client_ctx(ca_dir, client_pair, version)) as tls:
            await tls.send_all(b"the request")
            await tls.send_eof()
            answer = bytearray()
            while data := await tls.receive_some():
                answer += data
            return bytes(answer)

    _, answer = await _on_loopback(server, client)
    assert answer == b"answer to the request"


@SERVERS
@VERSIONS
@pytest.mark.parametrize("failure", ["hostname", "unknown_ca"])
async def test_client_verification_failure_is_typed(tmp_path: Path, ca_dir: Path, now: datetime,
                                                    client_pair: tuple[Path, Path],
                                                    server_ctx: ssl.SSLContext, server_kind: ServerKind,
                                                    version: ssl.TLSVersion, failure: str) -> None:
    """A server whose certificate does not match ``server_hostname``, or does not chain to
    our CA, fails the client's handshake with TlsHandshakeError; the server gets our alert."""
    if failure == "hostname":
        ctx, hostname = _client_ctx(ca_dir, client_pair, version), "not-the-server.example"
    else:
        other = tmp_path / "other"
        init_ca(other, trust_domain=TD, server_names=["localhost"], now=now)
        ctx, hostname = client_context(other / "ca.crt", cert=client_pair[0], key=client_pair[1]), "localhost"
        ctx.maximum_version = version

    async def server(listener: trio.SocketListener) -> BaseException:
        tls = _server_stream(server_kind, await listener.accept(), server_ctx)
        async with tls:
            with pytest.raises(trio.BrokenResourceError) as info:
                await tls.do_handshake()
            return info.value

    async def client(port: int) -> TlsHandshakeError:
        tls = await _connect(port, ctx, server_hostname=hostname)
        async with tls:
            assert tls.server_hostname == hostname
            with pytest.raises(TlsHandshakeError) as info:
                await tls.receive_some()  # the implicit handshake
            with pytest.raises(trio.BrokenResourceError):  # and it stays broken
                await tls.send_all(b"x")
            return info.value

    server_err, err = await _on_loopback(server, client)
    assert isinstance(err.__cause__, ssl.SSLCertVerificationError)
    assert isinstance(err, trio.BrokenResourceError)  # what callers catch for "TLS failed"
    assert err.reason.startswith("certificate verify failed: ")
    if failure == "hostname":
        assert "hostname mismatch" in err.reason.lower() and "not-the-server.example" in err.reason
    else:
        # our server sends its chain up to the (other) root
        assert err.reason.endswith("self-signed certificate in certificate chain")
    assert err.alert is True
    # the alert reached the server: it knows why, rather than seeing a bare close
    cause = server_err.__cause__
    assert isinstance(cause, ssl.SSLError)
    expected = "SSLV3_ALERT_BAD_CERTIFICATE" if failure == "hostname" else "TLSV1_ALERT_UNKNOWN_CA"
    assert cause.reason == expected
    if server_kind == "tlsstream":
        assert isinstance(server_err, TlsHandshakeError)


@SERVERS
@VERSIONS
async def test_client_resumes_a_session(ca_dir: Path, client_pair: tuple[Path, Path],
                                        server_ctx: ssl.SSLContext, server_kind: ServerKind,
                                        version: ssl.TLSVersion) -> None:
    """``session=`` from a previous connection resumes it; without it, a full handshake."""

    async def server(listener: trio.SocketListener) -> list[bool]:
        reused = []
        for _ in range(3):
            tls = _server_stream(server_kind, await listener.accept(), server_ctx)
            async with tls:
                await tls.send_all(b"hi")  # TLS 1.3: the session tickets go out before this
                assert await tls.receive_some() == b""
                reused.append(bool(tls.session_reused))
        return reused

    async def client(port: int) -> list[tuple[bool, bytes, bool]]:
        ctx = _client_ctx(ca_dir, client_pair, version)
        out = []
        session = None
        for attempt in range(3):
            tls = await _connect(port, ctx, session=session if attempt == 1 else None)
            async with tls:
                hello = await _receive_exactly(tls, 2)
                out.append((tls.session_reused, hello, tls.peer_certificate() is not None))
                session = tls.session
                assert session is not None
        return out

    reused, out = await _on_loopback(server, client)
    assert [r for r, _, _ in out] == [False, True, False]
    assert reused == [False, True, False]
    assert all(hello == b"hi" for _, hello, _ in out)
    assert all(has_cert for _, _, has_cert in out)  # a resumed session keeps the peer's certificate


# --- TlsStream semantics on memory streams -------------------------------------------------------


async def _pair(tmp_path: Path, ca_dir: Path, ca: CertificateAuthority, now: datetime,
                version: ssl.TLSVersion, *, transport: str = "memory",
                **server_options: Any) -> tuple[TlsStream, TlsStream]:
    """A handshaken (server, client) pair of TlsStreams, our client_context on the client."""
    crt, pem_key = _client_files(tmp_path, ca, now)
    cctx = client_context(ca_dir / "ca.crt", cert=crt, key=pem_key)
    cctx.maximum_version = version
    sctx = server_context(ca_dir / "server.crt", ca_dir / "server.key", ca_dir / "bundle.pem")
    a, b = (trio.testing.memory_stream_pair() if transport == "memory"
            else trio.testing.lockstep_stream_pair())
    server = TlsStream(a, sctx, server_side=True, **server_options)
    client = TlsStream(b, cctx, server_side=False, server_hostname="localhost")
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
    return server, client


@VERSIONS
async def test_half_close_and_clean_close(tmp_path: Path, ca_dir: Path, ca: CertificateAuthority,
                                          now: datetime, version: ssl.TLSVersion) -> None:
    server, client = await _pair(tmp_path, ca_dir, ca, now, version)
    assert client.server_hostname == "localhost"
    assert server.server_side and not client.server_side
    assert client.version() == server.version()
    with trio.fail_after(DEADLINE):
        await client.send_all(b"request")
        await client.send_eof()
        await client.send_eof()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await client.send_all(b"more")
        assert await _receive_exactly(server, 7) == b"request"
        assert await server.receive_some() == b""
        assert await server.receive_some() == b""  # EOF stays EOF
        await server.send_all(b"response after the client's EOF")
        assert await client.receive_some() == b"response after the client's EOF"
        await server.aclose()
        assert await client.receive_some() == b""
        await client.aclose()
        await client.aclose()  # idempotent
    for stream in (server, client):
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"x")


async def test_receive_returns_what_is_there_up_to_max_bytes(tmp_path: Path, ca_dir: Path,
                                                             ca: CertificateAuthority, now: datetime) -> None:
    server, client = await _pair(tmp_path, ca_dir, ca, now, TLS13)
    data = hashlib.shake_256(b"x").digest(200_000)
    with trio.fail_after(DEADLINE):
        await client.send_all(data)  # 13 records, buffered in the memory stream
        first = await server.receive_some(1000)
        assert first == data[:1000]
        rest = await server.receive_some()
        assert len(rest) > RECORD  # every record that arrived, not one
        rest += await _receive_exactly(server, len(data) - 1000 - len(rest))
        assert first + rest == data
        with pytest.raises(ValueError):
            await server.receive_some(0)
    await client.aclose()
    await server.aclose()


async def test_byte_at_a_time_transport(tmp_path: Path, ca_dir: Path, ca: CertificateAuthority,
                                        now: datetime) -> None:
    """A transport that yields one byte per read: handshake and data still work."""
    server, client = await _pair(tmp_path, ca_dir, ca, now, TLS13, read_size=1)
    with trio.fail_after(DEADLINE):
        await client.send_all(b"trickle" * 100)
        assert await _receive_exactly(server, 700) == b"trickle" * 100
        await server.send_all(b"ok")
        assert await client.receive_some() == b"ok"
    await client.aclose()
    await server.aclose()


class _Splitting(trio.abc.HalfCloseableStream):
    """A transport that hands out reads of awkward sizes: inside record headers, one byte
    either side of a whole record, several records at once."""

    SIZES = (1, 2, 3, 4, 5, 6, 7, 100, 16_383, 16_384, 16_385, 16_405, 16_406, 16_407, 16_411,
             40_000, 70_000)

    def __init__(self, inner: trio.abc.HalfCloseableStream, seed: int) -> None:
        import random

        self.inner = inner
        self.rng = random.Random(seed)
        self.sent = bytearray()
        self.received = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = self.rng.choice(self.SIZES)
        data = await self.inner.receive_some(size if max_bytes is None else min(size, max_bytes))
        self.received += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@VERSIONS
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_records_split_anywhere_by_the_transport(tmp_path: Path, ca_dir: Path,
                                                       ca: CertificateAuthority, now: datetime,
                                                       version: ssl.TLSVersion, seed: int) -> None:
    """Ciphertext is fed to OpenSSL record by record, following the record headers: reads
    that end inside a header, inside a record or on its last byte all decrypt the same."""
    crt, pem_key = _client_files(tmp_path, ca, now)
    cctx = client_context(ca_dir / "ca.crt", cert=crt, key=pem_key)
    cctx.maximum_version = version
    sctx = server_context(ca_dir / "server.crt", ca_dir / "server.key", ca_dir / "bundle.pem")
    a, b = trio.testing.memory_stream_pair()
    at_server, at_client = _Splitting(a, seed), _Splitting(b, seed + 100)
    server = TlsStream(at_server, sctx, server_side=True)
    client = TlsStream(at_client, cctx, server_side=False, server_hostname="localhost")
    # where each write into the server's BIO ended, and how much had arrived by then
    feeds: list[tuple[int, int]] = []
    feed = server._feed

    def left() -> int:
        return 0 if server._ct is None else len(server._ct) - server._ct_off

    def spy() -> bool:
        fed = feed()
        if fed:
            feeds.append((at_server.received - left(), at_server.received))
        return fed

    server._feed = spy  # type: ignore[method-assign]
    up = hashlib.shake_256(b"up%d" % seed).digest(300_000)
    down = hashlib.shake_256(b"down%d" % seed).digest(300_000)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, up)
            assert await _receive_exactly(server, len(up)) == up
        # every write ended on a record boundary, unless the transport's read ended first
        boundaries, pos, sent = set(), 0, at_client.sent
        while pos + 5 <= len(sent):
            pos += 5 + (sent[pos + 3] << 8 | sent[pos + 4])
            boundaries.add(pos)
        previous = 0
        for end, received in feeds:
            assert end in boundaries or end == received, (end, received)
            assert 0 < end - previous <= l4proxy.tls.BIO_SLICE
            previous = end
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, down)
            assert await _receive_exactly(client, len(down)) == down
        await client.aclose()
        assert await server.receive_some() == b""  # close_notify, after all the data
    await server.aclose()


def _record_sizes(data: bytes | bytearray) -> list[int]:
    sizes, pos = [], 0
    while pos + 5 <= len(data):
        sizes.append(data[pos + 3] << 8 | data[pos + 4])
        pos += 5 + sizes[-1]
    assert pos == len(data)
    return sizes


@VERSIONS
async def test_parts_are_sent_in_the_records_of_their_joined_bytes(
        tmp_path: Path, ca_dir: Path, ca: CertificateAuthority, now: datetime,
        version: ssl.TLSVersion) -> None:
    """A frame's 12-byte header shares its record with the payload, as in one send_all:
    the record sizes reveal no more of the message's structure."""
    crt, pem_key = _client_files(tmp_path, ca, now)
    cctx = client_context(ca_dir / "ca.crt", cert=crt, key=pem_key)
    cctx.maximum_version = version
    sctx = server_context(ca_dir / "server.crt", ca_dir / "server.key", ca_dir / "bundle.pem")
    a, b = trio.testing.memory_stream_pair()
    at_client = _Splitting(b, 1)
    server = TlsStream(a, sctx, server_side=True)
    client = TlsStream(at_client, cctx, server_side=False, server_hostname="localhost")
    payload = hashlib.shake_256(b"payload").digest(3 * RECORD + 100)
    cases = [[b"h" * 12, payload], [b"h" * 12, b"", payload[:50], payload], [payload, b"t" * 7],
             [b"x" * 5, b"y" * 6], [payload[:RECORD], payload[:RECORD - 1], b"z"]]
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        for parts in cases:
            start = len(at_client.sent)
            await client.send_all_parts(parts)
            middle = len(at_client.sent)
            await client.send_all(b"".join(parts))
            joined = b"".join(parts)
            assert await _receive_exactly(server, 2 * len(joined)) == joined * 2
            assert _record_sizes(at_client.sent[start:middle]) == \
                _record_sizes(at_client.sent[middle:])
    await client.aclose()
    await server.aclose()


async def test_a_record_header_claiming_too_much_breaks_the_stream(
        tmp_path: Path, ca_dir: Path, ca: CertificateAuthority, now: datetime) -> None:
    server, client = await _pair(tmp_path, ca_dir, ca, now, TLS13)
    with trio.fail_after(DEADLINE):
        # application data "of 65535 bytes": more than any legal record
        await client.transport_stream.send_all(b"\x17\x03\x03\xff\xff" + bytes(70_000))
        with pytest.raises(trio.BrokenResourceError, match="TLS error"):
            await server.receive_some()
        assert server._incoming.pending <= l4proxy.tls.BIO_SLICE  # fed one record's worth
    await server.aclose()
    await client.aclose()


async def test_concurrent_receives_conflict(tmp_path: Path, ca_dir: Path, ca: CertificateAuthority,
                                            now: datetime) -> None:
    server, client = await _pair(tmp_path, ca_dir, ca, now, TLS13)

    async def blocked_receiver() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_receiver)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await server.receive_some()
            await server.aclose()  # wakes the blocked receiver with ClosedResourceError
    await client.aclose()


async def test_eof_without_close_notify_is_broken(tmp_path: Path, ca_dir: Path, ca: CertificateAuthority,
                                                  now: datetime) -> None:
    server, client = await _pair(tmp_path, ca_dir, ca, now, TLS13)
    await client.send_all(b"partial")
    await client.transport_stream.aclose()  # a bare close: possible truncation
    assert await server.receive_some() == b"partial"
    with pytest.raises(trio.BrokenResourceError) as info:
        await server.receive_some()
    assert isinstance(info.value.__cause__, ssl.SSLEOFError)
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"x")
    await server.aclose()  # closing a broken stream is fine


async def test_ragged_eof_allowed_when_asked(tmp_path: Path, ca_dir: Path, ca: CertificateAuthority,
                                             now: datetime) -> None:
    server, client = await _pair(tmp_path, ca_dir, ca, now, TLS12, allow_ragged_eof=True)
    await client.transport_stream.aclose()
    assert await server.receive_some() == b""
    await server.aclose()


async def test_aclose_is_bounded_when_the_peer_never_reads(tmp_path: Path, ca_dir: Path,
                                                           ca: CertificateAuthority, now: datetime,
                                                           autojump_clock: trio.testing.MockClock) -> None:
    # lockstep: every send waits until the peer reads, and this peer never does
    # (TLS 1.2: with TLS 1.3 the server's session tickets would already wait for a reader)
    server, client = await _pair(tmp_path, ca_dir, ca, now, TLS12, transport="lockstep", close_timeout=3.0)
    start = trio.current_time()
    with trio.fail_after(30):
        await server.aclose()
    assert 3.0 <= trio.current_time() - start < 4.0
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some()
    await trio.aclose_forcefully(client)


async def test_cancelled_receive_loses_nothing(tmp_path: Path, ca_dir: Path, ca: CertificateAuthority,
                                               now: datetime) -> None:
    server, client = await _pair(tmp_path, ca_dir, ca, now, TLS12)
    with trio.move_on_after(0) as scope:
        await server.receive_some()
    assert scope.cancelled_caught
    with trio.fail_after(DEADLINE):
        await client.send_all(b"still here")
        assert await server.receive_some() == b"still here"
    await client.aclose()
    await server.aclose()


async def test_client_side_handshake_failure_is_typed(tmp_path: Path, ca_dir: Path, ca: CertificateAuthority,
                                                      now: datetime) -> None:
    """Upstream TLS: a server whose name does not match is refused by our client."""
    sctx = server_context(ca_dir / "server.crt", ca_dir / "server.key", ca_dir / "bundle.pem")
    cctx = client_context(ca_dir / "ca.crt")
    a, b = trio.testing.memory_stream_pair()
    server = TlsStream(a, sctx, server_side=True)
    client = TlsStream(b, cctx, server_side=False, server_hostname="not-the-gateway.example")
    errors: dict[str, BaseException] = {}

    async def run(name: str, stream: TlsStream) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            errors[name] = exc
        await stream.aclose()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "server", server)
            nursery.start_soon(run, "client", client)
    err = errors["client"]
    assert isinstance(err, TlsHandshakeError)
    assert "hostname mismatch" in err.reason.lower()
    assert err.alert is True
    # and the server learned why: our client's alert reached it
    assert isinstance(errors["server"], TlsHandshakeError)
    assert errors["server"].reason == "sslv3 alert bad certificate"
