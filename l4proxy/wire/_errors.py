"""Errors of the CWP/1 codec, and the wire error codes.

Theory of operation: every failure inside the codec says whose fault it is.
``RemoteProtocolError`` means the peer sent bytes we cannot accept;
``LocalProtocolError`` means our own code tried to send something the protocol
forbids. Both carry the :class:`ErrorCode` that belongs in the ERROR frame (or,
for a local error, the code we would have received). After either, the
connection object is in the ERROR state and says so on every later call.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["ErrorCode", "LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ErrorCode(IntEnum):
    """Wire error codes (u16 in the ERROR ``code`` field). See PROTOCOL.md section 9.

    1-99 are service codes, 100-199 are reserved for intermediaries (gateways).
    """

    # connection-level, always close the connection
    PROTOCOL_ERROR = 1
    FRAME_TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    AUTH_FAILED = 4
    TOO_MANY_PENDING = 5
    UNKNOWN_OPERATION = 6
    # request-level, the connection stays open
    INVALID_ARGUMENT = 10
    NOT_FOUND = 11
    ALREADY_EXISTS = 12
    CONFLICT = 13
    FORBIDDEN = 14
    CANCELLED = 15
    INTERNAL = 16
    TOO_LARGE = 17
    # reserved for intermediaries
    DENIED_BY_POLICY = 100
    APPROVAL_DENIED = 101
    APPROVAL_EXPIRED = 102
    APPROVAL_CANCELLED = 103
    MASKING_FAILED = 104
    MASKING_UNSUPPORTED = 105
    UPSTREAM_UNAVAILABLE = 106
    UPSTREAM_AUTH_FAILED = 107
    IDENTITY_LOCKED = 108
    CERTIFICATE_EXPIRED = 109
    RECORDING_FAILED = 110
    SHUTTING_DOWN = 111
    CLIENT_CREDENTIAL_REFUSED = 112
    OVER_CAPACITY = 113

    @property
    def closes_connection(self) -> bool:
        """True when an ERROR with this code is followed by closing the connection."""
        return self in _CLOSING

    @property
    def reserved_for_intermediary(self) -> bool:
        """True for codes only an intermediary (not the service) may send."""
        return self.value >= 100


_CLOSING = frozenset(
    {
        ErrorCode.PROTOCOL_ERROR,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.AUTH_FAILED,
        ErrorCode.TOO_MANY_PENDING,
        ErrorCode.UNKNOWN_OPERATION,
        ErrorCode.UPSTREAM_UNAVAILABLE,
        ErrorCode.UPSTREAM_AUTH_FAILED,
        ErrorCode.IDENTITY_LOCKED,
        ErrorCode.CERTIFICATE_EXPIRED,
        ErrorCode.RECORDING_FAILED,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.CLIENT_CREDENTIAL_REFUSED,
        ErrorCode.OVER_CAPACITY,
    }
)


class ProtocolError(Exception):
    """Base of codec errors.

    Attributes:
        code: the wire error code that describes the failure.
        request_id: the request the failure concerns, or 0 for the connection.
    """

    def __init__(
        self, message: str, *, code: ErrorCode = ErrorCode.PROTOCOL_ERROR, request_id: int = 0
    ) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id

    @property
    def message(self) -> str:
        return str(self.args[0])


class LocalProtocolError(ProtocolError):
    """Our side tried to do something CWP/1 forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not valid CWP/1."""
