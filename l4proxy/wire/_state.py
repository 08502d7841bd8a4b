"""CWP/1 state machines as tables.

Theory of operation: two tables. ``CONNECTION`` maps (sender, connection state, frame
kind) to the next connection state; ``STREAM`` maps (sender, stream state, stream event)
to the next state of one request. Both sides of a connection run the same tables over
every frame, sent or received, so a client and a server always agree on where each
request stands. A missing key is a protocol error naming role, state and event.
"""

from __future__ import annotations

from enum import Enum

from ._constants import Role

__all__ = ["CONNECTION", "STREAM", "ConnEvent", "ConnState", "StreamEvent", "StreamState"]


class ConnState(Enum):
    START = "START"              # nothing sent yet
    AWAIT_WELCOME = "AWAIT_WELCOME"  # HELLO sent, WELCOME not yet
    OPEN = "OPEN"
    DRAINING = "DRAINING"        # GOAWAY sent/received: finish in-flight requests only
    CLOSED = "CLOSED"            # ERROR for the connection or EOF: nothing more may be sent
    ERROR = "ERROR"              # a protocol error happened; the connection is unusable


class ConnEvent(Enum):
    HELLO = "HELLO"
    WELCOME = "WELCOME"
    REQUEST = "REQUEST"
    STREAM_FRAME = "STREAM_FRAME"   # any frame about an existing request
    GOAWAY = "GOAWAY"
    NOTICE_SESSION = "NOTICE(0)"
    ERROR_SESSION = "ERROR(0)"


_C, _S = Role.CLIENT, Role.SERVER
_CS, _E = ConnState, ConnEvent

CONNECTION: dict[tuple[Role, ConnState, ConnEvent], ConnState] = {
    (_C, _CS.START, _E.HELLO): _CS.AWAIT_WELCOME,
    (_S, _CS.AWAIT_WELCOME, _E.WELCOME): _CS.OPEN,
    (_S, _CS.AWAIT_WELCOME, _E.ERROR_SESSION): _CS.CLOSED,
    (_C, _CS.AWAIT_WELCOME, _E.ERROR_SESSION): _CS.CLOSED,
    (_C, _CS.OPEN, _E.REQUEST): _CS.OPEN,
    # A server cannot tell a REQUEST that crossed its GOAWAY from one sent after it, so
    # it accepts both and answers them with ERROR; the client's send() refuses to issue
    # new requests once it has seen GOAWAY (see Connection._apply).
    (_C, _CS.DRAINING, _E.REQUEST): _CS.DRAINING,
    (_C, _CS.OPEN, _E.STREAM_FRAME): _CS.OPEN,
    (_S, _CS.OPEN, _E.STREAM_FRAME): _CS.OPEN,
    (_C, _CS.DRAINING, _E.STREAM_FRAME): _CS.DRAINING,
    (_S, _CS.DRAINING, _E.STREAM_FRAME): _CS.DRAINING,
    (_S, _CS.OPEN, _E.GOAWAY): _CS.DRAINING,
    (_S, _CS.DRAINING, _E.GOAWAY): _CS.DRAINING,
    (_S, _CS.OPEN, _E.NOTICE_SESSION): _CS.OPEN,
    (_S, _CS.DRAINING, _E.NOTICE_SESSION): _CS.DRAINING,
    (_S, _CS.OPEN, _E.ERROR_SESSION): _CS.CLOSED,
    (_S, _CS.DRAINING, _E.ERROR_SESSION): _CS.CLOSED,
    (_C, _CS.OPEN, _E.ERROR_SESSION): _CS.CLOSED,
    (_C, _CS.DRAINING, _E.ERROR_SESSION): _CS.CLOSED,
}


class StreamState(Enum):
    AWAIT_CONTINUE = "AWAIT_CONTINUE"    # request with a body, waiting for permission
    CANCELLED_EARLY = "CANCELLED_EARLY"  # cancelled before CONTINUE; CONTINUE may still cross
    UPLOADING = "UPLOADING"              # CONTINUE given, body frames flowing
    AWAIT_HEAD = "AWAIT_HEAD"            # streamed-response op, waiting for RESPONSE
    STREAMING = "STREAMING"              # RESPONSE given, body frames flowing
    AWAIT_RESULT = "AWAIT_RESULT"        # waiting for the final RESULT or ERROR
    AWAIT_FINAL = "AWAIT_FINAL"          # response body ended, waiting for RESULT/ERROR
    DONE = "DONE"


class StreamEvent(Enum):
    CONTINUE = "CONTINUE"
    BODY = "BODY"          # DATA/ROWS without END_STREAM
    BODY_END = "BODY_END"  # DATA/ROWS with END_STREAM
    RESPONSE = "RESPONSE"
    RESULT = "RESULT"
    ERROR = "ERROR"
    CANCEL = "CANCEL"
    NOTICE = "NOTICE"


_SS, _SE = StreamState, StreamEvent

STREAM: dict[tuple[Role, StreamState, StreamEvent], StreamState] = {
    (_S, _SS.AWAIT_CONTINUE, _SE.CONTINUE): _SS.UPLOADING,
    (_S, _SS.AWAIT_CONTINUE, _SE.ERROR): _SS.DONE,
    (_C, _SS.AWAIT_CONTINUE, _SE.CANCEL): _SS.CANCELLED_EARLY,
    # a CONTINUE sent before the server saw CANCEL is ignored: no body follows
    (_S, _SS.CANCELLED_EARLY, _SE.CONTINUE): _SS.CANCELLED_EARLY,
    (_S, _SS.CANCELLED_EARLY, _SE.ERROR): _SS.DONE,
    # the server may have sent CONTINUE before it saw the CANCEL; it then holds the
    # request in AWAIT_RESULT (cancelled mid-upload) and may answer with RESULT
    (_S, _SS.CANCELLED_EARLY, _SE.RESULT): _SS.DONE,
    (_C, _SS.UPLOADING, _SE.BODY): _SS.UPLOADING,
    (_C, _SS.UPLOADING, _SE.BODY_END): _SS.AWAIT_RESULT,
    (_C, _SS.UPLOADING, _SE.CANCEL): _SS.AWAIT_RESULT,
    (_S, _SS.UPLOADING, _SE.ERROR): _SS.DONE,
    (_S, _SS.AWAIT_RESULT, _SE.RESULT): _SS.DONE,
    (_S, _SS.AWAIT_RESULT, _SE.ERROR): _SS.DONE,
    (_C, _SS.AWAIT_RESULT, _SE.CANCEL): _SS.AWAIT_RESULT,
    (_S, _SS.AWAIT_HEAD, _SE.RESPONSE): _SS.STREAMING,
    (_S, _SS.AWAIT_HEAD, _SE.ERROR): _SS.DONE,
    (_C, _SS.AWAIT_HEAD, _SE.CANCEL): _SS.AWAIT_HEAD,
    (_S, _SS.STREAMING, _SE.BODY): _SS.STREAMING,
    (_S, _SS.STREAMING, _SE.BODY_END): _SS.AWAIT_FINAL,
    (_S, _SS.STREAMING, _SE.ERROR): _SS.DONE,
    (_C, _SS.STREAMING, _SE.CANCEL): _SS.STREAMING,
    (_S, _SS.AWAIT_FINAL, _SE.RESULT): _SS.DONE,
    (_S, _SS.AWAIT_FINAL, _SE.ERROR): _SS.DONE,
    (_C, _SS.AWAIT_FINAL, _SE.CANCEL): _SS.AWAIT_FINAL,
}
# an intermediary may annotate any request that is not finished
for _state in StreamState:
    if _state is not StreamState.DONE:
        STREAM[(_S, _state, _SE.NOTICE)] = _state
