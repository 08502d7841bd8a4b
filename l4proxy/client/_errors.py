"""Errors raised by the chunk client, each with the CLI exit code it maps to."""

from __future__ import annotations

from l4proxy.wire import ErrorCode

__all__ = [
    "ApprovalDenied",
    "ApprovalTimedOut",
    "ClientError",
    "ConnectionFailed",
    "DeniedByPolicy",
    "IdentityRefused",
    "ProtocolViolation",
    "RequestFailed",
    "error_for_code",
]


class ClientError(Exception):
    """Base of client errors. ``exit_code`` is what ``chunk`` exits with."""

    exit_code = 2

    def __init__(self, message: str, *, code: ErrorCode | None = None, request_id: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.request_id = request_id


class RequestFailed(ClientError):
    """The server answered the request with ERROR."""

    exit_code = 2


class DeniedByPolicy(RequestFailed):
    exit_code = 3


class ApprovalDenied(RequestFailed):
    exit_code = 4


class ApprovalTimedOut(RequestFailed):
    """The approval expired, was cancelled, or we gave up waiting (and sent CANCEL)."""

    exit_code = 5


class ProtocolViolation(ClientError):
    exit_code = 6


class ConnectionFailed(ClientError):
    """Could not connect, TLS failed, the connection dropped or the server is unavailable."""

    exit_code = 7


class IdentityRefused(ClientError):
    """Certificate expired or identity locked: get a new certificate / ask an admin."""

    exit_code = 8


_BY_CODE: dict[ErrorCode, type[ClientError]] = {
    ErrorCode.DENIED_BY_POLICY: DeniedByPolicy,
    ErrorCode.APPROVAL_DENIED: ApprovalDenied,
    ErrorCode.APPROVAL_EXPIRED: ApprovalTimedOut,
    ErrorCode.APPROVAL_CANCELLED: ApprovalTimedOut,
    ErrorCode.CANCELLED: ApprovalTimedOut,
    ErrorCode.CERTIFICATE_EXPIRED: IdentityRefused,
    ErrorCode.IDENTITY_LOCKED: IdentityRefused,
    ErrorCode.UPSTREAM_UNAVAILABLE: ConnectionFailed,
    ErrorCode.OVER_CAPACITY: ConnectionFailed,
    ErrorCode.SHUTTING_DOWN: ConnectionFailed,
    ErrorCode.PROTOCOL_ERROR: ProtocolViolation,
    ErrorCode.FRAME_TOO_LARGE: ProtocolViolation,
    ErrorCode.UNSUPPORTED_VERSION: ProtocolViolation,
    ErrorCode.UNKNOWN_OPERATION: ProtocolViolation,
    ErrorCode.TOO_MANY_PENDING: ProtocolViolation,
}


def error_for_code(code: ErrorCode, message: str, request_id: int = 0) -> ClientError:
    """The exception for an ERROR frame."""
    cls = _BY_CODE.get(code, RequestFailed)
    return cls(f"{code.name}: {message}", code=code, request_id=request_id)
