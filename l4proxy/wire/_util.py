"""Helpers for adapters that sit around the codec."""

from __future__ import annotations

from ._constants import FrameFlag, FrameType
from ._errors import ErrorCode
from ._frames import encode_frame, pack_control

__all__ = ["connection_error_frame"]


def connection_error_frame(code: ErrorCode, message: str) -> bytes:
    """Encode ERROR(request id 0) without a Connection.

    For reporting a protocol error to the peer after the connection object has entered
    its ERROR state (and so refuses to encode anything). Send it, then close.
    """
    return encode_frame(FrameType.ERROR, FrameFlag.NONE, 0,
                        pack_control({"code": int(code), "message": message[:4096]}))
