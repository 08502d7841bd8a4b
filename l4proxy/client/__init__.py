"""The CWP/1 client: async on trio (:class:`ChunkClient`) plus a thin sync wrapper."""

from ._client import Call, ChunkClient, NoticeHandler, TableResult
from ._errors import (
    ApprovalDenied,
    ApprovalTimedOut,
    ClientError,
    ConnectionFailed,
    DeniedByPolicy,
    IdentityRefused,
    ProtocolViolation,
    RequestFailed,
    error_for_code,
)
from ._sync import SyncChunkClient

__all__ = [
    "ApprovalDenied",
    "ApprovalTimedOut",
    "Call",
    "ChunkClient",
    "ClientError",
    "ConnectionFailed",
    "DeniedByPolicy",
    "IdentityRefused",
    "NoticeHandler",
    "ProtocolViolation",
    "RequestFailed",
    "SyncChunkClient",
    "TableResult",
    "error_for_code",
]
