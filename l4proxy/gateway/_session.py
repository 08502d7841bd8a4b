"""One gateway session: a client on one side, the target's service on the other.

Theory of operation (CWP targets): the gateway is a CWP server to the client and a CWP
client to the service, with one sans-IO codec for each side (``down`` faces the client,
``up`` faces the service). The client's HELLO is answered only after the gateway has
completed its own HELLO/WELCOME upstream with the target's stored credential; the client
never holds, sends or sees that credential (a client HELLO carrying a key is refused, or
stripped when the target says so). Then two pumps run in one nursery:

* client → service: bytes are read, shown to the observer exactly as received, parsed by
  ``down``; every REQUEST goes to the policy (one place); allowed events are re-encoded by
  ``up`` from the parsed event, so the service executes exactly what the gateway
  understood, and a frame the codec cannot read goes nowhere (fail closed);
* service → client: events parsed by ``up`` pass the response transform (one place) and
  are re-encoded by ``down``; the bytes written to the client are shown to the observer
  exactly as sent.

Both pumps read only after their last write finished, so each direction buffers at most
one read. Writes to one side go through that side's lock, which also keeps codec order
and socket order the same. A session ends when either side closes, on a protocol error,
when the client certificate expires (NOTICE and GOAWAY ``expiry_notice`` before), at the
maximum session length, after ``idle_timeout`` without traffic and without pending
requests, or when the gateway ends it (lock, reload, drain) through
:class:`SessionControl`.

``tcp`` targets are relayed as opaque bytes with the same TLS, identity, connect checks,
expiry and controls, and half-close passed through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import trio

from l4proxy._send import send_all_parts
from l4proxy._sync import SendLock
from l4proxy.config import ClientCredentials, LimitsConfig, TargetConfig
from l4proxy.wire import (
    NEED_DATA,
    Cancel,
    Connection,
    ConnectionClosed,
    Continue,
    Data,
    Error,
    ErrorCode,
    Event,
    GoAway,
    Hello,
    Limits,
    LocalProtocolError,
    Notice,
    NoticeKind,
    RemoteProtocolError,
    Request,
    RequestedLimits,
    Response,
    Result,
    Role,
    Rows,
    Secret,
    StreamState,
    Welcome,
    connection_error_frame,
    negotiate_limits,
    resources,
)

from ._hooks import (
    AllowAll,
    NoObserver,
    NoTransform,
    ObserverFailed,
    Policy,
    ResponseTransform,
    SessionInfo,
    SessionObserver,
    observe_server_parts,
)

__all__ = [
    "SessionControl",
    "SessionEnded",
    "SessionHooks",
    "UpstreamUnavailable",
    "run_cwp_session",
    "run_tcp_session",
]

log = logging.getLogger("l4proxy.gateway.session")

#: what the gateway calls itself in WELCOME
GATEWAY_NAME = "l4proxy"
#: how often the idle watchdog looks again while a quiet session has a request pending
_WATCHDOG_INTERVAL = 1.0
#: the longest a GOAWAY or the final ERROR may wait to be sent (a client that does not
#: read gets no more time than this)
_GOODBYE_TIMEOUT = 2.0
#: how long to keep reading (and discarding) after a final ERROR before closing
_LINGER = 1.0

OpenUpstream = Callable[[], Awaitable[trio.abc.Stream]]


class SessionEnded(Exception):
    """Raised inside a session to end it; ``reason`` goes to the log and the observer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamUnavailable(Exception):
    """The target cannot be reached, or its credential cannot be read."""


@dataclass(slots=True)
class SessionHooks:
    policy: Policy
    transform: ResponseTransform
    observer: SessionObserver

    @classmethod
    def default(cls) -> SessionHooks:
        return cls(policy=AllowAll(), transform=NoTransform(), observer=NoObserver())


class SessionControl:
    """How the gateway talks to a live session from outside (lock, reload, drain).

    Holds at most one GOAWAY and one END (a session sends GOAWAY once, and ends once), so
    it is bounded without ever dropping an END behind a pile of GOAWAYs; END wins."""

    __slots__ = ("_end", "_goaway", "_goaway_taken", "_interrupt", "_posted")

    def __init__(self) -> None:
        self._goaway: tuple[str, ErrorCode, str] | None = None
        self._goaway_taken = False
        self._end: tuple[str, ErrorCode, str] | None = None
        self._posted = trio.Event()
        #: cancelled by end(): what the session's command task does besides waiting
        self._interrupt: trio.CancelScope | None = None

    @contextmanager
    def interruptible(self) -> Iterator[trio.CancelScope]:
        """``with control.interruptible():`` -- an :meth:`end` posted before or during the
        block cancels it, so that an END is not kept waiting behind the command task's
        other work (a send to a client that does not read)."""
        with trio.CancelScope() as scope:
            self._interrupt = scope
            if self._end is not None:
                scope.cancel()
            try:
                yield scope
            finally:
                self._interrupt = None

    def goaway(self, code: ErrorCode, message: str) -> None:
        """Ask the client to finish in-flight requests and go (CWP); TCP sessions end."""
        if self._goaway is None:
            self._goaway = ("goaway", code, message)
            self._posted.set()

    def end(self, code: ErrorCode, message: str) -> None:
        """End the session now (GOAWAY and ERROR for CWP clients, then close)."""
        if self._end is None:
            self._end = ("end", code, message)
            self._posted.set()
            if self._interrupt is not None:
                self._interrupt.cancel()

    async def receive(self) -> tuple[str, ErrorCode, str]:
        """The next command: ("end" | "goaway", code, message); END is returned again
        and again once posted, a GOAWAY once."""
        while True:
            if self._end is not None:
                return self._end
            if self._goaway is not None and not self._goaway_taken:
                self._goaway_taken = True
                return self._goaway
            await self._posted.wait()
            self._posted = trio.Event()


#: (target, scope) pairs already warned about; bounded: cleared when full
_WARNED: set[object] = set()
_MAX_WARNED = 1024


def _first_time(key: object) -> bool:
    """True the first time ``key`` is seen in this process (a warning about a target's
    configuration is logged once, not for every session)."""
    if key in _WARNED:
        return False
    if len(_WARNED) >= _MAX_WARNED:
        _WARNED.clear()
    _WARNED.add(key)
    return True


def _seconds_until(moment: datetime) -> float:
    return (moment - datetime.now(UTC)).total_seconds()


class _Activity:
    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


class _CwpSession:
    __slots__ = ("_held", "activity", "client", "client_lock", "control", "down", "final", "goaway_code",
                 "goaway_last", "hooks", "info", "limits", "max_hold_seconds", "open_upstream",
                 "read_credential", "said_goodbye", "tag", "target", "up", "up_lock", "upstream")

    def __init__(self, info: SessionInfo, client: trio.abc.Stream, *, target: TargetConfig,
                 limits: LimitsConfig, open_upstream: OpenUpstream,
                 read_credential: Callable[[], str], hooks: SessionHooks,
                 control: SessionControl, max_hold_seconds: int) -> None:
        self.info = info
        self.client = client
        self.target = target
        self.limits = limits
        self.open_upstream = open_upstream
        self.read_credential = read_credential
        self.hooks = hooks
        self.control = control
        self.max_hold_seconds = max_hold_seconds
        # data_views: DATA pieces are views of the read, relayed and recorded without a copy
        self.down = Connection(Role.SERVER, max_read=limits.read_size, data_views=True)
        self.up: Connection | None = None
        self.upstream: trio.abc.Stream | None = None
        self.client_lock = SendLock()
        self.up_lock = SendLock()
        self.activity = _Activity()
        self.goaway_code: ErrorCode | None = None
        self.goaway_last = 0
        #: an ERROR(0) reached a client that was uploading: linger before closing (linger())
        self.said_goodbye = False
        #: client bytes held back from the observer until HELLO is parsed
        self._held: bytearray | None = bytearray()
        #: set by the timers or the gateway to end the session after the pumps stopped
        self.final: tuple[ErrorCode, str] | None = None
        #: on every log line: the session id and the identity
        self.tag = f"session {info.session_id} ({info.identity.name})"

    # --- writing -----------------------------------------------------------------------

    async def to_client(self, event: Event) -> None:
        if isinstance(event, Notice):
            await self.hooks.observer.event("notice", {
                "request_id": event.request_id, "kind": str(event.kind), "message": event.message,
                "approval_id": event.approval_id})
        async with self.client_lock:
            if type(event) is Data:  # header and payload apart: a vectored send, no join
                parts = self.down.send_data(event)
                if parts:
                    await observe_server_parts(self.hooks.observer, parts)
                    await send_all_parts(self.client, parts)
                    self.activity.touch()
                return
            data = self.down.send(event)
            if data:
                await self.hooks.observer.server_bytes(data)
                await self.client.send_all(data)
                self.activity.touch()

    async def to_upstream(self, event: Event) -> None:
        assert self.up is not None and self.upstream is not None
        async with self.up_lock:
            data = self.up.send(event)
            if data:
                await self.upstream.send_all(data)
                self.activity.touch()

    async def end_client(self, code: ErrorCode, message: str) -> None:
        """Send ERROR(0) to the client (even if its codec is in the ERROR state).

        Best effort and bounded, the wait for the send lock included: a client that stops
        reading must not keep its session alive past a lock or its certificate.
        """
        with trio.move_on_after(_GOODBYE_TIMEOUT):
            async with self.client_lock:
                uploading = self.down.uploading is not None
                try:
                    data = self.down.send(Error(request_id=0, code=code, message=message))
                except LocalProtocolError:
                    data = connection_error_frame(code, message)
                await self.hooks.observer.server_bytes(data)
                try:
                    await self.client.send_all(data)
                    # a client busy uploading would see a reset instead of our ERROR
                    self.said_goodbye = uploading
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    # --- reading -----------------------------------------------------------------------

    async def client_event(self) -> Event:
        while True:
            event = self.down.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Event)
                return event
            # one immutable copy serves the observer and the codec (which hands out
            # pieces of it without copying while a DATA payload streams through)
            data = bytes(await self.client.receive_some(self.limits.read_size))
            if data:
                if self._held is not None:
                    self._held += data  # until HELLO is parsed: it may carry a credential
                else:
                    await self.hooks.observer.client_bytes(data)
                self.activity.touch()
            self.down.receive_data(data)

    async def release_held(self, secret: str | None) -> None:
        """Hand the bytes read before HELLO was parsed to the observer, with a client
        credential (refused or stripped) overwritten by a same-length marker, so the
        record keeps its framing but never holds the secret."""
        held, self._held = self._held, None
        if not held:
            return
        data = bytes(held)
        if secret:
            raw = secret.encode("utf-8")
            data = data.replace(raw, b"*" * len(raw))
        await self.hooks.observer.client_bytes(data)

    async def linger(self) -> None:
        """After a final ERROR: read and discard what the client still sends, for a moment,
        so a client busy uploading reads our ERROR instead of a reset."""
        with trio.move_on_after(_LINGER):
            try:
                while await self.client.receive_some(self.limits.read_size):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def upstream_event(self) -> Event:
        assert self.up is not None and self.upstream is not None
        while True:
            event = self.up.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Event)
                return event
            data = bytes(await self.upstream.receive_some(self.limits.read_size))  # see client_event
            if data:
                self.activity.touch()
            self.up.receive_data(data)

    # --- the session -------------------------------------------------------------------

    async def run(self) -> str:
        try:
            with trio.fail_after(self.limits.handshake_timeout):
                hello = await self.client_event()
        except trio.TooSlowError:
            raise SessionEnded("no HELLO in time") from None
        if isinstance(hello, ConnectionClosed):
            await self.release_held(None)
            raise SessionEnded("client closed before HELLO")
        assert isinstance(hello, Hello)
        if hello.api_key is not None:
            # announced before the bytes, so a recorder can list it in its header
            refuse = self.target.client_credentials is ClientCredentials.REFUSE
            await self.hooks.observer.event("redaction", {
                "what": "client api_key", "action": "refused" if refuse else "stripped"})
        await self.release_held(hello.api_key.reveal() if hello.api_key is not None else None)
        if hello.api_key is not None:
            if self.target.client_credentials is ClientCredentials.REFUSE:
                await self.end_client(ErrorCode.CLIENT_CREDENTIAL_REFUSED,
                                      "this gateway injects the service credential; "
                                      "remove the API key from your client")
                raise SessionEnded("client sent a credential (refused)")
            log.info("%s: client credential stripped", self.tag)
        welcome_up = await self.connect_upstream(hello.limits)
        offered = Limits(max_frame_payload=welcome_up.limits.max_frame_payload,
                         max_control_size=welcome_up.limits.max_control_size,
                         max_pending=welcome_up.limits.max_pending,
                         max_hold_seconds=self.max_hold_seconds)
        limits = negotiate_limits(hello.limits, offered)
        await self.to_client(Welcome(server=GATEWAY_NAME, session_id=self.info.session_id,
                                     limits=limits, scope=welcome_up.scope))
        await self.hooks.observer.event("session_open", {"upstream_session": welcome_up.session_id})
        async with trio.open_nursery() as nursery:
            done: list[str] = []

            async def guard(fn: Callable[[], Awaitable[str]]) -> None:
                try:
                    done.append(await fn())
                except SessionEnded as exc:
                    done.append(exc.reason)
                except ObserverFailed as exc:  # e.g. the recording cannot be written
                    self.final = (exc.code, exc.public_message)
                    done.append(f"observer failed: {exc}")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # upstream writes fail in forward(), client reads in client_pump:
                    # what reaches here is a failed write to the client
                    done.append("client connection lost")
                nursery.cancel_scope.cancel()

            for fn in (self.client_pump, self.upstream_pump, self.timers):
                nursery.start_soon(guard, fn, name=f"session.{fn.__name__}")
        if self.final is not None:
            code, message = self.final
            await self.goaway(code, message)
            await self.end_client(code, message)
        return done[0] if done else "ended"

    async def connect_upstream(self, requested: RequestedLimits) -> Welcome:
        try:
            with trio.fail_after(self.limits.upstream_connect_timeout):
                self.upstream = await self.open_upstream()
        except (trio.TooSlowError, OSError, trio.BrokenResourceError, UpstreamUnavailable) as exc:
            log.warning("%s: target %s unreachable: %s", self.tag,
                        self.target.name, _describe(exc))
            await self.end_client(ErrorCode.UPSTREAM_UNAVAILABLE,
                                  f"the service behind target {self.target.name!r} is unavailable")
            raise SessionEnded("upstream unavailable") from None
        try:
            credential = self.read_credential()
        except UpstreamUnavailable as exc:
            log.error("%s: target %s credential unavailable: %s", self.tag,
                      self.target.name, exc)
            await self.end_client(ErrorCode.UPSTREAM_UNAVAILABLE,
                                  f"target {self.target.name!r} is misconfigured")
            raise SessionEnded("credential unavailable") from None
        self.up = Connection(Role.CLIENT, max_read=self.limits.read_size, data_views=True)
        try:
            with trio.fail_after(self.limits.upstream_connect_timeout):
                await self.to_upstream(Hello(client=f"{GATEWAY_NAME}/{self.info.identity.name}"[:255],
                                             api_key=Secret(credential), limits=requested))
                answer = await self.upstream_event()
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError,
                RemoteProtocolError) as exc:
            log.warning("%s: target %s failed during HELLO: %s", self.tag,
                        self.target.name, _describe(exc))
            await self.end_client(ErrorCode.UPSTREAM_UNAVAILABLE,
                                  f"the service behind target {self.target.name!r} is unavailable")
            raise SessionEnded("upstream failed during HELLO") from None
        finally:
            del credential
        if isinstance(answer, Welcome):
            scope = answer.scope
            broad = "*" in scope.buckets or "*" in scope.tables or "admin" in scope.access
            if broad and _first_time((self.target.name, scope)):
                log.warning("%s: the credential of target %s reaches %s (buckets %s, tables %s); "
                            "give the gateway a key scoped to what its policy grants", self.tag,
                            self.target.name, "/".join(scope.access), list(scope.buckets),
                            list(scope.tables))
            return answer
        if isinstance(answer, Error) and answer.code is ErrorCode.AUTH_FAILED:
            log.error("%s: target %s refused the gateway's credential",
                      self.tag, self.target.name)
            await self.end_client(ErrorCode.UPSTREAM_AUTH_FAILED,
                                  f"target {self.target.name!r} refused the gateway's credential")
            raise SessionEnded("upstream refused the credential")
        await self.end_client(ErrorCode.UPSTREAM_UNAVAILABLE,
                              f"the service behind target {self.target.name!r} is unavailable")
        raise SessionEnded(f"upstream answered HELLO with {type(answer).__name__}")

    async def client_pump(self) -> str:
        hooks, info = self.hooks, self.info
        while True:
            try:
                event = await self.client_event()
            except RemoteProtocolError as exc:
                await self.end_client(exc.code, exc.message)
                raise SessionEnded(f"client protocol error: {exc.message}") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return "client connection lost"
            if isinstance(event, ConnectionClosed):
                return "client closed"
            if isinstance(event, Request):
                await hooks.observer.event("request", {
                    "request_id": event.request_id, "op": str(event.op), "reason": event.reason,
                    "resources": [[str(u.kind), u.name, str(u.access)]
                                  for u in resources(event.op, event.args)]})
                if self.goaway_code is not None and event.request_id > self.goaway_last:
                    await self.to_client(Error(request_id=event.request_id, code=self.goaway_code,
                                               message="the gateway sent GOAWAY; reconnect"))
                    continue
                decision = await hooks.policy.decide(info, event)
                await hooks.observer.event("decision", {
                    "request_id": event.request_id, "allow": decision.allow, "rule": decision.rule,
                    "code": None if decision.allow else decision.code.name})
                if decision.allow:
                    await self.forward(event)
                else:
                    log.info("%s: request %d (%s) denied: %s", self.tag,
                             event.request_id, event.op, decision.rule)
                    await self.to_client(Error(request_id=event.request_id, code=decision.code,
                                               message=decision.message or "denied by policy"))
            elif isinstance(event, (Data, Rows)):
                await self.forward(event)
            elif isinstance(event, Cancel):
                await hooks.observer.event("cancel", {"request_id": event.request_id})
                await self.forward(event)
            elif isinstance(event, Error):  # the client reports an error and closes
                return f"client sent ERROR {event.code.name}"

    async def forward(self, event: Event) -> None:
        """Re-encode ``event`` upstream. Decided under the upstream lock: a CANCEL for a
        request the service already finished is dropped (it crossed the answer), and a
        request the service will no longer take (it sent GOAWAY) is answered here."""
        assert self.up is not None and self.upstream is not None
        refused = False
        try:
            async with self.up_lock:
                if isinstance(event, Cancel) and \
                        self.up.stream_state(event.request_id) is StreamState.DONE:
                    return
                if isinstance(event, Request) and self.up.goaway_last_request_id is not None:
                    refused = True
                elif type(event) is Data:  # header and payload apart: a vectored send
                    parts = self.up.send_data(event)
                    if parts:
                        await send_all_parts(self.upstream, parts)
                        self.activity.touch()
                else:
                    data = self.up.send(event)
                    if data:
                        await self.upstream.send_all(data)
                        self.activity.touch()
        except LocalProtocolError as exc:  # the two codecs disagree: fail closed
            log.error("%s: cannot forward %s: %s", self.tag,
                      type(event).__name__, exc.message)
            await self.end_client(ErrorCode.PROTOCOL_ERROR, "the gateway could not forward a frame")
            raise SessionEnded("forwarding failed") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.end_client(ErrorCode.UPSTREAM_UNAVAILABLE, "the service connection was lost")
            raise SessionEnded("upstream connection lost") from None
        if refused:
            assert isinstance(event, Request)
            await self.to_client(Error(request_id=event.request_id,
                                       code=self.goaway_code or ErrorCode.SHUTTING_DOWN,
                                       message="the service is going away; reconnect"))

    async def upstream_pump(self) -> str:
        while True:
            try:
                event = await self.upstream_event()
            except RemoteProtocolError as exc:
                log.error("%s: upstream protocol error: %s", self.tag, exc.message)
                await self.end_client(ErrorCode.UPSTREAM_UNAVAILABLE, "the service broke the protocol")
                raise SessionEnded("upstream protocol error") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                event = ConnectionClosed()
            if isinstance(event, ConnectionClosed):
                await self.end_client(ErrorCode.UPSTREAM_UNAVAILABLE, "the service closed the connection")
                return "upstream closed"
            if isinstance(event, Error) and event.request_id == 0:
                log.warning("%s: upstream ended the connection: %s %s",
                            self.tag, event.code.name, event.message)
                await self.end_client(ErrorCode.UPSTREAM_UNAVAILABLE,
                                      f"the service ended the connection ({event.code.name})")
                return "upstream error"
            if isinstance(event, GoAway):
                # promise the client no more than the service promised us
                await self.goaway(event.code, event.message or "the service is going away",
                                  last=event.last_request_id)
                continue
            if isinstance(event, (Continue, Data, Rows, Response, Result, Error, Notice)):
                if isinstance(event, Continue):
                    await self.hooks.observer.event("continue", {"request_id": event.request_id})
                outgoing = self.hooks.transform.transform(self.info, event)
                try:
                    await self.to_client(outgoing)
                except LocalProtocolError as exc:
                    log.error("%s: cannot relay %s: %s", self.tag,
                              type(event).__name__, exc.message)
                    await self.end_client(ErrorCode.PROTOCOL_ERROR, "the gateway could not relay a frame")
                    raise SessionEnded("relaying failed") from None
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return "client connection lost"

    async def goaway(self, code: ErrorCode, message: str, *, last: int | None = None) -> None:
        """Send GOAWAY once (best effort, bounded). ``last``: the highest request id that
        will still be served (default: every request received so far)."""
        if self.goaway_code is not None:
            return
        self.goaway_code = code
        last_id = self.down.last_request_id if last is None else min(last, self.down.last_request_id)
        self.goaway_last = last_id
        await self.hooks.observer.event("goaway", {"code": code.name, "message": message})
        with trio.move_on_after(_GOODBYE_TIMEOUT):
            try:
                await self.to_client(GoAway(last_request_id=last_id, code=code, message=message))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def timers(self) -> str:
        """The session's deadlines (certificate expiry and its notice, maximum length,
        idle timeout) and the gateway's commands (lock, reload, drain), in one task: a
        held session costs one sleeping task here, not two."""
        not_after = self.info.not_after
        notice_at = _seconds_until(not_after) - self.limits.expiry_notice
        end_at = _seconds_until(not_after) + self.limits.expiry_grace
        max_end = self.limits.max_session_length
        start = trio.current_time()
        warned = False
        while True:
            now = trio.current_time() - start
            if now >= min(end_at, max_end):
                # the pumps stop first (the nursery is cancelled when this returns), then
                # run() sends the final ERROR: a client that does not read cannot delay it
                if end_at <= max_end:
                    self.final = (ErrorCode.CERTIFICATE_EXPIRED, "the client certificate expired")
                    return "certificate expired"
                self.final = (ErrorCode.SHUTTING_DOWN, "maximum session length reached")
                return "maximum session length"
            if not warned and now >= notice_at:
                warned = True
                left = max(0, round(end_at - now))
                # a client that does not read makes these sends wait (bounded); an END
                # from the gateway (a lock) cuts them short
                with self.control.interruptible():
                    with trio.move_on_after(_GOODBYE_TIMEOUT):
                        try:
                            await self.to_client(Notice(
                                request_id=0, kind=NoticeKind.EXPIRING,
                                message=f"certificate expires in {left} s; log in again and "
                                        "reconnect", expires_at=not_after.timestamp()))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                    await self.goaway(ErrorCode.CERTIFICATE_EXPIRED,
                                      "the client certificate expires soon")
                continue  # the sends took time: look at the clock and the commands again
            idle_for = time.monotonic() - self.activity.last
            if idle_for >= self.limits.idle_timeout:
                if self.down.pending == 0:
                    return "idle timeout"
                idle_wake = _WATCHDOG_INTERVAL  # quiet, but a request is pending: look again
            else:
                idle_wake = self.limits.idle_timeout - idle_for + 0.01
            # sleep until the next deadline, not a tick: thousands of idle sessions must
            # not wake up every second (activity moves the idle deadline; the wake-up at
            # the old one just sleeps again)
            wake = min(end_at, max_end) - now
            if not warned:
                wake = min(wake, notice_at - now)
            command = None
            with trio.move_on_after(max(0.0, min(wake, idle_wake))):
                command = await self.control.receive()
            if command is not None:  # acted on outside the timeout's scope
                kind, code, message = command
                if kind == "goaway":
                    with self.control.interruptible():  # an END cuts a stalled GOAWAY short
                        await self.goaway(code, message)
                else:
                    self.final = (code, message)  # sent by run() once the pumps have stopped
                    return f"ended by the gateway: {code.name}"


async def run_cwp_session(info: SessionInfo, client: trio.abc.Stream, *, target: TargetConfig,
                          limits: LimitsConfig, open_upstream: OpenUpstream,
                          read_credential: Callable[[], str], hooks: SessionHooks | None = None,
                          control: SessionControl | None = None,
                          max_hold_seconds: int = 900) -> str:
    """Run a CWP session to its end; returns why it ended. Closes both streams."""
    hooks = hooks or SessionHooks.default()
    session = _CwpSession(info, client, target=target, limits=limits, open_upstream=open_upstream,
                          read_credential=read_credential, hooks=hooks,
                          control=control or SessionControl(), max_hold_seconds=max_hold_seconds)
    reason = "ended"
    try:
        reason = await session.run()
    except SessionEnded as exc:
        reason = exc.reason
    except RemoteProtocolError as exc:
        await session.end_client(exc.code, exc.message)
        reason = f"client protocol error: {exc.message}"
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        reason = "connection lost"
    finally:
        with trio.CancelScope(shield=True):
            await session.release_held(None)  # e.g. garbage instead of a HELLO
            if session.said_goodbye:
                await session.linger()
            if session.upstream is not None:
                await trio.aclose_forcefully(session.upstream)
            await trio.aclose_forcefully(client)
            await hooks.observer.closed(reason)
    log.info("%s ended: %s", session.tag, reason)
    return reason


async def run_tcp_session(info: SessionInfo, client: trio.abc.Stream, *, limits: LimitsConfig,
                          open_upstream: OpenUpstream, hooks: SessionHooks | None = None,
                          control: SessionControl | None = None) -> str:
    """Relay opaque bytes both ways until both sides are done; returns why it ended."""
    hooks = hooks or SessionHooks.default()
    control = control or SessionControl()
    activity = _Activity()
    try:
        with trio.fail_after(limits.upstream_connect_timeout):
            upstream = await open_upstream()
    except (trio.TooSlowError, OSError, trio.BrokenResourceError, UpstreamUnavailable) as exc:
        log.warning("session %s (%s): target %s unreachable: %s", info.session_id,
                    info.identity.name, info.target, _describe(exc))
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(client)
            await hooks.observer.closed("upstream unavailable")
        return "upstream unavailable"
    reason = "closed"
    open_directions = 2

    async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, from_client: bool) -> None:
        nonlocal open_directions
        while True:
            try:
                data = await src.receive_some(limits.read_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                open_directions -= 1
                try:
                    if isinstance(dst, trio.abc.HalfCloseableStream):
                        await dst.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                return
            activity.touch()
            if from_client:
                await hooks.observer.client_bytes(bytes(data))
            else:
                await hooks.observer.server_bytes(bytes(data))
            await dst.send_all(data)

    try:
        async with trio.open_nursery() as nursery:

            async def both() -> None:
                nonlocal reason
                try:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(pump, client, upstream, True)
                        inner.start_soon(pump, upstream, client, False)
                except* (trio.BrokenResourceError, trio.ClosedResourceError):
                    reason = "connection lost"
                nursery.cancel_scope.cancel()

            async def watchdog() -> None:
                nonlocal reason
                end_at = trio.current_time() + min(_seconds_until(info.not_after) + limits.expiry_grace,
                                                   limits.max_session_length)
                while True:
                    now = trio.current_time()
                    if now >= end_at:
                        reason = "certificate expired or maximum session length"
                        break
                    idle_for = time.monotonic() - activity.last
                    if idle_for >= limits.idle_timeout:
                        reason = "idle timeout"
                        break
                    # the next deadline, not a tick (see _CwpSession.timers)
                    await trio.sleep(min(end_at - now, limits.idle_timeout - idle_for + 0.01))
                nursery.cancel_scope.cancel()

            async def commands() -> None:
                nonlocal reason
                _kind, code, _message = await control.receive()
                reason = f"ended by the gateway: {code.name}"
                nursery.cancel_scope.cancel()

            nursery.start_soon(both)
            nursery.start_soon(watchdog)
            nursery.start_soon(commands)
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(upstream)
            await trio.aclose_forcefully(client)
            await hooks.observer.closed(reason)
    log.info("session %s (%s) ended: %s", info.session_id, info.identity.name, reason)
    return reason


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

