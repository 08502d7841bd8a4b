"""CWP/1 codec under arbitrary input: only ``RemoteProtocolError``, and it sticks.

Inputs are random bytes (to a fresh connection and after a valid handshake), mutations of
a valid conversation (bit flips, truncation, inserted bytes) and well-framed headers
around random msgpack values, so the schema code sees structurally valid maps too.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import l4proxy.wire as wire
from l4proxy.wire import (
    NEED_DATA,
    Column,
    ColumnType,
    ConnectionClosed,
    ConnState,
    Continue,
    Data,
    ErrorCode,
    Event,
    FrameType,
    Hello,
    LocalProtocolError,
    Op,
    RemoteProtocolError,
    Request,
    Response,
    Result,
    Role,
    Rows,
    Welcome,
)

C, S = Role.CLIENT, Role.SERVER
HDR = struct.Struct(">BBHII")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def drain(conn: wire.Connection) -> list[Event]:
    out: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or isinstance(event, ConnectionClosed):
            return out
        assert isinstance(event, Event)
        out.append(event)


def must_only_raise_remote(conn: wire.Connection, chunks: list[bytes], eof: bool = True) -> None:
    """Feed ``chunks``; any failure must be RemoteProtocolError, and it must stick."""
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            drain(conn)
        if eof:
            conn.receive_data(b"")
            assert isinstance(conn.next_event(), ConnectionClosed)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert conn.state is ConnState.ERROR
        for _ in range(2):
            try:
                conn.next_event()
            except RemoteProtocolError as again:
                assert again.code is exc.code
            else:
                raise AssertionError("next_event() worked after a RemoteProtocolError") from None
        try:
            conn.receive_data(b"more")
        except LocalProtocolError:
            pass
        else:
            raise AssertionError("receive_data() worked after a RemoteProtocolError") from None


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


# --- random bytes ---------------------------------------------------------------------


@FUZZ
@given(role=st.sampled_from([C, S]), data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300),
                                                                               max_size=4))
def test_random_bytes_fresh(role: Role, data: bytes, cuts: list[int]) -> None:
    must_only_raise_remote(wire.Connection(role), chunked(data, cuts))


def header_then(ftype: int, flags: int, rid: int, tail: bytes) -> bytes:
    return HDR.pack(ftype, flags, 0, rid, len(tail)) + tail


@FUZZ
@given(role=st.sampled_from([C, S]), ftype=st.integers(0, 13), flags=st.sampled_from([0, 1, 2, 3, 0x80]),
       rid=st.sampled_from([0, 1, 2, 7, 0xFFFF_FFFF]), tail=st.binary(max_size=200),
       lie=st.sampled_from([None, 0, 1, 5, 1 << 20, 0xFFFF_FFFF]))
def test_random_payload_in_plausible_header(role: Role, ftype: int, flags: int, rid: int, tail: bytes,
                                            lie: int | None) -> None:
    # headers with a real frame type make the payload decoders see the random bytes
    length = len(tail) if lie is None else lie
    data = HDR.pack(ftype, flags, 0, rid, length) + tail
    must_only_raise_remote(wire.Connection(role), [data])


def opened(role: Role) -> wire.Connection:
    """A ``role`` connection after HELLO/WELCOME; a client has a few requests pending."""
    client, server = wire.Connection(C), wire.Connection(S)
    server.receive_data(client.send(Hello(client="fuzz")))
    drain(server)
    client.receive_data(server.send(Welcome(server="s", session_id="x")))
    drain(client)
    if role is S:
        return server
    client.send(Request(request_id=1, op=Op.PING))
    client.send(Request(request_id=2, op=Op.GET, args={"bucket": "b", "key": "k"}))
    client.send(Request(request_id=3, op=Op.SCAN, args={"table": "t"}))
    client.send(Request(request_id=4, op=Op.PUT, args={"bucket": "b", "key": "k"}))
    return client


@FUZZ
@given(role=st.sampled_from([C, S]), data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300),
                                                                               max_size=4))
def test_random_bytes_after_handshake(role: Role, data: bytes, cuts: list[int]) -> None:
    must_only_raise_remote(opened(role), chunked(data, cuts))


# --- random msgpack values in well-formed frames ---------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
           | st.floats(allow_nan=False) | st.text(max_size=10) | st.binary(max_size=10)
           | st.sampled_from(["ping", "put", "get", "scan", "info", "held", "text", "int", 1, 0]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(
                          ["op", "args", "bucket", "key", "columns", "size", "time", "code",
                           "message", "kind", "version", "client", "limits", "data"]),
                          inner, max_size=5), max_leaves=12)
maps = st.dictionaries(st.sampled_from(["op", "args", "reason", "version", "client", "code",
                                        "message", "kind", "size", "columns", "time", "data",
                                        "last_request_id", "api_key", "limits", "x"]),
                       values, max_size=5)


@FUZZ
@given(role=st.sampled_from([C, S]), ftype=st.sampled_from(list(FrameType)), rid=st.integers(0, 5),
       flags=st.integers(0, 3), obj=maps | values)
def test_random_msgpack_in_valid_frames(role: Role, ftype: FrameType, rid: int, flags: int,
                                        obj: Any) -> None:
    conn = opened(role)
    data = header_then(ftype, flags, rid, msgpack.packb(obj, use_bin_type=True))
    must_only_raise_remote(conn, [data], eof=False)


# --- mutations of a valid conversation ------------------------------------------------


def valid_streams() -> tuple[bytes, bytes, list[tuple[int, Callable[[wire.Connection], bytes]]],
                             list[tuple[int, Callable[[wire.Connection], bytes]]]]:
    """A short valid conversation: what each side received and when each side sent."""
    client, server = wire.Connection(C), wire.Connection(S)
    to_s, to_c = bytearray(), bytearray()
    c_sends: list[tuple[int, Callable[[wire.Connection], bytes]]] = []
    s_sends: list[tuple[int, Callable[[wire.Connection], bytes]]] = []

    def c(event: Event) -> None:
        c_sends.append((len(to_c), lambda conn: conn.send(event)))
        data = client.send(event)
        to_s.extend(data)
        server.receive_data(data)
        drain(server)

    def s(event: Event) -> None:
        s_sends.append((len(to_s), lambda conn: conn.send(event)))
        data = server.send(event)
        to_c.extend(data)
        client.receive_data(data)
        drain(client)

    c(Hello(client="fuzz"))
    s(Welcome(server="s", session_id="x"))
    c(Request(request_id=1, op=Op.PUT, args={"bucket": "b", "key": "k", "size": 6}))
    c(Request(request_id=2, op=Op.SCAN, args={"table": "t", "where": {"a": 1}}))
    c(Request(request_id=3, op=Op.INSERT, args={"table": "t", "columns": ("a", "b")}))
    s(Continue(request_id=1))
    c(Data(request_id=1, data=b"abc"))
    c(Data(request_id=1, data=b"def", end_stream=True))
    s(Response(request_id=2, columns=(Column(name="a", type=ColumnType.INT),)))
    s(Rows(request_id=2, rows=((1,), (None,)), end_stream=True))
    s(Result(request_id=2, fields={"rows": 2, "truncated": False}))
    s(Continue(request_id=3))
    c(Rows(request_id=3, rows=((1, "x"),), end_stream=True))
    s(Result(request_id=1, fields={"bucket": "b", "key": "k", "size": 6, "sha256": "0" * 64}))
    s(Result(request_id=3, fields={"table": "t", "inserted": 1}))
    return bytes(to_s), bytes(to_c), c_sends, s_sends


TO_S, TO_C, C_SENDS, S_SENDS = valid_streams()


def replay_mutated(role: Role, data: bytes, cuts: list[int]) -> None:
    """Like must_only_raise_remote, but ``role`` also makes its own sends on the way.

    Once a mutation makes the conversation diverge, one of our own sends may be refused
    (LocalProtocolError): that ends the example, since later input is not meaningful.
    """
    conn = wire.Connection(role)
    sends = list(C_SENDS if role is C else S_SENDS)
    fed = 0

    def sync() -> None:
        while sends and sends[0][0] <= fed - conn.buffered:
            sends.pop(0)[1](conn)

    try:
        for chunk in chunked(data, cuts):
            conn.receive_data(chunk)
            fed += len(chunk)
            while True:
                sync()
                event = conn.next_event()
                if event is NEED_DATA or isinstance(event, ConnectionClosed):
                    break
        sync()
        conn.receive_data(b"")
        conn.next_event()
    except LocalProtocolError:
        assert conn.state is ConnState.ERROR
    except RemoteProtocolError as exc:
        assert conn.state is ConnState.ERROR
        for _ in range(2):
            try:
                conn.next_event()
            except RemoteProtocolError as again:
                assert again.code is exc.code
            else:
                raise AssertionError("next_event() worked after a RemoteProtocolError") from None


def test_unmutated_streams_are_valid() -> None:
    # the baseline: without a mutation both replays run to a clean EOF
    for role, data in ((S, TO_S), (C, TO_C)):
        conn = wire.Connection(role)
        sends = list(C_SENDS if role is C else S_SENDS)
        events: list[Event] = []
        for i in range(len(data)):
            conn.receive_data(data[i : i + 1])
            while True:
                while sends and sends[0][0] <= i + 1 - conn.buffered:
                    sends.pop(0)[1](conn)
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                assert isinstance(event, Event)
                events.append(event)
        assert not sends
        conn.receive_data(b"")
        assert isinstance(conn.next_event(), ConnectionClosed)
        assert conn.pending == 0
        assert b"".join(e.data for e in events if isinstance(e, Data)) == (b"abcdef" if role is S
                                                                          else b"")


@FUZZ
@given(role=st.sampled_from([C, S]), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)),
                                                    min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 10_000), max_size=3))
def test_bit_flips(role: Role, flips: list[tuple[int, int]], cuts: list[int]) -> None:
    data = bytearray(TO_S if role is S else TO_C)
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    replay_mutated(role, bytes(data), cuts)


@FUZZ
@given(role=st.sampled_from([C, S]), keep=st.integers(0, 10_000), cuts=st.lists(st.integers(0, 10_000),
                                                                               max_size=3))
def test_truncations(role: Role, keep: int, cuts: list[int]) -> None:
    data = TO_S if role is S else TO_C
    replay_mutated(role, data[: keep % len(data)], cuts)


@FUZZ
@given(role=st.sampled_from([C, S]), at=st.integers(0, 10_000), junk=st.binary(min_size=1, max_size=16),
       cuts=st.lists(st.integers(0, 10_000), max_size=3))
def test_inserted_bytes(role: Role, at: int, junk: bytes, cuts: list[int]) -> None:
    data = TO_S if role is S else TO_C
    pos = at % (len(data) + 1)
    replay_mutated(role, data[:pos] + junk + data[pos:], cuts)


@FUZZ
@given(role=st.sampled_from([C, S]), at=st.integers(0, 10_000), n=st.integers(1, 16),
       cuts=st.lists(st.integers(0, 10_000), max_size=3))
def test_deleted_bytes(role: Role, at: int, n: int, cuts: list[int]) -> None:
    data = TO_S if role is S else TO_C
    pos = at % len(data)
    replay_mutated(role, data[:pos] + data[pos + n :], cuts)
