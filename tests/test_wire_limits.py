"""CWP/1 codec limits: each named limit is fed until it trips, from the header alone.

Limits before WELCOME are the constructor's; after WELCOME both sides use the negotiated
ones (see ``negotiate_limits``). Body sizes declared by PUT ``size`` and the GET RESPONSE
``size``, and ROWS shapes declared by RESPONSE columns / INSERT columns, are limits too.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest

import l4proxy.wire as wire
from l4proxy.wire import (
    DEFAULT_MAX_CONTROL_SIZE,
    DEFAULT_MAX_FRAME_PAYLOAD,
    DEFAULT_MAX_PENDING,
    HEADER_SIZE,
    NEED_DATA,
    Column,
    ColumnType,
    ConnState,
    Continue,
    Data,
    Error,
    ErrorCode,
    Event,
    FrameType,
    Hello,
    Limits,
    LocalProtocolError,
    Op,
    RemoteProtocolError,
    Request,
    RequestedLimits,
    Response,
    Result,
    Role,
    Rows,
    Welcome,
    connection_error_frame,
    negotiate_limits,
)

C, S = Role.CLIENT, Role.SERVER
HDR = struct.Struct(">BBHII")
MIN_FP, MAX_FP, MIN_CS, MAX_PENDING = 4 << 10, 16 << 20, 1 << 10, 4096


def frame(ftype: int, payload: bytes = b"", *, rid: int = 0, flags: int = 0,
          length: int | None = None) -> bytes:
    return HDR.pack(ftype, flags, 0, rid, len(payload) if length is None else length) + payload


def drain(conn: wire.Connection) -> list[Event]:
    out: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        out.append(event)
    return out


def feed(conn: wire.Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return drain(conn)


def open_pair(requested: RequestedLimits | None = None, offered: Limits | None = None,
              **kw: int) -> tuple[wire.Connection, wire.Connection]:
    client, server = wire.Connection(C, **kw), wire.Connection(S, **kw)
    hello = Hello(client="t", limits=requested or RequestedLimits())
    assert feed(server, client.send(hello)) == [hello]
    welcome = Welcome(server="s", session_id="x",
                      limits=negotiate_limits(hello.limits, offered or Limits()))
    assert feed(client, server.send(welcome)) == [welcome]
    assert client.limits == server.limits == welcome.limits
    return client, server


def start(client: wire.Connection, server: wire.Connection, event: Request) -> None:
    assert feed(server, client.send(event)) == [event]


def expect_remote(conn: wire.Connection, data: bytes, code: ErrorCode,
                  match: str | None = None) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        drain(conn)
    assert info.value.code is code
    assert conn.state is ConnState.ERROR
    return info.value


def expect_local(conn: wire.Connection, event: Event, code: ErrorCode,
                 match: str | None = None) -> LocalProtocolError:
    with pytest.raises(LocalProtocolError, match=match) as info:
        conn.send(event)
    assert info.value.code is code
    assert conn.state is ConnState.ERROR
    return info.value


# --- constructor and negotiation -----------------------------------------------------


def test_defaults() -> None:
    conn = wire.Connection(C)
    assert conn.limits == Limits(max_frame_payload=DEFAULT_MAX_FRAME_PAYLOAD,
                                 max_control_size=DEFAULT_MAX_CONTROL_SIZE,
                                 max_pending=DEFAULT_MAX_PENDING)


@pytest.mark.parametrize("kw", [
    {"max_frame_payload": MIN_FP - 1}, {"max_frame_payload": MAX_FP + 1},
    {"max_frame_payload": 0}, {"max_control_size": MIN_CS - 1},
    {"max_frame_payload": MIN_FP, "max_control_size": MIN_FP + 1},
    {"max_pending": 0}, {"max_pending": MAX_PENDING + 1}, {"max_pending": -1},
], ids=repr)
def test_constructor_rejects_out_of_range(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(kw)) if len(kw) == 1 else "max_control_size"):
        wire.Connection(S, **kw)


@pytest.mark.parametrize("kw", [
    {"max_frame_payload": MIN_FP, "max_control_size": MIN_CS, "max_pending": 1},
    {"max_frame_payload": MAX_FP, "max_control_size": MAX_FP, "max_pending": MAX_PENDING},
], ids=["floors", "ceilings"])
def test_constructor_accepts_the_bounds(kw: dict[str, int]) -> None:
    assert wire.Connection(C, **kw).limits == Limits(**kw)


def test_negotiate_takes_the_smaller() -> None:
    offered = Limits(max_frame_payload=1 << 20, max_control_size=32 << 10, max_pending=16,
                     max_hold_seconds=60)
    assert negotiate_limits(RequestedLimits(), offered) == offered
    assert negotiate_limits(RequestedLimits(max_frame_payload=8192, max_pending=100), offered) == \
        Limits(max_frame_payload=8192, max_control_size=8192, max_pending=16, max_hold_seconds=60)
    assert negotiate_limits(RequestedLimits(max_control_size=2048, max_pending=2), offered) == \
        Limits(max_frame_payload=1 << 20, max_control_size=2048, max_pending=2, max_hold_seconds=60)
    assert negotiate_limits(RequestedLimits(max_frame_payload=MAX_FP), offered).max_frame_payload == \
        1 << 20


@pytest.mark.parametrize(("requested", "offered"), [
    (RequestedLimits(max_frame_payload=100), Limits()),
    (RequestedLimits(max_frame_payload=MAX_FP + 1), Limits()),
    (RequestedLimits(max_control_size=10), Limits()),
    (RequestedLimits(max_pending=0), Limits()),
    (RequestedLimits(), Limits(max_pending=0)),
    (RequestedLimits(), Limits(max_frame_payload=MIN_FP, max_control_size=MIN_FP * 2)),
    (RequestedLimits(), Limits(max_hold_seconds=-1)),
], ids=["fp-low", "fp-high", "cs-low", "pending-0", "offered-pending-0", "offered-cs>fp",
        "offered-hold"])
def test_negotiate_rejects_out_of_range(requested: RequestedLimits, offered: Limits) -> None:
    with pytest.raises(ValueError, match="must be"):
        negotiate_limits(requested, offered)


@pytest.mark.parametrize("limits", [
    {"max_frame_payload": 100}, {"max_control_size": 1}, {"max_pending": MAX_PENDING + 1},
    {"max_frame_payload": MIN_FP, "max_control_size": MIN_FP + 1},
])
def test_hello_with_out_of_range_limits(limits: dict[str, int]) -> None:
    payload = msgpack.packb({"version": 1, "client": "c", "limits": limits})
    expect_remote(wire.Connection(S), frame(FrameType.HELLO, payload), ErrorCode.PROTOCOL_ERROR,
                  "HELLO limits")
    with pytest.raises(LocalProtocolError, match="HELLO limits"):
        wire.Connection(C).send(Hello(client="c", limits=RequestedLimits(**limits)))


def welcome_bytes(limits: dict[str, int]) -> bytes:
    obj = {"version": 1, "server": "s", "session_id": "x",
           "limits": {"max_frame_payload": DEFAULT_MAX_FRAME_PAYLOAD,
                      "max_control_size": DEFAULT_MAX_CONTROL_SIZE,
                      "max_pending": DEFAULT_MAX_PENDING, "max_hold_seconds": 60, **limits},
           "scope": {"buckets": [], "tables": [], "access": []}}
    return frame(FrameType.WELCOME, msgpack.packb(obj))


@pytest.mark.parametrize("limits", [
    {"max_frame_payload": MIN_FP - 1}, {"max_control_size": MIN_CS - 1}, {"max_pending": 0},
])
def test_welcome_with_out_of_range_limits(limits: dict[str, int]) -> None:
    client = wire.Connection(C)
    client.send(Hello(client="c"))
    expect_remote(client, welcome_bytes(limits), ErrorCode.PROTOCOL_ERROR, "WELCOME.*limits")


@pytest.mark.parametrize(("asked", "granted"), [
    ({"max_frame_payload": 8192}, {"max_frame_payload": 16384, "max_control_size": 8192}),
    ({"max_control_size": 2048}, {"max_control_size": 4096}),
    ({"max_pending": 2}, {"max_pending": 3}),
])
def test_welcome_may_not_grant_more_than_asked(asked: dict[str, int], granted: dict[str, int]) -> None:
    client = wire.Connection(C)
    client.send(Hello(client="c", limits=RequestedLimits(**asked)))
    expect_remote(client, welcome_bytes(granted), ErrorCode.PROTOCOL_ERROR, "more than the HELLO")
    # the same grant is fine for a client that did not ask
    client = wire.Connection(C)
    client.send(Hello(client="c"))
    assert len(feed(client, welcome_bytes(granted))) == 1
    assert getattr(client.limits, next(iter(granted))) == next(iter(granted.values()))


# --- max_control_size ------------------------------------------------------------------


def test_control_size_before_welcome_is_the_constructors() -> None:
    server = wire.Connection(S, max_control_size=MIN_CS)
    big = msgpack.packb({"version": 1, "client": "c", "api_key": "k" * MIN_CS})
    assert len(big) > MIN_CS
    # rejected from the header alone: the payload never arrives
    err = expect_remote(server, frame(FrameType.HELLO, length=len(big)), ErrorCode.FRAME_TOO_LARGE,
                        "exceeds max_control_size 1024")
    assert err.request_id == 0
    client = wire.Connection(C, max_control_size=MIN_CS)
    expect_local(client, Hello(client="c", api_key=wire.Secret("k" * MIN_CS)),
                 ErrorCode.FRAME_TOO_LARGE)


def test_control_size_at_the_limit_is_fine() -> None:
    server = wire.Connection(S, max_control_size=MIN_CS)
    base = msgpack.packb({"version": 1, "client": "c", "api_key": ""})
    key = "k" * (MIN_CS - len(base) - 2)      # str8 header grows by one byte, +1 for 'k'*n
    payload = msgpack.packb({"version": 1, "client": "c", "api_key": key})
    assert len(payload) == MIN_CS
    assert feed(server, frame(FrameType.HELLO, payload))[0] == Hello(client="c",
                                                                   api_key=wire.Secret(key))


def test_negotiated_control_size() -> None:
    client, server = open_pair(RequestedLimits(max_control_size=MIN_CS))
    assert server.limits.max_control_size == MIN_CS
    args = {"bucket": "b", "key": "k" * MIN_CS}
    # the client's own send is refused ...
    expect_local(client, Request(request_id=1, op=Op.STAT, args=args), ErrorCode.FRAME_TOO_LARGE)
    # ... and the server rejects it from the header, with the request id
    err = expect_remote(server, frame(FrameType.REQUEST, rid=1, length=MIN_CS + 1),
                        ErrorCode.FRAME_TOO_LARGE, "REQUEST payload of 1025 bytes")
    assert err.request_id == 1


def test_control_size_applies_to_server_frames() -> None:
    client, server = open_pair(RequestedLimits(max_control_size=MIN_CS))
    start(client, server, Request(request_id=1, op=Op.LIST_BUCKETS))
    names = tuple(f"bucket-{i:04d}" for i in range(200))
    expect_local(server, Result(request_id=1, fields={"buckets": names}), ErrorCode.FRAME_TOO_LARGE)
    for ftype in (FrameType.RESULT, FrameType.RESPONSE, FrameType.NOTICE, FrameType.ERROR):
        client2, _ = open_pair(RequestedLimits(max_control_size=MIN_CS))
        client2.send(Request(request_id=1, op=Op.LIST_BUCKETS))
        expect_remote(client2, frame(ftype, rid=1, length=MIN_CS + 1), ErrorCode.FRAME_TOO_LARGE)


@pytest.mark.parametrize("ftype", [FrameType.CONTINUE, FrameType.CANCEL])
def test_empty_frames_must_be_empty(ftype: FrameType) -> None:
    client, server = open_pair()
    start(client, server, Request(request_id=1, op=Op.PUT, args={"bucket": "b", "key": "k"}))
    conn = server if ftype is FrameType.CANCEL else client
    expect_remote(conn, frame(ftype, rid=1, length=1), ErrorCode.PROTOCOL_ERROR,
                  "must have an empty payload")


# --- max_frame_payload -----------------------------------------------------------------


def put_in_progress(**kw: Any) -> tuple[wire.Connection, wire.Connection]:
    client, server = open_pair(**kw)
    start(client, server, Request(request_id=1, op=Op.PUT, args={"bucket": "b", "key": "k"}))
    assert feed(client, server.send(Continue(request_id=1))) == [Continue(request_id=1)]
    return client, server


def test_data_frame_too_large_from_header() -> None:
    client, server = put_in_progress(requested=RequestedLimits(max_frame_payload=MIN_FP))
    ok = client.send(Data(request_id=1, data=b"x" * MIN_FP))
    assert len(ok) == HEADER_SIZE + MIN_FP
    assert feed(server, ok) == [Data(request_id=1, data=b"x" * MIN_FP)]
    expect_local(client, Data(request_id=1, data=b"x" * (MIN_FP + 1)), ErrorCode.FRAME_TOO_LARGE)
    # only the header of the oversized frame is fed: it is rejected before its payload
    err = expect_remote(server, frame(FrameType.DATA, rid=1, length=MIN_FP + 1),
                        ErrorCode.FRAME_TOO_LARGE, "exceeds max_frame_payload 4096")
    assert err.request_id == 1


def test_rows_frame_too_large_from_header() -> None:
    client, server = open_pair(RequestedLimits(max_frame_payload=MIN_FP))
    start(client, server, Request(request_id=1, op=Op.INSERT, args={"table": "t", "columns": ("a",)}))
    feed(client, server.send(Continue(request_id=1)))
    expect_local(client, Rows(request_id=1, rows=((b"x" * MIN_FP,),)), ErrorCode.FRAME_TOO_LARGE)
    expect_remote(server, frame(FrameType.ROWS, rid=1, length=MIN_FP + 1), ErrorCode.FRAME_TOO_LARGE)


def test_frame_payload_ceiling_is_the_constructors_before_welcome() -> None:
    server = wire.Connection(S, max_frame_payload=MIN_FP, max_control_size=MIN_CS)
    expect_remote(server, frame(FrameType.HELLO, length=0xFFFF_FFFF), ErrorCode.FRAME_TOO_LARGE)


def test_negotiated_frame_payload_for_server_data() -> None:
    client, server = open_pair(RequestedLimits(max_frame_payload=MIN_FP))
    start(client, server, Request(request_id=1, op=Op.GET, args={"bucket": "b", "key": "k"}))
    feed(client, server.send(Response(request_id=1, size=MIN_FP + 1)))
    expect_local(server, Data(request_id=1, data=b"x" * (MIN_FP + 1), end_stream=True),
                 ErrorCode.FRAME_TOO_LARGE)
    expect_remote(client, frame(FrameType.DATA, rid=1, flags=1, length=MIN_FP + 1),
                  ErrorCode.FRAME_TOO_LARGE)


def test_data_is_streamed_not_buffered() -> None:
    client, server = put_in_progress()
    body = bytes(range(256)) * (DEFAULT_MAX_FRAME_PAYLOAD // 256)
    data = client.send(Data(request_id=1, data=body, end_stream=True))
    got = bytearray()
    for i in range(0, len(data), 50_000):
        server.receive_data(data[i : i + 50_000])
        for event in drain(server):
            assert isinstance(event, Data)
            got += event.data
        assert server.buffered == 0      # nothing of the body is held back
    assert bytes(got) == body


# --- max_pending -----------------------------------------------------------------------


def test_max_pending_negotiated() -> None:
    client, server = open_pair(RequestedLimits(max_pending=2))
    start(client, server, Request(request_id=1, op=Op.PING))
    start(client, server, Request(request_id=2, op=Op.PING))
    assert client.pending == server.pending == 2
    third = Request(request_id=3, op=Op.PING)
    raw = frame(FrameType.REQUEST, msgpack.packb({"op": "ping", "args": {}}), rid=3)
    with pytest.raises(LocalProtocolError) as info:
        client.send(third)
    assert info.value.code is ErrorCode.TOO_MANY_PENDING
    err = expect_remote(server, raw, ErrorCode.TOO_MANY_PENDING, "max_pending=2")
    assert err.request_id == 3


def test_max_pending_frees_up() -> None:
    client, server = open_pair(RequestedLimits(max_pending=2))
    start(client, server, Request(request_id=1, op=Op.PING))
    start(client, server, Request(request_id=2, op=Op.PING))
    feed(client, server.send(Result(request_id=1, fields={"time": 1.0})))
    assert client.pending == server.pending == 1
    start(client, server, Request(request_id=3, op=Op.PING))
    assert client.pending == server.pending == 2


def test_max_pending_default_from_constructor() -> None:
    client, server = open_pair(max_pending=3)
    assert server.limits.max_pending == 64   # WELCOME (negotiated) replaces the constructor's
    client, server = open_pair(offered=Limits(max_pending=3))
    for rid in (1, 2, 3):
        start(client, server, Request(request_id=rid, op=Op.PING))
    raw = frame(FrameType.REQUEST, msgpack.packb({"op": "ping", "args": {}}), rid=4)
    expect_remote(server, raw, ErrorCode.TOO_MANY_PENDING)


# --- declared body sizes ---------------------------------------------------------------


def sized_put(size: int) -> tuple[wire.Connection, wire.Connection]:
    client, server = open_pair()
    start(client, server, Request(request_id=1, op=Op.PUT, args={"bucket": "b", "key": "k",
                                                                "size": size}))
    feed(client, server.send(Continue(request_id=1)))
    return client, server


def test_put_size_exact() -> None:
    client, server = sized_put(6)
    for piece in (b"abc", b"de", b"f"):
        assert feed(server, client.send(Data(request_id=1, data=piece))) == [
            Data(request_id=1, data=piece)]
    assert feed(server, client.send(Data(request_id=1, data=b"", end_stream=True))) == [
        Data(request_id=1, data=b"", end_stream=True)]


def test_put_size_overrun_from_header() -> None:
    client, server = sized_put(6)
    feed(server, client.send(Data(request_id=1, data=b"abcd")))
    expect_local(client, Data(request_id=1, data=b"xyz"), ErrorCode.PROTOCOL_ERROR,
                 "declared size 6")
    # the header claiming 3 more bytes is enough to reject it
    expect_remote(server, frame(FrameType.DATA, rid=1, length=3), ErrorCode.PROTOCOL_ERROR,
                  "declared size 6")


def test_put_size_short_at_end() -> None:
    client, server = sized_put(6)
    feed(server, client.send(Data(request_id=1, data=b"abcd")))
    expect_local(client, Data(request_id=1, data=b"e", end_stream=True), ErrorCode.PROTOCOL_ERROR,
                 "declared size")
    expect_remote(server, frame(FrameType.DATA, b"e", rid=1, flags=1), ErrorCode.PROTOCOL_ERROR,
                  "declared size")


def test_put_size_zero() -> None:
    client, server = sized_put(0)
    expect_remote(server, frame(FrameType.DATA, b"x", rid=1, flags=1), ErrorCode.PROTOCOL_ERROR)
    client, server = sized_put(0)
    assert feed(server, client.send(Data(request_id=1, data=b"", end_stream=True))) == [
        Data(request_id=1, data=b"", end_stream=True)]


def get_streaming(size: int) -> tuple[wire.Connection, wire.Connection]:
    client, server = open_pair()
    start(client, server, Request(request_id=1, op=Op.GET, args={"bucket": "b", "key": "k"}))
    assert feed(client, server.send(Response(request_id=1, size=size))) == [
        Response(request_id=1, size=size)]
    return client, server


def test_get_response_size_mismatch() -> None:
    client, server = get_streaming(4)
    feed(client, server.send(Data(request_id=1, data=b"ab")))
    expect_local(server, Data(request_id=1, data=b"cde"), ErrorCode.PROTOCOL_ERROR, "declared size 4")
    expect_remote(client, frame(FrameType.DATA, rid=1, length=3), ErrorCode.PROTOCOL_ERROR,
                  "declared size 4")
    client, server = get_streaming(4)
    expect_remote(client, frame(FrameType.DATA, b"abc", rid=1, flags=1), ErrorCode.PROTOCOL_ERROR,
                  "declared size 4")


def test_get_response_size_exact_then_result() -> None:
    client, server = get_streaming(4)
    assert feed(client, server.send(Data(request_id=1, data=b"abcd", end_stream=True))) == [
        Data(request_id=1, data=b"abcd", end_stream=True)]
    assert feed(client, server.send(Result(request_id=1, fields={"size": 4, "sha256": "0" * 64})))
    assert client.pending == server.pending == 0


@pytest.mark.parametrize("bad", [
    {"columns": [["a", "int"]]},          # a GET head needs size
    {"size": 1, "columns": [["a", "int"]]},
], ids=["columns", "both"])
def test_get_response_shape(bad: dict[str, Any]) -> None:
    client, server = open_pair()
    start(client, server, Request(request_id=1, op=Op.GET, args={"bucket": "b", "key": "k"}))
    expect_remote(client, frame(FrameType.RESPONSE, msgpack.packb(bad), rid=1), ErrorCode.PROTOCOL_ERROR)


def test_response_head_shape_on_send() -> None:
    client, server = open_pair()
    start(client, server, Request(request_id=1, op=Op.GET, args={"bucket": "b", "key": "k"}))
    start(client, server, Request(request_id=2, op=Op.SCAN, args={"table": "t"}))
    expect_local(server, Response(request_id=1, columns=(Column(name="a", type=ColumnType.INT),)),
                 ErrorCode.PROTOCOL_ERROR, "needs size")
    client, server = open_pair()
    start(client, server, Request(request_id=2, op=Op.SCAN, args={"table": "t"}))
    expect_local(server, Response(request_id=2, size=3), ErrorCode.PROTOCOL_ERROR)


# --- ROWS shapes -----------------------------------------------------------------------

COLUMNS = (Column(name="i", type=ColumnType.INT), Column(name="f", type=ColumnType.FLOAT),
           Column(name="t", type=ColumnType.TEXT), Column(name="b", type=ColumnType.BOOL),
           Column(name="y", type=ColumnType.BYTES))


def scan_streaming() -> tuple[wire.Connection, wire.Connection]:
    client, server = open_pair()
    start(client, server, Request(request_id=1, op=Op.SCAN, args={"table": "t"}))
    feed(client, server.send(Response(request_id=1, columns=COLUMNS)))
    return client, server


def test_rows_matching_columns() -> None:
    client, server = scan_streaming()
    rows = ((1, 1.5, "x", True, b"y"), (None, None, None, None, None),
            ((1 << 63) - 1, -0.0, "", False, b""))
    assert feed(client, server.send(Rows(request_id=1, rows=rows))) == [Rows(request_id=1, rows=rows)]


@pytest.mark.parametrize("row", [
    (1, 1.5, "x", True),                       # too few cells
    (1, 1.5, "x", True, b"y", None),           # too many
    (True, 1.5, "x", True, b"y"),              # bool where int
    (1, 1, "x", True, b"y"),                   # int where float
    (1, 1.5, b"x", True, b"y"),                # bytes where text
    (1, 1.5, "x", 1, b"y"),                    # int where bool
    (1, 1.5, "x", True, "y"),                  # text where bytes
    (1 << 63, 1.5, "x", True, b"y"),           # beyond i64
], ids=["short", "long", "bool-int", "int-float", "bytes-text", "int-bool", "text-bytes", "u64"])
def test_rows_mismatching_columns(row: tuple[Any, ...]) -> None:
    client, server = scan_streaming()
    good = (1, 2.5, "ok", False, b"")
    raw = frame(FrameType.ROWS, msgpack.packb([good, row], use_bin_type=True), rid=1)
    err = expect_remote(client, raw, ErrorCode.PROTOCOL_ERROR, r"row 1|rows\[1\]")
    assert err.request_id == 1
    _, server = scan_streaming()
    expect_local(server, Rows(request_id=1, rows=(good, row)), ErrorCode.PROTOCOL_ERROR,
                 r"row 1|rows\[1\]")


def insert_uploading(columns: tuple[str, ...]) -> tuple[wire.Connection, wire.Connection]:
    client, server = open_pair()
    start(client, server, Request(request_id=1, op=Op.INSERT, args={"table": "t", "columns": columns}))
    feed(client, server.send(Continue(request_id=1)))
    return client, server


@pytest.mark.parametrize("row", [
    ("only-one",), ("a", "b", "c"), (), (1 << 63, 2), ((1, 2), 3),
], ids=["short", "long", "empty", "u64", "array-cell"])
def test_insert_rows_mismatch(row: tuple[Any, ...]) -> None:
    client, server = insert_uploading(("a", "b"))
    assert feed(server, client.send(Rows(request_id=1, rows=((1, "x"), (None, 2.5))))) == [
        Rows(request_id=1, rows=((1, "x"), (None, 2.5)))]
    raw = frame(FrameType.ROWS, msgpack.packb([row], use_bin_type=True), rid=1)
    err = expect_remote(server, raw, ErrorCode.PROTOCOL_ERROR, "^ROWS (row 0 has|rows\\[0\\])")
    assert err.request_id == 1
    client, _ = insert_uploading(("a", "b"))
    expect_local(client, Rows(request_id=1, rows=(row,)), ErrorCode.PROTOCOL_ERROR, "^ROWS")


# --- the receive buffer and connection_error_frame (added with max_read) --------------------


def test_receive_buffer_is_bounded_by_max_read() -> None:
    conn = wire.Connection(Role.SERVER, max_read=4096)
    with pytest.raises(LocalProtocolError, match="max_read"):
        conn.receive_data(b"\x00" * 4097)
    conn = wire.Connection(Role.SERVER, max_read=4096)
    # feeding reads without draining: the buffer may hold one frame plus one read, no more
    total = 0
    with pytest.raises(LocalProtocolError, match="next_event"):
        while total < DEFAULT_MAX_FRAME_PAYLOAD + 2 * 4096 + 12:
            conn.receive_data(b"\x01" * 4096)
            total += 4096
    assert total >= DEFAULT_MAX_FRAME_PAYLOAD


def test_connection_error_frame_fits_the_smallest_control_limit() -> None:
    frame = connection_error_frame(ErrorCode.PROTOCOL_ERROR, "é" * 5000)
    client = wire.Connection(Role.CLIENT, max_control_size=1024)
    client.send(Hello(client="c"))
    client.receive_data(frame)
    event = client.next_event()
    assert isinstance(event, Error) and event.code is ErrorCode.PROTOCOL_ERROR
    assert len(event.message.encode()) <= 900
