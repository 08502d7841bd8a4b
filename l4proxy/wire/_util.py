"""Helpers for adapters that sit around the codec."""

from __future__ import annotations

from ._constants import FrameFlag, FrameType
from ._errors import ErrorCode
from ._frames import encode_frame, pack_control

__all__ = ["MAX_MESSAGE_BYTES", "connection_error_frame"]

#: longest message (UTF-8 bytes) in a frame built by connection_error_frame
MAX_MESSAGE_BYTES = 900


def connection_error_frame(code: ErrorCode, message: str) -> bytes:
    """Encode ERROR(request id 0) without a Connection.

    For reporting a protocol error to the peer after the connection object has entered
    its ERROR state (and so refuses to encode anything). Send it, then close.

    The message is cut to ``MAX_MESSAGE_BYTES`` of UTF-8 so the frame fits the smallest
    ``max_control_size`` any peer may negotiate (1 KiB).
    """
    cut = message.encode("utf-8", "replace")[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore")
    return encode_frame(FrameType.ERROR, FrameFlag.NONE, 0,
                        pack_control({"code": int(code), "message": cut}))
