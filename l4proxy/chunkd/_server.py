"""The reference chunking service on trio: one task pair per connection.

Theory of operation: ``serve`` binds the listeners (optionally TLS) and runs a
``_Session`` per connection. A session has a reader task and a worker task in one
nursery. The reader turns socket bytes into events through the sans-IO codec: REQUESTs
go into a queue (bounded by the negotiated ``max_pending``, which the codec enforces),
body frames go into the channel of the upload the worker is currently taking (a small
channel, so a slow disk stops the reader and TCP pushes back on the client), and CANCEL
marks the request cancelled (handlers check the mark between frames, and an upload
waiting for its body is woken). The worker takes requests in order, so responses never
interleave, and is the only task that writes responses (under ``_send_lock``, which also
keeps codec order and socket order the same).

Blocking disk and SQLite work runs in threads (``trio.to_thread``); memory per
connection stays bounded by the frame size whatever the object size.
"""

from __future__ import annotations

import hashlib
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import trio

from l4proxy.chunking import Chunker, ChunkSpecError, chunk_spec
from l4proxy.ids import uuid7
from l4proxy.tls import TlsStream
from l4proxy.wire import (
    NEED_DATA,
    Access,
    Cancel,
    Column,
    ColumnType,
    Connection,
    ConnectionClosed,
    Continue,
    Data,
    Error,
    ErrorCode,
    Event,
    Hello,
    Limits,
    Op,
    RemoteProtocolError,
    Request,
    ResourceKind,
    ResourceUse,
    Response,
    Result,
    Role,
    Rows,
    StreamState,
    Welcome,
    connection_error_frame,
    negotiate_limits,
    resources,
)

from ._errors import ServiceError
from ._keys import ApiKey, KeyRing
from ._names import check_bucket, check_key, check_table
from ._objects import ObjectStore
from ._tables import TableStore

__all__ = ["ChunkService", "ChunkdConfig", "serve"]

log = logging.getLogger("l4proxy.chunkd")

T = TypeVar("T")

#: bytes reserved for the msgpack array header inside a ROWS frame
_ROWS_OVERHEAD = 16
_LIST_PAGE = 500
#: bytes of an upload gathered before one write in a worker thread
_WRITE_BATCH = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkdConfig:
    """Validated settings of one chunkd process.

    Attributes:
        host, port: where to listen (port 0 picks a free port; ``serve`` reports it).
        data_dir: where objects and tables live (created 0700).
        keys: the API keys.
        tls_cert, tls_key: serve TLS when both are set.
        limits: the most the server offers in WELCOME.
        hello_timeout: seconds a new connection has to complete TLS and HELLO.
        idle_timeout: seconds without traffic (and no request running) before closing.
        read_size: bytes per socket read.
        max_connections: concurrent connections; further ones get OVER_CAPACITY.
        max_object_size: largest object ``put`` accepts.
    """

    host: str
    port: int
    data_dir: Path
    keys: KeyRing
    tls_cert: Path | None = None
    tls_key: Path | None = None
    name: str = "chunkd"
    limits: Limits = field(default_factory=Limits)
    hello_timeout: float = 10.0
    idle_timeout: float = 300.0
    read_size: int = 256 << 10
    max_connections: int = 1024
    max_object_size: int = 1 << 40


class ChunkService:
    """The service's state shared by all sessions: stores and keys."""

    def __init__(self, config: ChunkdConfig) -> None:
        self.config = config
        self.objects = ObjectStore(config.data_dir, max_object_size=config.max_object_size)
        self.tables = TableStore(config.data_dir)
        self.connections = 0

    def close(self) -> None:
        self.objects.close()
        self.tables.close()


def _server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+, no client certificate (API keys authenticate). Renegotiation is refused:
    :class:`~l4proxy.tls.TlsStream` sends without reading, so a client's renegotiation
    would break the stream (see its theory of operation)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert, key)
    return ctx


async def serve(config: ChunkdConfig, *,
                task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED) -> None:
    """Run chunkd until cancelled.

    Reports the bound ``(host, port)`` addresses through ``task_status.started``, so
    ``await nursery.start(serve, config)`` returns them.
    """
    service = ChunkService(config)
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        ctx = (_server_ssl_context(config.tls_cert, config.tls_key)
               if config.tls_cert and config.tls_key else None)
        addresses = []
        for ln in listeners:
            addr = ln.socket.getsockname()
            addresses.append((addr[0], addr[1]))
        log.info("chunkd listening on %s (tls=%s, keys=%d)",
                 ", ".join(f"{h}:{p}" for h, p in addresses), bool(config.tls_cert), len(config.keys))
        task_status.started(addresses)

        async def handler(tcp: trio.SocketStream) -> None:
            # TLS (when configured) wraps the accepted socket here (TlsStream has no
            # listener like trio.SSLListener): the handshake runs inside the session's
            # first read or write, so hello_timeout bounds it together with HELLO, and a
            # failed one ends the session like a dropped connection (BrokenResourceError)
            stream: trio.abc.Stream = tcp
            if ctx is not None:
                stream = TlsStream(tcp, ctx, server_side=True, read_size=config.read_size)
            try:
                await _Session(service, stream).run()
            except Exception:  # a bug in one session must not take the service down
                log.exception("session crashed")

        await trio.serve_listeners(handler, listeners)
    finally:
        service.close()


class _Closing(Exception):
    """End the session (the ERROR, if any, has been sent)."""


class _Cancelled(Exception):
    """The client cancelled the request being handled."""


@dataclass(slots=True)
class _Upload:
    request_id: int
    send: trio.MemorySendChannel[Event]


class _Session:
    def __init__(self, service: ChunkService, stream: trio.abc.Stream) -> None:
        self.service = service
        self.config = service.config
        self.stream = stream
        self.conn = Connection(Role.SERVER, max_frame_payload=self.config.limits.max_frame_payload,
                               max_control_size=self.config.limits.max_control_size,
                               max_pending=self.config.limits.max_pending)
        self.key: ApiKey | None = None
        self.session_id = "-"
        self._send_lock = trio.Lock()
        q_send, q_recv = trio.open_memory_channel[Request](math.inf)
        self._queue_send = q_send
        self._queue_recv = q_recv
        # CANCEL only sets a mark: handlers check it between frames, so a response frame
        # is never cut in half; an upload waiting for its body is woken by closing its channel
        self._cancelled: set[int] = set()
        self._upload: _Upload | None = None

    # --- plumbing ------------------------------------------------------------------------

    async def _send(self, event: Event) -> None:
        async with self._send_lock:
            data = self.conn.send(event)
            if data:
                await self.stream.send_all(data)

    async def _read_event(self) -> Event:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Event)
                return event
            timeout = self.config.idle_timeout if self.conn.pending == 0 else math.inf
            with trio.move_on_after(timeout) as idle:
                data = await self.stream.receive_some(self.config.read_size)
            if idle.cancelled_caught:
                raise _Closing("idle timeout")
            self.conn.receive_data(data)

    async def _protocol_error(self, exc: RemoteProtocolError) -> None:
        log.info("session %s: protocol error: %s", self.session_id, exc.message)
        async with self._send_lock:
            with trio.move_on_after(2):
                await self.stream.send_all(connection_error_frame(exc.code, exc.message))

    def _check_cancel(self, rid: int) -> None:
        if rid in self._cancelled:
            raise _Cancelled

    async def _fail(self, rid: int, code: ErrorCode, message: str) -> None:
        if self.conn.stream_state(rid) is not StreamState.DONE:
            await self._send(Error(request_id=rid, code=code, message=message))

    # --- session -------------------------------------------------------------------------

    async def run(self) -> None:
        svc = self.service
        if svc.connections >= self.config.max_connections:
            with trio.move_on_after(1):
                await self.stream.send_all(connection_error_frame(
                    ErrorCode.OVER_CAPACITY, "too many connections"))
            await trio.aclose_forcefully(self.stream)
            return
        svc.connections += 1
        try:
            await self._guarded(self._run)
        finally:
            svc.connections -= 1
            await trio.aclose_forcefully(self.stream)

    async def _guarded(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn``; expected ways for a session to end are handled here, not raised."""
        try:
            await fn()
        except RemoteProtocolError as exc:
            await self._protocol_error(exc)
        except _Closing as exc:
            log.debug("session %s closing: %s", self.session_id, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
            log.debug("session %s: transport closed: %s", self.session_id, type(exc).__name__)

    async def _run(self) -> None:
        try:
            with trio.fail_after(self.config.hello_timeout):
                hello = await self._read_event()
        except trio.TooSlowError:
            raise _Closing("no HELLO in time") from None
        if isinstance(hello, ConnectionClosed):
            return
        assert isinstance(hello, Hello)  # the codec only accepts HELLO first
        key = (self.service.config.keys.authenticate(hello.api_key.reveal())
               if hello.api_key is not None else None)
        if key is None:
            message = "an API key is required" if hello.api_key is None else "invalid API key"
            log.info("authentication failed: %s", message)
            await self._send(Error(request_id=0, code=ErrorCode.AUTH_FAILED, message=message))
            return
        self.key = key
        self.session_id = str(uuid7())
        limits = negotiate_limits(hello.limits, self.config.limits)
        await self._send(Welcome(server=self.config.name, session_id=self.session_id,
                                 limits=limits, scope=key.scope))
        log.info("session %s: client %r authenticated as key %r", self.session_id,
                 hello.client[:64], key.name)
        async with trio.open_nursery() as nursery:

            async def worker() -> None:
                try:
                    await self._guarded(self._worker)
                finally:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(worker)
            try:
                await self._guarded(self._reader)
            finally:
                nursery.cancel_scope.cancel()

    async def _reader(self) -> None:
        while True:
            event = await self._read_event()
            if isinstance(event, Request):
                self._queue_send.send_nowait(event)
            elif isinstance(event, (Data, Rows)):
                upload = self._upload
                if upload is not None and upload.request_id == event.request_id:
                    try:
                        await upload.send.send(event)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the upload ended (error or cancel); the rest is dropped
            elif isinstance(event, Cancel):
                self._cancelled.add(event.request_id)
                upload = self._upload
                if upload is not None and upload.request_id == event.request_id:
                    upload.send.close()
            elif isinstance(event, (ConnectionClosed, Error)):
                return

    async def _worker(self) -> None:
        async for request in self._queue_recv:
            rid = request.request_id
            if rid in self._cancelled:
                self._cancelled.discard(rid)
                await self._fail(rid, ErrorCode.CANCELLED, "cancelled")
                continue
            start = time.perf_counter()
            outcome = "ok"
            try:
                await self._handle(request)
            except _Cancelled:
                outcome = "CANCELLED"
                await self._fail(rid, ErrorCode.CANCELLED, "cancelled")
            except ServiceError as exc:
                outcome = exc.code.name
                await self._fail(rid, exc.code, exc.message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise
            except Exception:
                outcome = "INTERNAL"
                log.exception("session %s: request %d (%s) failed", self.session_id, rid,
                              request.op)
                await self._fail(rid, ErrorCode.INTERNAL, "internal error")
            self._cancelled.discard(rid)
            log.debug("session %s: request %d %s -> %s in %.1f ms", self.session_id, rid,
                      request.op, outcome, (time.perf_counter() - start) * 1000)

    # --- operations ----------------------------------------------------------------------

    async def _handle(self, req: Request) -> None:
        key = self.key
        assert key is not None
        args = req.args
        op = req.op
        # names first (INVALID_ARGUMENT), then scope (FORBIDDEN), then existence
        for name in ("bucket", "into"):
            if args.get(name) is not None:
                check_bucket(args[name])
        if "table" in args:
            check_table(args["table"])
        if "key" in args:
            check_key(args["key"])
        if op is Op.LIST_BUCKETS:
            if Access.READ not in key.scope.access:
                raise ServiceError(ErrorCode.FORBIDDEN, "this API key may not read buckets")
        else:
            key.check(resources(op, args))
        handler = _HANDLERS[op]
        await handler(self, req)

    async def _ping(self, req: Request) -> None:
        fields: dict[str, Any] = {"time": time.time()}
        if "data" in req.args:
            fields["data"] = req.args["data"]
        await self._send(Result(request_id=req.request_id, fields=fields))

    async def _list_buckets(self, req: Request) -> None:
        assert self.key is not None
        names = await trio.to_thread.run_sync(self.service.objects.list_buckets)
        visible = [n for n in names if self.key.allows(
            ResourceUse(kind=ResourceKind.BUCKET, name=n, access=Access.READ))]
        await self._send(Result(request_id=req.request_id, fields={"buckets": visible[:10_000]}))

    async def _create_bucket(self, req: Request) -> None:
        bucket = req.args["bucket"]
        await trio.to_thread.run_sync(self.service.objects.create_bucket, bucket)
        await self._send(Result(request_id=req.request_id, fields={"bucket": bucket}))

    async def _delete_bucket(self, req: Request) -> None:
        bucket = req.args["bucket"]
        count = await trio.to_thread.run_sync(
            lambda: self.service.objects.delete_bucket(bucket, force=req.args.get("force", False)))
        await self._send(Result(request_id=req.request_id,
                                fields={"bucket": bucket, "deleted_objects": count}))

    async def _stat(self, req: Request) -> None:
        info = await trio.to_thread.run_sync(self.service.objects.stat, req.args["bucket"],
                                             req.args["key"])
        await self._send(Result(request_id=req.request_id, fields={
            "bucket": info.bucket, "key": info.key, "size": info.size, "sha256": info.sha256,
            "modified": info.modified}))

    async def _delete(self, req: Request) -> None:
        bucket, key = req.args["bucket"], req.args["key"]
        await trio.to_thread.run_sync(self.service.objects.delete, bucket, key)
        await self._send(Result(request_id=req.request_id, fields={"bucket": bucket, "key": key}))

    async def _rows_stream(self, rid: int, columns: tuple[Column, ...],
                           batches: Callable[[], list[tuple[Any, ...]] | None]) -> int:
        """Send RESPONSE(columns) and ROWS frames from ``batches`` (called in a thread until
        it returns None). Returns the number of rows sent."""
        await self._send(Response(request_id=rid, columns=columns))
        budget = self.conn.limits.max_frame_payload - _ROWS_OVERHEAD
        pending: list[tuple[Any, ...]] = []
        size = 0
        count = 0
        while True:
            self._check_cancel(rid)
            batch = await trio.to_thread.run_sync(batches)
            if batch is None:
                break
            for row in batch:
                row_size = len(msgpack.packb(row, use_bin_type=True))
                if row_size > budget:
                    raise ServiceError(ErrorCode.TOO_LARGE,
                                       f"a row of {row_size} bytes does not fit in one frame")
                if size + row_size > budget:
                    self._check_cancel(rid)
                    await self._send(Rows(request_id=rid, rows=pending))
                    pending, size = [], 0
                pending.append(row)
                size += row_size
                count += 1
        await self._send(Rows(request_id=rid, rows=pending, end_stream=True))
        return count

    async def _list(self, req: Request) -> None:
        bucket = req.args["bucket"]
        prefix = req.args.get("prefix", "")
        limit = req.args.get("limit")
        store = self.service.objects
        await trio.to_thread.run_sync(store.require_bucket, bucket)
        state: dict[str, Any] = {"after": None, "left": limit, "done": False, "truncated": False}

        def next_batch() -> list[tuple[Any, ...]] | None:
            if state["done"]:
                return None
            want = _LIST_PAGE if state["left"] is None else min(_LIST_PAGE, state["left"] + 1)
            page = store.list_objects(bucket, prefix, state["after"], want)
            if state["left"] is not None and len(page) > state["left"]:
                state["truncated"] = True
                page = page[: state["left"]]
                state["done"] = True
            elif len(page) < want:
                state["done"] = True
            if page:
                state["after"] = page[-1].key
            if state["left"] is not None:
                state["left"] -= len(page)
                if state["left"] == 0:
                    state["done"] = True
                    state["truncated"] = state["truncated"] or bool(
                        store.list_objects(bucket, prefix, state["after"], 1))
            return [(o.key, o.size, o.sha256, o.modified) for o in page]

        columns = (Column(name="key", type=ColumnType.TEXT), Column(name="size", type=ColumnType.INT),
                   Column(name="sha256", type=ColumnType.TEXT),
                   Column(name="modified", type=ColumnType.FLOAT))
        count = await self._rows_stream(req.request_id, columns, next_batch)
        await self._send(Result(request_id=req.request_id,
                                fields={"count": count, "truncated": state["truncated"]}))

    async def _put(self, req: Request) -> None:
        rid = req.request_id
        store = self.service.objects
        declared = req.args.get("size")
        if declared is not None and declared > store.max_object_size:
            raise ServiceError(ErrorCode.TOO_LARGE, f"object larger than {store.max_object_size} bytes")
        handle = await trio.to_thread.run_sync(store.begin_put, req.args["bucket"], req.args["key"])
        try:
            info = await self._receive_body(rid, handle.write, handle.commit)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(handle.abort)
            raise
        await self._send(Result(request_id=rid, fields={
            "bucket": info.bucket, "key": info.key, "size": info.size, "sha256": info.sha256}))

    async def _receive_body(self, rid: int, consume: Callable[[Any], None],
                            finish: Callable[[], T]) -> T:
        """Grant CONTINUE, hand the body to ``consume`` in a thread, then ``finish``.

        DATA pieces (16 KiB each when they come from TLS records) are gathered up to
        ``_WRITE_BATCH`` bytes per thread hop; ROWS frames go one frame per hop.
        """
        send, recv = trio.open_memory_channel[Event](4)
        self._upload = _Upload(request_id=rid, send=send)
        pending = bytearray()
        try:
            await self._send(Continue(request_id=rid))
            async with recv:
                while True:
                    try:
                        event = await recv.receive()
                    except trio.EndOfChannel:
                        raise _Cancelled from None
                    end = getattr(event, "end_stream", False)
                    if isinstance(event, Data):
                        pending += event.data
                        if pending and (end or len(pending) >= _WRITE_BATCH):
                            await trio.to_thread.run_sync(consume, bytes(pending))
                            pending.clear()
                    elif isinstance(event, Rows) and event.rows:
                        await trio.to_thread.run_sync(consume, event.rows)
                    if end:
                        break
            return await trio.to_thread.run_sync(finish)
        finally:
            self._upload = None
            send.close()

    async def _get(self, req: Request) -> None:
        rid = req.request_id
        info, f = await trio.to_thread.run_sync(self.service.objects.open_object,
                                                req.args["bucket"], req.args["key"])
        try:
            offset = req.args.get("offset", 0)
            if offset > info.size:
                raise ServiceError(ErrorCode.INVALID_ARGUMENT,
                                   f"offset {offset} is past the end ({info.size} bytes)")
            length = min(req.args.get("length", info.size - offset), info.size - offset)
            if offset:
                await trio.to_thread.run_sync(f.seek, offset)
            await self._send(Response(request_id=rid, size=length))
            digest = hashlib.sha256()
            piece_max = self.conn.limits.max_frame_payload
            left = length

            def read_piece() -> bytes:
                return f.read(min(piece_max, left))

            if length == 0:
                await self._send(Data(request_id=rid, data=b"", end_stream=True))
            while left > 0:
                self._check_cancel(rid)
                piece = await trio.to_thread.run_sync(read_piece)
                if not piece:
                    raise ServiceError(ErrorCode.INTERNAL, "object shrank while reading")
                left -= len(piece)
                digest.update(piece)
                await self._send(Data(request_id=rid, data=piece, end_stream=left == 0))
        finally:
            f.close()
        await self._send(Result(request_id=rid, fields={"size": length, "sha256": digest.hexdigest()}))

    async def _chunk(self, req: Request) -> None:
        rid = req.request_id
        args = req.args
        try:
            spec = chunk_spec(args["strategy"], size=args.get("size"), min_size=args.get("min_size"),
                              avg_size=args.get("avg_size"), max_size=args.get("max_size"))
        except ChunkSpecError as exc:
            raise ServiceError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        with_data = bool(args.get("with_data", False))
        if with_data and spec.max_chunk_size > self.conn.limits.max_frame_payload - 4096:
            raise ServiceError(ErrorCode.INVALID_ARGUMENT,
                               "with_data needs chunks smaller than the frame size "
                               f"({self.conn.limits.max_frame_payload - 4096} bytes)")
        into = args.get("into")
        store = self.service.objects
        if into is not None:
            await trio.to_thread.run_sync(store.require_bucket, into)
        info, f = await trio.to_thread.run_sync(store.open_object, args["bucket"], args["key"])
        chunker = Chunker(spec)
        counters = {"stored": 0, "bytes": 0, "eof": False}

        def next_batch() -> list[tuple[Any, ...]] | None:
            if counters["eof"]:
                return None
            data = f.read(1 << 20)
            if data:
                done = chunker.feed(data)
            else:
                done = chunker.finish()
                counters["eof"] = True
            rows: list[tuple[Any, ...]] = []
            for record, payload in done:
                counters["bytes"] += record.length
                if into is not None and not store.exists(into, record.sha256):
                    store.put_bytes(into, record.sha256, payload)
                    counters["stored"] += 1
                row: tuple[Any, ...] = (record.index, record.offset, record.length, record.sha256)
                rows.append((*row, payload) if with_data else row)
            return rows

        columns = [Column(name="index", type=ColumnType.INT), Column(name="offset", type=ColumnType.INT),
                   Column(name="length", type=ColumnType.INT), Column(name="sha256", type=ColumnType.TEXT)]
        if with_data:
            columns.append(Column(name="data", type=ColumnType.BYTES))
        try:
            count = await self._rows_stream(rid, tuple(columns), next_batch)
        finally:
            f.close()
        del info
        await self._send(Result(request_id=rid, fields={
            "chunks": count, "bytes": counters["bytes"], "stored": counters["stored"]}))

    async def _create_table(self, req: Request) -> None:
        table = req.args["table"]
        await trio.to_thread.run_sync(self.service.tables.create_table, table, req.args["columns"])
        await self._send(Result(request_id=req.request_id, fields={"table": table}))

    async def _drop_table(self, req: Request) -> None:
        table = req.args["table"]
        await trio.to_thread.run_sync(self.service.tables.drop_table, table)
        await self._send(Result(request_id=req.request_id, fields={"table": table}))

    async def _insert(self, req: Request) -> None:
        rid = req.request_id
        table = req.args["table"]
        inserter = await trio.to_thread.run_sync(self.service.tables.begin_insert, table,
                                                 req.args["columns"])
        try:
            count = await self._receive_body(rid, inserter.add, inserter.commit)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(inserter.abort)
            raise
        await self._send(Result(request_id=rid, fields={"table": table, "inserted": count}))

    async def _scan(self, req: Request) -> None:
        rid = req.request_id
        args = req.args
        limit = args.get("limit")
        columns, batches = await trio.to_thread.run_sync(
            lambda: self.service.tables.scan(args["table"], args.get("columns"),
                                             args.get("where", {}),
                                             None if limit is None else limit + 1))
        state = {"seen": 0, "truncated": False}
        it: Iterator[list[tuple[Any, ...]]] = batches

        def next_batch() -> list[tuple[Any, ...]] | None:
            batch = next(it, None)
            if batch is None:
                return None
            if limit is not None and state["seen"] + len(batch) > limit:
                batch = batch[: limit - state["seen"]]
                state["truncated"] = True
            state["seen"] += len(batch)
            return batch

        try:
            count = await self._rows_stream(rid, columns, next_batch)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                await trio.to_thread.run_sync(close)
        await self._send(Result(request_id=rid, fields={"rows": count,
                                                         "truncated": bool(state["truncated"])}))


_HANDLERS: dict[Op, Callable[[_Session, Request], Any]] = {
    Op.PING: _Session._ping,
    Op.LIST_BUCKETS: _Session._list_buckets,
    Op.CREATE_BUCKET: _Session._create_bucket,
    Op.DELETE_BUCKET: _Session._delete_bucket,
    Op.LIST: _Session._list,
    Op.STAT: _Session._stat,
    Op.PUT: _Session._put,
    Op.GET: _Session._get,
    Op.DELETE: _Session._delete,
    Op.CHUNK: _Session._chunk,
    Op.CREATE_TABLE: _Session._create_table,
    Op.INSERT: _Session._insert,
    Op.SCAN: _Session._scan,
    Op.DROP_TABLE: _Session._drop_table,
}
