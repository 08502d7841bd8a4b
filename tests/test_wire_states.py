"""CWP/1 state machines: CONTINUE / CANCEL / GOAWAY / ERROR transitions (``_state`` tables).

Each rule is checked from both ends: our own ``send()`` refuses it with
``LocalProtocolError`` and the peer's bytes are refused with ``RemoteProtocolError``.
Frames that cross in flight (CANCEL vs CONTINUE / RESULT, body vs ERROR, REQUEST vs GOAWAY)
must be accepted by both sides.
"""

from __future__ import annotations

import struct

import msgpack
import pytest

import l4proxy.wire as wire
from l4proxy.wire import (
    NEED_DATA,
    Cancel,
    Column,
    ColumnType,
    ConnState,
    Continue,
    Data,
    Error,
    ErrorCode,
    Event,
    FrameType,
    GoAway,
    Hello,
    LocalProtocolError,
    Notice,
    NoticeKind,
    Op,
    ProtocolError,
    RemoteProtocolError,
    Request,
    Response,
    Result,
    Role,
    Rows,
    StreamState,
    Welcome,
)
from l4proxy.wire._state import CONNECTION, STREAM, ConnEvent, StreamEvent

C, S = Role.CLIENT, Role.SERVER
HDR = struct.Struct(">BBHII")
SHA = "0" * 64
PUT = Request(request_id=1, op=Op.PUT, args={"bucket": "b", "key": "k"})
INSERT = Request(request_id=1, op=Op.INSERT, args={"table": "t", "columns": ("a",)})
PUT_RESULT = Result(request_id=1, fields={"bucket": "b", "key": "k", "size": 0, "sha256": SHA})


def frame(ftype: int, payload: bytes = b"", *, rid: int = 0, flags: int = 0) -> bytes:
    return HDR.pack(ftype, flags, 0, rid, len(payload)) + payload


def drain(conn: wire.Connection) -> list[Event]:
    out: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        out.append(event)
    return out


class Pair:
    """A client and a server after HELLO/WELCOME, with helpers to move frames."""

    def __init__(self) -> None:
        self.c, self.s = wire.Connection(C), wire.Connection(S)
        assert self.to_s(Hello(client="t")) == [Hello(client="t")]
        welcome = Welcome(server="s", session_id="x")
        assert self.to_c(welcome) == [welcome]

    def to_s(self, event: Event) -> list[Event]:
        """The client sends ``event``; return what the server makes of it."""
        self.s.receive_data(self.c.send(event))
        return drain(self.s)

    def to_c(self, event: Event) -> list[Event]:
        self.c.receive_data(self.s.send(event))
        return drain(self.c)

    def both_pending(self) -> tuple[int, int]:
        return self.c.pending, self.s.pending


def upload(p: Pair, req: Request = PUT) -> None:
    assert p.to_s(req) == [req]
    assert p.to_c(Continue(request_id=req.request_id)) == [Continue(request_id=req.request_id)]
    assert p.c.stream_state(req.request_id) is StreamState.UPLOADING
    assert p.s.stream_state(req.request_id) is StreamState.UPLOADING


def refuse_local(conn: wire.Connection, event: Event, match: str,
                 code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
    with pytest.raises(LocalProtocolError, match=match) as info:
        conn.send(event)
    assert info.value.code is code
    assert conn.state is ConnState.ERROR


def refuse_remote(conn: wire.Connection, data: bytes, match: str,
                  code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> RemoteProtocolError:
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        drain(conn)
    assert info.value.code is code
    assert conn.state is ConnState.ERROR
    return info.value


def encoded(sender: Role, event: Event, setup: list[tuple[Role, Event]]) -> bytes:
    """The bytes of ``event`` from a connection that is allowed to send it after ``setup``."""
    p = Pair()
    for who, ev in setup:
        (p.to_s if who is C else p.to_c)(ev)
    return (p.c if sender is C else p.s).send(event)


# --- the tables themselves -------------------------------------------------------------


def test_tables_only_let_the_right_role_act() -> None:
    # only the server answers (CONTINUE/RESPONSE/RESULT/ERROR/NOTICE); only the client
    # cancels and sends request bodies
    for (role, _state, event), _new in STREAM.items():
        if event in (StreamEvent.CANCEL,):
            assert role is C
        elif event in (StreamEvent.BODY, StreamEvent.BODY_END):
            continue
        else:
            assert role is S, (role, _state, event)
    assert (C, ConnState.START, ConnEvent.HELLO) in CONNECTION
    assert not any(state in (ConnState.CLOSED, ConnState.ERROR) for _r, state, _e in CONNECTION)
    assert not any(state is StreamState.DONE for _r, state, _e in STREAM)


def test_missing_table_key_names_role_state_and_event() -> None:
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.SCAN, args={"table": "t"}))
    refuse_local(p.s, Result(request_id=1, fields={"rows": 0, "truncated": False}),
                 "RESULT from the server is not allowed for request 1 in state AWAIT_HEAD")
    client = wire.Connection(C)
    refuse_local(client, Request(request_id=1, op=Op.PING),
                 "REQUEST from the client is not allowed in connection state START")


# --- handshake -------------------------------------------------------------------------


def test_handshake_order() -> None:
    hello = frame(FrameType.HELLO, msgpack.packb({"version": 1, "client": "c"}))
    server = wire.Connection(S)
    assert drain_after(server, hello) == [Hello(client="c")]
    refuse_remote(server, hello, "HELLO from the client is not allowed in connection state "
                                 "AWAIT_WELCOME")
    # no request before WELCOME, either way
    client = wire.Connection(C)
    client.send(Hello(client="c"))
    refuse_local(client, Request(request_id=1, op=Op.PING), "AWAIT_WELCOME")
    server = wire.Connection(S)
    drain_after(server, hello)
    refuse_remote(server, frame(FrameType.REQUEST, msgpack.packb({"op": "ping", "args": {}}), rid=1),
                  "AWAIT_WELCOME")
    # a server may not speak first
    refuse_local(wire.Connection(S), Welcome(server="s", session_id="x"), "START")
    client = wire.Connection(C)
    refuse_remote(client, encoded(S, GoAway(last_request_id=0, code=ErrorCode.SHUTTING_DOWN), []),
                  "GOAWAY from the server is not allowed in connection state START")


def drain_after(conn: wire.Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return drain(conn)


def test_error_instead_of_welcome_closes() -> None:
    client = wire.Connection(C)
    server = wire.Connection(S)
    server.receive_data(client.send(Hello(client="c")))
    drain(server)
    err = Error(request_id=0, code=ErrorCode.AUTH_FAILED, message="bad key")
    assert drain_after(client, server.send(err)) == [err]
    assert client.state is server.state is ConnState.CLOSED


# --- CONTINUE --------------------------------------------------------------------------


def test_second_continue_while_uploading() -> None:
    p = Pair()
    upload(p)
    put2 = Request(request_id=2, op=Op.PUT, args={"bucket": "b", "key": "k2"})
    assert p.to_s(put2) == [put2]
    raw = encoded(S, Continue(request_id=2), [(C, PUT), (C, put2)])
    refuse_local(p.s, Continue(request_id=2), "request 1 is still uploading")
    refuse_remote(p.c, raw, "request 1 is still uploading")


def test_next_continue_after_upload_ends() -> None:
    p = Pair()
    upload(p)
    put2 = Request(request_id=2, op=Op.PUT, args={"bucket": "b", "key": "k2"})
    p.to_s(put2)
    assert p.to_s(Data(request_id=1, data=b"x", end_stream=True)) == [
        Data(request_id=1, data=b"x", end_stream=True)]
    assert p.to_c(Continue(request_id=2)) == [Continue(request_id=2)]


def test_continue_only_for_requests_with_a_body() -> None:
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.GET, args={"bucket": "b", "key": "k"}))
    raw = frame(FrameType.CONTINUE, rid=1)
    refuse_local(p.s, Continue(request_id=1), "CONTINUE from the server is not allowed for request "
                                              "1 in state AWAIT_HEAD")
    refuse_remote(p.c, raw, "not allowed for request 1 in state AWAIT_HEAD")


def test_continue_twice_for_one_request() -> None:
    p = Pair()
    upload(p)
    refuse_local(p.s, Continue(request_id=1), "state UPLOADING")
    refuse_remote(p.c, frame(FrameType.CONTINUE, rid=1), "state UPLOADING")


def test_body_before_continue() -> None:
    for body in (Data(request_id=1, data=b"x"), Rows(request_id=1, rows=(("a",),))):
        p = Pair()
        req = PUT if isinstance(body, Data) else INSERT
        p.to_s(req)
        refuse_local(p.c, body, "not allowed for request 1 in state AWAIT_CONTINUE")
        raw = encoded(C, body, [(C, req), (S, Continue(request_id=1))])
        refuse_remote(p.s, raw, "not allowed for request 1 in state AWAIT_CONTINUE")


def test_wrong_body_kind() -> None:
    p = Pair()
    upload(p, INSERT)
    refuse_local(p.c, Data(request_id=1, data=b"x"), "DATA frame for a insert request")
    p = Pair()
    upload(p, PUT)
    refuse_remote(p.s, frame(FrameType.ROWS, msgpack.packb([["a"]]), rid=1), "ROWS frame for a put")


def test_no_body_after_end_stream() -> None:
    p = Pair()
    upload(p)
    p.to_s(Data(request_id=1, data=b"", end_stream=True))
    assert p.both_pending() == (1, 1)
    refuse_local(p.c, Data(request_id=1, data=b"x"), "state AWAIT_RESULT")
    refuse_remote(p.s, frame(FrameType.DATA, b"x", rid=1), "state AWAIT_RESULT")


# --- CANCEL ----------------------------------------------------------------------------


def test_cancel_before_continue_crossed_by_continue() -> None:
    p = Pair()
    p.to_s(PUT)
    cancel = p.c.send(Cancel(request_id=1))
    cont = p.s.send(Continue(request_id=1))
    assert drain_after(p.s, cancel) == [Cancel(request_id=1)]
    assert drain_after(p.c, cont) == [Continue(request_id=1)]
    assert p.c.stream_state(1) is StreamState.CANCELLED_EARLY
    assert p.s.stream_state(1) is StreamState.AWAIT_RESULT
    # no body may follow on the client side, and the server is free to upload-CONTINUE others
    refuse_local(p.c, Data(request_id=1, data=b"x"), "CANCELLED_EARLY")


@pytest.mark.parametrize("final", ["result", "error"])
def test_crossed_continue_then_final(final: str) -> None:
    # the server saw the CANCEL only after its CONTINUE, so it may answer with either
    p = Pair()
    p.to_s(PUT)
    cancel = p.c.send(Cancel(request_id=1))
    cont = p.s.send(Continue(request_id=1))
    drain_after(p.s, cancel)
    drain_after(p.c, cont)
    answer: Event = PUT_RESULT if final == "result" else Error(request_id=1, code=ErrorCode.CANCELLED)
    assert p.to_c(answer) == [answer]
    assert p.both_pending() == (0, 0)


def test_cancel_before_continue_seen_by_server() -> None:
    p = Pair()
    p.to_s(PUT)
    assert p.to_s(Cancel(request_id=1)) == [Cancel(request_id=1)]
    assert p.s.stream_state(1) is StreamState.CANCELLED_EARLY
    # the server then answers with ERROR; a CONTINUE is pointless but harmless
    assert p.to_c(Continue(request_id=1)) == [Continue(request_id=1)]
    assert p.to_c(Error(request_id=1, code=ErrorCode.CANCELLED)) == [
        Error(request_id=1, code=ErrorCode.CANCELLED)]
    assert p.both_pending() == (0, 0)


def test_cancel_mid_upload() -> None:
    p = Pair()
    upload(p, INSERT)
    p.to_s(Rows(request_id=1, rows=((1,),)))
    assert p.to_s(Cancel(request_id=1)) == [Cancel(request_id=1)]
    assert p.c.stream_state(1) is p.s.stream_state(1) is StreamState.AWAIT_RESULT
    refuse_local(p.c, Rows(request_id=1, rows=((2,),), end_stream=True), "AWAIT_RESULT")
    # the upload slot is free again
    p = Pair()
    upload(p, INSERT)
    p.to_s(Cancel(request_id=1))
    put2 = Request(request_id=2, op=Op.PUT, args={"bucket": "b", "key": "k"})
    p.to_s(put2)
    assert p.to_c(Continue(request_id=2)) == [Continue(request_id=2)]


@pytest.mark.parametrize("when", ["await_continue", "uploading", "await_result", "streaming"])
def test_double_cancel(when: str) -> None:
    p = Pair()
    if when == "await_continue":
        p.to_s(PUT)
    elif when == "uploading":
        upload(p)
    elif when == "await_result":
        p.to_s(Request(request_id=1, op=Op.PING))
    else:
        p.to_s(Request(request_id=1, op=Op.GET, args={"bucket": "b", "key": "k"}))
        p.to_c(Response(request_id=1, size=5))
    raw = p.c.send(Cancel(request_id=1))
    assert drain_after(p.s, raw) == [Cancel(request_id=1)]
    server_view = p.s.stream_state(1)
    refuse_local(p.c, Cancel(request_id=1), "already cancelled|CANCELLED_EARLY")
    refuse_remote(p.s, raw, "already cancelled|CANCELLED_EARLY")
    assert server_view is not StreamState.DONE


def test_cancel_crossing_the_final_answer_is_dropped() -> None:
    for answer in (Result(request_id=1, fields={"time": 1.0}),
                   Error(request_id=1, code=ErrorCode.INTERNAL)):
        p = Pair()
        p.to_s(Request(request_id=1, op=Op.PING))
        cancel = p.c.send(Cancel(request_id=1))
        assert drain_after(p.c, p.s.send(answer)) == [answer]
        assert drain_after(p.s, cancel) == []   # dropped, not an error
        assert p.s.state is ConnState.OPEN
        assert p.both_pending() == (0, 0)
        # the client knows the request is finished: it may not cancel it now
        refuse_local(p.c, Cancel(request_id=1), "unknown or finished request 1")


def test_cancel_of_a_request_never_made() -> None:
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.PING))
    refuse_local(p.c, Cancel(request_id=2), "unknown or finished request 2")
    refuse_remote(p.s, frame(FrameType.CANCEL, rid=2), "unknown or finished request 2")


# --- server ERROR mid-upload -------------------------------------------------------------


def test_error_mid_upload_drops_late_data() -> None:
    p = Pair()
    upload(p)
    late = [p.c.send(Data(request_id=1, data=b"abc")), p.c.send(Data(request_id=1, data=b"def"))]
    err = Error(request_id=1, code=ErrorCode.TOO_LARGE)
    to_client = p.s.send(err)
    assert p.s.pending == 0
    for raw in late:
        assert drain_after(p.s, raw) == []        # dropped on the server
    assert drain_after(p.c, to_client) == [err]
    # the client keeps sending (a race in real life): send() returns nothing to write
    assert p.c.send(Data(request_id=1, data=b"ghi")) == b""
    assert p.c.send(Data(request_id=1, data=b"", end_stream=True)) == b""
    # after END_STREAM the request is really gone on the client side too
    refuse_local(p.c, Data(request_id=1, data=b"x"), "unknown or finished request 1")


def test_error_mid_upload_drops_late_rows() -> None:
    p = Pair()
    upload(p, INSERT)
    late = p.c.send(Rows(request_id=1, rows=((1,),)))
    late_end = p.c.send(Rows(request_id=1, rows=((2,),), end_stream=True))
    err = Error(request_id=1, code=ErrorCode.INVALID_ARGUMENT)
    to_client = p.s.send(err)
    assert drain_after(p.s, late + late_end) == []
    assert drain_after(p.c, to_client) == [err]
    # the dropping stops at END_STREAM: a further ROWS for the request is an error again
    refuse_remote(p.s, frame(FrameType.ROWS, msgpack.packb([[3]]), rid=1),
                  "unknown or finished request 1")


def test_error_mid_upload_then_client_sends_rows() -> None:
    p = Pair()
    upload(p, INSERT)
    p.to_c(Error(request_id=1, code=ErrorCode.INVALID_ARGUMENT))
    assert p.c.send(Rows(request_id=1, rows=((1,),))) == b""
    assert p.c.send(Rows(request_id=1, rows=((2,),), end_stream=True)) == b""
    assert p.c.state is ConnState.OPEN
    assert p.both_pending() == (0, 0)


def test_error_while_a_data_frame_is_arriving() -> None:
    p = Pair()
    upload(p)
    raw = p.c.send(Data(request_id=1, data=b"abcdef", end_stream=True))
    assert drain_after(p.s, raw[:-4]) == [Data(request_id=1, data=b"ab")]
    p.s.send(Error(request_id=1, code=ErrorCode.INTERNAL))
    assert drain_after(p.s, raw[-4:]) == []      # the rest of that frame is dropped
    # and a following request is parsed normally
    assert p.to_s(Request(request_id=2, op=Op.PING)) == [Request(request_id=2, op=Op.PING)]


def test_error_before_continue_is_not_an_upload_abort() -> None:
    # the client never sent a body, so there is nothing to drop: DATA is an error
    p = Pair()
    p.to_s(PUT)
    p.to_c(Error(request_id=1, code=ErrorCode.FORBIDDEN))
    refuse_local(p.c, Data(request_id=1, data=b"x"), "unknown or finished request 1")


# --- final answers -----------------------------------------------------------------------


def test_result_for_streamed_op_needs_response() -> None:
    for op, args in ((Op.GET, {"bucket": "b", "key": "k"}), (Op.SCAN, {"table": "t"})):
        p = Pair()
        p.to_s(Request(request_id=1, op=op, args=args))
        fields = ({"size": 0, "sha256": SHA} if op is Op.GET else {"rows": 0, "truncated": False})
        refuse_local(p.s, Result(request_id=1, fields=fields), "state AWAIT_HEAD")
        refuse_remote(p.c, frame(FrameType.RESULT, msgpack.packb(fields), rid=1), "state AWAIT_HEAD")


def test_result_before_response_body_ends() -> None:
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.SCAN, args={"table": "t"}))
    p.to_c(Response(request_id=1, columns=(Column(name="a", type=ColumnType.INT),)))
    p.to_c(Rows(request_id=1, rows=((1,),)))
    fields = {"rows": 1, "truncated": False}
    refuse_local(p.s, Result(request_id=1, fields=fields), "state STREAMING")
    refuse_remote(p.c, frame(FrameType.RESULT, msgpack.packb(fields), rid=1), "state STREAMING")


def test_error_mid_response_stream_is_fine() -> None:
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.GET, args={"bucket": "b", "key": "k"}))
    p.to_c(Response(request_id=1, size=10))
    p.to_c(Data(request_id=1, data=b"abc"))
    assert p.to_c(Error(request_id=1, code=ErrorCode.INTERNAL)) == [
        Error(request_id=1, code=ErrorCode.INTERNAL)]
    assert p.both_pending() == (0, 0)


def test_response_only_once() -> None:
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.GET, args={"bucket": "b", "key": "k"}))
    p.to_c(Response(request_id=1, size=1))
    refuse_local(p.s, Response(request_id=1, size=1), "RESPONSE .* state STREAMING")


def test_response_for_an_op_without_one() -> None:
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.PING))
    refuse_local(p.s, Response(request_id=1, size=1), "state AWAIT_RESULT")
    refuse_remote(p.c, frame(FrameType.RESPONSE, msgpack.packb({"size": 1}), rid=1),
                  "no streamed response")


@pytest.mark.parametrize("second", ["result", "error"])
def test_exactly_one_final(second: str) -> None:
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.PING))
    p.to_s(Request(request_id=2, op=Op.PING))
    first = p.s.send(Result(request_id=1, fields={"time": 1.0}))
    assert drain_after(p.c, first)
    assert p.both_pending() == (1, 1)
    again: Event = (Result(request_id=1, fields={"time": 1.0}) if second == "result"
                    else Error(request_id=1, code=ErrorCode.INTERNAL))
    refuse_local(p.s, again, "unknown or finished request 1")
    refuse_remote(p.c, first if second == "result"
                  else frame(FrameType.ERROR, msgpack.packb({"code": 16, "message": ""}), rid=1),
                  "unknown or finished request 1")


def test_pending_goes_back_to_zero() -> None:
    p = Pair()
    reqs = [Request(request_id=1, op=Op.PING), Request(request_id=2, op=Op.LIST_BUCKETS),
            Request(request_id=3, op=Op.GET, args={"bucket": "b", "key": "k"}),
            Request(request_id=4, op=Op.PUT, args={"bucket": "b", "key": "k"})]
    for n, r in enumerate(reqs, start=1):
        p.to_s(r)
        assert p.both_pending() == (n, n)
    p.to_c(Result(request_id=2, fields={"buckets": ()}))
    p.to_c(Response(request_id=3, size=2))
    p.to_c(Continue(request_id=4))
    p.to_s(Data(request_id=4, data=b"xy"))
    p.to_c(Data(request_id=3, data=b"ab", end_stream=True))
    p.to_s(Data(request_id=4, data=b"", end_stream=True))
    assert p.both_pending() == (3, 3)
    p.to_c(Result(request_id=3, fields={"size": 2, "sha256": SHA}))
    p.to_c(Error(request_id=1, code=ErrorCode.INTERNAL))
    p.to_c(Result(request_id=4, fields={"bucket": "b", "key": "k", "size": 2, "sha256": SHA}))
    assert p.both_pending() == (0, 0)
    for rid in range(1, 5):
        assert p.c.stream_state(rid) is p.s.stream_state(rid) is StreamState.DONE
        assert p.c.stream_op(rid) is None


def test_notices() -> None:
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.PING))
    held = Notice(request_id=1, kind=NoticeKind.HELD, message="wait", approval_id="a1",
                  hold_seconds=30)
    assert p.to_c(held) == [held]
    assert p.to_c(Notice(request_id=0, kind=NoticeKind.INFO, message="hi"))
    p.to_c(Result(request_id=1, fields={"time": 1.0}))
    refuse_local(p.s, Notice(request_id=1, kind=NoticeKind.INFO, message="late"),
                 "unknown or finished request 1")


# --- GOAWAY ------------------------------------------------------------------------------


def test_goaway_stops_new_requests_but_not_in_flight_ones() -> None:
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.PING))
    crossed = p.c.send(Request(request_id=2, op=Op.PING))   # in flight when GOAWAY is sent
    goaway = GoAway(last_request_id=1, code=ErrorCode.SHUTTING_DOWN, message="bye")
    to_client = p.s.send(goaway)
    assert p.s.state is ConnState.DRAINING
    assert p.s.goaway_last_request_id == 1
    # the server still accepts the crossed REQUEST (and answers it with ERROR)
    assert drain_after(p.s, crossed) == [Request(request_id=2, op=Op.PING)]
    assert drain_after(p.c, to_client) == [goaway]
    assert p.c.state is ConnState.DRAINING
    assert p.c.goaway_last_request_id == 1
    assert p.to_c(Error(request_id=2, code=ErrorCode.SHUTTING_DOWN)) == [
        Error(request_id=2, code=ErrorCode.SHUTTING_DOWN)]
    # in-flight requests finish normally
    assert p.to_c(Result(request_id=1, fields={"time": 1.0}))
    assert p.both_pending() == (0, 0)
    refuse_local(p.c, Request(request_id=3, op=Op.PING), "no new requests after GOAWAY")


def test_goaway_allows_cancel_and_bodies() -> None:
    p = Pair()
    upload(p)
    p.to_s(Request(request_id=2, op=Op.PING))
    p.to_c(GoAway(last_request_id=2, code=ErrorCode.SHUTTING_DOWN))
    assert p.to_s(Data(request_id=1, data=b"x", end_stream=True))
    assert p.to_s(Cancel(request_id=2)) == [Cancel(request_id=2)]
    assert p.to_c(Error(request_id=2, code=ErrorCode.CANCELLED))
    assert p.to_c(Notice(request_id=0, kind=NoticeKind.INFO, message="draining"))
    assert p.to_c(PUT_RESULT)
    assert p.both_pending() == (0, 0)
    assert p.c.state is p.s.state is ConnState.DRAINING


def test_goaway_may_lower_but_not_raise() -> None:
    p = Pair()
    p.to_c(GoAway(last_request_id=5, code=ErrorCode.SHUTTING_DOWN))
    assert p.to_c(GoAway(last_request_id=3, code=ErrorCode.SHUTTING_DOWN))
    assert p.c.goaway_last_request_id == p.s.goaway_last_request_id == 3
    assert p.to_c(GoAway(last_request_id=3, code=ErrorCode.SHUTTING_DOWN))
    raw = encoded(S, GoAway(last_request_id=4, code=ErrorCode.SHUTTING_DOWN), [])
    refuse_local(p.s, GoAway(last_request_id=4, code=ErrorCode.SHUTTING_DOWN),
                 "may not raise last_request_id")
    refuse_remote(p.c, raw, "may not raise last_request_id")


def test_client_may_not_send_goaway() -> None:
    p = Pair()
    refuse_local(p.c, GoAway(last_request_id=0, code=ErrorCode.SHUTTING_DOWN),
                 "GOAWAY may not be sent by the client")


# --- ERROR(0) ----------------------------------------------------------------------------


def test_error_zero_from_server_ends_everything() -> None:
    p = Pair()
    upload(p)
    p.to_s(Request(request_id=2, op=Op.PING))
    err = Error(request_id=0, code=ErrorCode.OVER_CAPACITY, message="full")
    assert p.to_c(err) == [err]
    assert p.c.state is p.s.state is ConnState.CLOSED
    assert p.both_pending() == (0, 0)
    raw = frame(FrameType.NOTICE, msgpack.packb({"kind": "info", "message": ""}))
    refuse_remote(p.c, raw, "NOTICE\\(0\\) from the server is not allowed in connection state CLOSED")
    refuse_local(p.s, Notice(request_id=0, kind=NoticeKind.INFO, message="x"),
                 "NOTICE\\(0\\) from the server is not allowed in connection state CLOSED")
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.PING))
    p.to_c(Error(request_id=0, code=ErrorCode.OVER_CAPACITY))
    refuse_local(p.s, Result(request_id=1, fields={"time": 1.0}), "unknown or finished request 1")
    p = Pair()
    upload(p)
    p.to_c(Error(request_id=0, code=ErrorCode.OVER_CAPACITY))
    refuse_local(p.c, Data(request_id=1, data=b"x"), "CLOSED")


def test_error_zero_from_client() -> None:
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.PING))
    err = Error(request_id=0, code=ErrorCode.PROTOCOL_ERROR, message="bye")
    assert p.to_s(err) == [err]
    assert p.s.state is p.c.state is ConnState.CLOSED
    refuse_remote(p.s, encoded(C, Request(request_id=2, op=Op.PING), [(C, Request(request_id=1,
                                                                                 op=Op.PING))]),
                  "CLOSED")
    refuse_local(p.c, Request(request_id=2, op=Op.PING), "CLOSED")


def test_error_zero_also_ends_dropping_of_late_body() -> None:
    p = Pair()
    upload(p)
    late = p.c.send(Data(request_id=1, data=b"x"))
    p.s.send(Error(request_id=1, code=ErrorCode.INTERNAL))
    p.s.send(Error(request_id=0, code=ErrorCode.INTERNAL))
    refuse_remote(p.s, late, "CLOSED")


def test_client_may_not_fail_a_single_request() -> None:
    p = Pair()
    p.to_s(Request(request_id=1, op=Op.PING))
    refuse_local(p.c, Error(request_id=1, code=ErrorCode.CANCELLED), "ERROR from the client")
    refuse_remote(p.s, frame(FrameType.ERROR, msgpack.packb({"code": 15, "message": ""}), rid=1),
                  "ERROR from the client")


# --- the ERROR state ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    Request(request_id=1, op=Op.PING, args={"nope": 1}),
    Continue(request_id=1),
    Request(request_id=0, op=Op.PING),
    Request(request_id=1 << 32, op=Op.PING),
    Cancel(request_id=-1),
    Error(request_id=0, code=999),  # type: ignore[arg-type]
], ids=["args", "continue-from-client", "rid-0", "rid-u32", "rid-negative", "error-code"])
def test_local_error_sticks(bad: Event) -> None:
    p = Pair()
    with pytest.raises(LocalProtocolError) as info:
        p.c.send(bad)
    assert p.c.state is ConnState.ERROR
    with pytest.raises(LocalProtocolError, match="ERROR state") as again:
        p.c.send(Request(request_id=5, op=Op.PING))
    assert again.value.code is info.value.code
    with pytest.raises(RemoteProtocolError, match="ERROR state"):
        p.c.next_event()
    with pytest.raises(LocalProtocolError, match="ERROR state"):
        p.c.receive_data(b"x")


def test_remote_error_sticks_for_send_too() -> None:
    p = Pair()
    with pytest.raises(RemoteProtocolError):
        drain_after(p.s, b"\xff" * 12)
    with pytest.raises(LocalProtocolError, match="ERROR state") as info:
        p.s.send(Error(request_id=0, code=ErrorCode.PROTOCOL_ERROR))
    assert isinstance(info.value, ProtocolError)
    with pytest.raises(LocalProtocolError, match="ERROR state"):
        p.s.receive_data(b"more")


def test_connection_closed_is_not_sendable() -> None:
    p = Pair()
    with pytest.raises(LocalProtocolError, match="close the transport"):
        p.c.send(wire.ConnectionClosed())
    assert p.c.state is ConnState.ERROR


def test_send_requires_a_known_operation() -> None:
    p = Pair()
    with pytest.raises(LocalProtocolError) as info:
        p.c.send(Request(request_id=1, op="format_disk"))  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.UNKNOWN_OPERATION


def test_plain_string_op_is_normalised() -> None:
    p = Pair()
    events = p.to_s(Request(request_id=1, op="insert",  # type: ignore[arg-type]
                            args={"table": "t", "columns": ("a", "b")}))
    assert events == [Request(request_id=1, op=Op.INSERT, args={"table": "t", "columns": ("a", "b")})]
    assert p.c.stream_op(1) is Op.INSERT
    p.to_c(Continue(request_id=1))
    assert p.to_s(Rows(request_id=1, rows=((1, "x"),), end_stream=True))
