"""The gateway end to end on real loopback sockets: mTLS in front, our certificate checks,
routing and access, credential injection, tcp targets, locks, expiry, reload and drain."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from l4proxy.audit import AuditLog
from l4proxy.client import ChunkClient, ClientError, ConnectionFailed, IdentityRefused, RequestFailed
from l4proxy.config import (
    AccessRule,
    CaConfig,
    ClientCredentials,
    Config,
    ControlConfig,
    GatewayConfig,
    LimitsConfig,
    ListenerConfig,
    TargetConfig,
    TargetProtocol,
)
from l4proxy.gateway import Gateway, GatewayConfigError
from l4proxy.identity import CertificateAuthority, Identity, init_ca
from l4proxy.store import AsyncStateStore, LockKind, LockSpec, SqliteStateStore
from l4proxy.wire import ErrorCode, NoticeKind

from .conftest import ChunkdHandle, TaskSteps, start_chunkd, write_private

TRUST = "gw.test"


@dataclass
class Env:
    tmp: Path
    ca: CertificateAuthority
    chunkd: ChunkdHandle
    secret: str
    gateway: Gateway
    config: Config
    store: AsyncStateStore
    address: tuple[str, int]
    audit_path: Path

    def client_files(self, sub: str, *, groups: tuple[str, ...] = ("eng",),
                     ttl: dt.timedelta = dt.timedelta(minutes=10)) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.ca.mint_client(public_key=key.public_key(),
                                   identity=Identity(provider="dev", subject=sub, groups=groups),
                                   replay_key=f"jti:{sub}-{os.urandom(4).hex()}", ttl=ttl,
                                   now=dt.datetime.now(dt.UTC))
        cert_path = self.tmp / f"{sub}-{cert.serial_number:x}.crt"
        key_path = self.tmp / f"{sub}-{cert.serial_number:x}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path

    def context(self, sub: str | None = "alice", **kw: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.tmp / "certs" / "ca.crt"))
        if sub is not None:
            ctx.load_cert_chain(*self.client_files(sub, **kw))
        return ctx

    def connect(self, sub: str | None = "alice", *, server_name: str = "chunks.gw.test",
                ctx: ssl.SSLContext | None = None, **kw: Any) -> Any:
        host, port = self.address
        return ChunkClient.connect(host, port, ssl_context=ctx or self.context(sub),
                                   server_name=server_name, **kw)

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


def _config(tmp: Path, chunkd: ChunkdHandle, *, limits: LimitsConfig | None = None,
            chunks_access: AccessRule | None = None,
            credentials: ClientCredentials = ClientCredentials.REFUSE,
            echo_port: int = 9, upstream_port: int | None = None) -> Config:
    certs = tmp / "certs"
    return Config(
        gateway=GatewayConfig(id="gw-test", state_dir=tmp / "state"),
        control=ControlConfig(listen=("127.0.0.1", 0), ops_listen=("127.0.0.1", 0)),
        ca=CaConfig(dir=certs, trust_domain=TRUST),
        targets=(
            TargetConfig(name="chunks", upstream=(chunkd.host, upstream_port or chunkd.port),
                         credential_file=tmp / "chunkd.key", client_credentials=credentials,
                         server_names=("chunks.gw.test",),
                         access=chunks_access or AccessRule(groups=("eng",))),
            TargetConfig(name="echo", upstream=("127.0.0.1", echo_port), protocol=TargetProtocol.TCP,
                         server_names=("echo.gw.test",),
                         access=AccessRule(identities=("dev/alice",))),
        ),
        listeners=(ListenerConfig(name="main", listen=("127.0.0.1", 0),
                                  server_cert=certs / "server.crt", server_key=certs / "server.key",
                                  client_ca=certs / "bundle.pem", targets=("chunks", "echo")),),
        limits=limits or LimitsConfig(),
    )


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)
        await stream.send_eof()


_CLOSE_LATER: list[Any] = []


@pytest.fixture(autouse=True)
def _close_after_everything() -> Any:
    """Stores and audit logs close after the nursery (and every session) is done."""
    yield
    while _CLOSE_LATER:
        _CLOSE_LATER.pop().close()


async def _env(nursery: trio.Nursery, tmp: Path, **config_kw: Any) -> Env:
    init_ca(tmp / "certs", trust_domain=TRUST, server_names=["127.0.0.1", "chunks.gw.test",
                                                            "echo.gw.test"],
            now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
    secret = "ck_gateway_" + os.urandom(8).hex()
    key_file = write_private(tmp / "chunkd.key", secret + "\n")
    chunkd = await start_chunkd(nursery, tmp, key_file=key_file, api_key=secret)
    listeners = await nursery.start(trio.serve_tcp, _echo, 0)
    echo_port = listeners[0].socket.getsockname()[1]
    config = _config(tmp, chunkd, echo_port=echo_port, **config_kw)
    sqlite = SqliteStateStore.open(config.gateway.state_dir)
    store = AsyncStateStore(sqlite)
    audit_path = tmp / "audit.jsonl"
    audit = AuditLog(audit_path, gateway_id="gw-test")
    gateway = Gateway(config, store=store, audit=audit)
    _CLOSE_LATER.extend([sqlite, audit])
    addresses = await nursery.start(gateway.serve)
    return Env(tmp=tmp, ca=CertificateAuthority.load(tmp / "certs"), chunkd=chunkd, secret=secret,
               gateway=gateway, config=config, store=store, address=addresses["main"],
               audit_path=audit_path)


@pytest.fixture
async def env(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Env]:
    yield await _env(nursery, tmp_path)


async def test_operations_through_the_gateway(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = os.urandom(3 << 20)
    async with env.connect() as c:
        assert len(c.session_id) == 36 and c.session_id[14] == "7"  # a UUIDv7 from the gateway
        assert c.welcome.server == "l4proxy"
        await c.create_bucket("b")
        assert (await c.put("b", "k", body))["size"] == len(body)
        assert (await c.get("b", "k"))[0] == body
        assert [r[0] for r in (await c.list("b")).rows] == ["k"]
        assert len((await c.chunk("b", "k", strategy="fixed", size=1 << 20)).rows) == 3
        await c.create_table("t", [("n", "int"), ("s", "text")])
        await c.insert("t", ["n", "s"], [(i, str(i)) for i in range(500)])
        assert len((await c.scan("t", where={"s": "7"})).rows) == 1
        with pytest.raises(RequestFailed) as exc:
            await c.stat("b", "missing")
        assert exc.value.code is ErrorCode.NOT_FOUND
        assert (await c.ping(b"x"))["data"] == b"x"
        assert await c.list_buckets() == ["b"]
        assert (await c.stat("b", "k"))["size"] == len(body)
        await c.delete("b", "k")
        await c.drop_table("t")
        assert (await c.delete_bucket("b"))["deleted_objects"] == 0
        session = c.session_id
    with trio.fail_after(5):  # the gateway writes session_end once its side has closed
        while not any(e["event"] == "session_end" for e in env.audit()):
            await trio.sleep(0.02)
    audit = env.audit()
    started = [e for e in audit if e["event"] == "session_start"]
    assert started and started[0]["identity"] == "dev/alice" and started[0]["session"] == session
    assert any(e["event"] == "session_request" and e["op"] == "put" for e in audit)
    assert any(e["event"] == "session_end" and e["session"] == session for e in audit)
    # the service credential appears nowhere the client or an operator can see
    everything = env.audit_path.read_text() + caplog.text
    assert env.secret not in everything


async def test_client_credentials_are_refused_or_stripped(nursery: trio.Nursery, tmp_path: Path) -> None:
    env = await _env(nursery, tmp_path / "refuse")
    with pytest.raises(ClientError) as exc:
        async with env.connect(api_key="my-own-key"):
            pass
    assert exc.value.code is ErrorCode.CLIENT_CREDENTIAL_REFUSED
    strip = await _env(nursery, tmp_path / "strip", credentials=ClientCredentials.STRIP)
    async with strip.connect(api_key="my-own-key") as c:
        assert "time" in await c.ping()
    assert any(e["event"] == "session_redaction" for e in strip.audit())


async def test_connections_refused_before_a_session(env: Env) -> None:
    # no client certificate: the TLS layer refuses (alert); the client sees it on connect/read
    with pytest.raises(ConnectionFailed):
        async with env.connect(None) as c:
            await c.ping()
    # a certificate from another CA
    other = env.tmp / "other"
    init_ca(other, trust_domain=TRUST, now=dt.datetime.now(dt.UTC))
    stranger = CertificateAuthority.load(other)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = stranger.mint_client(public_key=key.public_key(), identity=Identity(provider="dev",
                                subject="mallory", groups=("eng",)), replay_key="jti:m",
                                ttl=dt.timedelta(minutes=5), now=dt.datetime.now(dt.UTC))
    (env.tmp / "m.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (env.tmp / "m.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                      serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    ctx = env.context(None)
    ctx.load_cert_chain(env.tmp / "m.crt", env.tmp / "m.key")
    with pytest.raises(ConnectionFailed):
        async with env.connect(ctx=ctx) as c:
            await c.ping()
    # no access to the target
    with pytest.raises(ClientError) as exc:
        async with env.connect(ctx=env.context("bob", groups=("sales",))) as c:
            await c.ping()
    assert exc.value.code is ErrorCode.DENIED_BY_POLICY
    # a locked identity
    await env.store.add_lock(LockSpec(kind=LockKind.IDENTITY, value="dev/carol", reason="test",
                                      created_by="dev/admin"), now=dt.datetime.now().timestamp())
    with pytest.raises(IdentityRefused) as locked:
        async with env.connect("carol") as c:
            await c.ping()
    assert locked.value.code is ErrorCode.IDENTITY_LOCKED
    reasons = [e["reason"] for e in env.audit() if e["event"] == "session_refused"]
    assert "access" in reasons and "locked" in reasons


async def test_a_lock_ends_a_live_session_within_a_second(env: Env) -> None:
    async with env.connect("dave") as c:
        assert "time" in await c.ping()
        await env.store.add_lock(LockSpec(kind=LockKind.GROUP, value="eng", reason="incident",
                                          created_by="dev/admin"), now=dt.datetime.now().timestamp())
        with trio.fail_after(3):
            with pytest.raises(ClientError) as exc:
                while True:
                    await c.ping()
                    await trio.sleep(0.05)
        assert exc.value.code is ErrorCode.IDENTITY_LOCKED


async def test_a_lock_written_by_another_process_applies_within_a_second(env: Env) -> None:
    # an admin tool with its own connection to the state store: the gateway learns of the
    # lock from the store's lock version (polled), not from its in-process counter
    other = SqliteStateStore.open(env.config.gateway.state_dir)
    try:
        other.add_lock(LockSpec(kind=LockKind.IDENTITY, value="dev/olga", reason="elsewhere",
                                created_by="dev/admin"), now=dt.datetime.now().timestamp())
    finally:
        other.close()
    assert env.store.lock_changes == 0
    with trio.fail_after(3):
        while True:
            try:
                async with env.connect("olga") as c:
                    await c.ping()
            except IdentityRefused as exc:
                assert exc.code is ErrorCode.IDENTITY_LOCKED
                break
            await trio.sleep(0.1)


async def test_a_failing_state_store_refuses_connections(env: Env) -> None:
    # the lock view is too old to trust and cannot be re-read (and the session could not
    # be indexed either): fail closed
    async with env.connect("paul") as c:
        await c.ping()
    env.store.store.close()  # the state store fails from now on
    env.gateway._locks.refreshed -= 3600  # as if the watcher had failed for an hour
    with pytest.raises((ConnectionFailed, ClientError)):
        async with env.connect("paul") as c:
            await c.ping()


async def test_upstream_down(nursery: trio.Nursery, tmp_path: Path) -> None:
    env = await _env(nursery, tmp_path, upstream_port=9)
    with pytest.raises(ConnectionFailed) as exc:
        async with env.connect() as c:
            await c.ping()
    assert exc.value.code is ErrorCode.UPSTREAM_UNAVAILABLE


async def test_certificate_expiry_ends_the_session(nursery: trio.Nursery, tmp_path: Path) -> None:
    env = await _env(nursery, tmp_path, limits=LimitsConfig(expiry_notice=1.0))
    notices: list[Any] = []
    ctx = env.context("erin", ttl=dt.timedelta(seconds=2))
    with trio.fail_after(10):
        with pytest.raises(IdentityRefused) as exc:
            async with env.connect(ctx=ctx, on_notice=notices.append) as c:
                while True:
                    await c.ping()  # after GOAWAY(CERTIFICATE_EXPIRED) this raises
                    await trio.sleep(0.1)
    assert exc.value.code is ErrorCode.CERTIFICATE_EXPIRED
    assert any(n.kind is NoticeKind.EXPIRING for n in notices)


async def test_tcp_target_relays_bytes_with_half_close(env: Env) -> None:
    host, port = env.address
    ctx = env.context("alice")
    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, ctx, server_hostname="echo.gw.test")
    async with tls:
        await tls.send_all(b"hello through the gateway")
        got = b""
        with trio.fail_after(5):
            while len(got) < 25:
                got += await tls.receive_some(1000)
        assert got == b"hello through the gateway"
    # bob may not use the tcp target
    ctx_bob = env.context("bob")
    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, ctx_bob, server_hostname="echo.gw.test")
    async with tls:
        with trio.fail_after(5):
            try:
                await tls.send_all(b"x")
                data = await tls.receive_some(100)
            except trio.BrokenResourceError:
                data = b""
        assert data == b""


async def test_reload_withdraws_access_and_a_broken_reload_keeps_the_old_state(env: Env) -> None:
    async with env.connect("frank") as c:
        assert "time" in await c.ping()
        broken = dataclasses.replace(env.config, listeners=(dataclasses.replace(
            env.config.listeners[0], server_cert=env.tmp / "missing.crt"),))
        with pytest.raises(GatewayConfigError):
            env.gateway.reload(broken)
        assert "time" in await c.ping()  # still serving with the old state
        narrowed = dataclasses.replace(env.config, targets=(dataclasses.replace(
            env.config.targets[0], access=AccessRule(identities=("dev/someone-else",))),
            env.config.targets[1]))
        env.gateway.reload(narrowed)
        with trio.fail_after(3):
            while c.goaway is None:
                await trio.sleep(0.05)
        assert c.goaway.code is ErrorCode.DENIED_BY_POLICY
    with pytest.raises(ClientError) as exc:
        async with env.connect("frank") as c:
            await c.ping()
    assert exc.value.code is ErrorCode.DENIED_BY_POLICY


async def test_a_gateway_without_recording_says_so_loudly(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    assert env.config.recording is None and env.gateway.recorder is None
    # at start (the fixture started serving): one audit event naming the listeners
    events = [e for e in env.audit() if e["event"] == "recording_disabled"]
    assert [e["listeners"] for e in events] == [sorted(env.gateway.addresses)]
    caplog.set_level(logging.WARNING)
    caplog.clear()
    env.gateway.reload(env.config)  # and again on every reload
    warnings = [r for r in caplog.records if "RECORDING IS OFF" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert len([e for e in env.audit() if e["event"] == "recording_disabled"]) == 2


async def test_drain_sends_goaway_then_ends_sessions(env: Env) -> None:
    async with env.connect("gina") as c:
        assert "time" in await c.ping()
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(env.gateway.drain, 0.5)
                while c.goaway is None:
                    await trio.sleep(0.02)
        assert c.goaway.code is ErrorCode.SHUTTING_DOWN
        with pytest.raises(ClientError):
            await c.ping()


async def test_a_broad_service_credential_is_warned_about_once(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    from l4proxy.gateway import _session

    _session._WARNED.clear()  # other tests of this process may have seen the target
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        async with env.connect("wanda") as c:
            await c.ping()
    warnings = [r for r in caplog.records if "give the gateway a key scoped" in r.getMessage()]
    assert len(warnings) == 1  # the test chunkd's key reaches everything


async def test_a_quiet_session_does_not_wake_up_every_second(env: Env) -> None:
    counter = TaskSteps("session.timers")
    trio.lowlevel.add_instrument(counter)
    try:
        async with env.connect("quinn") as c:
            await c.ping()
            await trio.sleep(0.1)
            before = counter.steps
            assert before > 0  # the counter sees the session's timer task
            await trio.sleep(2.5)  # the idle timeout and the certificate are far away
            assert counter.steps == before
            assert "time" in await c.ping()
    finally:
        trio.lowlevel.remove_instrument(counter)


async def test_idle_sessions_are_closed(nursery: trio.Nursery, tmp_path: Path) -> None:
    env = await _env(nursery, tmp_path, limits=LimitsConfig(idle_timeout=0.5))
    async with env.connect("hank") as c:
        assert "time" in await c.ping()
        await trio.sleep(1.8)
        with pytest.raises(ClientError):
            await c.ping()


async def test_a_lock_ends_a_session_whose_client_stopped_reading(env: Env) -> None:
    import socket
    import time as _time

    from l4proxy.wire import NEED_DATA, Connection, Continue, Data, Hello, Op, Request, Result, Role, Welcome

    host, port = env.address
    tcp = await trio.open_tcp_stream(host, port)
    tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tls = trio.SSLStream(tcp, env.context("stalled"), server_hostname="chunks.gw.test")
    conn = Connection(Role.CLIENT)

    async def next_event() -> Any:
        while True:
            event = conn.next_event()
            if event is not NEED_DATA:
                return event
            conn.receive_data(await tls.receive_some(65536))

    with trio.fail_after(20):
        await tls.send_all(conn.send(Hello(client="stalled")))
        assert isinstance(await next_event(), Welcome)
        await tls.send_all(conn.send(Request(request_id=1, op=Op.CREATE_BUCKET, args={"bucket": "b"})))
        assert isinstance(await next_event(), Result)
        body = os.urandom(8 << 20)
        await tls.send_all(conn.send(Request(request_id=2, op=Op.PUT, args={"bucket": "b", "key": "k"})))
        assert isinstance(await next_event(), Continue)
        for off in range(0, len(body), 1 << 20):
            await tls.send_all(conn.send(Data(request_id=2, data=body[off:off + (1 << 20)],
                                              end_stream=off + (1 << 20) >= len(body))))
        assert isinstance(await next_event(), Result)
        # ask for the object and never read the answer: the gateway's send blocks
        await tls.send_all(conn.send(Request(request_id=3, op=Op.GET, args={"bucket": "b", "key": "k"})))
        await trio.sleep(0.5)
        assert len(env.gateway.sessions) == 1
        await env.store.add_lock(LockSpec(kind=LockKind.IDENTITY, value="dev/stalled", reason="x",
                                          created_by="dev/admin"), now=_time.time())
        with trio.fail_after(5):  # lock poll (0.5 s) + the bounded goodbye (2 s)
            while env.gateway.sessions:
                await trio.sleep(0.05)
    await trio.aclose_forcefully(tls)


async def test_the_observer_never_sees_a_client_credential(nursery: trio.Nursery,
                                                           tmp_path: Path) -> None:
    env = await _env(nursery, tmp_path, credentials=ClientCredentials.STRIP)
    seen: dict[str, bytearray] = {"client": bytearray(), "server": bytearray()}

    class Tap:
        async def client_bytes(self, data: bytes) -> None:
            seen["client"] += data

        async def server_bytes(self, data: bytes) -> None:
            seen["server"] += data

        async def event(self, kind: str, fields: Any) -> None:
            return None

        async def closed(self, reason: str) -> None:
            return None

    env.gateway.observer_factory = lambda info: Tap()
    async with env.connect(api_key="client-side-secret-key") as c:
        assert "time" in await c.ping()
    with trio.fail_after(5):
        while not any(e["event"] == "session_end" for e in env.audit()):
            await trio.sleep(0.02)
    assert b"client-side-secret-key" not in seen["client"]
    assert b"*" * len("client-side-secret-key") in seen["client"]  # marked, same framing
    assert env.secret.encode() not in seen["client"] + seen["server"]
    assert seen["server"]  # the WELCOME and the RESULT went to the client


async def test_openssl_s_client_works_through_a_tcp_target(env: Env) -> None:
    """Any TLS client works with a tcp target, given its certificate. Needs the openssl
    command (Debian's openssl package); skipped where it is not installed."""
    import select
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl command not installed")
    cert, key = env.client_files("alice")
    host, port = env.address

    def talk() -> str:
        proc = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"{host}:{port}", "-servername", "echo.gw.test",
             "-cert", str(cert), "-key", str(key), "-CAfile", str(env.tmp / "certs" / "ca.crt"),
             "-verify_return_error", "-quiet"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(b"ping over openssl\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 15)  # bounded wait
            return proc.stdout.readline().decode() if ready else ""
        finally:
            proc.kill()
            proc.wait(timeout=10)
            proc.stdin.close()
            proc.stdout.close()

    with trio.fail_after(20):
        line = await trio.to_thread.run_sync(talk)
    assert line == "ping over openssl\n"


async def test_sessions_are_indexed_with_their_totals(env: Env) -> None:
    async with env.connect("ivan") as c:
        await c.ping()
        await c.create_bucket("idx")
        session = c.session_id
        record = await env.store.get_session(session)
        assert record is not None and record.ended_at is None  # open while it runs
        assert (record.identity, record.target) == ("dev/ivan", "chunks")
    with trio.fail_after(5):
        while (await env.store.get_session(session)).ended_at is None:  # type: ignore[union-attr]
            await trio.sleep(0.02)
    record = await env.store.get_session(session)
    assert record is not None and record.requests == 2 and record.denials == 0
    assert record.bytes_to_gateway > 0 and record.bytes_to_client > 0
    assert record.end_reason in ("client closed", "client connection lost")
