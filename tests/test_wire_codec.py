"""CWP/1 codec: input splitting, strict decoding and canonical encoding.

The split tests record one rich conversation between a real client and a real server
``Connection`` (every operation, bodies, crossings, GOAWAY, EOF), then replay what each
side received into a fresh ``Connection`` whole, one byte at a time and at
hypothesis-chosen cut points. The replaying side also performs its own sends at the byte
offsets where it made them in the recording, because both directions drive its state.
"""

from __future__ import annotations

import itertools
import struct
import subprocess
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import l4proxy.wire as wire
from l4proxy.wire import (
    HEADER_SIZE,
    NEED_DATA,
    OPS,
    Access,
    Cancel,
    Column,
    ColumnType,
    ConnectionClosed,
    ConnState,
    Continue,
    Data,
    Error,
    ErrorCode,
    Event,
    FrameType,
    GoAway,
    Hello,
    Limits,
    Notice,
    NoticeKind,
    Op,
    RemoteProtocolError,
    Request,
    RequestedLimits,
    Response,
    Result,
    Role,
    Rows,
    Scope,
    Secret,
    Welcome,
    negotiate_limits,
)

C, S = Role.CLIENT, Role.SERVER
HDR = struct.Struct(">BBHII")
SHA = "ab" * 32


# --- helpers -------------------------------------------------------------------------


def frame(ftype: int, payload: bytes = b"", *, rid: int = 0, flags: int = 0, reserved: int = 0,
          length: int | None = None) -> bytes:
    """A raw frame, built by hand (``length`` overrides the header's payload length)."""
    return HDR.pack(ftype, flags, reserved, rid, len(payload) if length is None else length) + payload


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def raw_map(pairs: Sequence[tuple[Any, Any]]) -> bytes:
    """A msgpack map written pair by pair (so keys may repeat or be of any type)."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(pack(k) + pack(v) for k, v in pairs)


def drain(conn: wire.Connection) -> list[Event]:
    out: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        assert isinstance(event, Event)
        out.append(event)
        if isinstance(event, ConnectionClosed):
            return out


def feed(conn: wire.Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return drain(conn)


def open_pair() -> tuple[wire.Connection, wire.Connection]:
    client, server = wire.Connection(C), wire.Connection(S)
    assert feed(server, client.send(Hello(client="t"))) == [Hello(client="t")]
    welcome = Welcome(server="s", session_id="x")
    assert feed(client, server.send(welcome)) == [welcome]
    return client, server


def normalise(events: Iterable[Event]) -> list[Event]:
    """Join consecutive Data pieces of one request until end_stream."""
    out: list[Event] = []
    for ev in events:
        prev = out[-1] if out else None
        if (isinstance(ev, Data) and isinstance(prev, Data) and prev.request_id == ev.request_id
                and not prev.end_stream):
            out[-1] = Data(request_id=ev.request_id, data=prev.data + ev.data,
                           end_stream=ev.end_stream)
        else:
            out.append(ev)
    return out


# --- the recorded conversation ---------------------------------------------------------


class Talk:
    """A real client and server in lock-step; ``hold=True`` lets frames cross."""

    def __init__(self) -> None:
        self.conns = {C: wire.Connection(C), S: wire.Connection(S)}
        self.held = {C: bytearray(), S: bytearray()}
        self.stream = {C: bytearray(), S: bytearray()}   # all bytes each side received
        self.sends: dict[Role, list[tuple[int, Event]]] = {C: [], S: []}  # (offset, event)
        self.received: dict[Role, list[Event]] = {C: [], S: []}
        self.expected: dict[Role, list[Event]] = {C: [], S: []}
        self.body_frames: dict[Role, int] = {C: 0, S: 0}

    def send(self, who: Role, event: Event, *, hold: bool = False, dropped: bool = False) -> bytes:
        data = self.conns[who].send(event)
        self.sends[who].append((len(self.stream[who]), event))
        self.held[who] += data
        if not dropped:
            self.expected[who.peer].append(event)
        if not hold:
            self.deliver()
        return data

    def c(self, event: Event, **kw: bool) -> bytes:
        return self.send(C, event, **kw)

    def s(self, event: Event, **kw: bool) -> bytes:
        return self.send(S, event, **kw)

    def deliver(self) -> None:
        for sender in (C, S):
            data = bytes(self.held[sender])
            self.held[sender].clear()
            if not data:
                continue
            peer = sender.peer
            self.stream[peer] += data
            self.received[peer] += feed(self.conns[peer], data)

    def close(self) -> None:
        self.deliver()
        for who in (C, S):
            self.conns[who].receive_data(b"")
            self.received[who] += drain(self.conns[who])
            self.expected[who].append(ConnectionClosed())


ARGS: dict[Op, dict[str, Any]] = {
    Op.PING: {"data": b"\x00hi"},
    Op.LIST_BUCKETS: {},
    Op.CREATE_BUCKET: {"bucket": "b1"},
    Op.DELETE_BUCKET: {"bucket": "old", "force": True},
    Op.LIST: {"bucket": "b1", "prefix": "p/", "limit": 10},
    Op.STAT: {"bucket": "b1", "key": "k"},
    Op.PUT: {"bucket": "b1", "key": "k", "size": 10},
    Op.GET: {"bucket": "b1", "key": "k", "offset": 0, "length": 10},
    Op.DELETE: {"bucket": "b1", "key": "gone"},
    Op.CHUNK: {"bucket": "b1", "key": "k", "strategy": "cdc", "min_size": 256, "avg_size": 1024,
               "max_size": 4096, "into": "chunks", "with_data": True},
    Op.CREATE_TABLE: {"table": "t", "columns": (("a", "int"), ("b", "text"))},
    Op.INSERT: {"table": "t", "columns": ("a", "b")},
    Op.SCAN: {"table": "t", "columns": ("a", "b", "c", "d", "e"), "where": {"a": 1, "b": None},
              "limit": 5},
    Op.DROP_TABLE: {"table": "t"},
}


def _cols(*spec: tuple[str, ColumnType]) -> tuple[Column, ...]:
    return tuple(Column(name=n, type=t) for n, t in spec)


@cache
def conversation() -> Talk:
    t = Talk()
    hello = Hello(client="cli/1", api_key=Secret("sk-test-123"),
                  limits=RequestedLimits(max_pending=32, max_frame_payload=64 << 10))
    t.c(hello)
    t.s(Welcome(server="chunkd/1", session_id="sess-1",
                limits=negotiate_limits(hello.limits, Limits()),
                scope=Scope(buckets=("b*",), tables=("t",), access=(Access.READ, Access.WRITE))))
    t.s(Notice(request_id=0, kind=NoticeKind.EXPIRING, message="cert expires", expires_at=1.7e9))

    # every operation, pipelined in one write
    rid = {op: i for i, op in enumerate(OPS, start=1)}
    assert set(rid) == set(Op) == set(ARGS)
    for op in OPS:
        t.c(Request(request_id=rid[op], op=op, args=ARGS[op],
                    reason="ticket-42" if op is Op.DELETE_BUCKET else None), hold=True)
    t.deliver()

    t.s(Notice(request_id=rid[Op.STAT], kind=NoticeKind.HELD, message="held", approval_id="ap-1",
               hold_seconds=60))
    t.s(Result(request_id=rid[Op.PING], fields={"data": b"\x00hi", "time": 1.5}))
    t.s(Result(request_id=rid[Op.LIST_BUCKETS], fields={"buckets": ("b1", "b2")}))
    t.s(Result(request_id=rid[Op.CREATE_BUCKET], fields={"bucket": "b1"}))
    t.s(Error(request_id=rid[Op.DELETE_BUCKET], code=ErrorCode.NOT_FOUND, message="no bucket"))
    r = rid[Op.LIST]
    t.s(Response(request_id=r, columns=_cols(("key", ColumnType.TEXT), ("size", ColumnType.INT))))
    t.s(Rows(request_id=r, rows=(("a", 1), ("b", None))))
    t.s(Rows(request_id=r, rows=(), end_stream=True))
    t.s(Result(request_id=r, fields={"count": 2, "truncated": False}))
    t.s(Notice(request_id=rid[Op.STAT], kind=NoticeKind.APPROVED, message="ok"))
    t.s(Result(request_id=rid[Op.STAT], fields={"bucket": "b1", "key": "k", "size": 10,
                                                "sha256": SHA, "modified": 1.7e9}))
    # upload (client DATA) interleaved with a download (server DATA)
    put, get = rid[Op.PUT], rid[Op.GET]
    t.s(Continue(request_id=put))
    t.s(Response(request_id=get, size=10), hold=True)
    t.c(Data(request_id=put, data=b"hello"), hold=True)
    t.s(Data(request_id=get, data=b"0123"), hold=True)
    t.c(Data(request_id=put, data=b"world"), hold=True)
    t.deliver()
    t.s(Data(request_id=get, data=b"456789"), hold=True)
    t.c(Data(request_id=put, data=b"", end_stream=True), hold=True)
    t.s(Data(request_id=get, data=b"", end_stream=True), hold=True)
    t.deliver()
    t.s(Result(request_id=put, fields={"bucket": "b1", "key": "k", "size": 10, "sha256": SHA}))
    t.s(Result(request_id=get, fields={"size": 10, "sha256": SHA}))
    t.s(Error(request_id=rid[Op.DELETE], code=ErrorCode.NOT_FOUND, message="no key"))
    r = rid[Op.CHUNK]
    t.s(Response(request_id=r, columns=_cols(("offset", ColumnType.INT), ("length", ColumnType.INT),
                                             ("sha256", ColumnType.TEXT), ("data", ColumnType.BYTES))))
    t.s(Rows(request_id=r, rows=((0, 3, SHA, b"abc"), (3, 2, SHA, b"de")), end_stream=True))
    t.s(Result(request_id=r, fields={"chunks": 2, "bytes": 5, "stored": 2}))
    t.s(Result(request_id=rid[Op.CREATE_TABLE], fields={"table": "t"}))
    r = rid[Op.INSERT]
    t.s(Continue(request_id=r))
    t.c(Rows(request_id=r, rows=((1, "x"), (2, None))))
    t.c(Rows(request_id=r, rows=((3, "z"),), end_stream=True))
    t.s(Result(request_id=r, fields={"table": "t", "inserted": 3}))
    r = rid[Op.SCAN]
    t.s(Response(request_id=r, columns=_cols(("a", ColumnType.INT), ("b", ColumnType.TEXT),
                                             ("c", ColumnType.FLOAT), ("d", ColumnType.BOOL),
                                             ("e", ColumnType.BYTES))))
    t.s(Rows(request_id=r, rows=((1, "x", 1.5, True, b"\x00"), (None, None, None, None, None),
                                 (-(1 << 63), "", -0.0, False, b""))))
    t.s(Rows(request_id=r, rows=(), end_stream=True))
    t.s(Result(request_id=r, fields={"rows": 3, "truncated": False}))
    t.s(Result(request_id=rid[Op.DROP_TABLE], fields={"table": "t"}))
    nxt = len(OPS) + 1

    # CANCEL before CONTINUE, crossed by the server's CONTINUE
    t.c(Request(request_id=nxt, op=Op.PUT, args={"bucket": "b1", "key": "k2"}))
    t.c(Cancel(request_id=nxt), hold=True)
    t.s(Continue(request_id=nxt), hold=True)
    t.deliver()
    t.s(Error(request_id=nxt, code=ErrorCode.CANCELLED))
    # CANCEL mid-upload
    nxt += 1
    t.c(Request(request_id=nxt, op=Op.INSERT, args={"table": "t", "columns": ("a",)}))
    t.s(Continue(request_id=nxt))
    t.c(Rows(request_id=nxt, rows=((1,),)))
    t.c(Cancel(request_id=nxt))
    t.s(Error(request_id=nxt, code=ErrorCode.CANCELLED))
    # the server aborts an upload with ERROR; a DATA frame crosses it and is dropped
    nxt += 1
    t.c(Request(request_id=nxt, op=Op.PUT, args={"bucket": "b1", "key": "k3", "size": 8}))
    t.s(Continue(request_id=nxt))
    t.c(Data(request_id=nxt, data=b"abcd"), hold=True, dropped=True)
    t.s(Error(request_id=nxt, code=ErrorCode.TOO_LARGE, message="quota"), hold=True)
    t.deliver()
    assert t.c(Data(request_id=nxt, data=b"efgh", end_stream=True), dropped=True) == b""
    # a CANCEL that crosses the final RESULT is dropped by the server
    nxt += 1
    t.c(Request(request_id=nxt, op=Op.PING))
    t.c(Cancel(request_id=nxt), hold=True, dropped=True)
    t.s(Result(request_id=nxt, fields={"time": 2.0}), hold=True)
    t.deliver()
    # GOAWAY while one request is in flight and another crosses it
    nxt += 1
    t.c(Request(request_id=nxt, op=Op.GET, args={"bucket": "b1", "key": "empty"}))
    t.c(Request(request_id=nxt + 1, op=Op.LIST_BUCKETS), hold=True)
    t.s(GoAway(last_request_id=nxt, code=ErrorCode.SHUTTING_DOWN, message="bye"), hold=True)
    t.deliver()
    t.s(Error(request_id=nxt + 1, code=ErrorCode.SHUTTING_DOWN))
    t.s(Response(request_id=nxt, size=0))
    t.s(Data(request_id=nxt, data=b"", end_stream=True))
    t.s(Result(request_id=nxt, fields={"size": 0, "sha256": SHA}))
    t.close()
    for who in (C, S):
        assert t.conns[who].pending == 0
        assert t.conns[who].state is ConnState.CLOSED
    return t


def replay(who: Role, chunks: Iterable[bytes], sent: bytearray | None = None, *,
           data_views: bool = False) -> list[Event]:
    """Feed ``chunks`` to a fresh ``who`` connection, making its recorded sends on time.

    What those sends encode to is appended to ``sent``.
    """
    t = conversation()
    conn = wire.Connection(who, data_views=data_views)
    todo = deque(t.sends[who])
    events: list[Event] = []
    fed = 0
    sent = bytearray() if sent is None else sent

    def sync() -> None:
        consumed = fed - conn.buffered
        while todo and todo[0][0] <= consumed:
            offset, event = todo.popleft()
            assert offset == consumed, "a send point was parsed past"
            sent.extend(conn.send(event))

    for chunk in chunks:
        conn.receive_data(chunk)
        fed += len(chunk)
        while True:
            sync()
            event = conn.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(event, Event)
            events.append(event)
    sync()
    assert not todo
    conn.receive_data(b"")
    events += drain(conn)
    assert conn.pending == 0
    return events


@pytest.mark.parametrize("who", [C, S])
def test_conversation_round_trips(who: Role) -> None:
    t = conversation()
    # each side saw exactly what the other sent (minus late frames dropped by design)
    assert t.received[who] == t.expected[who]
    kinds = {type(e) for e in t.received[who]}
    if who is S:
        assert kinds == {Hello, Request, Data, Rows, Cancel, ConnectionClosed}
    else:
        assert kinds == {Welcome, Notice, Result, Error, Response, Rows, Data, Continue, GoAway,
                         ConnectionClosed}


@pytest.mark.parametrize("who", [C, S])
def test_split_whole(who: Role) -> None:
    stream = bytes(conversation().stream[who])
    # whole frames come out as one Data event per DATA frame: no normalising needed
    assert replay(who, [stream]) == conversation().received[who]


@pytest.mark.parametrize("who", [C, S])
def test_split_one_byte_at_a_time(who: Role) -> None:
    stream = bytes(conversation().stream[who])
    events = replay(who, (stream[i : i + 1] for i in range(len(stream))))
    assert normalise(events) == normalise(conversation().received[who])
    assert all(len(e.data) <= 1 for e in events if isinstance(e, Data))
    assert any(isinstance(e, Data) and not e.end_stream for e in events)


@settings(max_examples=200, deadline=None)
@given(who=st.sampled_from([C, S]), data=st.data())
def test_split_at_chosen_points(who: Role, data: st.DataObject) -> None:
    stream = bytes(conversation().stream[who])
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=40))))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert normalise(replay(who, chunks)) == normalise(conversation().received[who])


@settings(max_examples=200, deadline=None)
@given(who=st.sampled_from([C, S]), data=st.data())
def test_split_with_bytes_and_bytearray_reads(who: Role, data: st.DataObject) -> None:
    # ``bytes`` reads inside a DATA payload are handed out in place, other reads are
    # copied into the buffer: any mix of the two parses the same
    stream = bytes(conversation().stream[who])
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=40))))
    bounds = [0, *cuts, len(stream)]
    kinds = data.draw(st.lists(st.booleans(), min_size=len(bounds), max_size=len(bounds)))
    chunks = [stream[a:b] if k else bytearray(stream[a:b])
              for (a, b), k in zip(itertools.pairwise(bounds), kinds, strict=False)]
    assert normalise(replay(who, chunks)) == normalise(conversation().received[who])
    # the same with DATA pieces handed out as views of the reads (the gateway's codecs)
    events = replay(who, chunks, data_views=True)
    for event in events:
        if isinstance(event, Data) and not isinstance(event.data, bytes):
            view = event.data
            assert isinstance(view, memoryview) and view.readonly and isinstance(view.obj, bytes)
    as_bytes = [Data(request_id=e.request_id, data=bytes(e.data), end_stream=e.end_stream)
                if isinstance(e, Data) else e for e in events]
    assert normalise(as_bytes) == normalise(conversation().received[who])


@pytest.mark.parametrize("kinds", [(bytes, bytes), (bytes, bytearray), (bytearray, bytes)])
def test_reads_fed_before_draining_keep_their_order(kinds: tuple[type, type]) -> None:
    # receive_data() may be called again before next_event() drained the last read (within
    # the buffer limit): a read kept in place must stay ahead of the newer one
    client, server = open_pair()
    put = Request(request_id=1, op=Op.PUT, args={"bucket": "b", "key": "k", "size": 20})
    assert feed(server, client.send(put)) == [put]
    client.receive_data(server.send(Continue(request_id=1)))
    assert drain(client) == [Continue(request_id=1)]
    stream = client.send(Data(request_id=1, data=b"a" * 20, end_stream=True)) + \
        client.send(Request(request_id=2, op=Op.PING))
    header = wire.HEADER_SIZE
    first, middle, last = stream[: header + 5], stream[header + 5: header + 30], stream[header + 30:]
    assert [(type(e), len(e.data)) for e in feed(server, first) if isinstance(e, Data)] == \
        [(Data, 5)]
    server.receive_data(kinds[0](middle))  # the rest of the payload and half a REQUEST
    server.receive_data(kinds[1](last))  # the other half, before draining
    events = drain(server)
    assert events == [Data(request_id=1, data=b"a" * 15, end_stream=True),
                      Request(request_id=2, op=Op.PING)]
    assert server.buffered == 0


def test_reads_inside_a_data_payload_are_handed_out_without_a_copy() -> None:
    client, server = open_pair()
    size = 3 * 1000 + 10
    put = Request(request_id=1, op=Op.PUT, args={"bucket": "b", "key": "k", "size": size})
    assert feed(server, client.send(put)) == [put]
    client.receive_data(server.send(Continue(request_id=1)))
    assert drain(client) == [Continue(request_id=1)]
    body = bytes(range(256)) * 12
    stream = client.send(Data(request_id=1, data=body[:size], end_stream=True)) + \
        client.send(Request(request_id=2, op=Op.PING))
    header = wire.HEADER_SIZE
    reads = [stream[: header + 10], *(stream[header + 10 + i * 1000: header + 10 + (i + 1) * 1000]
                                      for i in range(3)), stream[header + size:]]
    events = [e for r in reads for e in feed(server, r)]
    data = [e for e in events if isinstance(e, Data)]
    assert b"".join(e.data for e in data) == body[:size]
    assert [e.data is r for e, r in zip(data[1:], reads[1:4], strict=True)] == [True] * 3
    assert data[-1].end_stream and events[-1] == Request(request_id=2, op=Op.PING)
    assert server.buffered == 0


# --- strict decoding -----------------------------------------------------------------


def server_open() -> wire.Connection:
    """A server that has answered HELLO; a PING (1), PUT (2) and GET (3) are pending."""
    client, server = open_pair()
    for ev in (Request(request_id=1, op=Op.PING), Request(request_id=2, op=Op.PUT, args=ARGS[Op.PUT]),
               Request(request_id=3, op=Op.GET, args=ARGS[Op.GET])):
        assert feed(server, client.send(ev)) == [ev]
    return server


def client_open() -> wire.Connection:
    """A client with a PING (1), an INSERT (2) and a SCAN (3) pending."""
    client, _server = open_pair()
    client.send(Request(request_id=1, op=Op.PING))
    client.send(Request(request_id=2, op=Op.INSERT, args=ARGS[Op.INSERT]))
    client.send(Request(request_id=3, op=Op.SCAN, args={"table": "t"}))
    return client


def assert_remote(conn: wire.Connection, data: bytes, code: ErrorCode = ErrorCode.PROTOCOL_ERROR,
                  match: str | None = None) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        drain(conn)
    assert info.value.code is code
    assert conn.state is ConnState.ERROR
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert again.value.code is code
    return info.value


def request(payload: bytes, rid: int = 4, flags: int = 0) -> bytes:
    return frame(FrameType.REQUEST, payload, rid=rid, flags=flags)


def hello(payload: bytes) -> bytes:
    return frame(FrameType.HELLO, payload)


def test_valid_handcrafted_frames_are_accepted() -> None:
    # the baseline for the strictness tests below: these exact bytes are fine
    server = wire.Connection(S)
    assert feed(server, hello(pack({"version": 1, "client": "c"}))) == [Hello(client="c")]
    server = server_open()
    got = feed(server, request(pack({"op": "stat", "args": {"bucket": "b", "key": "k"}})))
    assert got == [Request(request_id=4, op=Op.STAT, args={"bucket": "b", "key": "k"})]
    client = client_open()
    assert feed(client, frame(FrameType.RESULT, pack({"time": 1.0}), rid=1)) == [
        Result(request_id=1, fields={"time": 1.0})]


@pytest.mark.parametrize("payload", [
    raw_map([("version", 1), ("client", "a"), ("client", "b")]),
    raw_map([("version", 1), ("version", 1), ("client", "a")]),
], ids=["client", "version"])
def test_duplicate_keys_in_hello(payload: bytes) -> None:
    assert_remote(wire.Connection(S), hello(payload), match="duplicate map key")


def test_duplicate_keys_nested_in_args() -> None:
    args = raw_map([("bucket", "b"), ("key", "k"), ("bucket", "c")])
    payload = bytes([0x82]) + pack("op") + pack("stat") + pack("args") + args
    assert_remote(server_open(), request(payload), match="duplicate map key")


@pytest.mark.parametrize("key", [1, b"client", 1.5, None, True], ids=repr)
def test_non_string_keys(key: Any) -> None:
    assert_remote(wire.Connection(S), hello(raw_map([("version", 1), ("client", "c"), (key, 1)])),
                  match="only strings allowed")


def test_non_string_key_nested() -> None:
    args = raw_map([(b"bucket", "b"), ("key", "k")])
    payload = bytes([0x82]) + pack("op") + pack("stat") + pack("args") + args
    assert_remote(server_open(), request(payload), match="only strings allowed")


@pytest.mark.parametrize(("who", "data"), [
    (S, hello(pack({"version": 1, "client": "c", "extra": 1}))),
    (S, hello(pack({"version": 1, "client": "c", "limits": {"max_pending": 4, "max_rows": 1}}))),
    (S, "args"),
    (S, "reason"),
    (C, frame(FrameType.RESULT, pack({"time": 1.0, "extra": 1}), rid=1)),
    (C, frame(FrameType.RESPONSE, pack({"columns": [["a", "int"]], "size": 1}), rid=3)),
    (C, frame(FrameType.ERROR, pack({"code": 11, "message": "", "detail": "x"}), rid=1)),
    (C, frame(FrameType.NOTICE, pack({"kind": "info", "message": "", "url": "x"}))),
    (C, frame(FrameType.GOAWAY, pack({"last_request_id": 3, "code": 111, "message": "", "x": 1}))),
], ids=["hello", "hello.limits", "args", "request", "result", "response", "error", "notice",
        "goaway"])
def test_unknown_fields(who: Role, data: bytes | str) -> None:
    if data == "args":
        data = request(pack({"op": "stat", "args": {"bucket": "b", "key": "k", "version": 2}}))
    elif data == "reason":
        data = request(pack({"op": "ping", "args": {}, "priority": 1}))
    assert isinstance(data, bytes)
    conn = server_open() if who is S else client_open()
    assert_remote(conn, data, match="unknown field")


def test_unknown_field_in_welcome_scope() -> None:
    client = wire.Connection(C)
    client.send(Hello(client="c"))
    server = wire.Connection(S)
    server.receive_data(wire.Connection(C).send(Hello(client="c")))
    drain(server)
    good = server.send(Welcome(server="s", session_id="x"))
    obj = msgpack.unpackb(good[HEADER_SIZE:])
    obj["scope"]["regions"] = ["eu"]
    assert_remote(client, frame(FrameType.WELCOME, pack(obj)), match="scope.regions: unknown field")


@pytest.mark.parametrize(("who", "data", "match"), [
    (S, hello(pack({"version": 1, "client": "c", "limits": {"max_pending": True}})),
     "expected an integer, got bool"),
    (S, hello(pack({"version": True, "client": "c"})), "expected an integer, got bool"),
    (S, hello(pack({"version": 1.0, "client": "c"})), "expected an integer, got float"),
    (S, request(pack({"op": "ping", "args": {"data": "text"}})), "expected bytes, got str"),
    (S, request(pack({"op": "stat", "args": {"bucket": b"b", "key": "k"}})), "expected a string"),
    (S, request(pack({"op": "delete_bucket", "args": {"bucket": "b", "force": 1}})),
     "expected a boolean, got int"),
    (S, request(pack({"op": "list", "args": {"bucket": "b", "limit": 1.0}})),
     "expected an integer, got float"),
    (S, request(pack({"op": "list", "args": {"bucket": "b", "limit": -1}})), "must be in"),
    (S, request(pack({"op": "ping", "args": []})), "expected a map"),
    (C, frame(FrameType.RESULT, pack({"time": 1}), rid=1), "expected a float, got int"),
    (C, frame(FrameType.RESULT, pack({"time": True}), rid=1), "expected a float, got bool"),
    (C, frame(FrameType.ERROR, pack({"code": "11", "message": ""}), rid=1),
     "expected an integer, got str"),
    (C, frame(FrameType.RESPONSE, pack({"columns": [["a", "decimal"]]}), rid=3), "must be one of"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_wrong_types(who: Role, data: bytes, match: str) -> None:
    assert_remote(server_open() if who is S else client_open(), data, match=match)


def test_trailing_bytes_after_map() -> None:
    assert_remote(wire.Connection(S), hello(pack({"version": 1, "client": "c"}) + b"\xc0"),
                  match="invalid msgpack: ExtraData")


@pytest.mark.parametrize("payload", [
    pack([1, "c"]), pack("hello"), pack(None), b"", b"\x81",
], ids=["array", "str", "nil", "empty", "truncated"])
def test_control_payload_not_one_map(payload: bytes) -> None:
    assert_remote(wire.Connection(S), hello(payload))


@pytest.mark.parametrize("value", [msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 0)],
                         ids=["ext", "timestamp"])
def test_extension_types_rejected(value: Any) -> None:
    assert_remote(wire.Connection(S), hello(pack({"version": 1, "client": "c", "api_key": value})))
    rows = frame(FrameType.ROWS, pack([[1, value]]), rid=3)
    client = client_open()
    resp = frame(FrameType.RESPONSE, pack({"columns": [["a", "int"], ["b", "bytes"]]}), rid=3)
    assert feed(client, resp)[0] == Response(request_id=3, columns=_cols(("a", ColumnType.INT),
                                                                         ("b", ColumnType.BYTES)))
    assert_remote(client, rows)


def test_invalid_utf8() -> None:
    bad = bytes([0x82]) + pack("version") + pack(1) + pack("client") + b"\xa2\xff\xfe"
    assert_remote(wire.Connection(S), hello(bad), match="invalid msgpack")
    bad_key = bytes([0x82]) + pack("version") + pack(1) + b"\xa6client\xc0" + pack("c")
    assert_remote(wire.Connection(S), hello(bad_key))


def test_nesting_too_deep() -> None:
    # the payload map is level 0, args level 1, so 7 arrays put the 1 at level 9
    deep: Any = 1
    for _ in range(7):
        deep = [deep]
    assert_remote(server_open(), request(pack({"op": "ping", "args": {"data": deep}})),
                  match="nested deeper than 8")
    # one level less is a schema problem, not a nesting one
    assert_remote(server_open(), request(pack({"op": "ping", "args": {"data": deep[0]}})),
                  match="expected bytes")


def test_unknown_operation() -> None:
    err = assert_remote(server_open(), request(pack({"op": "format_disk", "args": {}}), rid=9),
                        ErrorCode.UNKNOWN_OPERATION)
    assert err.request_id == 9


@pytest.mark.parametrize("obj", [
    {"version": 2, "client": "c"},
    {"version": 0, "client": "c"},
    {"version": 2, "client": "c", "features": ["zstd"]},   # a newer HELLO with new fields
    {"version": 2},
], ids=["v2", "v0", "v2-new-field", "v2-missing-client"])
def test_unsupported_hello_version(obj: dict[str, Any]) -> None:
    assert_remote(wire.Connection(S), hello(pack(obj)), ErrorCode.UNSUPPORTED_VERSION)


def test_unsupported_welcome_version() -> None:
    client = wire.Connection(C)
    client.send(Hello(client="c"))
    welcome = {"version": 2, "server": "s", "session_id": "x"}
    assert_remote(client, frame(FrameType.WELCOME, pack(welcome)), ErrorCode.UNSUPPORTED_VERSION)


def test_unknown_error_code_and_notice_kind() -> None:
    assert_remote(client_open(), frame(FrameType.ERROR, pack({"code": 999, "message": ""}), rid=1),
                  match="unknown error code")
    assert_remote(client_open(), frame(FrameType.GOAWAY, pack(
        {"last_request_id": 1, "code": 50, "message": ""})), match="unknown error code")
    assert_remote(client_open(), frame(FrameType.NOTICE, pack({"kind": "party", "message": ""}),
                                       rid=1), match="unknown notice kind")


@pytest.mark.parametrize("reserved", [1, 0x8000, 0xFFFF])
def test_reserved_header_bits(reserved: int) -> None:
    assert_remote(wire.Connection(S), frame(FrameType.HELLO, pack({"version": 1, "client": "c"}),
                                            reserved=reserved), match="reserved header bits")


@pytest.mark.parametrize("ftype", [0x00, 0x0D, 0x7F, 0xFF])
def test_unknown_frame_type(ftype: int) -> None:
    assert_remote(wire.Connection(S), frame(ftype), match="unknown frame type")
    assert_remote(client_open(), frame(ftype, rid=1), match="unknown frame type")


@pytest.mark.parametrize(("ftype", "flags", "rid"), [
    (FrameType.HELLO, 0x01, 0), (FrameType.HELLO, 0x02, 0), (FrameType.HELLO, 0x80, 0),
    (FrameType.REQUEST, 0x01, 4), (FrameType.REQUEST, 0x04, 4), (FrameType.REQUEST, 0x42, 4),
    (FrameType.DATA, 0x02, 2), (FrameType.DATA, 0x80, 2), (FrameType.DATA, 0x81, 2),
    (FrameType.ROWS, 0x02, 2), (FrameType.ROWS, 0x10, 2), (FrameType.CANCEL, 0x01, 1),
    (FrameType.ERROR, 0x01, 0), (FrameType.ERROR, 0x20, 0),
])
def test_disallowed_flags(ftype: FrameType, flags: int, rid: int) -> None:
    conn = wire.Connection(S) if ftype is FrameType.HELLO else server_open()
    assert_remote(conn, frame(ftype, rid=rid, flags=flags), match=f"flags 0x{flags:02x} not allowed")


def test_body_flag_mismatch() -> None:
    put = pack({"op": "put", "args": {"bucket": "b", "key": "k"}})
    assert_remote(server_open(), request(put), match="BODY flag missing")
    assert_remote(server_open(), request(pack({"op": "ping", "args": {}}), flags=0x02),
                  match="BODY flag set")
    server = server_open()
    assert feed(server, request(put, flags=0x02)) == [
        Request(request_id=4, op=Op.PUT, args={"bucket": "b", "key": "k"})]


@pytest.mark.parametrize("ftype", [FrameType.WELCOME, FrameType.CONTINUE, FrameType.RESPONSE,
                                   FrameType.RESULT, FrameType.GOAWAY, FrameType.NOTICE])
def test_server_frames_sent_by_client(ftype: FrameType) -> None:
    rid = 0 if ftype in (FrameType.WELCOME, FrameType.GOAWAY) else 1
    assert_remote(server_open(), frame(ftype, rid=rid), match="may not be sent by the client")


@pytest.mark.parametrize("ftype", [FrameType.HELLO, FrameType.REQUEST, FrameType.CANCEL])
def test_client_frames_sent_by_server(ftype: FrameType) -> None:
    rid = 0 if ftype is FrameType.HELLO else 1
    assert_remote(client_open(), frame(ftype, rid=rid), match="may not be sent by the server")


@pytest.mark.parametrize(("ftype", "rid"), [
    (FrameType.REQUEST, 0), (FrameType.DATA, 0), (FrameType.ROWS, 0), (FrameType.CANCEL, 0),
    (FrameType.HELLO, 1),
])
def test_request_id_rules_client_frames(ftype: FrameType, rid: int) -> None:
    conn = wire.Connection(S) if ftype is FrameType.HELLO else server_open()
    assert_remote(conn, frame(ftype, rid=rid), match="must have request id 0|non-zero request id")


@pytest.mark.parametrize(("ftype", "rid"), [
    (FrameType.CONTINUE, 0), (FrameType.DATA, 0), (FrameType.ROWS, 0), (FrameType.RESPONSE, 0),
    (FrameType.RESULT, 0), (FrameType.GOAWAY, 1), (FrameType.WELCOME, 2),
])
def test_request_id_rules_server_frames(ftype: FrameType, rid: int) -> None:
    assert_remote(client_open(), frame(ftype, rid=rid),
                  match="must have request id 0|non-zero request id")


@pytest.mark.parametrize("rid", [3, 2, 1])
def test_request_ids_must_increase(rid: int) -> None:
    server = server_open()   # saw 1, 2, 3
    assert_remote(server, request(pack({"op": "ping", "args": {}}), rid=rid),
                  match="not greater than 3")


@pytest.mark.parametrize("payload", [
    pack({"a": 1}), pack([{"a": 1}]), pack([1, 2]), pack([[[1]]]), pack([[{"a": 1}]]),
    pack([["a"]]) + b"x", pack([["a"]])[:-1], pack([["a", "b"]]), pack([[1 << 63]]),
], ids=["map", "map-row", "scalar-rows", "array-cell", "map-cell", "trailing", "truncated",
        "arity", "int-range"])
def test_rows_payload_shape(payload: bytes) -> None:
    client, server = open_pair()
    request_ = Request(request_id=1, op=Op.INSERT, args={"table": "t", "columns": ("a",)})
    assert feed(server, client.send(request_)) == [request_]
    server.send(Continue(request_id=1))
    assert feed(server, frame(FrameType.ROWS, pack([["ok"]]), rid=1)) == [
        Rows(request_id=1, rows=(("ok",),))]
    err = assert_remote(server, frame(FrameType.ROWS, payload, rid=1))
    assert err.request_id == 1


# --- canonical encoding ----------------------------------------------------------------


def test_golden_bytes() -> None:
    """Pin the wire format: header layout, type numbers, sorted map keys."""
    assert wire.Connection(C).send(Hello(client="c")) == (
        bytes.fromhex("01000000 00000000 00000013") + b"\x82\xa6client\xa1c\xa7version\x01")
    client, _ = open_pair()
    raw = client.send(Request(request_id=0x01020304, op=Op.PUT, args={"key": "k", "bucket": "b"}))
    assert raw == bytes.fromhex("03020000 01020304 0000001d") + (
        b"\x82\xa4args\x82\xa6bucket\xa1b\xa3key\xa1k\xa2op\xa3put")
    assert client.send(Cancel(request_id=0x01020304)) == bytes.fromhex("0a000000 01020304 00000000")


def test_frame_type_numbers() -> None:
    assert {t.name: int(t) for t in FrameType} == {
        "HELLO": 1, "WELCOME": 2, "REQUEST": 3, "CONTINUE": 4, "DATA": 5, "ROWS": 6,
        "RESPONSE": 7, "RESULT": 8, "ERROR": 9, "CANCEL": 10, "GOAWAY": 11, "NOTICE": 12}
    assert HEADER_SIZE == 12


@pytest.mark.parametrize("who", [C, S])
def test_same_event_same_bytes(who: Role) -> None:
    # an independent connection replaying one side's sends writes exactly the bytes the
    # recorded connection wrote (the peer's received stream)
    stream = bytes(conversation().stream[who])
    sent = bytearray()
    replay(who, [stream], sent)
    assert bytes(sent) == bytes(conversation().stream[who.peer])
    assert len(sent) > 1000


@pytest.mark.parametrize("op", [Op.CHUNK, Op.SCAN, Op.GET])
def test_args_order_does_not_matter(op: Op) -> None:
    args = ARGS[op]
    shuffled = dict(reversed(list(args.items())))
    assert list(shuffled) != list(args)
    if op is Op.SCAN:
        shuffled["where"] = {"b": None, "a": 1}
    a, _ = open_pair()
    b, _ = open_pair()
    assert a.send(Request(request_id=1, op=op, args=args)) == b.send(
        Request(request_id=1, op=op, args=shuffled))


def test_lists_and_tuples_encode_alike() -> None:
    a, _ = open_pair()
    b, _ = open_pair()
    assert a.send(Request(request_id=1, op=Op.INSERT, args={"table": "t", "columns": ("a", "b")})) \
        == b.send(Request(request_id=1, op=Op.INSERT, args={"table": "t", "columns": ["a", "b"]}))


def round_trip(sender: wire.Connection, receiver: wire.Connection, event: Event) -> Event:
    got = feed(receiver, sender.send(event))
    assert len(got) == 1
    return got[0]


def test_decode_encode_is_identity() -> None:
    client, server = wire.Connection(C), wire.Connection(S)
    events: list[tuple[wire.Connection, wire.Connection, Event]] = []
    hello = Hello(client="x", api_key=Secret("k"), limits=RequestedLimits(
        max_frame_payload=8192, max_control_size=2048, max_pending=20))
    welcome = Welcome(server="y", session_id="s1", limits=Limits(
        max_frame_payload=8192, max_control_size=2048, max_pending=20, max_hold_seconds=0),
        scope=Scope(buckets=("a", "b*"), tables=(), access=(Access.ADMIN,)))
    events += [(client, server, hello), (server, client, welcome)]
    events += [(client, server, Request(request_id=r, op=op, args=ARGS[op], reason="why"))
               for r, op in enumerate(OPS, start=1)]
    events += [
        (server, client, Notice(request_id=0, kind=NoticeKind.INFO, message="hi")),
        (server, client, Notice(request_id=6, kind=NoticeKind.HELD, message="m", approval_id="a",
                                hold_seconds=5, expires_at=3.25)),
        (server, client, Continue(request_id=7)),
        (client, server, Data(request_id=7, data=b"0123456789", end_stream=True)),
        (server, client, Response(request_id=8, size=3)),
        (server, client, Data(request_id=8, data=b"abc")),
        (server, client, Data(request_id=8, data=b"", end_stream=True)),
        (server, client, Response(request_id=13, columns=_cols(("a", ColumnType.FLOAT)))),
        (server, client, Rows(request_id=13, rows=((1.0,), (None,), (float("inf"),)))),
        (client, server, Cancel(request_id=13)),
        (server, client, Result(request_id=7, fields={"bucket": "b", "key": "k", "size": 10,
                                                      "sha256": SHA})),
        (server, client, Error(request_id=13, code=ErrorCode.CANCELLED, message="c")),
        (server, client, GoAway(last_request_id=14, code=ErrorCode.SHUTTING_DOWN, message="m")),
        (server, client, Error(request_id=0, code=ErrorCode.INTERNAL, message="boom")),
    ]
    for sender, receiver, event in events:
        assert round_trip(sender, receiver, event) == event


def test_secret_not_in_repr() -> None:
    event = Hello(client="c", api_key=Secret("sk-very-secret"))
    assert "sk-very-secret" not in repr(event)
    assert "sk-very-secret" not in str(event)
    server = wire.Connection(S)
    (decoded,) = feed(server, wire.Connection(C).send(event))
    assert isinstance(decoded, Hello) and decoded.api_key is not None
    assert "sk-very-secret" not in repr(decoded)
    assert decoded.api_key.reveal() == "sk-very-secret"
    assert decoded == event


# --- EOF -------------------------------------------------------------------------------


def test_clean_eof() -> None:
    client, server = open_pair()
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.state is ConnState.CLOSED
    assert server.next_event() == ConnectionClosed()
    with pytest.raises(wire.LocalProtocolError, match="after EOF"):
        server.receive_data(b"x")
    # EOF right after a complete frame is clean too
    client.send(Request(request_id=1, op=Op.PING))
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 3])
def test_eof_mid_frame(cut: int) -> None:
    data = wire.Connection(C).send(Hello(client="client"))
    server = wire.Connection(S)
    server.receive_data(data[:cut])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed in the middle") as info:
        server.next_event()
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_eof_mid_data_payload() -> None:
    client, server = open_pair()
    feed(server, client.send(Request(request_id=1, op=Op.PUT, args={"bucket": "b", "key": "k"})))
    feed(client, server.send(Continue(request_id=1)))
    data = client.send(Data(request_id=1, data=b"abcdef", end_stream=True))
    assert feed(server, data[:-2]) == [Data(request_id=1, data=b"abcd")]
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a DATA frame"):
        server.next_event()


# --- module surface --------------------------------------------------------------------


def test_codec_does_not_import_io() -> None:
    code = ("import sys, l4proxy.wire; "
            "bad = {'trio', 'socket', 'ssl', 'asyncio', 'selectors'} & set(sys.modules); "
            "print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_public_surface() -> None:
    assert sorted(wire.__all__) == sorted(set(wire.__all__))
    for name in wire.__all__:
        assert hasattr(wire, name), name
    assert {"Connection", "RemoteProtocolError", "LocalProtocolError", "NEED_DATA",
            "negotiate_limits"} <= set(wire.__all__)


def _uploading() -> tuple[wire.Connection, wire.Connection]:
    """A client with a PUT of 10 bytes (request 1) that the server told to go on."""
    client, server = open_pair()
    server.receive_data(client.send(Request(request_id=1, op=Op.PUT,
                                            args={"bucket": "b", "key": "k", "size": 10})))
    drain(server)
    client.receive_data(server.send(Continue(request_id=1)))
    drain(client)
    return client, server


def test_send_data_is_send_split_into_header_and_payload() -> None:
    """The gateway's vectored path: the same bytes and the same state changes as send()."""
    one, _ = _uploading()
    two, _ = _uploading()
    payload = b"0123456789"
    piece = payload[:4]
    whole = one.send(Data(request_id=1, data=piece))
    parts = two.send_data(Data(request_id=1, data=piece))
    assert len(parts) == 2 and len(parts[0]) == 12 and parts[1] is piece  # not copied
    assert b"".join(parts) == whole
    assert b"".join(two.send_data(Data(request_id=1, data=payload[4:], end_stream=True))) == \
        one.send(Data(request_id=1, data=payload[4:], end_stream=True))
    # refused alike: the body is complete; then the connection is in the ERROR state
    with pytest.raises(wire.LocalProtocolError):
        two.send_data(Data(request_id=1, data=b"more"))
    with pytest.raises(wire.LocalProtocolError, match="ERROR state"):
        two.send_data(Data(request_id=1, data=b"more"))


def test_send_data_swallows_what_send_swallows() -> None:
    """Body pieces of an upload the server already refused: send() gives b"", send_data ()."""
    one, server_one = _uploading()
    two, server_two = _uploading()
    for conn, server in ((one, server_one), (two, server_two)):
        conn.send(Data(request_id=1, data=b"01"))
        conn.receive_data(server.send(Error(request_id=1, code=ErrorCode.NOT_FOUND,
                                            message="no bucket")))
        drain(conn)
    assert one.send(Data(request_id=1, data=b"01234")) == b""
    assert two.send_data(Data(request_id=1, data=b"01234")) == ()


def test_a_data_frame_starting_inside_a_read_kept_in_place_is_parsed_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # large reads and large DATA frames seldom line up: when one payload ends inside a read
    # and the next DATA frame starts there, its header and payload come from the read
    # itself, not from a copy of the read's rest in the buffer
    client, server = open_pair()
    size = 3000
    put = Request(request_id=1, op=Op.PUT, args={"bucket": "b", "key": "k", "size": size})
    assert feed(server, client.send(put)) == [put]
    client.receive_data(server.send(Continue(request_id=1)))
    assert drain(client) == [Continue(request_id=1)]
    body = bytes(range(256)) * 12
    stream = (client.send(Data(request_id=1, data=body[:1000]))
              + client.send(Data(request_id=1, data=body[1000:1500]))  # wholly inside read 2
              + client.send(Data(request_id=1, data=body[1500:size], end_stream=True))
              + client.send(Request(request_id=2, op=Op.PING)))
    header = wire.HEADER_SIZE
    cuts = [0, header + 10, header + 1000 + 2 * header + 500 + 100, len(stream)]
    reads = [stream[a:b] for a, b in itertools.pairwise(cuts)]
    copied: list[int] = []
    real = server._undirect

    def undirect() -> None:
        if server._direct is not None:
            copied.append(len(server._direct) - server._dpos)
        real()

    monkeypatch.setattr(server, "_undirect", undirect)
    events = [e for r in reads for e in feed(server, r)]
    data = [e for e in events if isinstance(e, Data)]
    assert b"".join(e.data for e in data) == body[:size]
    assert [len(e.data) for e in data] == [10, 990, 500, 100, 1400]
    assert data[-1].end_stream and not any(e.end_stream for e in data[:-1])
    assert events[-1] == Request(request_id=2, op=Op.PING)
    # only the rest of the last read (a PING) went through the buffer
    assert copied == [len(reads[-1]) - 1400]
    assert server.buffered == 0


def test_data_views_hands_out_views_of_the_read_not_copies() -> None:
    sender, server = wire.Connection(C), wire.Connection(S, data_views=True)
    assert feed(server, sender.send(Hello(client="t"))) == [Hello(client="t")]
    welcome = Welcome(server="s", session_id="x")
    assert feed(sender, server.send(welcome)) == [welcome]
    put = Request(request_id=1, op=Op.PUT, args={"bucket": "b", "key": "k", "size": 10})
    assert feed(server, sender.send(put)) == [put]
    sender.receive_data(server.send(Continue(request_id=1)))
    drain(sender)
    frame = (sender.send(Data(request_id=1, data=b"0123456789", end_stream=True))
             + sender.send(Request(request_id=2, op=Op.PING)))
    first, rest = frame[: wire.HEADER_SIZE + 3], frame[wire.HEADER_SIZE + 3:]
    events = feed(server, first) + feed(server, rest)
    pieces = [e for e in events if isinstance(e, Data)]
    assert b"".join(bytes(p.data) for p in pieces) == b"0123456789" and pieces[-1].end_stream
    view = pieces[-1].data
    assert isinstance(view, memoryview) and view.readonly and view.obj is rest  # no copy
    assert events[-1] == Request(request_id=2, op=Op.PING)
    assert wire.Connection(S).data_views is False  # applications get bytes


def test_data_lengths_count_bytes_whatever_the_buffer() -> None:
    import array

    client, server = _uploading()  # a PUT of 10 bytes
    words = memoryview(array.array("H", [0x3130, 0x3332, 0x3534]))  # 3 items, 6 bytes
    frame = client.send(Data(request_id=1, data=words))  # type: ignore[arg-type]
    assert len(frame) == wire.HEADER_SIZE + 6
    parts = client.send_data(Data(request_id=1, data=memoryview(b"6789")[:4], end_stream=True))
    assert isinstance(parts[1], memoryview) and len(parts[1]) == 4  # a read-only byte view: as is
    assert [e.data for e in feed(server, frame + b"".join(parts)) if isinstance(e, Data)] == \
        [words.tobytes(), b"6789"]
