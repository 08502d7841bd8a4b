"""The three places later features plug into a session, each in exactly one spot.

* :class:`Policy` decides every request (scopes, deny-lists, approvals come here);
* :class:`ResponseTransform` may rewrite every event going back to the client
  (PII masking comes here);
* :class:`SessionObserver` sees exactly the bytes the client sent and received, plus the
  decoded events and decisions (the recorder comes here).

The defaults allow everything, change nothing and record nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from l4proxy.identity import Identity
from l4proxy.wire import ErrorCode, Event, Request

__all__ = [
    "ALLOW",
    "AllowAll",
    "Decision",
    "NoObserver",
    "NoTransform",
    "ObserverFailed",
    "Policy",
    "ResponseTransform",
    "SessionInfo",
    "SessionObserver",
    "observe_server_parts",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInfo:
    """Who a session belongs to and where it goes; on every log line and audit event."""

    session_id: str
    identity: Identity
    serial: int
    not_after: datetime
    target: str
    client_address: str
    listener: str = ""

    def log_fields(self) -> Mapping[str, Any]:
        return {"session": self.session_id, "identity": self.identity.name,
                "email": self.identity.email, "groups": list(self.identity.groups),
                "serial": f"{self.serial:x}", "target": self.target,
                "client": self.client_address}


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The verdict on one request. ``allow`` False sends ERROR(code, message)."""

    allow: bool
    code: ErrorCode = ErrorCode.DENIED_BY_POLICY
    message: str = ""
    rule: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


ALLOW = Decision(allow=True, rule="default")


class ObserverFailed(Exception):
    """An observer cannot do its job (the recorder cannot write): the session must end.

    ``code`` goes to the client in the final ERROR with ``public_message``.
    """

    def __init__(self, message: str, *, code: ErrorCode, public_message: str) -> None:
        super().__init__(message)
        self.code = code
        self.public_message = public_message


class Policy(Protocol):
    async def decide(self, session: SessionInfo, request: Request) -> Decision: ...


class ResponseTransform(Protocol):
    """Rewrites an event on its way to the client. A ``Data`` event's ``data`` may be a
    read-only ``memoryview`` of the bytes read from the service (the gateway's codec
    hands out DATA pieces without copying them): treat it as bytes-like."""

    def transform(self, session: SessionInfo, event: Event) -> Event: ...


class SessionObserver(Protocol):
    """Receives what happens in one session, in order. Must not block for long: the
    recorder issue bounds its queue (the session waits when it is full)."""

    async def client_bytes(self, data: bytes) -> None:
        """Bytes exactly as the client sent them (after TLS)."""

    async def server_bytes(self, data: bytes) -> None:
        """Bytes exactly as the client received them (before TLS).

        An observer may also have ``async def server_parts(self, parts)``: the same for
        one message given in parts (a DATA frame's header and payload, which the gateway
        sends without joining them; a part may be a read-only ``memoryview`` of the bytes
        read from the service). It must take in every part before its first checkpoint,
        so that a cancelled session never leaves half a frame observed. Without it the
        observer gets ``server_bytes`` of the joined parts (:func:`observe_server_parts`).
        """

    async def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        """A decoded protocol event or a decision."""

    async def closed(self, reason: str) -> None:
        """The session ended."""


async def observe_server_parts(observer: SessionObserver,
                               parts: Sequence[bytes | memoryview]) -> None:
    """Show ``observer`` one message sent to the client in parts, whole, in one call:
    its ``server_parts`` if it has one, else ``server_bytes`` of the joined parts."""
    server_parts = getattr(observer, "server_parts", None)
    if server_parts is not None:
        await server_parts(parts)
    else:
        await observer.server_bytes(b"".join(parts))


class AllowAll:
    async def decide(self, session: SessionInfo, request: Request) -> Decision:
        return ALLOW


class NoTransform:
    def transform(self, session: SessionInfo, event: Event) -> Event:
        return event


class NoObserver:
    async def client_bytes(self, data: bytes) -> None:
        return None

    async def server_bytes(self, data: bytes) -> None:
        return None

    async def server_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        return None

    async def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        return None

    async def closed(self, reason: str) -> None:
        return None
