"""The CWP/1 connection: a sans-IO state machine for one side of one connection.

Theory of operation (after h11): the caller owns the socket. Bytes read from it go into
:meth:`Connection.receive_data` (``b""`` for EOF); :meth:`Connection.next_event` then
returns parsed events one by one, or :data:`NEED_DATA`. Events the caller wants to send go
through :meth:`Connection.send`, which validates them against the same state machine and
returns the bytes to write. Both directions drive the tables in ``_state``, so each side
always knows what the other may do next.

Parsing is all-or-nothing: a frame header is validated (type, flags, request id, length
against the negotiated limit, and that the frame is allowed in the current state) before
its payload is awaited, and buffered bytes are consumed only after the frame was accepted.
DATA payloads are the exception that keeps memory flat: once the header is accepted, the
payload is handed out piece by piece as it arrives, so the codec never holds more than one
read's worth of a body. Control payloads and ROWS are bounded by ``max_control_size`` and
``max_frame_payload``.

Any violation raises ``RemoteProtocolError`` (peer's fault) or ``LocalProtocolError``
(ours) with the wire error code, and the connection stays in the ERROR state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, cast

from ._constants import (
    DEFAULT_MAX_CONTROL_SIZE,
    DEFAULT_MAX_FRAME_PAYLOAD,
    DEFAULT_MAX_PENDING,
    HEADER,
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD_CEILING,
    MAX_PENDING_CEILING,
    MAX_REQUEST_ID,
    MIN_CONTROL_SIZE,
    MIN_FRAME_PAYLOAD,
    PROTOCOL_VERSION,
    Access,
    FrameFlag,
    FrameType,
    Role,
)
from ._errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    Cancel,
    Column,
    ColumnType,
    ConnectionClosed,
    Continue,
    Data,
    Error,
    Event,
    GoAway,
    Hello,
    Limits,
    NeedData,
    Notice,
    NoticeKind,
    Op,
    Request,
    RequestedLimits,
    Response,
    Result,
    Rows,
    Scope,
    Secret,
    Welcome,
)
from ._frames import (
    DecodeError,
    encode_frame,
    encode_header,
    pack_control,
    pack_rows,
    unpack_control,
    unpack_rows,
)
from ._schema import (
    GOAWAY,
    HELLO,
    NOTICE,
    OPS,
    REQUEST,
    RESPONSE_DATA,
    RESPONSE_ROWS,
    WELCOME,
    BodyKind,
    SchemaError,
    v_scalar,
)
from ._state import CONNECTION, STREAM, ConnEvent, ConnState, StreamEvent, StreamState

__all__ = ["Connection", "negotiate_limits"]

_COMPACT_AT = 256 << 10
#: default largest single receive_data() chunk
DEFAULT_MAX_READ = 1 << 20
#: how many aborted uploads whose in-flight frames we still drop
_MAX_ABORTED = 8

# which side may send which frame type
_SENDABLE: dict[Role, frozenset[FrameType]] = {
    Role.CLIENT: frozenset({FrameType.HELLO, FrameType.REQUEST, FrameType.DATA, FrameType.ROWS,
                            FrameType.CANCEL, FrameType.ERROR}),
    Role.SERVER: frozenset({FrameType.WELCOME, FrameType.CONTINUE, FrameType.DATA,
                            FrameType.ROWS, FrameType.RESPONSE, FrameType.RESULT,
                            FrameType.ERROR, FrameType.GOAWAY, FrameType.NOTICE}),
}
_ALLOWED_FLAGS: dict[FrameType, FrameFlag] = {t: FrameFlag.NONE for t in FrameType}
_ALLOWED_FLAGS[FrameType.DATA] = FrameFlag.END_STREAM
_ALLOWED_FLAGS[FrameType.ROWS] = FrameFlag.END_STREAM
_ALLOWED_FLAGS[FrameType.REQUEST] = FrameFlag.BODY
# int(): ~ on an IntFlag only complements within the defined flags, so it would let
# unknown bits (0x04..0x80) through
_ALLOWED_FLAG_BITS: dict[FrameType, int] = {t: int(f) for t, f in _ALLOWED_FLAGS.items()}
#: lookup tables for the header's type and flags bytes (cheaper than enum calls)
_FRAME_TYPES: dict[int, FrameType] = {int(t): t for t in FrameType}
_DATA_TYPE = int(FrameType.DATA)
_FLAGS: tuple[FrameFlag, ...] = tuple(FrameFlag(b & int(FrameFlag.END_STREAM | FrameFlag.BODY))
                                      for b in range(256))
# request id: 0 = must be zero, 1 = must be non-zero, None = either
_RID_RULE: dict[FrameType, int | None] = {
    FrameType.HELLO: 0, FrameType.WELCOME: 0, FrameType.GOAWAY: 0,
    FrameType.REQUEST: 1, FrameType.CONTINUE: 1, FrameType.DATA: 1, FrameType.ROWS: 1,
    FrameType.RESPONSE: 1, FrameType.RESULT: 1, FrameType.CANCEL: 1,
    FrameType.ERROR: None, FrameType.NOTICE: None,
}
_EMPTY_PAYLOAD = frozenset({FrameType.CONTINUE, FrameType.CANCEL})
_BODY_TYPES = {FrameType.DATA: BodyKind.DATA, FrameType.ROWS: BodyKind.ROWS}
_CELL_TYPES: dict[ColumnType, type] = {
    ColumnType.TEXT: str, ColumnType.INT: int, ColumnType.FLOAT: float,
    ColumnType.BOOL: bool, ColumnType.BYTES: bytes,
}


def _check_limits(limits: Limits | RequestedLimits) -> str | None:
    """Return a complaint if limits are outside what CWP/1 allows, else None."""
    fp, cs, mp = limits.max_frame_payload, limits.max_control_size, limits.max_pending
    if fp is not None and not MIN_FRAME_PAYLOAD <= fp <= MAX_FRAME_PAYLOAD_CEILING:
        return f"max_frame_payload must be {MIN_FRAME_PAYLOAD}..{MAX_FRAME_PAYLOAD_CEILING}"
    if cs is not None and not MIN_CONTROL_SIZE <= cs <= (fp or MAX_FRAME_PAYLOAD_CEILING):
        return f"max_control_size must be {MIN_CONTROL_SIZE}..max_frame_payload"
    if mp is not None and not 1 <= mp <= MAX_PENDING_CEILING:
        return f"max_pending must be 1..{MAX_PENDING_CEILING}"
    if isinstance(limits, Limits) and limits.max_hold_seconds < 0:
        return "max_hold_seconds must be >= 0"
    return None


def negotiate_limits(requested: RequestedLimits, offered: Limits) -> Limits:
    """The limits a server puts in WELCOME: the smaller of what was asked and offered.

    Args:
        requested: the client's HELLO limits (None fields mean "your default").
        offered: the server's own maxima.

    Returns:
        The negotiated :class:`Limits`, always within the protocol's floors.

    Raises:
        ValueError: ``requested`` or ``offered`` is outside what CWP/1 allows.
    """
    problem = _check_limits(requested) or _check_limits(offered)
    if problem:
        raise ValueError(problem)
    fp = min(requested.max_frame_payload or offered.max_frame_payload, offered.max_frame_payload)
    cs = min(requested.max_control_size or offered.max_control_size, offered.max_control_size, fp)
    mp = min(requested.max_pending or offered.max_pending, offered.max_pending)
    return Limits(max_frame_payload=fp, max_control_size=cs, max_pending=mp,
                  max_hold_seconds=offered.max_hold_seconds)


@dataclass(slots=True)
class _Stream:
    op: Op
    state: StreamState
    upload_arity: int | None = None            # insert: number of columns per row
    columns: tuple[Column, ...] | None = None  # streamed ROWS response: declared columns
    expected_size: int | None = None           # put 'size' / get RESPONSE 'size'
    seen_size: int = 0
    cancelled: bool = False


@dataclass(slots=True)
class _PartialData:
    sender: Role
    request_id: int
    remaining: int
    end_stream: bool
    swallow: bool


class _Swallowed:
    __slots__ = ()


_SWALLOWED = _Swallowed()


class Connection:
    """One side (``our_role``) of a CWP/1 connection.

    Args:
        our_role: ``Role.CLIENT`` or ``Role.SERVER``.
        max_frame_payload: largest frame payload accepted or sent before WELCOME, and the
            upper bound a server offers. After WELCOME the negotiated value applies.
        max_control_size: largest control-map payload (HELLO, REQUEST, RESULT, ...).
        max_pending: most unfinished requests at once.
        max_read: largest chunk one :meth:`receive_data` call may feed (the adapter's
            read size). The receive buffer never holds more than one incomplete frame
            (header plus at most ``max_frame_payload``) plus one read: feeding more
            without draining :meth:`next_event` is a ``LocalProtocolError``.
        data_views: hand out the DATA pieces cut from a ``bytes`` read kept in place as
            ``memoryview`` slices of it instead of ``bytes`` copies (``Data.data`` is then
            a read-only view of an immutable read; a relay sends and records it as it is).
            Off by default: applications get ``bytes``.

    Raises:
        ValueError: a limit is outside the protocol's floors and ceilings.
    """

    def __init__(
        self,
        our_role: Role,
        *,
        max_frame_payload: int = DEFAULT_MAX_FRAME_PAYLOAD,
        max_control_size: int = DEFAULT_MAX_CONTROL_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_read: int = DEFAULT_MAX_READ,
        data_views: bool = False,
    ) -> None:
        if not 1 <= max_read <= MAX_FRAME_PAYLOAD_CEILING:
            raise ValueError(f"max_read must be 1..{MAX_FRAME_PAYLOAD_CEILING}")
        self.max_read = max_read
        self.data_views = data_views
        self.our_role = our_role
        self.their_role = our_role.peer
        limits = Limits(max_frame_payload=max_frame_payload, max_control_size=max_control_size,
                        max_pending=max_pending)
        problem = _check_limits(limits)
        if problem:
            raise ValueError(problem)
        self.limits = limits
        self.session_id: str | None = None
        self.scope: Scope | None = None
        self._state = ConnState.START
        self._buf = bytearray()
        self._pos = 0
        #: a received ``bytes`` object read in place (no copy into ``_buf``) while a DATA
        #: frame's payload is streaming through; ``_buf`` is empty meanwhile
        self._direct: bytes | None = None
        self._dpos = 0
        self._eof = False
        self._streams: dict[int, _Stream] = {}
        self._last_request_id = 0
        self._uploading: int | None = None
        # uploads answered with ERROR mid-body: their late frames are dropped (bounded)
        self._aborted_uploads: deque[int] = deque(maxlen=_MAX_ABORTED)
        self._partial: _PartialData | None = None
        self._goaway_last: int | None = None
        self._requested: RequestedLimits | None = None  # the HELLO's limits, once seen
        self._error: ProtocolError | None = None

    # --- introspection ---------------------------------------------------------------

    @property
    def state(self) -> ConnState:
        return self._state

    @property
    def pending(self) -> int:
        """Number of requests that have no final RESULT/ERROR yet."""
        return len(self._streams)

    def stream_state(self, request_id: int) -> StreamState:
        """State of one request (DONE once finished or never seen)."""
        stream = self._streams.get(request_id)
        return stream.state if stream else StreamState.DONE

    def stream_op(self, request_id: int) -> Op | None:
        stream = self._streams.get(request_id)
        return stream.op if stream else None

    @property
    def goaway_last_request_id(self) -> int | None:
        return self._goaway_last

    @property
    def uploading(self) -> int | None:
        """The request whose body is being uploaded (CONTINUE given, no END_STREAM yet)."""
        return self._uploading

    @property
    def last_request_id(self) -> int:
        """The highest request id seen so far (sent or received); 0 before any."""
        return self._last_request_id

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        direct = 0 if self._direct is None else len(self._direct) - self._dpos
        return len(self._buf) - self._pos + direct

    # --- receiving ---------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed (EOF).

        Call :meth:`next_event` until it returns NEED_DATA before feeding more, so the
        buffer holds at most one read plus one incomplete frame header or control payload.

        Raises:
            LocalProtocolError: data after EOF, or the connection is in the ERROR state.
        """
        if self._error is not None:
            raise LocalProtocolError(f"connection is in the ERROR state: {self._error.message}")
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("received data after EOF")
        if len(data) > self.max_read:
            raise LocalProtocolError(f"receive_data() got {len(data)} bytes, more than "
                                     f"max_read={self.max_read}")
        if self.buffered + len(data) > self.limits.max_frame_payload + HEADER_SIZE + self.max_read:
            raise LocalProtocolError("receive buffer limit exceeded: call next_event() until "
                                     "NEED_DATA before feeding more")
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        if type(data) is bytes and self._partial is not None and not self.buffered:
            # the middle of a DATA payload: hand out pieces of ``data`` itself (the whole
            # object when the read lies inside the payload), not copies
            self._direct = data
            self._dpos = 0
            return
        self._undirect()  # fed again before draining: keep the byte order
        self._buf += data

    def next_event(self) -> Event | NeedData:
        """Return the next event from received bytes, or NEED_DATA.

        Raises:
            RemoteProtocolError: the peer sent invalid bytes (also on every later call).
        """
        if self._error is not None:
            raise RemoteProtocolError(
                f"connection is in the ERROR state: {self._error.message}", code=self._error.code
            )
        try:
            while True:
                event = self._next_event()
                if event is not _SWALLOWED:
                    assert not isinstance(event, _Swallowed)
                    return event
        except RemoteProtocolError as exc:
            self._error = exc
            self._state = ConnState.ERROR
            raise

    def _remote(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR,
                request_id: int = 0) -> NoReturn:
        raise RemoteProtocolError(message, code=code, request_id=request_id)

    def _compact(self) -> None:
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_AT and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def _undirect(self) -> None:
        """Move what is left of a read kept in place into ``_buf`` (after what is there)."""
        if self._direct is not None:
            self._buf += memoryview(self._direct)[self._dpos:]
            self._direct = None

    def _next_event(self) -> Event | NeedData | _Swallowed:
        direct = self._direct
        if direct is not None:
            start = self._dpos
            if self._partial is not None:
                n = min(len(direct) - start, self._partial.remaining)
                if n == len(direct):
                    piece = direct
                elif self.data_views:  # a view of the immutable read, typed as what it reads as
                    piece = cast(bytes, memoryview(direct)[start : start + n])
                else:
                    piece = direct[start : start + n]
                self._dpos = start + n
                if self._dpos == len(direct):
                    self._direct = None
                return self._data_piece(self._partial, piece)
            if (len(direct) - start >= HEADER_SIZE and direct[start] == _DATA_TYPE
                    and self._pos == len(self._buf)):
                # the payload ended inside this read and the next DATA frame starts in
                # it: its header is parsed in place and its payload handed out from the
                # read too (large reads and large frames seldom line up, and moving the
                # rest of each read into _buf copied about half of every byte twice)
                _, raw_flags, reserved, rid, length = HEADER.unpack_from(direct, start)
                self._dpos = start + HEADER_SIZE
                if self._dpos == len(direct):
                    self._direct = None
                return self._start_data(raw_flags, reserved, rid, length)
            self._undirect()  # anything else: parse the rest from _buf
        if self._partial is not None:
            return self._next_data_piece(self._partial)
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            if self._eof:
                if avail:
                    self._remote("connection closed in the middle of a frame header")
                self._state = ConnState.CLOSED if self._state is not ConnState.ERROR else self._state
                return ConnectionClosed()
            return NEED_DATA
        raw_type, raw_flags, reserved, rid, length = HEADER.unpack_from(self._buf, self._pos)
        if raw_type == _DATA_TYPE:
            self._pos += HEADER_SIZE
            return self._start_data(raw_flags, reserved, rid, length)
        ftype, flags = self._check_header(self.their_role, raw_type, raw_flags, reserved, rid, length)
        if avail < HEADER_SIZE + length:
            if self._eof:
                self._remote("connection closed in the middle of a frame")
            return NEED_DATA
        start = self._pos + HEADER_SIZE
        payload = bytes(self._buf[start : start + length])
        event = self._decode(ftype, flags, rid, payload)
        self._pos = start + length
        self._compact()
        return event

    def _start_data(self, raw_flags: int, reserved: int, rid: int,
                    length: int) -> Event | NeedData | _Swallowed:
        """A DATA header was read (the caller moved past it): check it, then hand out the
        first piece of its payload (from the read kept in place, or from ``_buf``)."""
        _, flags = self._check_header(self.their_role, _DATA_TYPE, raw_flags, reserved, rid, length)
        swallow, next_state = self._check_body(self.their_role, rid, BodyKind.DATA,
                                               bool(flags & FrameFlag.END_STREAM), length)
        del next_state  # applied when the last piece is handed out
        self._partial = _PartialData(
            sender=self.their_role, request_id=rid, remaining=length,
            end_stream=bool(flags & FrameFlag.END_STREAM), swallow=swallow,
        )
        if self._direct is not None:
            return self._next_event()
        return self._next_data_piece(self._partial)

    def _next_data_piece(self, partial: _PartialData) -> Event | NeedData | _Swallowed:
        avail = len(self._buf) - self._pos
        n = min(avail, partial.remaining)
        if n == 0 and partial.remaining:
            if self._eof:
                self._remote("connection closed in the middle of a DATA frame")
            return NEED_DATA
        with memoryview(self._buf) as view:
            piece = bytes(view[self._pos : self._pos + n])
        self._pos += n
        self._compact()
        return self._data_piece(partial, piece)

    def _data_piece(self, partial: _PartialData, piece: bytes) -> Event | _Swallowed:
        """Account for ``piece``, the next bytes of ``partial``'s payload."""
        n = len(piece)
        partial.remaining -= n
        last = partial.remaining == 0
        if last:
            self._partial = None
        rid = partial.request_id
        if not partial.swallow and rid not in self._streams:
            # our side finished the request (ERROR, or ERROR(0)) while this frame was
            # arriving: drop the rest of it like any late body frame
            partial.swallow = True
        if partial.swallow:
            if last and partial.end_stream:
                self._forget_aborted(rid)
            return _SWALLOWED
        end = last and partial.end_stream
        self._account_body(partial.sender, rid, n, end)
        return Data(request_id=rid, data=piece, end_stream=end)

    # --- header and payload checks (shared by both directions) ------------------------------

    def _check_header(self, sender: Role, raw_type: int, raw_flags: int, reserved: int,
                      rid: int, length: int) -> tuple[FrameType, FrameFlag]:
        ftype = _FRAME_TYPES.get(raw_type)  # a dict lookup: FrameType(x) costs an enum call
        if ftype is None:
            self._fail(sender, f"unknown frame type 0x{raw_type:02x}")
        if reserved:
            self._fail(sender, f"{ftype.name}: reserved header bits are not zero")
        if not 0 <= rid <= MAX_REQUEST_ID:  # only reachable from send(): a u32 on the wire
            self._fail(sender, f"{ftype.name}: request id {rid} is out of range")
        if raw_flags & ~_ALLOWED_FLAG_BITS[ftype]:
            self._fail(sender, f"{ftype.name}: flags 0x{raw_flags:02x} not allowed")
        if ftype not in _SENDABLE[sender]:
            self._fail(sender, f"{ftype.name} may not be sent by the {sender}")
        rule = _RID_RULE[ftype]
        if rule == 0 and rid != 0:
            self._fail(sender, f"{ftype.name} must have request id 0")
        if rule == 1 and rid == 0:
            self._fail(sender, f"{ftype.name} needs a non-zero request id")
        if ftype in _BODY_TYPES:
            if length > self.limits.max_frame_payload:
                self._fail(sender, f"{ftype.name} payload of {length} bytes exceeds max_frame_payload "
                             f"{self.limits.max_frame_payload}", ErrorCode.FRAME_TOO_LARGE, rid)
        elif ftype in _EMPTY_PAYLOAD:
            if length:
                self._fail(sender, f"{ftype.name} must have an empty payload")
        elif length > self.limits.max_control_size:
            self._fail(sender, f"{ftype.name} payload of {length} bytes exceeds max_control_size "
                         f"{self.limits.max_control_size}", ErrorCode.FRAME_TOO_LARGE, rid)
        return ftype, _FLAGS[raw_flags]

    def _decode(self, ftype: FrameType, flags: FrameFlag, rid: int,
                payload: bytes) -> Event | _Swallowed:
        sender = self.their_role
        try:
            if ftype is FrameType.ROWS:
                rows = unpack_rows(payload)
                event: Event = Rows(request_id=rid, rows=rows,
                                    end_stream=bool(flags & FrameFlag.END_STREAM))
            elif ftype in _EMPTY_PAYLOAD:
                event = (Continue if ftype is FrameType.CONTINUE else Cancel)(request_id=rid)
            else:
                event = self._control_event(ftype, flags, rid, unpack_control(payload))
        except DecodeError as exc:
            self._remote(f"{ftype.name}: {exc}", request_id=rid)
        except SchemaError as exc:
            self._remote(f"{ftype.name}: {exc}", request_id=rid)
        if not self._apply(sender, event, flags):
            return _SWALLOWED
        return event

    def _control_event(self, ftype: FrameType, flags: FrameFlag, rid: int,
                       obj: dict[str, Any]) -> Event:
        """Build a control event from a decoded map (validating it). Raises SchemaError."""
        if ftype in (FrameType.HELLO, FrameType.WELCOME):
            # the version decides how the rest reads: check it before any other field
            version = obj.get("version")
            if type(version) is int and version != PROTOCOL_VERSION:
                raise RemoteProtocolError(f"unsupported protocol version {version}",
                                          code=ErrorCode.UNSUPPORTED_VERSION)
        if ftype is FrameType.HELLO:
            m = HELLO(obj, "")
            lim = m.get("limits", {})
            key = m.get("api_key")
            return Hello(client=m["client"], version=m["version"],
                         api_key=Secret(key) if key is not None else None,
                         limits=RequestedLimits(**lim))
        if ftype is FrameType.WELCOME:
            m = WELCOME(obj, "")
            sc = m["scope"]
            return Welcome(server=m["server"], session_id=m["session_id"], version=m["version"],
                           limits=Limits(**m["limits"]),
                           scope=Scope(buckets=sc["buckets"], tables=sc["tables"],
                                       access=tuple(Access(a) for a in sc["access"])))
        if ftype is FrameType.REQUEST:
            m = REQUEST(obj, "")
            try:
                op = Op(m["op"])
            except ValueError:
                raise RemoteProtocolError(f"unknown operation {m['op']!r}",
                                          code=ErrorCode.UNKNOWN_OPERATION,
                                          request_id=rid) from None
            spec = OPS[op]
            if bool(flags & FrameFlag.BODY) != (spec.body is not None):
                raise SchemaError("<flags>", f"BODY flag {'missing' if spec.body else 'set'} "
                                  f"for operation {op}")
            args = spec.args(m["args"], "args")
            return Request(request_id=rid, op=op, args=args, reason=m.get("reason"))
        if ftype is FrameType.RESPONSE:
            stream = self._stream_for(rid, ftype)
            spec = OPS[stream.op]
            if spec.response is BodyKind.DATA:
                m = RESPONSE_DATA(obj, "")
                return Response(request_id=rid, size=m["size"])
            if spec.response is BodyKind.ROWS:
                m = RESPONSE_ROWS(obj, "")
                return Response(request_id=rid, columns=tuple(
                    Column(name=n, type=ColumnType(t)) for n, t in m["columns"]))
            raise SchemaError("<frame>", f"operation {stream.op} has no streamed response")
        if ftype is FrameType.RESULT:
            stream = self._stream_for(rid, ftype)
            return Result(request_id=rid, fields=OPS[stream.op].result(obj, ""))
        if ftype is FrameType.ERROR:
            from ._schema import ERROR  # local: name clash with the event class
            m = ERROR(obj, "")
            return Error(request_id=rid, code=_error_code(m["code"]), message=m["message"])
        if ftype is FrameType.GOAWAY:
            m = GOAWAY(obj, "")
            return GoAway(last_request_id=m["last_request_id"], code=_error_code(m["code"]),
                          message=m["message"])
        if ftype is FrameType.NOTICE:
            m = NOTICE(obj, "")
            kind = _notice_kind(m["kind"])
            return Notice(request_id=rid, kind=kind, message=m["message"],
                          approval_id=m.get("approval_id"), hold_seconds=m.get("hold_seconds"),
                          expires_at=m.get("expires_at"))
        raise AssertionError(ftype)  # pragma: no cover

    def _stream_for(self, rid: int, ftype: FrameType) -> _Stream:
        stream = self._streams.get(rid)
        if stream is None:
            raise SchemaError("<frame>", f"{ftype.name} for unknown or finished request {rid}")
        return stream

    # --- the state machine --------------------------------------------------------------

    def _fail(self, sender: Role, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR,
              request_id: int = 0) -> NoReturn:
        cls = LocalProtocolError if sender is self.our_role else RemoteProtocolError
        raise cls(message, code=code, request_id=request_id)

    def _conn(self, sender: Role, event: ConnEvent) -> None:
        new = CONNECTION.get((sender, self._state, event))
        if new is None:
            self._fail(sender, f"{event.value} from the {sender} is not allowed in "
                               f"connection state {self._state.value}")
        self._state = new

    def _stream(self, sender: Role, rid: int, event: StreamEvent) -> tuple[_Stream, StreamState]:
        stream = self._streams.get(rid)
        if stream is None:
            self._fail(sender, f"{event.value} from the {sender} for unknown or finished "
                               f"request {rid}", request_id=rid)
        new = STREAM.get((sender, stream.state, event))
        if new is None:
            self._fail(sender, f"{event.value} from the {sender} is not allowed for request "
                               f"{rid} in state {stream.state.value}", request_id=rid)
        return stream, new

    def _set_stream(self, rid: int, stream: _Stream, new: StreamState) -> None:
        old = stream.state
        stream.state = new
        if old is StreamState.UPLOADING and new is not StreamState.UPLOADING:
            self._uploading = None
        if new is StreamState.DONE:
            del self._streams[rid]

    def _check_body(self, sender: Role, rid: int, kind: BodyKind, end: bool,
                    length: int) -> tuple[bool, StreamState | None]:
        """Validate a DATA/ROWS frame header. Returns (swallow, next state)."""
        if sender is Role.CLIENT and rid in self._aborted_uploads:
            # the server already answered this upload with ERROR: late body frames are
            # dropped until its END_STREAM (or the next upload)
            return True, None
        self._conn(sender, ConnEvent.STREAM_FRAME)
        stream, new = self._stream(sender, rid, StreamEvent.BODY_END if end else StreamEvent.BODY)
        spec = OPS[stream.op]
        want = spec.body if sender is Role.CLIENT else spec.response
        if want is not kind:
            self._fail(sender, f"{kind.upper()} frame for a {stream.op} request", request_id=rid)
        if stream.expected_size is not None and kind is BodyKind.DATA:
            total = stream.seen_size + length
            if total > stream.expected_size or (end and total != stream.expected_size):
                self._fail(sender, f"body of request {rid} does not match its declared size "
                                   f"{stream.expected_size}", request_id=rid)
        return False, new

    def _account_body(self, sender: Role, rid: int, n: int, end: bool) -> None:
        """Count a received DATA piece; on END apply the stream transition."""
        stream = self._streams[rid]
        stream.seen_size += n
        if end:
            self._set_stream(rid, stream, STREAM[(sender, stream.state, StreamEvent.BODY_END)])

    def _check_rows(self, sender: Role, stream: _Stream, rid: int,
                    rows: Sequence[Sequence[Any]]) -> None:
        if stream.columns is not None:
            types = [_CELL_TYPES[c.type] for c in stream.columns]
            arity = len(types)
            for i, row in enumerate(rows):
                if len(row) != arity:
                    self._fail(sender, f"ROWS row {i} has {len(row)} cells, expected {arity}",
                               request_id=rid)
                for j, (cell, t) in enumerate(zip(row, types, strict=True)):
                    if cell is not None and type(cell) is not t:
                        self._fail(sender, f"ROWS row {i} column {stream.columns[j].name!r}: "
                                           f"expected {stream.columns[j].type}, got "
                                           f"{type(cell).__name__}", request_id=rid)
                    try:
                        v_scalar(cell, f"rows[{i}][{j}]")  # integers: the i64 range
                    except SchemaError as exc:
                        self._fail(sender, f"ROWS {exc}", request_id=rid)
        else:
            arity = stream.upload_arity or 0
            for i, row in enumerate(rows):
                if len(row) != arity:
                    self._fail(sender, f"ROWS row {i} has {len(row)} cells, expected {arity}",
                               request_id=rid)
                for j, cell in enumerate(row):
                    try:
                        v_scalar(cell, f"rows[{i}][{j}]")
                    except SchemaError as exc:
                        self._fail(sender, f"ROWS {exc}", request_id=rid)

    def _forget_aborted(self, rid: int) -> None:
        if rid in self._aborted_uploads:
            self._aborted_uploads.remove(rid)

    def _apply(self, sender: Role, event: Event, flags: FrameFlag = FrameFlag.NONE) -> bool:
        """Run ``event`` (sent by ``sender``) through the state machine.

        Returns False when the event is a late frame that is dropped (a body frame of an
        upload already answered with ERROR, a CANCEL that crossed the final answer).
        """
        if isinstance(event, Request):
            if sender is self.our_role and self._state is ConnState.DRAINING:
                self._fail(sender, "no new requests after GOAWAY", request_id=event.request_id)
            self._conn(sender, ConnEvent.REQUEST)
            rid = event.request_id
            if not self._last_request_id < rid <= MAX_REQUEST_ID:
                self._fail(sender, f"request id {rid} is not greater than {self._last_request_id}",
                           request_id=rid)
            if len(self._streams) >= self.limits.max_pending:
                self._fail(sender, f"more than max_pending={self.limits.max_pending} requests",
                           ErrorCode.TOO_MANY_PENDING, rid)
            self._last_request_id = rid
            spec = OPS[event.op]
            if spec.body is not None:
                state = StreamState.AWAIT_CONTINUE
            elif spec.response is not None:
                state = StreamState.AWAIT_HEAD
            else:
                state = StreamState.AWAIT_RESULT
            stream = _Stream(op=spec.op, state=state)
            if spec.op is Op.INSERT:
                stream.upload_arity = len(event.args["columns"])
            if spec.op is Op.PUT and "size" in event.args:
                stream.expected_size = event.args["size"]
            self._streams[rid] = stream
        elif isinstance(event, Data):
            raise AssertionError("DATA is applied by the body path")  # pragma: no cover
        elif isinstance(event, Rows):
            rid = event.request_id
            swallow, new = self._check_body(sender, rid, BodyKind.ROWS, event.end_stream, 0)
            if swallow:
                if event.end_stream:
                    self._forget_aborted(rid)
                return False
            stream = self._streams[rid]
            self._check_rows(sender, stream, rid, event.rows)
            assert new is not None
            self._set_stream(rid, stream, new)
        elif isinstance(event, Continue):
            self._conn(sender, ConnEvent.STREAM_FRAME)
            stream, new = self._stream(sender, event.request_id, StreamEvent.CONTINUE)
            if new is StreamState.UPLOADING:
                if self._uploading is not None:
                    self._fail(sender, f"CONTINUE for request {event.request_id} while request "
                                       f"{self._uploading} is still uploading",
                               request_id=event.request_id)
                self._uploading = event.request_id
            self._set_stream(event.request_id, stream, new)
        elif isinstance(event, Response):
            self._conn(sender, ConnEvent.STREAM_FRAME)
            stream, new = self._stream(sender, event.request_id, StreamEvent.RESPONSE)
            spec = OPS[stream.op]
            if spec.response is BodyKind.DATA:
                if event.size is None or event.columns is not None:
                    self._fail(sender, f"RESPONSE for {stream.op} needs size and no columns",
                               request_id=event.request_id)
                stream.expected_size = event.size
                stream.seen_size = 0
            elif spec.response is BodyKind.ROWS:
                if event.columns is None or event.size is not None:
                    self._fail(sender, f"RESPONSE for {stream.op} needs columns and no size",
                               request_id=event.request_id)
                stream.columns = event.columns
            self._set_stream(event.request_id, stream, new)
        elif isinstance(event, Result):
            self._conn(sender, ConnEvent.STREAM_FRAME)
            stream, new = self._stream(sender, event.request_id, StreamEvent.RESULT)
            self._set_stream(event.request_id, stream, new)
        elif isinstance(event, Error):
            if event.request_id == 0:
                self._conn(sender, ConnEvent.ERROR_SESSION)
                self._streams.clear()
                self._uploading = None
                self._aborted_uploads.clear()  # nothing more is accepted, not even late body
                return True
            self._conn(sender, ConnEvent.STREAM_FRAME)
            stream, new = self._stream(sender, event.request_id, StreamEvent.ERROR)
            if stream.state is StreamState.UPLOADING:
                self._aborted_uploads.append(event.request_id)
            self._set_stream(event.request_id, stream, new)
        elif isinstance(event, Cancel):
            self._conn(sender, ConnEvent.STREAM_FRAME)
            rid = event.request_id
            if (sender is self.their_role and rid not in self._streams
                    and 0 < rid <= self._last_request_id):
                # the client cancelled a request we already answered: the CANCEL crossed
                # our RESULT/ERROR and is dropped
                self._forget_aborted(rid)
                return False
            stream, new = self._stream(sender, rid, StreamEvent.CANCEL)
            if stream.cancelled:
                self._fail(sender, f"request {event.request_id} was already cancelled",
                           request_id=event.request_id)
            stream.cancelled = True
            self._set_stream(event.request_id, stream, new)
        elif isinstance(event, Notice):
            if event.request_id == 0:
                self._conn(sender, ConnEvent.NOTICE_SESSION)
            else:
                self._conn(sender, ConnEvent.STREAM_FRAME)
                stream, new = self._stream(sender, event.request_id, StreamEvent.NOTICE)
        elif isinstance(event, GoAway):
            self._conn(sender, ConnEvent.GOAWAY)
            if self._goaway_last is not None and event.last_request_id > self._goaway_last:
                self._fail(sender, "GOAWAY may not raise last_request_id")
            self._goaway_last = event.last_request_id
        elif isinstance(event, Hello):
            if event.version != PROTOCOL_VERSION:
                self._fail(sender, f"unsupported protocol version {event.version}",
                           ErrorCode.UNSUPPORTED_VERSION)
            problem = _check_limits(event.limits)
            if problem:
                self._fail(sender, f"HELLO limits: {problem}")
            self._conn(sender, ConnEvent.HELLO)
            self._requested = event.limits
        elif isinstance(event, Welcome):
            if event.version != PROTOCOL_VERSION:
                self._fail(sender, f"unsupported protocol version {event.version}",
                           ErrorCode.UNSUPPORTED_VERSION)
            problem = _check_limits(event.limits)
            if problem:
                self._fail(sender, f"WELCOME limits: {problem}")
            self._conn(sender, ConnEvent.WELCOME)
            asked = self._requested
            for name in ("max_frame_payload", "max_control_size", "max_pending"):
                want = getattr(asked, name, None)
                if want is not None and getattr(event.limits, name) > want:
                    self._fail(sender, f"WELCOME {name}={getattr(event.limits, name)} is more "
                                       f"than the HELLO asked for ({want})")
            self.limits = event.limits
            self.session_id = event.session_id
            self.scope = event.scope
        else:
            raise LocalProtocolError(f"not a CWP/1 event: {type(event).__name__}")
        return True

    # --- sending -----------------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """Validate ``event`` against the state machine and return the bytes to write.

        Returns ``b""`` for body frames of an upload the server already answered with
        ERROR (they are dropped, never an error: the client may not have seen the ERROR
        yet).

        Raises:
            LocalProtocolError: the event is invalid here; the connection enters ERROR.
        """
        if self._error is not None:
            raise LocalProtocolError(f"connection is in the ERROR state: {self._error.message}",
                                     code=self._error.code)
        try:
            return self._send(event)
        except LocalProtocolError as exc:
            self._error = exc
            self._state = ConnState.ERROR
            raise

    def send_data(self, event: Data) -> tuple[bytes | memoryview, ...]:
        """:meth:`send` for a DATA event, with the frame's header and payload apart: the
        payload is handed back as it came (not copied into a frame), for a vectored send.

        Returns:
            ``(header, payload)``, or ``()`` where :meth:`send` returns ``b""``.

        Raises:
            LocalProtocolError: as :meth:`send`.
        """
        if self._error is not None:
            raise LocalProtocolError(f"connection is in the ERROR state: {self._error.message}",
                                     code=self._error.code)
        try:
            return self._send_data(self.our_role, event)
        except LocalProtocolError as exc:
            self._error = exc
            self._state = ConnState.ERROR
            raise

    def _send_data(self, us: Role, event: Data) -> tuple[bytes | memoryview, ...]:
        # bytes, or a read-only byte view (data_views) sent as it is; anything else is
        # copied first, so that every length below counts bytes
        data: bytes | memoryview = event.data
        if type(data) is not bytes and not (isinstance(data, memoryview) and data.readonly
                                            and data.format == "B"):
            data = bytes(data)
        rid = event.request_id
        self._check_header(us, FrameType.DATA, int(FrameFlag.END_STREAM if event.end_stream
                           else FrameFlag.NONE), 0, rid, len(data))
        swallow, new = self._check_body(us, rid, BodyKind.DATA, event.end_stream, len(data))
        if swallow:
            if event.end_stream:
                self._forget_aborted(rid)
            return ()
        stream = self._streams[rid]
        stream.seen_size += len(data)
        assert new is not None
        self._set_stream(rid, stream, new)
        flags = FrameFlag.END_STREAM if event.end_stream else FrameFlag.NONE
        return encode_header(FrameType.DATA, flags, rid, len(data)), data

    def _encode_control(self, ftype: FrameType, obj: Mapping[str, Any], rid: int,
                        flags: FrameFlag = FrameFlag.NONE) -> bytes:
        payload = pack_control(obj)
        if len(payload) > self.limits.max_control_size:
            raise LocalProtocolError(f"{ftype.name} payload of {len(payload)} bytes exceeds "
                                     f"max_control_size {self.limits.max_control_size}",
                                     code=ErrorCode.FRAME_TOO_LARGE, request_id=rid)
        return encode_frame(ftype, flags, rid, payload)

    def _send(self, event: Event) -> bytes:
        us = self.our_role
        try:
            return self._send_checked(us, event)
        except SchemaError as exc:
            raise LocalProtocolError(f"{type(event).__name__}: {exc}") from exc

    def _send_checked(self, us: Role, event: Event) -> bytes:
        if isinstance(event, Data):
            return b"".join(self._send_data(us, event))
        if isinstance(event, Rows):
            rid = event.request_id
            flags = FrameFlag.END_STREAM if event.end_stream else FrameFlag.NONE
            try:
                payload = pack_rows(event.rows)
            except (TypeError, ValueError, OverflowError) as exc:
                raise LocalProtocolError(f"ROWS: cannot encode rows: {exc}",
                                         request_id=rid) from exc
            self._check_header(us, FrameType.ROWS, int(flags), 0, rid, len(payload))
            if us is Role.CLIENT and rid in self._aborted_uploads:
                if event.end_stream:
                    self._forget_aborted(rid)
                return b""
            self._apply(us, event)
            return encode_frame(FrameType.ROWS, flags, rid, payload)
        if isinstance(event, Request):
            spec = OPS.get(event.op)
            if spec is None:
                raise LocalProtocolError(f"unknown operation {event.op!r}",
                                         code=ErrorCode.UNKNOWN_OPERATION)
            args = spec.args(event.args, "args")
            obj: dict[str, Any] = {"op": str(event.op), "args": args}
            if event.reason is not None:
                obj["reason"] = event.reason
            REQUEST(obj, "")
            flags = FrameFlag.BODY if spec.body else FrameFlag.NONE
            self._check_header(us, FrameType.REQUEST, int(flags), 0, event.request_id, 0)
            data = self._encode_control(FrameType.REQUEST, obj, event.request_id, flags)
            self._apply(us, event)
            return data
        if isinstance(event, (Continue, Cancel)):
            ftype = FrameType.CONTINUE if isinstance(event, Continue) else FrameType.CANCEL
            self._check_header(us, ftype, 0, 0, event.request_id, 0)
            self._apply(us, event)
            return encode_frame(ftype, FrameFlag.NONE, event.request_id, b"")
        if isinstance(event, Response):
            self._check_header(us, FrameType.RESPONSE, 0, 0, event.request_id, 0)
            if event.columns is not None:
                obj = {"columns": [[c.name, str(c.type)] for c in event.columns]}
                RESPONSE_ROWS(obj, "")
            else:
                obj = {"size": event.size}
                RESPONSE_DATA(obj, "")
            data = self._encode_control(FrameType.RESPONSE, obj, event.request_id)
            self._apply(us, event)
            return data
        if isinstance(event, Result):
            self._check_header(us, FrameType.RESULT, 0, 0, event.request_id, 0)
            found = self._streams.get(event.request_id)
            if found is None:
                raise LocalProtocolError(f"RESULT for unknown or finished request "
                                         f"{event.request_id}", request_id=event.request_id)
            fields = OPS[found.op].result(event.fields, "")
            data = self._encode_control(FrameType.RESULT, fields, event.request_id)
            self._apply(us, event)
            return data
        if isinstance(event, Error):
            self._check_header(us, FrameType.ERROR, 0, 0, event.request_id, 0)
            obj = {"code": int(_error_code(event.code)), "message": event.message}
            from ._schema import ERROR
            ERROR(obj, "")
            data = self._encode_control(FrameType.ERROR, obj, event.request_id)
            self._apply(us, event)
            return data
        if isinstance(event, GoAway):
            self._check_header(us, FrameType.GOAWAY, 0, 0, 0, 0)
            obj = {"last_request_id": event.last_request_id, "code": int(_error_code(event.code)),
                   "message": event.message}
            GOAWAY(obj, "")
            data = self._encode_control(FrameType.GOAWAY, obj, 0)
            self._apply(us, event)
            return data
        if isinstance(event, Notice):
            self._check_header(us, FrameType.NOTICE, 0, 0, event.request_id, 0)
            obj = {"kind": str(_notice_kind(event.kind)), "message": event.message}
            for name in ("approval_id", "hold_seconds", "expires_at"):
                value = getattr(event, name)
                if value is not None:
                    obj[name] = value
            NOTICE(obj, "")
            data = self._encode_control(FrameType.NOTICE, obj, event.request_id)
            self._apply(us, event)
            return data
        if isinstance(event, Hello):
            self._check_header(us, FrameType.HELLO, 0, 0, 0, 0)
            obj = {"version": event.version, "client": event.client}
            if event.api_key is not None:
                obj["api_key"] = event.api_key.reveal()
            lim = {k: getattr(event.limits, k) for k in
                   ("max_frame_payload", "max_control_size", "max_pending")
                   if getattr(event.limits, k) is not None}
            if lim:
                obj["limits"] = lim
            HELLO(obj, "")
            data = self._encode_control(FrameType.HELLO, obj, 0)
            self._apply(us, event)
            return data
        if isinstance(event, Welcome):
            self._check_header(us, FrameType.WELCOME, 0, 0, 0, 0)
            neg = event.limits
            obj = {
                "version": event.version, "server": event.server, "session_id": event.session_id,
                "limits": {"max_frame_payload": neg.max_frame_payload,
                           "max_control_size": neg.max_control_size,
                           "max_pending": neg.max_pending,
                           "max_hold_seconds": neg.max_hold_seconds},
                "scope": {"buckets": list(event.scope.buckets),
                          "tables": list(event.scope.tables),
                          "access": [str(a) for a in event.scope.access]},
            }
            WELCOME(obj, "")
            data = self._encode_control(FrameType.WELCOME, obj, 0)
            self._apply(us, event)
            return data
        if isinstance(event, ConnectionClosed):
            raise LocalProtocolError("ConnectionClosed is not sent; close the transport")
        raise LocalProtocolError(f"not a CWP/1 event: {type(event).__name__}")


def _error_code(value: int) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        raise SchemaError("code", f"unknown error code {value!r}") from None


def _notice_kind(value: str) -> NoticeKind:
    try:
        return NoticeKind(value)
    except ValueError:
        raise SchemaError("kind", f"unknown notice kind {value!r}") from None
