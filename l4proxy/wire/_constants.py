"""Named wire constants of CWP/1: frame types, flags, header layout, default limits."""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag, StrEnum

__all__ = [
    "DEFAULT_MAX_CONTROL_SIZE",
    "DEFAULT_MAX_FRAME_PAYLOAD",
    "DEFAULT_MAX_HOLD_SECONDS",
    "DEFAULT_MAX_PENDING",
    "HEADER",
    "HEADER_SIZE",
    "MAX_REQUEST_ID",
    "PROTOCOL_VERSION",
    "Access",
    "FrameFlag",
    "FrameType",
    "Role",
]

PROTOCOL_VERSION = 1

#: type (u8), flags (u8), reserved (u16, zero), request id (u32), payload length (u32)
HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size  # 12

MAX_REQUEST_ID = 0xFFFF_FFFF

#: Largest payload of any single frame, unless negotiated lower.
DEFAULT_MAX_FRAME_PAYLOAD = 1 << 20
#: Largest payload of a control frame (a msgpack map), unless negotiated lower.
DEFAULT_MAX_CONTROL_SIZE = 64 << 10
#: Most requests a client may have outstanding (sent, no final RESULT/ERROR yet).
DEFAULT_MAX_PENDING = 64
#: Longest time, in seconds, an intermediary may hold a request for approval.
DEFAULT_MAX_HOLD_SECONDS = 900

#: Floors and ceilings for negotiable limits.
MIN_FRAME_PAYLOAD = 4 << 10
MAX_FRAME_PAYLOAD_CEILING = 16 << 20
MIN_CONTROL_SIZE = 1 << 10
MAX_PENDING_CEILING = 4096


class Role(StrEnum):
    CLIENT = "client"
    SERVER = "server"

    @property
    def peer(self) -> Role:
        return Role.SERVER if self is Role.CLIENT else Role.CLIENT


class FrameType(IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    REQUEST = 0x03
    CONTINUE = 0x04
    DATA = 0x05
    ROWS = 0x06
    RESPONSE = 0x07
    RESULT = 0x08
    ERROR = 0x09
    CANCEL = 0x0A
    GOAWAY = 0x0B
    NOTICE = 0x0C


class FrameFlag(IntFlag):
    NONE = 0
    #: on DATA / ROWS: this is the last frame of the body.
    END_STREAM = 0x01
    #: on REQUEST: a body (DATA or ROWS) follows once the server sends CONTINUE.
    BODY = 0x02


class Access(StrEnum):
    """Access classes that a request needs on a resource (and a key's scope grants)."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"
