"""The async CWP/1 client on trio.

Theory of operation: ``ChunkClient.connect`` opens TCP (and TLS), sends HELLO, waits for
WELCOME, then starts one reader task. Each request is a :class:`Call` with its own
channel: the reader routes every frame for that request id into it, so several tasks may
pipeline requests on one connection. Session-level NOTICEs go to the ``on_notice``
callback; a GOAWAY stops new requests; a connection-level ERROR or a dropped connection
fails every open call with a typed error. Sends go through one lock so the codec's order
and the socket's order stay the same.

A request held for approval by an intermediary is announced by a NOTICE (kind ``held``).
The call then waits up to the announced hold time (plus a small grace) for CONTINUE or an
answer; if none comes it sends CANCEL and raises :class:`ApprovalTimedOut`.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO, Any

import trio

from l4proxy.tls import TlsStream
from l4proxy.wire import (
    NEED_DATA,
    Cancel,
    Column,
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
    Op,
    RemoteProtocolError,
    Request,
    RequestedLimits,
    Response,
    Result,
    Role,
    Rows,
    Scope,
    Secret,
    StreamState,
    Welcome,
    connection_error_frame,
)

from ._errors import (
    ApprovalTimedOut,
    ClientError,
    ConnectionFailed,
    ProtocolViolation,
    error_for_code,
)

__all__ = ["Call", "ChunkClient", "NoticeHandler", "TableResult"]

NoticeHandler = Callable[[Notice], None]
#: extra seconds to wait after an announced hold time before giving up
HOLD_GRACE = 10.0
_CALL_BUFFER = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class TableResult:
    """Rows of a streamed ROWS response, with the column list and the final RESULT."""

    columns: tuple[Column, ...]
    rows: list[tuple[Any, ...]]
    result: Mapping[str, Any]


class Call:
    """One request in flight. Created by :meth:`ChunkClient.start`."""

    def __init__(self, client: ChunkClient, request_id: int, op: Op) -> None:
        self._client = client
        self.request_id = request_id
        self.op = op
        send, recv = trio.open_memory_channel[Event](_CALL_BUFFER)
        self._send_channel = send
        self._recv_channel = recv
        self._deadline = math.inf
        self.finished = False
        self.head: Response | None = None

    async def _next(self) -> Event:
        """Next frame for this call; NOTICEs are reported, ERROR is raised."""
        while True:
            try:
                with trio.fail_at(self._deadline):
                    event = await self._recv_channel.receive()
            except trio.TooSlowError:
                await self.cancel()
                raise ApprovalTimedOut(
                    "gave up waiting for approval (hold time elapsed); request cancelled",
                    code=ErrorCode.APPROVAL_EXPIRED, request_id=self.request_id) from None
            except trio.EndOfChannel:
                raise self._client._failure() from None
            if isinstance(event, Notice):
                if event.kind is NoticeKind.HELD:
                    hold = event.hold_seconds
                    if hold is None:
                        hold = self._client.limits.max_hold_seconds
                    self._deadline = trio.current_time() + hold + HOLD_GRACE
                self._client._notify(event)
                continue
            self._deadline = math.inf
            if isinstance(event, Error):
                self.finished = True
                raise error_for_code(event.code, event.message, self.request_id)
            if isinstance(event, Result):
                self.finished = True
            return event

    async def wait_continue(self) -> None:
        """Wait for permission to send the body (CONTINUE)."""
        event = await self._next()
        if not isinstance(event, Continue):
            raise ProtocolViolation(f"expected CONTINUE, got {type(event).__name__}")

    async def send_data(self, data: bytes, *, end: bool = False) -> bool:
        """Send a body piece (split to the frame size). False if the server ended the upload."""
        limit = self._client.limits.max_frame_payload
        view = memoryview(data)
        if not view:
            return await self._client._send_body(Data(request_id=self.request_id, data=b"",
                                                      end_stream=end))
        for start in range(0, len(view), limit):
            piece = bytes(view[start : start + limit])
            last = end and start + limit >= len(view)
            if not await self._client._send_body(Data(request_id=self.request_id, data=piece,
                                                      end_stream=last)):
                return False
        return True

    async def send_rows(self, rows: Sequence[Sequence[Any]], *, end: bool = False) -> bool:
        return await self._client._send_body(Rows(request_id=self.request_id, rows=rows,
                                                  end_stream=end))

    async def response(self) -> Response:
        """Wait for the RESPONSE head of a streamed response."""
        event = await self._next()
        if not isinstance(event, Response):
            raise ProtocolViolation(f"expected RESPONSE, got {type(event).__name__}")
        self.head = event
        return event

    async def body(self) -> AsyncIterator[Data | Rows]:
        """Yield DATA/ROWS frames of the response body until END_STREAM."""
        while True:
            event = await self._next()
            if not isinstance(event, (Data, Rows)):
                raise ProtocolViolation(f"expected a body frame, got {type(event).__name__}")
            yield event
            if event.end_stream:
                return

    async def result(self) -> Mapping[str, Any]:
        """Wait for the final RESULT (raises the typed error for an ERROR)."""
        event = await self._next()
        if not isinstance(event, Result):
            raise ProtocolViolation(f"expected RESULT, got {type(event).__name__}")
        return event.fields

    async def cancel(self) -> None:
        """Send CANCEL (once; ignored if the request already finished)."""
        await self._client._cancel(self)

    async def abandon(self) -> None:
        """Cancel if unfinished and stop listening: later frames of this call are dropped."""
        if not self.finished:
            with trio.CancelScope(shield=True):
                await self.cancel()
        self._recv_channel.close()


class ChunkClient:
    """A connected CWP/1 client. Use ``async with ChunkClient.connect(...) as client``."""

    def __init__(self, stream: trio.abc.Stream, conn: Connection, welcome: Welcome, *,
                 on_notice: NoticeHandler | None, read_size: int) -> None:
        self._stream = stream
        self._conn = conn
        self.welcome = welcome
        self._on_notice = on_notice
        self._read_size = read_size
        self._send_lock = trio.Lock()
        self._calls: dict[int, Call] = {}
        self._next_id = 1
        self._broken: ClientError | None = None
        self._cancel_sent: set[int] = set()
        self.goaway: GoAway | None = None
        self.notices: list[Notice] = []

    # --- connecting ----------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        api_key: Secret | str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
        client_name: str = "chunk",
        on_notice: NoticeHandler | None = None,
        connect_timeout: float = 15.0,
        limits: RequestedLimits | None = None,
        read_size: int = 256 << 10,
    ) -> AsyncIterator[ChunkClient]:
        """Connect, authenticate and yield a ready client; closes it on exit.

        With ``ssl_context``, TLS runs on :class:`~l4proxy.tls.TlsStream` (reading up to
        ``read_size`` of ciphertext at once); ``server_name`` (default: ``host``) goes out
        in SNI and, with the context's ``check_hostname``, must match the server's
        certificate. On exit the client sends close_notify before closing (bounded: a
        peer that does not read cannot hold it up). TLS 1.2 renegotiation is not
        supported (a send while a server runs one breaks the connection).

        Raises:
            ConnectionFailed: TCP or TLS failed, or the server went away during HELLO.
            ClientError: the server refused the HELLO (e.g. AUTH_FAILED, exit code 2).
        """
        key = Secret(api_key) if isinstance(api_key, str) else api_key
        stream: trio.abc.Stream | None = None
        try:
            try:
                with trio.fail_after(connect_timeout):
                    tcp = await trio.open_tcp_stream(host, port)
                    stream = tcp
                    if ssl_context is not None:
                        # TlsStream, not trio.SSLStream: large reads make the client keep up
                        # with the gateway; a bare EOF (no close_notify) is an error, as
                        # with https_compatible=False
                        tls = TlsStream(tcp, ssl_context, server_side=False,
                                        server_hostname=server_name or host, read_size=read_size)
                        stream = tls
                        await tls.do_handshake()
            except BaseException:
                if stream is not None:  # e.g. the TLS handshake failed: don't leak the socket
                    await trio.aclose_forcefully(stream)
                raise
        except trio.TooSlowError:
            raise ConnectionFailed(f"timed out connecting to {host}:{port}") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise ConnectionFailed(f"cannot connect to {host}:{port}: {_describe(exc)}") from None
        assert stream is not None
        conn = Connection(Role.CLIENT)
        try:
            with trio.fail_after(connect_timeout):
                await stream.send_all(conn.send(Hello(client=client_name, api_key=key,
                                                      limits=limits or RequestedLimits())))
                welcome = await _read_welcome(stream, conn, read_size)
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise ConnectionFailed(f"no WELCOME from {host}:{port} in time") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await trio.aclose_forcefully(stream)
            raise ConnectionFailed(f"connection to {host}:{port} failed: {_describe(exc)}") from None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        client = cls(stream, conn, welcome, on_notice=on_notice, read_size=read_size)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._reader)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # the reader never raises, so a group holds what the caller's block raised:
            # hand it back unwrapped, so `except ClientError` around `connect` works
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            # a clean close (TLS close_notify) when the peer lets us, a hard one otherwise
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            await trio.aclose_forcefully(stream)

    @property
    def session_id(self) -> str:
        return self.welcome.session_id

    @property
    def scope(self) -> Scope:
        return self.welcome.scope

    @property
    def limits(self) -> Limits:
        return self.welcome.limits

    # --- plumbing ------------------------------------------------------------------------

    def _failure(self) -> ClientError:
        return self._broken or ConnectionFailed("connection closed")

    def _notify(self, notice: Notice) -> None:
        self.notices.append(notice)
        if self._on_notice is not None:
            self._on_notice(notice)

    async def _send_event(self, event: Event, *, guard: Callable[[], bool] | None = None) -> bytes:
        """Send one event. With ``guard``, send only if ``guard()`` holds under the send
        lock (another task's CANCEL may end an upload between a check and the send)."""
        if self._broken is not None:
            raise self._broken
        async with self._send_lock:
            if guard is not None and not guard():
                return b""
            data = self._conn.send(event)
            if data:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._broken = self._broken or ConnectionFailed(
                        f"connection lost: {_describe(exc)}")
                    raise self._broken from None
            return data

    async def _send_body(self, event: Data | Rows) -> bool:
        rid = event.request_id
        return bool(await self._send_event(
            event, guard=lambda: self._conn.stream_state(rid) is StreamState.UPLOADING))

    async def _cancel(self, call: Call) -> None:
        rid = call.request_id
        if rid in self._cancel_sent or self._conn.stream_state(rid) is StreamState.DONE:
            return
        self._cancel_sent.add(rid)
        try:
            await self._send_event(Cancel(request_id=rid),
                                   guard=lambda: self._conn.stream_state(rid) is not StreamState.DONE)
        except ClientError:
            pass

    async def _reader(self) -> None:
        try:
            while True:
                event = self._conn.next_event()
                if event is NEED_DATA:
                    data = await self._stream.receive_some(self._read_size)
                    self._conn.receive_data(data)
                    continue
                if isinstance(event, ConnectionClosed):
                    self._broken = self._broken or ConnectionFailed("the server closed the connection")
                    break
                if isinstance(event, GoAway):
                    self.goaway = event
                    continue
                if isinstance(event, Notice) and event.request_id == 0:
                    self._notify(event)
                    continue
                if isinstance(event, Error) and event.request_id == 0:
                    self._broken = error_for_code(event.code, event.message)
                    break
                rid = getattr(event, "request_id", 0)
                call = self._calls.get(rid)
                if call is not None:
                    try:
                        await call._send_channel.send(event)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the caller stopped listening to this call
                    if isinstance(event, (Result, Error)):
                        self._calls.pop(rid, None)
                        call._send_channel.close()
        except RemoteProtocolError as exc:
            self._broken = ProtocolViolation(f"server broke the protocol: {exc.message}",
                                             code=exc.code)
            with trio.move_on_after(1):
                async with self._send_lock:
                    await self._stream.send_all(connection_error_frame(exc.code, exc.message))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._broken = self._broken or ConnectionFailed(f"connection lost: {_describe(exc)}")
        finally:
            for call in self._calls.values():
                call._send_channel.close()
            self._calls.clear()

    # --- requests ------------------------------------------------------------------------

    async def start(self, op: Op, args: Mapping[str, Any] | None = None, *,
                    reason: str | None = None) -> Call:
        """Send a REQUEST and return its :class:`Call`.

        Raises:
            ConnectionFailed: the connection is gone, or the server sent GOAWAY.
            ClientError: the arguments do not match the operation's schema.
        """
        if self._broken is not None:
            raise self._broken
        if self.goaway is not None:
            # typed by the GOAWAY's code: an expiring certificate or a lock says so
            raise error_for_code(self.goaway.code,
                                 f"{self.goaway.message} (GOAWAY: no new requests; reconnect)")
        rid = self._next_id
        self._next_id += 1
        call = Call(self, rid, op)
        self._calls[rid] = call
        try:
            await self._send_event(Request(request_id=rid, op=op, args=dict(args or {}),
                                           reason=reason))
        except LocalProtocolError as exc:
            self._calls.pop(rid, None)
            raise ClientError(f"invalid request: {exc.message}") from None
        return call

    async def simple(self, op: Op, args: Mapping[str, Any] | None = None, *,
                     reason: str | None = None) -> Mapping[str, Any]:
        """A request answered by one RESULT."""
        call = await self.start(op, args, reason=reason)
        return await call.result()

    async def ping(self, data: bytes | None = None) -> Mapping[str, Any]:
        return await self.simple(Op.PING, {} if data is None else {"data": data})

    async def list_buckets(self) -> list[str]:
        return list((await self.simple(Op.LIST_BUCKETS))["buckets"])

    async def create_bucket(self, bucket: str, *, reason: str | None = None) -> Mapping[str, Any]:
        return await self.simple(Op.CREATE_BUCKET, {"bucket": bucket}, reason=reason)

    async def delete_bucket(self, bucket: str, *, force: bool = False,
                            reason: str | None = None) -> Mapping[str, Any]:
        args: dict[str, Any] = {"bucket": bucket}
        if force:
            args["force"] = True
        return await self.simple(Op.DELETE_BUCKET, args, reason=reason)

    async def stat(self, bucket: str, key: str) -> Mapping[str, Any]:
        return await self.simple(Op.STAT, {"bucket": bucket, "key": key})

    async def delete(self, bucket: str, key: str, *, reason: str | None = None) -> Mapping[str, Any]:
        return await self.simple(Op.DELETE, {"bucket": bucket, "key": key}, reason=reason)

    async def create_table(self, table: str, columns: Sequence[tuple[str, str]], *,
                           reason: str | None = None) -> Mapping[str, Any]:
        return await self.simple(Op.CREATE_TABLE, {"table": table,
                                                   "columns": [list(c) for c in columns]},
                                 reason=reason)

    async def drop_table(self, table: str, *, reason: str | None = None) -> Mapping[str, Any]:
        return await self.simple(Op.DROP_TABLE, {"table": table}, reason=reason)

    async def put(self, bucket: str, key: str,
                  source: bytes | IO[bytes] | AsyncIterable[bytes], *, size: int | None = None,
                  reason: str | None = None,
                  progress: Callable[[int], None] | None = None) -> Mapping[str, Any]:
        """Upload an object from bytes, a binary file, or an async iterable of bytes.

        The body is sent only after the server (or gateway) grants CONTINUE. If it is
        answered with ERROR mid-upload, sending stops and the error is raised.
        """
        if isinstance(source, (bytes, bytearray, memoryview)) and size is None:
            size = len(source)
        args: dict[str, Any] = {"bucket": bucket, "key": key}
        if size is not None:
            args["size"] = size
        call = await self.start(Op.PUT, args, reason=reason)
        await call.wait_continue()
        piece = self.limits.max_frame_payload
        sent_ok = True
        if isinstance(source, (bytes, bytearray, memoryview)):
            view = memoryview(source)
            for start in range(0, max(len(view), 1), piece):
                chunk = bytes(view[start : start + piece])
                sent_ok = await call.send_data(chunk, end=start + piece >= len(view))
                if progress:
                    progress(len(chunk))
                if not sent_ok:
                    break
        elif hasattr(source, "read"):
            file = source
            nxt = await trio.to_thread.run_sync(file.read, piece)
            while True:
                current = nxt
                nxt = await trio.to_thread.run_sync(file.read, piece) if current else b""
                sent_ok = await call.send_data(current, end=not nxt)
                if progress:
                    progress(len(current))
                if not sent_ok or not nxt:
                    break
        else:
            pending: bytes | None = None
            async for chunk in source:
                if pending is not None:
                    sent_ok = await call.send_data(pending)
                    if progress:
                        progress(len(pending))
                    if not sent_ok:
                        break
                pending = bytes(chunk)
            if sent_ok:
                await call.send_data(pending or b"", end=True)
                if progress and pending:
                    progress(len(pending))
        return await call.result()

    @asynccontextmanager
    async def get_stream(self, bucket: str, key: str, *, offset: int | None = None,
                         length: int | None = None,
                         reason: str | None = None,
                         ) -> AsyncIterator[tuple[Response, AsyncIterator[bytes], Call]]:
        """Stream an object: yields (head, async iterator of byte pieces, call).

        After the pieces are exhausted, ``await call.result()`` gives size and sha256.
        """
        args: dict[str, Any] = {"bucket": bucket, "key": key}
        if offset is not None:
            args["offset"] = offset
        if length is not None:
            args["length"] = length
        call = await self.start(Op.GET, args, reason=reason)
        try:
            head = await call.response()

            async def pieces() -> AsyncIterator[bytes]:
                async for frame in call.body():
                    assert isinstance(frame, Data)
                    yield frame.data

            yield head, pieces(), call
        finally:
            await call.abandon()

    async def get(self, bucket: str, key: str, *, offset: int | None = None,
                  length: int | None = None, sink: IO[bytes] | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[bytes, Mapping[str, Any]]:
        """Download an object into memory (or into ``sink``, returning b"")."""
        parts: list[bytes] = []
        async with self.get_stream(bucket, key, offset=offset, length=length) as (_h, pieces, call):
            async for piece in pieces:
                if sink is not None:
                    await trio.to_thread.run_sync(sink.write, piece)
                else:
                    parts.append(piece)
                if progress:
                    progress(len(piece))
            result = await call.result()
        return b"".join(parts), result

    async def rows_stream(self, op: Op, args: Mapping[str, Any], *,
                          reason: str | None = None) -> AsyncIterator[tuple[Any, ...] | Mapping[str, Any]]:
        """Yield the rows of a ROWS response, then its RESULT fields (a mapping) last."""
        call = await self.start(op, args, reason=reason)
        try:
            await call.response()
            async for frame in call.body():
                assert isinstance(frame, Rows)
                for row in frame.rows:
                    yield tuple(row)
            yield await call.result()
        finally:
            await call.abandon()

    async def _table(self, op: Op, args: Mapping[str, Any], reason: str | None) -> TableResult:
        call = await self.start(op, args, reason=reason)
        try:
            head = await call.response()
            rows: list[tuple[Any, ...]] = []
            async for frame in call.body():
                assert isinstance(frame, Rows)
                rows.extend(tuple(r) for r in frame.rows)
            result = await call.result()
        finally:
            await call.abandon()
        return TableResult(columns=head.columns or (), rows=rows, result=result)

    async def list(self, bucket: str, *, prefix: str | None = None,
                   limit: int | None = None) -> TableResult:
        args: dict[str, Any] = {"bucket": bucket}
        if prefix:
            args["prefix"] = prefix
        if limit is not None:
            args["limit"] = limit
        return await self._table(Op.LIST, args, None)

    async def chunk(self, bucket: str, key: str, *, strategy: str = "cdc",
                    size: int | None = None, min_size: int | None = None,
                    avg_size: int | None = None, max_size: int | None = None,
                    into: str | None = None, with_data: bool = False,
                    reason: str | None = None) -> TableResult:
        args: dict[str, Any] = {"bucket": bucket, "key": key, "strategy": strategy}
        for name, value in (("size", size), ("min_size", min_size), ("avg_size", avg_size),
                            ("max_size", max_size), ("into", into)):
            if value is not None:
                args[name] = value
        if with_data:
            args["with_data"] = True
        return await self._table(Op.CHUNK, args, reason)

    async def scan(self, table: str, *, columns: Sequence[str] | None = None,
                   where: Mapping[str, Any] | None = None, limit: int | None = None,
                   reason: str | None = None) -> TableResult:
        args: dict[str, Any] = {"table": table}
        if columns:
            args["columns"] = list(columns)
        if where:
            args["where"] = dict(where)
        if limit is not None:
            args["limit"] = limit
        return await self._table(Op.SCAN, args, reason)

    async def insert(self, table: str, columns: Sequence[str],
                     rows: Iterable[Sequence[Any]], *, reason: str | None = None,
                     batch_bytes: int | None = None) -> Mapping[str, Any]:
        """Insert rows (any iterable; sent in ROWS frames that fit the frame size)."""
        import msgpack

        call = await self.start(Op.INSERT, {"table": table, "columns": list(columns)},
                                reason=reason)
        await call.wait_continue()
        budget = min(batch_bytes or self.limits.max_frame_payload,
                     self.limits.max_frame_payload) - 16
        batch: list[Sequence[Any]] = []
        size = 0
        for row in rows:
            row_size = len(msgpack.packb(list(row), use_bin_type=True))
            if row_size > budget:
                await call.cancel()
                await _drain_final(call)
                raise ClientError(f"a row of {row_size} bytes does not fit in one frame")
            if size + row_size > budget and batch:
                if not await call.send_rows(batch):
                    break
                batch, size = [], 0
            batch.append(list(row))
            size += row_size
        else:
            await call.send_rows(batch, end=True)
        return await call.result()


async def _drain_final(call: Call) -> None:
    try:
        while not call.finished:
            await call._next()
    except ClientError:
        pass


async def _read_welcome(stream: trio.abc.Stream, conn: Connection, read_size: int) -> Welcome:
    while True:
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            raise ProtocolViolation(f"server broke the protocol: {exc.message}",
                                    code=exc.code) from None
        if event is NEED_DATA:
            conn.receive_data(await stream.receive_some(read_size))
            continue
        if isinstance(event, Welcome):
            return event
        if isinstance(event, Error):
            raise error_for_code(event.code, event.message)
        if isinstance(event, ConnectionClosed):
            raise ConnectionFailed("the server closed the connection during HELLO")
        raise ProtocolViolation(f"expected WELCOME, got {type(event).__name__}")


def _describe(exc: BaseException) -> str:
    """Describe a transport error without echoing anything secret."""
    # TlsStream wraps a failed transport call in one more BrokenResourceError: describe
    # the transport's own error (the socket's errno), as with a plain TCP stream
    while (isinstance(exc, trio.BrokenResourceError)
           and isinstance(exc.__cause__, (trio.BrokenResourceError, trio.ClosedResourceError))):
        exc = exc.__cause__
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, trio.BrokenResourceError) and isinstance(cause, ssl.SSLError):
        return f"TLS error: {cause.reason or cause.__class__.__name__}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc.__class__.__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    # trio's "all attempts to connect failed" carries the real errors as its cause
    causes = cause.exceptions if isinstance(cause, BaseExceptionGroup) else (cause,)
    for inner in causes:
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror
    return str(exc) if isinstance(exc, OSError) and str(exc) else type(exc).__name__
