"""The chunk client and chunkd over TLS, both on ``l4proxy.tls.TlsStream``.

Against an in-process chunkd serving TLS on loopback, and against a scripted CWP/1 peer
behind trio's ``SSLStream`` (``https_compatible=False``, so a missing close_notify is an
error there) where a test needs to see what the client put on the wire. The certificates
come from ``init_ca`` in a temp dir (the server certificate names ``localhost`` and
``127.0.0.1``). Every wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from l4proxy.client import ChunkClient, ConnectionFailed
from l4proxy.client.cli import make_ssl_context
from l4proxy.identity import init_ca
from l4proxy.tls import TlsStream
from l4proxy.wire import NEED_DATA, Connection, Hello, Role, Welcome

from .conftest import ChunkdHandle, start_chunkd, write_private

DEADLINE = 20  # seconds, for every test
LARGE = 8 * 1024 * 1024




@pytest.fixture
def client_ctx(ca_dir: Path) -> ssl.SSLContext:
    """What ``chunk --ca-file`` builds."""
    ctx = make_ssl_context(ca_file=str(ca_dir / "ca.crt"), cert=None, key=None, tls=True)
    assert ctx is not None
    return ctx


async def _tls_chunkd(nursery: trio.Nursery, tmp_path: Path, ca_dir: Path, **config: Any) -> ChunkdHandle:
    secret = "ck_tls_" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:16]
    key_file = write_private(tmp_path / "tls-chunkd.key", secret + "\n")
    return await start_chunkd(nursery, tmp_path, key_file=key_file, api_key=secret,
                              tls_cert=ca_dir / "server.crt", tls_key=ca_dir / "server.key", **config)


def test_the_cli_context_refuses_renegotiation(client_ctx: ssl.SSLContext) -> None:
    # TlsStream sends without reading (see l4proxy.tls): a renegotiation would break it
    assert client_ctx.options & ssl.OP_NO_RENEGOTIATION
    assert client_ctx.minimum_version is ssl.TLSVersion.TLSv1_2


# --- against chunkd -----------------------------------------------------------------------------


async def test_large_objects_round_trip_over_tls(nursery: trio.Nursery, tmp_path: Path, ca_dir: Path,
                                                 client_ctx: ssl.SSLContext) -> None:
    chunkd = await _tls_chunkd(nursery, tmp_path, ca_dir)
    data = hashlib.shake_256(b"object").digest(LARGE)
    with trio.fail_after(DEADLINE):
        # no server_name: the host (an IP address) is what the certificate must match
        async with chunkd.connect(ssl_context=client_ctx) as client:
            assert isinstance(client._stream, TlsStream)
            assert client._stream.version() in ("TLSv1.2", "TLSv1.3")
            await client.create_bucket("b")
            put = await client.put("b", "big", data)
            assert put["size"] == LARGE
            got, _ = await client.get("b", "big")
            assert got == data
            await client.ping()


@pytest.mark.parametrize("failure", ["server_name", "ca"])
async def test_tls_failures_are_connection_failed(nursery: trio.Nursery, tmp_path: Path, ca_dir: Path,
                                                  client_ctx: ssl.SSLContext, failure: str) -> None:
    """Same error type, exit code and wording as with trio's SSLStream; chunkd carries on."""
    chunkd = await _tls_chunkd(nursery, tmp_path, ca_dir)
    if failure == "ca":
        other = tmp_path / "other"
        init_ca(other, trust_domain="test.l4proxy", server_names=["127.0.0.1"], now=datetime.now(UTC))
        ctx = make_ssl_context(ca_file=str(other / "ca.crt"), cert=None, key=None, tls=True)
        kwargs: dict[str, Any] = {"ssl_context": ctx}
    else:
        kwargs = {"ssl_context": client_ctx, "server_name": "not-chunkd.example"}
    with trio.fail_after(DEADLINE):
        with pytest.raises(ConnectionFailed) as info:
            async with chunkd.connect(**kwargs):
                pass
        assert info.value.exit_code == 7
        assert info.value.message == (f"cannot connect to {chunkd.host}:{chunkd.port}: "
                                      "TLS error: CERTIFICATE_VERIFY_FAILED")
        async with chunkd.connect(ssl_context=client_ctx) as client:
            await client.ping()
            assert client.welcome.server == "chunkd"


async def test_chunkd_hello_timeout_bounds_the_tls_handshake(nursery: trio.Nursery, tmp_path: Path,
                                                             ca_dir: Path) -> None:
    """A connection that never starts TLS is closed after hello_timeout, as before."""
    chunkd = await _tls_chunkd(nursery, tmp_path, ca_dir, hello_timeout=0.3)
    with trio.fail_after(DEADLINE):
        tcp = await trio.open_tcp_stream(chunkd.host, chunkd.port)
        async with tcp:
            start = trio.current_time()
            assert await tcp.receive_some() == b""
            assert trio.current_time() - start >= 0.25


async def test_chunkd_answers_a_bad_handshake_with_an_alert(nursery: trio.Nursery, tmp_path: Path,
                                                            ca_dir: Path, client_ctx: ssl.SSLContext,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A malformed ClientHello: chunkd sends the TLS alert (decode_error) and closes; the
    session ends like a dropped connection (no "session crashed"), and the service carries
    on. (trio's SSLStream used to drop the alert: the client saw a bare close.)"""
    chunkd = await _tls_chunkd(nursery, tmp_path, ca_dir)
    caplog.set_level(logging.DEBUG, logger="l4proxy.chunkd")
    with trio.fail_after(DEADLINE):
        tcp = await trio.open_tcp_stream(chunkd.host, chunkd.port)
        async with tcp:
            # a handshake record holding a ClientHello one byte long
            await tcp.send_all(bytes.fromhex("1603010005") + bytes.fromhex("0100000100"))
            reply = bytearray()
            while data := await tcp.receive_some():
                reply += data
        assert bytes(reply) == bytes.fromhex("1503030002") + bytes([2, 50])  # fatal decode_error
        async with ChunkClient.connect(chunkd.host, chunkd.port, api_key=chunkd.api_key,
                                       ssl_context=client_ctx) as client:
            await client.ping()
    assert not [r for r in caplog.records if r.getMessage() == "session crashed"]
    assert any("transport closed: TlsHandshakeError" in r.getMessage() for r in caplog.records)


# --- against a scripted peer ----------------------------------------------------------------------


async def _scripted_peer(ca_dir: Path, after_welcome: Callable[[trio.SSLStream[trio.SocketStream],
                                                                trio.SocketStream], Awaitable[Any]],
                         client: Callable[[int], Awaitable[Any]]) -> tuple[Any, Any]:
    """One TLS connection on loopback: handshake (trio's SSLStream), HELLO -> WELCOME,
    then ``after_welcome(tls, tcp)``; ``client(port)`` runs alongside. Returns both results
    (the peer's result is the exception if its handshake failed)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(ca_dir / "server.crt", ca_dir / "server.key")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    assert isinstance(listener, trio.SocketListener)
    results: dict[str, Any] = {}

    async def serve() -> None:
        tcp = await listener.accept()
        tls = trio.SSLStream(tcp, ctx, server_side=True, https_compatible=False)
        try:
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                results["peer"] = exc
                return
            conn = Connection(Role.SERVER)
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    conn.receive_data(await tls.receive_some())
                    continue
                assert isinstance(event, Hello)
                break
            await tls.send_all(conn.send(Welcome(server="scripted", session_id="s-1")))
            results["peer"] = await after_welcome(tls, tcp)
        finally:
            await trio.aclose_forcefully(tls)  # (the peer may have reset the socket already)

    async def run_client() -> None:
        results["client"] = await client(listener.socket.getsockname()[1])

    try:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                nursery.start_soon(run_client)
    finally:
        await listener.aclose()
    return results["peer"], results["client"]


async def _until_eof(tls: trio.abc.Stream) -> bytes | bytearray | BaseException:
    """What the peer sees after WELCOME: b"" for close_notify, the error for a bare close."""
    try:
        while data := await tls.receive_some():
            pass
        return data
    except trio.BrokenResourceError as exc:
        return exc


@pytest.mark.parametrize("exit", ["normal", "exception"])
async def test_client_sends_close_notify_on_exit(ca_dir: Path, client_ctx: ssl.SSLContext, exit: str) -> None:

    async def peer(tls: trio.SSLStream[trio.SocketStream],
                   tcp: trio.SocketStream) -> bytes | bytearray | BaseException:
        return await _until_eof(tls)

    async def client(port: int) -> str:
        try:
            async with ChunkClient.connect("127.0.0.1", port, ssl_context=client_ctx,
                                           server_name="localhost") as c:
                if exit == "exception":
                    raise LookupError("the caller's own error")
                return c.session_id
        except LookupError:
            return "raised"

    seen, result = await _scripted_peer(ca_dir, peer, client)
    assert seen == b""  # close_notify, not a bare close (which trio reports as broken)
    assert result == ("s-1" if exit == "normal" else "raised")


async def test_client_handshake_failure_sends_an_alert(ca_dir: Path, client_ctx: ssl.SSLContext) -> None:
    """The server learns why (trio's SSLStream client used to drop the alert)."""

    async def peer(tls: trio.SSLStream[trio.SocketStream], tcp: trio.SocketStream) -> None:
        raise AssertionError("the handshake must fail")

    async def client(port: int) -> tuple[int, ConnectionFailed]:
        with pytest.raises(ConnectionFailed) as info:
            async with ChunkClient.connect("127.0.0.1", port, ssl_context=client_ctx,
                                           server_name="wrong.example"):
                pass
        return port, info.value

    seen, (port, err) = await _scripted_peer(ca_dir, peer, client)
    assert err.message == f"cannot connect to 127.0.0.1:{port}: TLS error: CERTIFICATE_VERIFY_FAILED"
    assert isinstance(seen, trio.BrokenResourceError)
    assert isinstance(seen.__cause__, ssl.SSLError)
    assert seen.__cause__.reason == "SSLV3_ALERT_BAD_CERTIFICATE"


async def test_client_describes_a_reset_by_its_errno(ca_dir: Path, client_ctx: ssl.SSLContext) -> None:
    """A transport failure under TLS reads like one without it: the socket's error."""

    async def peer(tls: trio.SSLStream[trio.SocketStream], tcp: trio.SocketStream) -> None:
        assert await tls.receive_some()  # the client's REQUEST (never answered)
        # a RST instead of a FIN: SO_LINGER with a zero timeout, then close
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(tcp)

    async def client(port: int) -> ConnectionFailed:
        async with ChunkClient.connect("127.0.0.1", port, ssl_context=client_ctx,
                                       server_name="localhost") as c:
            with pytest.raises(ConnectionFailed) as info:
                await c.ping()
            return info.value

    _, err = await _scripted_peer(ca_dir, peer, client)
    assert err.message == "connection lost: Connection reset by peer"

