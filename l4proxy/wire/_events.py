"""Events of CWP/1: what ``Connection.next_event()`` returns and ``Connection.send()`` takes.

Every event is a frozen, slotted, keyword-only dataclass. Control payloads that vary per
operation (request arguments, results) are carried as read-only mappings whose contents
have already been validated against the operation's schema (see ``_schema``).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from ._constants import (
    DEFAULT_MAX_CONTROL_SIZE,
    DEFAULT_MAX_FRAME_PAYLOAD,
    DEFAULT_MAX_HOLD_SECONDS,
    DEFAULT_MAX_PENDING,
    PROTOCOL_VERSION,
    Access,
)
from ._errors import ErrorCode

__all__ = [
    "NEED_DATA",
    "Cancel",
    "Column",
    "ColumnType",
    "ConnectionClosed",
    "Continue",
    "Data",
    "Error",
    "Event",
    "GoAway",
    "Hello",
    "Limits",
    "NeedData",
    "Notice",
    "NoticeKind",
    "Op",
    "Request",
    "RequestedLimits",
    "Response",
    "Result",
    "Rows",
    "Scope",
    "Secret",
    "Welcome",
]



class NeedData(Enum):
    """Returned by ``next_event()`` when more bytes are needed."""

    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA


class Op(StrEnum):
    PING = "ping"
    LIST_BUCKETS = "list_buckets"
    CREATE_BUCKET = "create_bucket"
    DELETE_BUCKET = "delete_bucket"
    LIST = "list"
    STAT = "stat"
    PUT = "put"
    GET = "get"
    DELETE = "delete"
    CHUNK = "chunk"
    CREATE_TABLE = "create_table"
    INSERT = "insert"
    SCAN = "scan"
    DROP_TABLE = "drop_table"


class ColumnType(StrEnum):
    TEXT = "text"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    BYTES = "bytes"


class NoticeKind(StrEnum):
    #: the request is held for approval (``approval_id``, ``hold_seconds`` set)
    HELD = "held"
    #: a held request was approved and proceeds
    APPROVED = "approved"
    #: the session ends soon (``expires_at`` set), e.g. the certificate expires
    EXPIRING = "expiring"
    #: anything else worth showing to the user
    INFO = "info"


class Secret:
    """A secret string (an API key). Its repr never shows the value.

    Use :meth:`reveal` at the one place the value is needed. Equality is constant-time.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> Any:
        raise TypeError("Secret values are not serialisable")


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Negotiated connection limits (WELCOME ``limits``)."""

    max_frame_payload: int = DEFAULT_MAX_FRAME_PAYLOAD
    max_control_size: int = DEFAULT_MAX_CONTROL_SIZE
    max_pending: int = DEFAULT_MAX_PENDING
    max_hold_seconds: int = DEFAULT_MAX_HOLD_SECONDS


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestedLimits:
    """Limits a client asks for in HELLO; ``None`` means "the server's default"."""

    max_frame_payload: int | None = None
    max_control_size: int | None = None
    max_pending: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Scope:
    """What the API key behind a session may reach: name globs and access classes."""

    buckets: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    access: tuple[Access, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Column:
    name: str
    type: ColumnType


class Event:
    """Base class of all CWP/1 events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Event):
    client: str
    version: int = PROTOCOL_VERSION
    api_key: Secret | None = None
    limits: RequestedLimits = field(default_factory=RequestedLimits)


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Event):
    server: str
    session_id: str
    version: int = PROTOCOL_VERSION
    limits: Limits = field(default_factory=Limits)
    scope: Scope = field(default_factory=Scope)


@dataclass(frozen=True, slots=True, kw_only=True)
class Request(Event):
    """A client request. ``args`` is validated against the operation's schema."""

    request_id: int
    op: Op
    args: Mapping[str, Any] = field(default_factory=dict)
    reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Continue(Event):
    """Permission to send the body of ``request_id``."""

    request_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Data(Event):
    """A piece of a DATA body. ``end_stream`` is set on the last piece of the body."""

    request_id: int
    data: bytes
    end_stream: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Rows(Event):
    """A ROWS frame: table rows, each a tuple of cells in column order."""

    request_id: int
    rows: Sequence[Sequence[Any]]
    end_stream: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Response(Event):
    """The head of a streamed response: ``size`` for ``get``, ``columns`` for row streams."""

    request_id: int
    size: int | None = None
    columns: tuple[Column, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Result(Event):
    """The final, successful answer to a request."""

    request_id: int
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Event):
    """The final, failed answer to a request, or (``request_id`` 0) a connection error."""

    request_id: int
    code: ErrorCode
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(Event):
    request_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GoAway(Event):
    last_request_id: int
    code: ErrorCode
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice(Event):
    """Informational message from an intermediary; ``request_id`` 0 concerns the session."""

    request_id: int
    kind: NoticeKind
    message: str
    approval_id: str | None = None
    hold_seconds: int | None = None
    expires_at: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed(Event):
    """The peer closed its side of the connection (``receive_data(b"")``)."""
