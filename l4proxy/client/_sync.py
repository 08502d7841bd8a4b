"""A thin synchronous wrapper around :class:`ChunkClient` for scripts.

Theory of operation: a background thread runs ``trio.run`` holding one connection; each
method hands its coroutine to that thread with ``trio.from_thread.run`` and waits.
Streams are collected (``get`` returns bytes or writes to a file object).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import IO, Any, TypeVar

import trio

from ._client import ChunkClient, TableResult

__all__ = ["SyncChunkClient"]

T = TypeVar("T")


class SyncChunkClient:
    """Blocking client. ``with SyncChunkClient(host, port, api_key=...) as c: c.ping()``.

    Takes the same keyword arguments as :meth:`ChunkClient.connect`.
    """

    def __init__(self, host: str, port: int, **kwargs: Any) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._client: ChunkClient | None = None
        self._error: BaseException | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, args=(host, port, kwargs),
                                        name="chunk-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self, host: str, port: int, kwargs: dict[str, Any]) -> None:
        async def run() -> None:
            try:
                async with ChunkClient.connect(host, port, **kwargs) as client:
                    self._client = client
                    self._token = trio.lowlevel.current_trio_token()
                    self._stop = trio.Event()
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:  # reported to the constructor or the next call
                self._error = exc
            finally:
                self._ready.set()

        trio.run(run)

    def _call(self, fn: Callable[[ChunkClient], Awaitable[T]]) -> T:
        if self._client is None or self._token is None:
            raise self._error or RuntimeError("client is closed")
        client = self._client

        async def go() -> T:
            return await fn(client)

        return trio.from_thread.run(go, trio_token=self._token)

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            stop = self._stop
            try:
                trio.from_thread.run_sync(stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=10)
        self._client = None

    def __enter__(self) -> SyncChunkClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def session_id(self) -> str:
        assert self._client is not None
        return self._client.session_id

    def ping(self, data: bytes | None = None) -> Mapping[str, Any]:
        return self._call(lambda c: c.ping(data))

    def list_buckets(self) -> list[str]:
        return self._call(lambda c: c.list_buckets())

    def create_bucket(self, bucket: str, **kw: Any) -> Mapping[str, Any]:
        return self._call(lambda c: c.create_bucket(bucket, **kw))

    def delete_bucket(self, bucket: str, **kw: Any) -> Mapping[str, Any]:
        return self._call(lambda c: c.delete_bucket(bucket, **kw))

    def list(self, bucket: str, **kw: Any) -> TableResult:
        return self._call(lambda c: c.list(bucket, **kw))

    def stat(self, bucket: str, key: str) -> Mapping[str, Any]:
        return self._call(lambda c: c.stat(bucket, key))

    def put(self, bucket: str, key: str, source: bytes | IO[bytes], **kw: Any) -> Mapping[str, Any]:
        return self._call(lambda c: c.put(bucket, key, source, **kw))

    def get(self, bucket: str, key: str, **kw: Any) -> tuple[bytes, Mapping[str, Any]]:
        return self._call(lambda c: c.get(bucket, key, **kw))

    def delete(self, bucket: str, key: str, **kw: Any) -> Mapping[str, Any]:
        return self._call(lambda c: c.delete(bucket, key, **kw))

    def chunk(self, bucket: str, key: str, **kw: Any) -> TableResult:
        return self._call(lambda c: c.chunk(bucket, key, **kw))

    def create_table(self, table: str, columns: Sequence[tuple[str, str]], **kw: Any) -> Mapping[str, Any]:
        return self._call(lambda c: c.create_table(table, columns, **kw))

    def insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
               **kw: Any) -> Mapping[str, Any]:
        rows = list(rows)
        return self._call(lambda c: c.insert(table, columns, rows, **kw))

    def scan(self, table: str, **kw: Any) -> TableResult:
        return self._call(lambda c: c.scan(table, **kw))

    def drop_table(self, table: str, **kw: Any) -> Mapping[str, Any]:
        return self._call(lambda c: c.drop_table(table, **kw))
