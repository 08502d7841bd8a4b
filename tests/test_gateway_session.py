"""Gateway session logic without TLS: ``run_cwp_session`` / ``run_tcp_session`` on trio
memory streams.

The client side is a real ``l4proxy.wire.Connection(Role.CLIENT)`` on one end of a
``lockstep_stream_pair`` (so when the client writes one byte at a time, the gateway reads
one byte at a time); the service is a real in-process chunkd in a temp dir, reached over
loopback TCP through a tap that keeps every byte the gateway sent upstream. The hooks
(policy, response transform, observer) are small real implementations written here.
Every wait is bounded; the only real-time waits are the expiry and idle-timeout tests.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import socket
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4proxy.config import ClientCredentials, LimitsConfig, TargetConfig
from l4proxy.gateway import (
    ALLOW,
    AllowAll,
    Decision,
    NoTransform,
    Policy,
    ResponseTransform,
    SessionControl,
    SessionHooks,
    SessionInfo,
    UpstreamUnavailable,
    run_cwp_session,
    run_tcp_session,
)
from l4proxy.identity import Identity
from l4proxy.ids import uuid7
from l4proxy.wire import (
    NEED_DATA,
    Column,
    ColumnType,
    Connection,
    ConnectionClosed,
    Continue,
    Data,
    Error,
    ErrorCode,
    Event,
    FrameType,
    GoAway,
    Hello,
    Notice,
    NoticeKind,
    Op,
    Request,
    Response,
    Result,
    Role,
    Rows,
    Secret,
    Welcome,
)

from .conftest import ChunkdHandle, start_chunkd, write_private

ALICE = Identity(provider="dev", subject="alice", email="alice@example.com", groups=("eng",))
SESSION_ID = str(uuid7())
LIMITS = LimitsConfig(handshake_timeout=5.0, upstream_connect_timeout=5.0)
DEADLINE = 10  # seconds, for every conversation
HEADER = struct.Struct(">BBHII")
E = TypeVar("E", bound=Event)

# the conversation's upload: three DATA frames of one put
BODY_PARTS = (bytes(range(256)) * 4, b"\x00middle\xff" * 50, bytes(range(255, -1, -1)) * 2)
BODY = b"".join(BODY_PARTS)
BODY_SHA = hashlib.sha256(BODY).hexdigest()


# --- helpers -------------------------------------------------------------------------------

Split = Callable[[bytes], Iterator[bytes]]


def whole(data: bytes) -> Iterator[bytes]:
    if data:
        yield data


def trickle(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i:i + 1]


def cut_at(sizes: Sequence[int]) -> Split:
    """Pieces of the given sizes, cycling through ``sizes``."""

    def split(data: bytes) -> Iterator[bytes]:
        pos = 0
        for n in itertools.cycle(sizes):
            if pos >= len(data):
                return
            yield data[pos:pos + n]
            pos += n

    return split


class Recorder:
    """A SessionObserver that keeps everything it is shown."""

    def __init__(self) -> None:
        self.client: list[bytes] = []
        self.server: list[bytes] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.reasons: list[str] = []

    async def client_bytes(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.client.append(data)

    async def server_bytes(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.server.append(data)

    async def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        self.events.append((kind, dict(fields)))

    async def closed(self, reason: str) -> None:
        self.reasons.append(reason)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [f for k, f in self.events if k == kind]

    def everything(self) -> bytes:
        """All it saw, as bytes, for searching."""
        text = repr(self.events) + repr(self.reasons)
        return b"".join(self.client) + b"".join(self.server) + text.encode()


class Tap(trio.abc.HalfCloseableStream):
    """A stream that keeps a copy of every byte sent through it (the gateway's upstream)."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.sent = bytearray()
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()

    def frames(self) -> list[tuple[FrameType, int, bytes]]:
        """The frames the gateway sent upstream: (type, request id, payload)."""
        out = []
        pos = 0
        while pos < len(self.sent):
            ftype, _flags, _reserved, rid, length = HEADER.unpack_from(self.sent, pos)
            out.append((FrameType(ftype), rid, bytes(self.sent[pos + 12:pos + 12 + length])))
            pos += 12 + length
        assert pos == len(self.sent)
        return out

    def requests(self) -> list[tuple[int, str]]:
        return [(rid, msgpack.unpackb(p)["op"]) for t, rid, p in self.frames()
                if t is FrameType.REQUEST]

    def body(self, request_id: int) -> bytes:
        return b"".join(p for t, rid, p in self.frames()
                        if t is FrameType.DATA and rid == request_id)


class Client:
    """A real CWP client codec on a stream; a background task reads everything."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = Connection(Role.CLIENT)
        self.sent = bytearray()
        self.received = bytearray()
        self.events: list[Event] = []
        self.closed = False
        self._changed = trio.Event()

    async def read_all(self) -> None:
        while not self.closed:
            try:
                data = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.received += data
            self.conn.receive_data(data)
            while (event := self.conn.next_event()) is not NEED_DATA:
                if isinstance(event, ConnectionClosed):
                    self.closed = True
                    break
                assert isinstance(event, Event)
                self.events.append(event)
            self._changed.set()
            self._changed = trio.Event()

    async def send(self, *events: Event, split: Split = whole) -> None:
        await self.send_raw(b"".join(self.conn.send(e) for e in events), split=split)

    async def send_raw(self, data: bytes, *, split: Split = whole) -> None:
        self.sent += data
        for piece in split(data):
            await self.stream.send_all(piece)

    async def wait_for(self, predicate: Callable[[], bool], what: str = "") -> None:
        with trio.fail_after(DEADLINE):
            while not predicate():
                if self.closed:
                    raise AssertionError(f"closed while waiting for {what}: {self.events}")
                await self._changed.wait()

    async def wait_event(self, kind: type[E], request_id: int | None = None) -> E:
        def found() -> E | None:
            return next((e for e in self.events if isinstance(e, kind)
                         and (request_id is None or getattr(e, "request_id", None) == request_id)),
                        None)

        await self.wait_for(lambda: found() is not None, f"{kind.__name__} {request_id}")
        event = found()
        assert event is not None
        return event

    async def wait_closed(self) -> None:
        with trio.fail_after(DEADLINE):
            while not self.closed:
                await self._changed.wait()

    async def hello(self, *, api_key: str | None = None, split: Split = whole) -> Welcome:
        await self.send(Hello(client="test-client", api_key=Secret(api_key) if api_key else None),
                        split=split)
        return await self.wait_event(Welcome)

    def of(self, request_id: int) -> list[Event]:
        return [e for e in self.events if getattr(e, "request_id", None) == request_id]


@dataclass
class Harness:
    client: Client
    observer: Recorder
    control: SessionControl
    taps: list[Tap] = field(default_factory=list)
    reason: str | None = None
    #: what the session function raised (it should return a reason instead)
    error: BaseException | None = None
    done: trio.Event = field(default_factory=trio.Event)

    async def ended(self) -> str:
        with trio.fail_after(DEADLINE):
            await self.done.wait()
        assert self.error is None, f"the session raised instead of ending: {self.error!r}"
        assert self.reason is not None
        return self.reason

    def run(self, session: Callable[[], Awaitable[str]]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                self.reason = await session()
            except Exception as exc:  # reported by ended()
                self.error = exc
            finally:
                self.done.set()

        return run

    @property
    def tap(self) -> Tap:
        assert len(self.taps) == 1
        return self.taps[0]


def info(*, not_after: datetime | None = None, identity: Identity = ALICE) -> SessionInfo:
    return SessionInfo(session_id=SESSION_ID, identity=identity, serial=0x1234,
                       not_after=not_after or datetime.now(UTC) + timedelta(hours=1),
                       target="chunks", client_address="127.0.0.1")


def tapped(address: tuple[str, int], taps: list[Tap]) -> Callable[[], Awaitable[trio.abc.Stream]]:
    async def open_upstream() -> trio.abc.Stream:
        tap = Tap(await trio.open_tcp_stream(*address))
        taps.append(tap)
        return tap

    return open_upstream


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_cwp(nursery: trio.Nursery, chunkd: ChunkdHandle, *,
                    credential: str | Callable[[], str] | None = None,
                    policy: Policy | None = None, transform: ResponseTransform | None = None,
                    limits: LimitsConfig = LIMITS,
                    session: SessionInfo | None = None,
                    target: TargetConfig | None = None,
                    upstream: tuple[str, int] | None = None) -> Harness:
    """Run ``run_cwp_session`` on one end of a lockstep pair; the Client on the other."""
    client_end, gateway_end = trio.testing.lockstep_stream_pair()
    recorder = Recorder()
    hooks = SessionHooks(policy=policy or AllowAll(), transform=transform or NoTransform(),
                         observer=recorder)
    h = Harness(client=Client(client_end), observer=recorder, control=SessionControl())
    if callable(credential):
        read_credential = credential
    else:
        secret = chunkd.api_key if credential is None else credential
        read_credential = lambda: secret  # noqa: E731
    address = upstream or (chunkd.host, chunkd.port)

    nursery.start_soon(h.run(lambda: run_cwp_session(
        session or info(), gateway_end,
        target=target or TargetConfig(name="chunks", upstream=address),
        limits=limits, open_upstream=tapped(address, h.taps),
        read_credential=read_credential, hooks=hooks, control=h.control)))
    nursery.start_soon(h.client.read_all)
    return h


async def _chunkd(nursery: trio.Nursery, tmp: Path, name: str = "chunkd") -> ChunkdHandle:
    secret = "ck_session_" + hashlib.sha256(str(tmp).encode()).hexdigest()[:16]
    key_file = write_private(tmp / f"{name}.key", secret + "\n")
    return await start_chunkd(nursery, tmp, key_file=key_file, api_key=secret)


@pytest.fixture
async def chunkd(nursery: trio.Nursery, tmp_path: Path) -> ChunkdHandle:
    return await _chunkd(nursery, tmp_path)


def plain(value: Any) -> Any:
    """Events and their mappings/sequences as plain, comparable Python values."""
    if isinstance(value, Event) and dataclasses.is_dataclass(value):
        return (type(value).__name__,
                {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)})
    if isinstance(value, Enum):
        return value
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    return value


def per_request(events: Sequence[Event]) -> dict[int, list[Any]]:
    """Each request's events in order, DATA pieces merged (piece sizes follow the reads)."""
    out: dict[int, list[Any]] = {}
    for event in events:
        rid = getattr(event, "request_id", 0)
        seq = out.setdefault(rid, [])
        if isinstance(event, Data) and seq and isinstance(seq[-1], Data) and not seq[-1].end_stream:
            seq[-1] = Data(request_id=rid, data=seq[-1].data + event.data,
                           end_stream=event.end_stream)
        else:
            seq.append(event)
    return {rid: [plain(e) for e in seq] for rid, seq in out.items()}


# --- a full conversation, split three ways ---------------------------------------------------


def _expected() -> dict[int, list[Any]]:
    def result(rid: int, **fields: Any) -> Event:
        return Result(request_id=rid, fields=fields)

    return per_request([
        result(1, bucket="b"),
        result(2, table="t"),
        Continue(request_id=3),
        result(3, bucket="b", key="k", size=len(BODY), sha256=BODY_SHA),
        Response(request_id=4, size=len(BODY)),
        Data(request_id=4, data=BODY, end_stream=True),
        result(4, size=len(BODY), sha256=BODY_SHA),
        Continue(request_id=5),
        result(5, table="t", inserted=3),
        Response(request_id=6, columns=(Column(name="n", type=ColumnType.INT),
                                        Column(name="s", type=ColumnType.TEXT))),
        Rows(request_id=6, rows=[[3, "c"]], end_stream=True),
        result(6, rows=1, truncated=False),
    ])


async def converse(h: Harness, split: Split) -> Welcome:
    """HELLO, then pipelined requests: create_bucket, create_table, a put with a body of
    three DATA frames, a get, an insert of two ROWS frames and a scan; then EOF."""
    c = h.client
    welcome = await c.hello(split=split)
    await c.send(
        Request(request_id=1, op=Op.CREATE_BUCKET, args={"bucket": "b"}),
        Request(request_id=2, op=Op.CREATE_TABLE,
                args={"table": "t", "columns": [["n", "int"], ["s", "text"]]}),
        Request(request_id=3, op=Op.PUT, args={"bucket": "b", "key": "k", "size": len(BODY)},
                reason="the conversation test"),
        split=split)
    await c.wait_event(Continue, 3)
    await c.send(
        *(Data(request_id=3, data=part, end_stream=i == len(BODY_PARTS) - 1)
          for i, part in enumerate(BODY_PARTS)),
        Request(request_id=4, op=Op.GET, args={"bucket": "b", "key": "k"}),
        Request(request_id=5, op=Op.INSERT, args={"table": "t", "columns": ["n", "s"]}),
        split=split)
    await c.wait_event(Continue, 5)
    await c.send(
        Rows(request_id=5, rows=[[1, "a"], [2, None]]),
        Rows(request_id=5, rows=[[3, "c"]], end_stream=True),
        Request(request_id=6, op=Op.SCAN, args={"table": "t", "where": {"s": "c"}}),
        split=split)
    await c.wait_event(Result, 6)
    await c.stream.send_eof()  # type: ignore[attr-defined]
    await c.wait_closed()
    return welcome


async def check_conversation(h: Harness, chunkd: ChunkdHandle, split: Split) -> None:
    welcome = await converse(h, split)
    assert await h.ended() == "client closed"
    # the client saw the gateway's WELCOME, with the service's scope
    assert welcome.server == "l4proxy" and welcome.session_id == SESSION_ID
    async with chunkd.connect() as direct:
        assert welcome.scope == direct.welcome.scope
    events = [e for e in h.client.events if not isinstance(e, Welcome)]
    assert per_request(events) == _expected()
    # the service executed exactly these requests, with the gateway's credential in HELLO
    tap = h.tap
    kind, _rid, payload = tap.frames()[0]
    assert kind is FrameType.HELLO
    assert msgpack.unpackb(payload)["api_key"] == chunkd.api_key
    assert tap.requests() == [(1, "create_bucket"), (2, "create_table"), (3, "put"),
                              (4, "get"), (5, "insert"), (6, "scan")]
    assert tap.body(3) == BODY
    assert tap.closed
    # the observer saw exactly what the client sent and received, never the credential
    obs = h.observer
    assert b"".join(obs.client) == bytes(h.client.sent)
    assert b"".join(obs.server) == bytes(h.client.received)
    assert chunkd.api_key.encode() not in obs.everything()
    assert [f["op"] for f in obs.kinds("request")] == ["create_bucket", "create_table", "put",
                                                         "get", "insert", "scan"]
    assert all(f["allow"] for f in obs.kinds("decision"))
    assert obs.kinds("request")[2]["reason"] == "the conversation test"
    assert obs.reasons == ["client closed"]


@pytest.mark.parametrize("split", [whole, trickle], ids=["whole", "trickle"])
async def test_a_full_conversation_whole_or_one_byte_at_a_time(
        nursery: trio.Nursery, chunkd: ChunkdHandle, split: Split,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h = await start_cwp(nursery, chunkd)
    await check_conversation(h, chunkd, split)
    if split is trickle:  # the gateway really was fed one byte per read
        # (the observer gets the bytes up to HELLO in one piece, once HELLO is parsed)
        hello, *after = h.observer.client
        assert hello == bytes(h.client.sent[:len(hello)]) and hello[0] == FrameType.HELLO
        assert len(after) == len(h.client.sent) - len(hello)
        assert {len(piece) for piece in after} == {1}
    assert chunkd.api_key not in caplog.text


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=12))
async def test_a_full_conversation_cut_at_chosen_points(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            chunkd = await _chunkd(nursery, Path(tmp))
            h = await start_cwp(nursery, chunkd)
            await check_conversation(h, chunkd, cut_at(sizes))
            nursery.cancel_scope.cancel()


async def test_requests_are_forwarded_re_encoded_canonically(
        nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    h = await start_cwp(nursery, chunkd)
    c = h.client
    await c.hello()
    request = Request(request_id=1, op=Op.CREATE_BUCKET, args={"bucket": "canon"},
                      reason="why not")
    canonical = c.conn.send(request)  # the client codec tracks it; we send other bytes
    payload = b"\x83" + b"".join(msgpack.packb(x) for x in (
        "reason", "why not", "op", "create_bucket", "args", {"bucket": "canon"}))
    assert payload != canonical[12:]
    await c.send_raw(HEADER.pack(FrameType.REQUEST, 0, 0, 1, len(payload)) + payload)
    result = await c.wait_event(Result, 1)
    assert dict(result.fields) == {"bucket": "canon"}
    [(_kind, _rid, forwarded)] = [f for f in h.tap.frames() if f[0] is FrameType.REQUEST]
    assert forwarded == canonical[12:]


async def test_a_long_identity_name_does_not_leak_into_welcome(
        nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    # WELCOME's session_id is at most 64 characters: it must be the id, nothing built from it
    someone = Identity(provider="corporate-okta", subject="00u" + "x" * 200 + "@example.com")
    h = await start_cwp(nursery, chunkd, session=info(identity=someone))
    welcome = await h.client.hello()
    assert welcome.session_id == SESSION_ID
    await h.client.send(Request(request_id=1, op=Op.PING))
    await h.client.wait_event(Result, 1)
    hello = msgpack.unpackb(h.tap.frames()[0][2])
    assert hello["client"].startswith("l4proxy/corporate-okta/00u") and len(hello["client"]) <= 255


# --- the hooks: policy, response transform ------------------------------------------------


class DenyDeletesAndLockedPuts:
    """Denies delete_bucket anywhere, and put into the bucket "locked"."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, Op]] = []

    async def decide(self, session: SessionInfo, request: Request) -> Decision:
        self.seen.append((session.identity.name, request.request_id, request.op))
        if request.op is Op.DELETE_BUCKET:
            return Decision(allow=False, rule="no-bucket-deletes", message="not here")
        if request.op is Op.PUT and request.args["bucket"] == "locked":
            return Decision(allow=False, rule="locked-bucket")
        return ALLOW


async def test_policy_denies_one_request_and_the_service_never_sees_it(
        nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    policy = DenyDeletesAndLockedPuts()
    h = await start_cwp(nursery, chunkd, policy=policy)
    c = h.client
    await c.hello()
    await c.send(
        Request(request_id=1, op=Op.CREATE_BUCKET, args={"bucket": "keep"}),
        Request(request_id=2, op=Op.CREATE_BUCKET, args={"bucket": "locked"}),
        Request(request_id=3, op=Op.DELETE_BUCKET, args={"bucket": "keep", "force": True}),
        Request(request_id=4, op=Op.PUT, args={"bucket": "locked", "key": "k"}),
        Request(request_id=5, op=Op.PING, args={"data": b"after"}))
    await c.wait_event(Result, 5)
    assert [type(e) for e in c.of(1)] == [Result]
    assert c.of(3) == [Error(request_id=3, code=ErrorCode.DENIED_BY_POLICY, message="not here")]
    # the denied put got its ERROR instead of CONTINUE, so its body was never sent
    assert c.of(4) == [Error(request_id=4, code=ErrorCode.DENIED_BY_POLICY,
                             message="denied by policy")]
    assert (await c.wait_event(Result, 5)).fields["data"] == b"after"  # the session goes on
    assert [rid for _, rid, _ in policy.seen] == [1, 2, 3, 4, 5]
    assert {who for who, _, _ in policy.seen} == {"dev/alice"}
    # the service never saw the denied requests
    assert h.tap.requests() == [(1, "create_bucket"), (2, "create_bucket"), (5, "ping")]
    assert not [f for f in h.tap.frames() if f[0] is FrameType.DATA]
    async with chunkd.connect() as direct:
        assert {"keep", "locked"} <= set(await direct.list_buckets())
        assert (await direct.list("locked")).rows == []
    decisions = {f["request_id"]: f for f in h.observer.kinds("decision")}
    assert not decisions[3]["allow"] and decisions[3]["rule"] == "no-bucket-deletes"
    assert decisions[3]["code"] == "DENIED_BY_POLICY" and decisions[5]["allow"]
    assert 4 not in {f["request_id"] for f in h.observer.kinds("continue")}


class MaskSha256:
    """Rewrites the sha256 field of every RESULT."""

    def transform(self, session: SessionInfo, event: Event) -> Event:
        if isinstance(event, Result) and "sha256" in event.fields:
            return dataclasses.replace(event, fields={**event.fields, "sha256": "x" * 64})
        return event


async def test_response_transform_changes_what_the_client_sees(
        nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    h = await start_cwp(nursery, chunkd, transform=MaskSha256())
    c = h.client
    await c.hello()
    await c.send(Request(request_id=1, op=Op.CREATE_BUCKET, args={"bucket": "b"}),
                 Request(request_id=2, op=Op.PUT, args={"bucket": "b", "key": "k"}))
    await c.wait_event(Continue, 2)
    await c.send(Data(request_id=2, data=BODY, end_stream=True),
                 Request(request_id=3, op=Op.STAT, args={"bucket": "b", "key": "k"}),
                 Request(request_id=4, op=Op.GET, args={"bucket": "b", "key": "k"}))
    await c.wait_event(Result, 4)
    for rid in (2, 3, 4):
        assert (await c.wait_event(Result, rid)).fields["sha256"] == "x" * 64
    assert c.of(4)[1] == Data(request_id=4, data=BODY, end_stream=True)  # bodies untouched
    async with chunkd.connect() as direct:  # the service still holds the real value
        assert (await direct.stat("b", "k"))["sha256"] == BODY_SHA
    # the observer sees what the client received: the transformed bytes
    assert b"".join(h.observer.server) == bytes(c.received)
    assert BODY_SHA.encode() not in bytes(c.received)


# --- refusals and failures -----------------------------------------------------------------


async def test_a_client_credential_is_refused_before_the_service_is_contacted(
        nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    h = await start_cwp(nursery, chunkd)
    await h.client.send(Hello(client="test-client", api_key=Secret("ck_client_own_key")))
    await h.client.wait_closed()
    [error] = h.client.events
    assert isinstance(error, Error) and error.request_id == 0
    assert error.code is ErrorCode.CLIENT_CREDENTIAL_REFUSED
    assert await h.ended() == "client sent a credential (refused)"
    assert h.taps == []
    # the observer saw the HELLO's framing, with the client's key overwritten
    seen = b"".join(h.observer.client)
    assert len(seen) == len(h.client.sent) and b"ck_client_own_key" not in seen
    assert seen == bytes(h.client.sent).replace(b"ck_client_own_key", b"*" * 17)


async def test_a_client_credential_is_stripped_when_the_target_says_so(
        nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    target = TargetConfig(name="chunks", upstream=(chunkd.host, chunkd.port),
                          client_credentials=ClientCredentials.STRIP)
    h = await start_cwp(nursery, chunkd, target=target)
    await h.client.hello(api_key="ck_client_own_key")
    await h.client.send(Request(request_id=1, op=Op.PING))
    await h.client.wait_event(Result, 1)
    hello = msgpack.unpackb(h.tap.frames()[0][2])
    assert hello["api_key"] == chunkd.api_key  # the gateway's, not the client's
    assert b"ck_client_own_key" not in bytes(h.tap.sent)
    assert b"ck_client_own_key" not in h.observer.everything()
    assert h.observer.kinds("redaction") == [{"what": "client api_key", "action": "stripped"}]


@pytest.mark.parametrize("when", ["before HELLO", "after WELCOME"])
async def test_garbage_from_the_client_ends_the_session_with_protocol_error(
        nursery: trio.Nursery, chunkd: ChunkdHandle, when: str) -> None:
    h = await start_cwp(nursery, chunkd)
    if when == "after WELCOME":
        await h.client.hello()
        garbage = b"\x7f\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00"  # frame type 0x7f
    else:  # a HELLO header around bytes that are not MessagePack
        h.client.conn.send(Hello(client="test-client"))  # so the codec expects an answer
        garbage = HEADER.pack(FrameType.HELLO, 0, 0, 0, 3) + b"\xc1\xc1\xc1"
    await h.client.send_raw(garbage)
    await h.client.wait_closed()
    last = h.client.events[-1]
    assert isinstance(last, Error) and last.request_id == 0
    assert last.code is ErrorCode.PROTOCOL_ERROR
    assert (await h.ended()).startswith("client protocol error")
    assert b"".join(h.observer.client).endswith(garbage)
    if when == "before HELLO":
        assert h.taps == []
    else:  # nothing of the garbage went upstream, and the upstream connection is closed
        assert h.tap.requests() == [] and h.tap.closed


async def test_an_unsupported_hello_version_is_refused(
        nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    h = await start_cwp(nursery, chunkd)
    h.client.conn.send(Hello(client="test-client"))  # so the codec expects an answer
    payload = msgpack.packb({"client": "from the future", "version": 2, "wish": "list"})
    await h.client.send_raw(HEADER.pack(FrameType.HELLO, 0, 0, 0, len(payload)) + payload)
    await h.client.wait_closed()
    [error] = h.client.events
    assert isinstance(error, Error) and error.code is ErrorCode.UNSUPPORTED_VERSION
    await h.ended()
    assert h.taps == []


async def test_no_hello_in_time(nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    h = await start_cwp(nursery, chunkd, limits=dataclasses.replace(LIMITS, handshake_timeout=0.3))
    await h.client.send_raw(b"\x01\x00")  # the start of a HELLO, and nothing more
    await h.client.wait_closed()
    assert await h.ended() == "no HELLO in time"
    assert h.taps == [] and h.client.events == []


async def test_upstream_unreachable(nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    h = await start_cwp(nursery, chunkd, upstream=("127.0.0.1", closed_port()))
    await h.client.send(Hello(client="test-client"))
    await h.client.wait_closed()
    [error] = h.client.events
    assert isinstance(error, Error) and error.code is ErrorCode.UPSTREAM_UNAVAILABLE
    assert await h.ended() == "upstream unavailable"


async def test_upstream_credential_unreadable(nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    def unreadable() -> str:
        raise UpstreamUnavailable("/etc/l4proxy/chunks.key: permission denied")

    h = await start_cwp(nursery, chunkd, credential=unreadable)
    await h.client.send(Hello(client="test-client"))
    await h.client.wait_closed()
    [error] = h.client.events
    assert isinstance(error, Error) and error.code is ErrorCode.UPSTREAM_UNAVAILABLE
    assert "chunks.key" not in error.message  # the operator's detail stays in the log
    assert await h.ended() == "credential unavailable"


async def test_upstream_refusing_the_credential(nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    wrong = "ck_wrong_" + "z" * 20
    h = await start_cwp(nursery, chunkd, credential=wrong)
    await h.client.send(Hello(client="test-client"))
    await h.client.wait_closed()
    [error] = h.client.events
    assert isinstance(error, Error) and error.code is ErrorCode.UPSTREAM_AUTH_FAILED
    assert await h.ended() == "upstream refused the credential"
    assert wrong.encode() not in bytes(h.client.received)
    assert wrong.encode() not in h.observer.everything()


async def test_the_client_vanishing_closes_the_upstream(
        nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    h = await start_cwp(nursery, chunkd)
    await h.client.hello()
    await h.client.send(Request(request_id=1, op=Op.CREATE_BUCKET, args={"bucket": "b"}),
                        Request(request_id=2, op=Op.PUT, args={"bucket": "b", "key": "k"}))
    await h.client.wait_event(Continue, 2)
    await h.client.send(Data(request_id=2, data=b"half of it"))  # then vanish mid-upload
    await h.client.stream.aclose()
    await h.ended()
    assert h.tap.closed
    async with chunkd.connect() as direct:  # the half upload did not become an object
        assert (await direct.list("b")).rows == []


async def test_the_service_vanishing_mid_session(nursery: trio.Nursery, tmp_path: Path) -> None:
    async with trio.open_nursery() as service:
        chunkd = await _chunkd(service, tmp_path)
        h = await start_cwp(nursery, chunkd)
        await h.client.hello()
        await h.client.send(Request(request_id=1, op=Op.PING))
        await h.client.wait_event(Result, 1)
        service.cancel_scope.cancel()  # chunkd stops and its connections close
    await h.client.wait_closed()
    assert h.client.events[-1] == Error(request_id=0, code=ErrorCode.UPSTREAM_UNAVAILABLE,
                                        message="the service closed the connection")
    assert await h.ended() == "upstream closed"
    assert h.tap.closed


async def test_a_client_that_stops_reading_ends_the_session_without_raising(
        nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    # a request the gateway answers itself (a denial) while writes to the client fail
    h = await start_cwp(nursery, chunkd, policy=DenyDeletesAndLockedPuts())
    await h.client.hello()
    await h.client.stream.receive_stream.aclose()  # type: ignore[attr-defined]
    await h.client.send(Request(request_id=1, op=Op.DELETE_BUCKET, args={"bucket": "b"}))
    assert "lost" in await h.ended()
    assert h.tap.closed and h.tap.requests() == []


# --- ending sessions: control, expiry, idle --------------------------------------------------


async def test_goaway_then_end_from_the_gateway(nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    h = await start_cwp(nursery, chunkd)
    c = h.client
    await c.hello()
    await c.send(Request(request_id=1, op=Op.PING))
    await c.wait_event(Result, 1)
    crossing = c.conn.send(Request(request_id=2, op=Op.PING))  # sent after GOAWAY arrives
    h.control.goaway(ErrorCode.SHUTTING_DOWN, "draining")
    goaway = await c.wait_event(GoAway)
    assert goaway == GoAway(last_request_id=1, code=ErrorCode.SHUTTING_DOWN, message="draining")
    await c.send_raw(crossing)
    assert await c.wait_event(Error, 2) == Error(request_id=2, code=ErrorCode.SHUTTING_DOWN,
                                                 message="the gateway sent GOAWAY; reconnect")
    h.control.end(ErrorCode.SHUTTING_DOWN, "bye now")
    await c.wait_closed()
    assert c.events[-1] == Error(request_id=0, code=ErrorCode.SHUTTING_DOWN, message="bye now")
    assert sum(isinstance(e, GoAway) for e in c.events) == 1
    assert await h.ended() == "ended by the gateway: SHUTTING_DOWN"
    assert h.tap.requests() == [(1, "ping")]  # the crossing request never went upstream


async def test_certificate_expiry_ends_the_session(nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    not_after = datetime.now(UTC) + timedelta(seconds=2.5)
    start = time.monotonic()
    h = await start_cwp(nursery, chunkd, session=info(not_after=not_after),
                        limits=dataclasses.replace(LIMITS, expiry_notice=1.0))
    c = h.client
    await c.hello()
    await c.send(Request(request_id=1, op=Op.PING))
    await c.wait_event(Result, 1)
    notice = await c.wait_event(Notice)
    noticed = time.monotonic() - start
    await c.wait_closed()
    ended = time.monotonic() - start
    rest = c.events[c.events.index(notice):]
    assert notice.request_id == 0 and notice.kind is NoticeKind.EXPIRING
    assert notice.expires_at == pytest.approx(not_after.timestamp())
    assert rest[1] == GoAway(last_request_id=1, code=ErrorCode.CERTIFICATE_EXPIRED,
                             message="the client certificate expires soon")
    assert isinstance(rest[2], Error) and rest[2].request_id == 0
    assert rest[2].code is ErrorCode.CERTIFICATE_EXPIRED and len(rest) == 3
    assert 1.2 <= noticed <= 2.4  # expiry_notice (1 s) before not_after
    assert 2.3 <= ended <= 3.5  # at not_after: access never outlives the certificate
    assert await h.ended() == "certificate expired"


async def test_an_idle_session_is_closed(nursery: trio.Nursery, chunkd: ChunkdHandle) -> None:
    h = await start_cwp(nursery, chunkd, limits=dataclasses.replace(LIMITS, idle_timeout=0.4))
    await h.client.hello()
    await h.client.wait_closed()
    assert await h.ended() == "idle timeout"
    assert h.tap.closed


# --- tcp targets ---------------------------------------------------------------------------


GREETING = b"220 upstream ready\r\n"


async def _answer_after_eof(stream: trio.SocketStream) -> None:
    """Greets at once, reads until the client's EOF, then answers and closes."""
    async with stream:
        await stream.send_all(GREETING)
        got = bytearray()
        async for data in stream:
            got += data
        await stream.send_all(b"got %d bytes: " % len(got) + bytes(got[::-1]))


async def _tcp_upstream(nursery: trio.Nursery) -> tuple[str, int]:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, _answer_after_eof, 0,
                                                      host="127.0.0.1"))
    return "127.0.0.1", int(listeners[0].socket.getsockname()[1])


async def start_tcp(nursery: trio.Nursery, address: tuple[str, int], *,
                    session: SessionInfo | None = None,
                    limits: LimitsConfig = LIMITS) -> tuple[trio.abc.Stream, Harness]:
    client_end, gateway_end = trio.testing.memory_stream_pair()
    recorder = Recorder()
    h = Harness(client=Client(client_end), observer=recorder, control=SessionControl())

    nursery.start_soon(h.run(lambda: run_tcp_session(
        session or info(), gateway_end, limits=limits, open_upstream=tapped(address, h.taps),
        hooks=SessionHooks(policy=AllowAll(), transform=NoTransform(), observer=recorder),
        control=h.control)))
    return client_end, h


async def _read_until_eof(stream: trio.abc.Stream) -> bytes:
    got = bytearray()
    with trio.fail_after(DEADLINE):
        while data := await stream.receive_some(1 << 16):
            got += data
    return bytes(got)


async def test_tcp_session_relays_both_ways_with_half_close(nursery: trio.Nursery) -> None:
    address = await _tcp_upstream(nursery)
    client, h = await start_tcp(nursery, address)
    with trio.fail_after(DEADLINE):
        greeting = b""
        while len(greeting) < len(GREETING):  # the service talks first
            greeting += await client.receive_some(100)
    assert greeting == GREETING
    sent = b"".join(b"line %d\n" % i for i in range(2000))
    for piece in cut_at([1, 7, 500, 4096])(sent):
        await client.send_all(piece)
    await client.send_eof()  # type: ignore[attr-defined]
    answer = await _read_until_eof(client)  # the service answers only after our EOF
    assert answer == b"got %d bytes: " % len(sent) + sent[::-1]
    assert await h.ended() == "closed"
    assert b"".join(h.observer.client) == sent
    assert b"".join(h.observer.server) == greeting + answer
    assert h.observer.reasons == ["closed"] and h.tap.closed


async def _firehose(stream: trio.SocketStream) -> None:
    with trio.move_on_after(DEADLINE):
        try:
            while True:
                await stream.send_all(b"x" * 65536)
        except trio.BrokenResourceError:
            pass


async def test_tcp_session_client_vanishing_while_the_service_sends(nursery: trio.Nursery) -> None:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, _firehose, 0,
                                                      host="127.0.0.1"))
    client, h = await start_tcp(nursery, ("127.0.0.1", listeners[0].socket.getsockname()[1]))
    with trio.fail_after(DEADLINE):
        assert await client.receive_some(100)
    await client.aclose()
    assert await h.ended() == "connection lost"
    assert h.tap.closed and h.observer.reasons == ["connection lost"]


async def test_tcp_session_upstream_unreachable_closes_the_client(nursery: trio.Nursery) -> None:
    client, h = await start_tcp(nursery, ("127.0.0.1", closed_port()))
    assert await _read_until_eof(client) == b""
    assert await h.ended() == "upstream unavailable"


async def test_tcp_session_ended_by_the_gateway(nursery: trio.Nursery) -> None:
    address = await _tcp_upstream(nursery)
    client, h = await start_tcp(nursery, address)
    with trio.fail_after(DEADLINE):
        while len(await client.receive_some(100)) == 0:
            pass
    h.control.end(ErrorCode.IDENTITY_LOCKED, "locked")
    assert await h.ended() == "ended by the gateway: IDENTITY_LOCKED"
    assert h.tap.closed
    with pytest.raises(trio.BrokenResourceError):  # the gateway closed our connection
        with trio.fail_after(DEADLINE):
            while True:
                await client.send_all(b"more")
                await trio.sleep(0.01)


async def test_tcp_session_ends_when_the_certificate_expires(nursery: trio.Nursery) -> None:
    address = await _tcp_upstream(nursery)
    start = time.monotonic()
    client, h = await start_tcp(nursery, address,
                                session=info(not_after=datetime.now(UTC) + timedelta(seconds=0.6)))
    assert await _read_until_eof(client) == GREETING  # then a clean close
    assert await h.ended() == "certificate expired or maximum session length"
    assert 0.5 <= time.monotonic() - start <= 1.6


async def test_session_control_keeps_the_end_behind_any_number_of_goaways() -> None:
    control = SessionControl()
    with trio.move_on_after(0.05) as idle:
        await control.receive()  # nothing posted: waits
    assert idle.cancelled_caught
    for i in range(100):  # reloads, drains: bounded, and only the first is delivered
        control.goaway(ErrorCode.DENIED_BY_POLICY, f"reload {i}")
    assert await control.receive() == ("goaway", ErrorCode.DENIED_BY_POLICY, "reload 0")
    control.end(ErrorCode.IDENTITY_LOCKED, "locked")
    control.end(ErrorCode.SHUTTING_DOWN, "later")
    for _ in range(2):  # the first END, every time it is asked for
        assert await control.receive() == ("end", ErrorCode.IDENTITY_LOCKED, "locked")

    # an END cancels what the command task registered as interruptible
    control = SessionControl()
    with control.interruptible() as sends:
        control.end(ErrorCode.IDENTITY_LOCKED, "locked")
        await trio.sleep(10)  # a stalled send, cut short
    assert sends.cancelled_caught
    with control.interruptible() as late:  # entered after the END: cancelled at once
        await trio.sleep(10)
    assert late.cancelled_caught

    waiting = SessionControl()
    got: list[tuple[str, ErrorCode, str]] = []

    async def receiver() -> None:
        got.append(await waiting.receive())

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.sleep(0.01)
            waiting.end(ErrorCode.CERTIFICATE_EXPIRED, "expired")  # wakes the waiter
    assert got == [("end", ErrorCode.CERTIFICATE_EXPIRED, "expired")]


# --- a DATA frame sent in parts is observed whole ---------------------------------------------


class _StallingObserver:
    """Keeps what it is shown, then stalls (a recorder waiting for a slow disk)."""

    def __init__(self, *, parts: bool) -> None:
        self.seen: list[bytes] = []
        if parts:
            self.server_parts = self._parts

    async def client_bytes(self, data: bytes) -> None:
        return None

    async def server_bytes(self, data: bytes) -> None:
        self.seen.append(bytes(data))
        await trio.sleep_forever()

    async def _parts(self, parts: Sequence[bytes]) -> None:
        self.seen.extend(bytes(p) for p in parts)  # every part before the first checkpoint
        await trio.sleep_forever()

    async def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        return None

    async def closed(self, reason: str) -> None:
        return None


def _drained(conn: Connection) -> None:
    while conn.next_event() is not NEED_DATA:
        pass


@pytest.mark.parametrize("parts", [True, False], ids=["server_parts", "server_bytes"])
async def test_a_data_frame_is_observed_whole_even_when_the_session_is_cancelled(parts: bool) -> None:
    """The gateway sends a DATA frame's header and payload without joining them; an
    observer still sees the frame whole before anything is sent, so a session cancelled
    while the observer makes it wait (the recorder's backpressure) never leaves a header
    observed without its payload (the recording's stream would be misaligned)."""
    from l4proxy.gateway._session import _CwpSession

    a, b = trio.testing.memory_stream_pair()
    hooks = SessionHooks.default()
    observer = _StallingObserver(parts=parts)
    hooks.observer = observer
    info = SessionInfo(session_id="s", identity=Identity(provider="dev", subject="a"), serial=1,
                       not_after=datetime.now(UTC) + timedelta(hours=1), target="t",
                       client_address="x")
    session = _CwpSession(info, a, target=TargetConfig(name="t", upstream=("127.0.0.1", 1)),
                          limits=LimitsConfig(), open_upstream=None, read_credential=lambda: "",
                          hooks=hooks, control=SessionControl(), max_hold_seconds=10)
    client = Connection(Role.CLIENT)
    session.down.receive_data(client.send(Hello(client="c")))
    _drained(session.down)
    client.receive_data(session.down.send(Welcome(server="s", session_id="x")))
    _drained(client)
    session.down.receive_data(client.send(Request(request_id=1, op=Op.GET,
                                                  args={"bucket": "b", "key": "k"})))
    _drained(session.down)
    client.receive_data(session.down.send(Response(request_id=1, size=10)))
    _drained(client)
    with trio.move_on_after(0.2):
        await session.to_client(Data(request_id=1, data=b"0123456789", end_stream=True))
    frame = b"".join(observer.seen)
    assert len(frame) == 12 + 10 and frame.endswith(b"0123456789")
    with trio.move_on_after(0.1):  # and nothing was sent
        assert await b.receive_some() == b"unreachable"
