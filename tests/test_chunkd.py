"""chunkd and the client library over real loopback sockets."""

from __future__ import annotations

import hashlib
import os
import random
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgpack
import pytest
import trio

from l4proxy.chunkd import ChunkdConfigError, load_key_file, load_keys_toml
from l4proxy.client import ClientError, ConnectionFailed, RequestFailed
from l4proxy.wire import (
    NEED_DATA,
    Access,
    Connection,
    ConnectionClosed,
    Data,
    Error,
    ErrorCode,
    Event,
    Hello,
    Limits,
    Op,
    Request,
    Response,
    Result,
    Role,
    Secret,
    Welcome,
)

from .conftest import ChunkdHandle, start_chunkd, write_private


async def test_every_operation_round_trip(chunkd: ChunkdHandle) -> None:
    async with chunkd.connect() as c:
        assert c.scope.access == (Access.READ, Access.WRITE, Access.ADMIN)
        assert (await c.ping(b"abc"))["data"] == b"abc"
        assert await c.create_bucket("photos") == {"bucket": "photos"}
        assert await c.list_buckets() == ["photos"]
        body = os.urandom(300_000)
        put = await c.put("photos", "2026/cat.jpg", body)
        assert put["sha256"] == hashlib.sha256(body).hexdigest() and put["size"] == len(body)
        got, res = await c.get("photos", "2026/cat.jpg")
        assert got == body and res["sha256"] == put["sha256"]
        part, res = await c.get("photos", "2026/cat.jpg", offset=1000, length=10)
        assert part == body[1000:1010] and res["size"] == 10
        st = await c.stat("photos", "2026/cat.jpg")
        assert (st["size"], st["sha256"]) == (len(body), put["sha256"])
        await c.put("photos", "2026/dog.jpg", b"woof")
        await c.put("photos", "other", b"")
        listed = await c.list("photos", prefix="2026/")
        assert [r[0] for r in listed.rows] == ["2026/cat.jpg", "2026/dog.jpg"]
        assert [col.name for col in listed.columns] == ["key", "size", "sha256", "modified"]
        assert listed.result == {"count": 2, "truncated": False}
        limited = await c.list("photos", limit=1)
        assert len(limited.rows) == 1 and limited.result["truncated"] is True
        empty, _ = await c.get("photos", "other")
        assert empty == b""
        chunks = await c.chunk("photos", "2026/cat.jpg", strategy="fixed", size=65536,
                               with_data=True)
        assert [r[2] for r in chunks.rows] == [65536] * 4 + [300_000 - 4 * 65536]
        assert b"".join(r[4] for r in chunks.rows) == body
        assert all(hashlib.sha256(r[4]).hexdigest() == r[3] for r in chunks.rows)
        await c.create_bucket("chunks")
        stored = await c.chunk("photos", "2026/cat.jpg", strategy="cdc", avg_size=16384,
                               into="chunks")
        assert stored.result["stored"] == len({r[3] for r in stored.rows})
        listed_chunks = await c.list("chunks")
        assert {r[0] for r in listed_chunks.rows} == {r[3] for r in stored.rows}
        assert await c.delete("photos", "2026/dog.jpg") == {"bucket": "photos", "key": "2026/dog.jpg"}
        with pytest.raises(RequestFailed) as exc:
            await c.stat("photos", "2026/dog.jpg")
        assert exc.value.code is ErrorCode.NOT_FOUND
        await c.create_table("events", [("id", "int"), ("who", "text"), ("ok", "bool"),
                                        ("score", "float"), ("blob", "bytes")])
        rows = [(i, f"user{i % 3}", i % 2 == 0, i / 2, bytes([i % 256])) for i in range(1500)]
        assert (await c.insert("events", ["id", "who", "ok", "score", "blob"], rows))["inserted"] == 1500
        scanned = await c.scan("events")
        assert scanned.rows == rows
        assert [col.type.value for col in scanned.columns] == ["int", "text", "bool", "float", "bytes"]
        some = await c.scan("events", columns=["id"], where={"who": "user1", "ok": True}, limit=2)
        assert some.rows == [(4,), (10,)] and some.result == {"rows": 2, "truncated": True}
        assert await c.drop_table("events") == {"table": "events"}
        with pytest.raises(RequestFailed) as exc:
            await c.scan("events")
        assert exc.value.code is ErrorCode.NOT_FOUND
        with pytest.raises(RequestFailed) as exc:
            await c.delete_bucket("photos")
        assert exc.value.code is ErrorCode.CONFLICT
        assert (await c.delete_bucket("photos", force=True))["deleted_objects"] == 2
        assert await c.list_buckets() == ["chunks"]


async def test_pipelined_requests_on_one_connection(chunkd: ChunkdHandle) -> None:
    async with chunkd.connect() as c:
        await c.create_bucket("b")
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            data = str(i).encode() * (i + 1)
            await c.put("b", f"k{i}", data)
            results[i] = (await c.get("b", f"k{i}"))[0]

        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(one, i)
        assert results == {i: str(i).encode() * (i + 1) for i in range(20)}


async def test_cdc_boundaries_are_stable_through_the_service(chunkd: ChunkdHandle) -> None:
    rng = random.Random(7)
    base = rng.randbytes(2 << 20)
    edited = base[:1000] + b"inserted!" + base[1000:]
    async with chunkd.connect() as c:
        await c.create_bucket("b")
        await c.put("b", "v1", base)
        await c.put("b", "v2", edited)
        one = await c.chunk("b", "v1", strategy="cdc", avg_size=16384)
        two = await c.chunk("b", "v2", strategy="cdc", avg_size=16384)
    h1 = {r[3] for r in one.rows}
    h2 = [r[3] for r in two.rows]
    assert sum(h in h1 for h in h2) >= 0.9 * len(h2)


# --- scoped keys -------------------------------------------------------------------------


@pytest.fixture
def scoped_keys(tmp_path: Path) -> Path:
    return write_private(tmp_path / "keys.toml", """
[[keys]]
name = "admin"
key = "admin-secret-1"
buckets = ["*"]
tables = ["*"]
access = ["read", "write", "admin"]

[[keys]]
name = "logs-reader"
key_sha256 = "READER_SHA"
buckets = ["logs-*"]
access = ["read"]

[[keys]]
name = "events-writer"
key = "writer-secret-3"
tables = ["events"]
access = ["write"]
""".replace("READER_SHA", hashlib.sha256(b"reader-secret-2").hexdigest()))


async def test_scoped_keys(nursery: trio.Nursery, tmp_path: Path, scoped_keys: Path) -> None:
    srv = await start_chunkd(nursery, tmp_path, keys_toml=scoped_keys)
    async with srv.connect(api_key="admin-secret-1") as admin:
        await admin.create_bucket("logs-2026")
        await admin.create_bucket("secrets")
        await admin.put("logs-2026", "a", b"log line")
        await admin.put("secrets", "a", b"top secret")
        await admin.create_table("events", [("n", "int")])
        await admin.create_table("payroll", [("n", "int")])
    async with srv.connect(api_key="reader-secret-2") as reader:
        assert reader.scope.buckets == ("logs-*",) and reader.scope.access == (Access.READ,)
        assert await reader.list_buckets() == ["logs-2026"]
        assert (await reader.get("logs-2026", "a"))[0] == b"log line"
        for attempt in (reader.get("secrets", "a"), reader.put("logs-2026", "b", b"x"),
                        reader.delete("logs-2026", "a"), reader.create_bucket("logs-new"),
                        reader.scan("events")):
            with pytest.raises(RequestFailed) as exc:
                await attempt
            assert exc.value.code is ErrorCode.FORBIDDEN
        # chunking into another bucket needs write there
        with pytest.raises(RequestFailed) as exc:
            await reader.chunk("logs-2026", "a", strategy="fixed", into="logs-2026")
        assert exc.value.code is ErrorCode.FORBIDDEN
    async with srv.connect(api_key="writer-secret-3") as writer:
        assert (await writer.insert("events", ["n"], [(1,), (2,)]))["inserted"] == 2
        for attempt in (writer.scan("events"), writer.insert("payroll", ["n"], [(1,)]),
                        writer.drop_table("events"), writer.list_buckets()):
            with pytest.raises(RequestFailed) as exc:
                await attempt
            assert exc.value.code is ErrorCode.FORBIDDEN
    async with srv.connect(api_key="admin-secret-1") as admin:
        # nothing the refused requests asked for happened
        assert (await admin.scan("payroll")).rows == []
        assert (await admin.list("logs-2026")).result["count"] == 1
        assert await admin.list_buckets() == ["logs-2026", "secrets"]
        assert (await admin.scan("events")).rows == [(1,), (2,)]


def test_key_files_are_validated(tmp_path: Path) -> None:
    empty = write_private(tmp_path / "empty", "  \n")
    with pytest.raises(ChunkdConfigError, match="empty"):
        load_key_file(empty)
    loose = tmp_path / "loose"
    loose.write_text("k")
    loose.chmod(0o644)
    with pytest.raises(ChunkdConfigError, match="chmod 600"):
        load_key_file(loose)
    with pytest.raises(ChunkdConfigError, match="cannot read"):
        load_key_file(tmp_path / "missing")
    cases = {
        "bad-toml": "[[keys]\n",
        "no-keys": "x = 1\n",
        "unknown": '[[keys]]\nname="a"\nkey="k"\naccess=["read"]\ncolour="red"\n',
        "both": '[[keys]]\nname="a"\nkey="k"\nkey_sha256="00"\naccess=["read"]\n',
        "bad-access": '[[keys]]\nname="a"\nkey="k"\naccess=["root"]\n',
        "dup": '[[keys]]\nname="a"\nkey="k"\naccess=["read"]\n[[keys]]\nname="b"\nkey="k"\naccess=["read"]\n',
        "bad-hash": '[[keys]]\nname="a"\nkey_sha256="zz"\naccess=["read"]\n',
    }
    for name, text in cases.items():
        path = write_private(tmp_path / f"{name}.toml", text)
        with pytest.raises(ChunkdConfigError) as exc:
            load_keys_toml(path)
        assert "k\n" not in str(exc.value)
    ring = load_key_file(write_private(tmp_path / "good", "  s3cret \n"))
    assert ring.authenticate("s3cret") is not None and ring.authenticate("s3cre") is None


# --- bad input -----------------------------------------------------------------------------


async def test_bad_names_and_path_tricks(chunkd: ChunkdHandle) -> None:
    async with chunkd.connect() as c:
        await c.create_bucket("b")
        for key in ("../etc/passwd", "a/../../b", "./x", "/abs", "a//b", "a\\b", "nul\x00",
                    "tab\tkey", "..", "a/.."):
            with pytest.raises(RequestFailed) as exc:
                await c.put("b", key, b"x")
            assert exc.value.code is ErrorCode.INVALID_ARGUMENT, key
        for bucket in ("UPPER", "../b", "a" * 64, "-lead", "has space", "b..c"):
            with pytest.raises(RequestFailed) as exc:
                await c.create_bucket(bucket)
            assert exc.value.code is ErrorCode.INVALID_ARGUMENT, bucket
        for table in ('t"; DROP TABLE x; --', "1abc", "sqlite_master", "_chunkd_columns", "a b"):
            with pytest.raises(RequestFailed) as exc:
                await c.create_table(table, [("a", "int")])
            assert exc.value.code is ErrorCode.INVALID_ARGUMENT, table
        await c.create_table("t", [("name", "text")])
        await c.insert("t", ["name"], [("alice",), ("bob",)])
        injected = await c.scan("t", where={"name": "x' OR '1'='1"})
        assert injected.rows == []
        with pytest.raises(RequestFailed) as exc:
            await c.scan("t", where={'name" OR 1=1 --': "x"})
        assert exc.value.code is ErrorCode.INVALID_ARGUMENT
        with pytest.raises(RequestFailed) as exc:
            await c.insert("t", ["name"], [(42,)])
        assert exc.value.code is ErrorCode.INVALID_ARGUMENT
        with pytest.raises(RequestFailed) as exc:
            await c.create_table("t2", [("a", "int"), ("A", "text")])
        assert exc.value.code is ErrorCode.INVALID_ARGUMENT
        with pytest.raises(RequestFailed) as exc:
            await c.create_table("T", [("a", "int")])
        assert exc.value.code is ErrorCode.ALREADY_EXISTS
        with pytest.raises(RequestFailed) as exc:
            await c.get("nope", "k")
        assert exc.value.code is ErrorCode.NOT_FOUND
        with pytest.raises(RequestFailed) as exc:
            await c.get("b", "k", offset=5)
        assert exc.value.code is ErrorCode.NOT_FOUND
        with pytest.raises(RequestFailed) as exc:
            await c.chunk("b", "k", strategy="cdc", avg_size=1000)
        assert exc.value.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.NOT_FOUND)
        assert (await c.scan("t")).rows == [("alice",), ("bob",)]
        assert (await c.ping())["time"] > 0
    outside = sorted(p.name for p in chunkd.data_dir.parent.iterdir())
    assert all(name.startswith(("data-", "api.key")) for name in outside), outside


async def test_invalid_chunk_spec(chunkd: ChunkdHandle) -> None:
    async with chunkd.connect() as c:
        await c.create_bucket("b")
        await c.put("b", "k", b"x" * 1000)
        with pytest.raises(RequestFailed) as exc:
            await c.chunk("b", "k", strategy="cdc", avg_size=1000)
        assert exc.value.code is ErrorCode.INVALID_ARGUMENT and "avg_size" in exc.value.message
        with pytest.raises(RequestFailed) as exc:
            await c.chunk("b", "k", strategy="fixed", size=8 << 20, with_data=True)
        assert exc.value.code is ErrorCode.INVALID_ARGUMENT


class RawClient:
    """A client speaking raw frames, for inputs the real client refuses to produce."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = Connection(Role.CLIENT)

    async def events(self) -> list[Event]:
        """Read (for at most 5 s) until the server closes; return every event."""
        out: list[Event] = []
        with trio.fail_after(5):
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    self.conn.receive_data(await self.stream.receive_some(65536))
                    continue
                out.append(event)  # type: ignore[arg-type]
                if isinstance(event, ConnectionClosed):
                    return out

    async def hello(self, key: str | None) -> Event:
        await self.stream.send_all(self.conn.send(Hello(client="raw", api_key=Secret(key) if key else None)))
        with trio.fail_after(5):
            while True:
                event = self.conn.next_event()
                if event is NEED_DATA:
                    self.conn.receive_data(await self.stream.receive_some(65536))
                    continue
                return event  # type: ignore[return-value]


def raw_frame(ftype: int, rid: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BBHII", ftype, flags, 0, rid, len(payload)) + payload


@asynccontextmanager
async def _raw(chunkd: ChunkdHandle) -> AsyncIterator[RawClient]:
    stream = await trio.open_tcp_stream(chunkd.host, chunkd.port)
    async with stream:
        yield RawClient(stream)


async def test_auth_failures(chunkd: ChunkdHandle) -> None:
    for key, message in ((None, "an API key is required"), ("wrong", "invalid API key")):
        async with _raw(chunkd) as raw:
            event = await raw.hello(key)
            assert isinstance(event, Error) and event.code is ErrorCode.AUTH_FAILED
            assert event.message == message
            assert isinstance((await raw.events())[-1], ConnectionClosed)
    with pytest.raises(ClientError) as exc:
        async with chunkd.connect(api_key="nope"):
            pass
    assert exc.value.code is ErrorCode.AUTH_FAILED and "nope" not in str(exc.value)


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        # unknown operation
        ([raw_frame(3, 1, msgpack.packb({"op": "format_disk", "args": {}}))], ErrorCode.UNKNOWN_OPERATION),
        # wrong type for a field
        ([raw_frame(3, 1, msgpack.packb({"op": "stat", "args": {"bucket": 1, "key": "k"}}))],
         ErrorCode.PROTOCOL_ERROR),
        # unknown field
        ([raw_frame(3, 1, msgpack.packb({"op": "ping", "args": {"sudo": True}}))], ErrorCode.PROTOCOL_ERROR),
        # duplicate keys: a map with "bucket" twice
        ([raw_frame(3, 1, b"\x82\xa2op\xa4stat\xa4args" + b"\x83\xa6bucket\xa1a\xa6bucket\xa1b\xa3key\xa1k")],
         ErrorCode.PROTOCOL_ERROR),
        # oversize frame header: rejected before its payload is sent
        ([struct.pack(">BBHII", 5, 0, 0, 1, 4 << 20)], ErrorCode.FRAME_TOO_LARGE),
        # garbage
        ([b"\xff" * 12], ErrorCode.PROTOCOL_ERROR),
        # body before CONTINUE
        ([raw_frame(3, 1, msgpack.packb({"op": "put", "args": {"bucket": "b", "key": "k"}}), flags=2),
          raw_frame(5, 1, b"early")], ErrorCode.PROTOCOL_ERROR),
    ],
)
async def test_protocol_violations_get_an_error_frame_and_close(
        chunkd: ChunkdHandle, frames: list[bytes], code: ErrorCode) -> None:
    async with _raw(chunkd) as raw:
        assert isinstance(await raw.hello(chunkd.api_key), Welcome)
        for frame in frames:
            await raw.stream.send_all(frame)
        # decode the server's answer by hand: our own codec's state would not know about
        # the hand-crafted requests
        data = b""
        with trio.fail_after(5):
            while True:
                piece = await raw.stream.receive_some(65536)
                if not piece:
                    break
                data += piece
    ftype, _flags, _res, rid, length = struct.unpack(">BBHII", data[:12])
    assert ftype == 9 and rid == 0
    body = msgpack.unpackb(data[12 : 12 + length])
    assert body["code"] == code, body
    async with chunkd.connect() as c:  # the service is still fine
        assert "time" in await c.ping()


async def test_cancel_running_get_and_put(chunkd: ChunkdHandle) -> None:
    async with chunkd.connect() as c:
        await c.create_bucket("b")
        await c.put("b", "big", os.urandom(8 << 20))
        call = await c.start(Op.GET, {"bucket": "b", "key": "big"})
        head = await call.response()
        assert head.size == 8 << 20
        await call.cancel()
        with pytest.raises(RequestFailed) as exc:
            async for _frame in call.body():
                pass
            await call.result()
        assert exc.value.code is ErrorCode.CANCELLED
        # an upload cancelled mid-body leaves no object behind
        put = await c.start(Op.PUT, {"bucket": "b", "key": "half"})
        await put.wait_continue()
        await put.send_data(b"x" * 100_000)
        await put.cancel()
        with pytest.raises(RequestFailed) as exc:
            await put.result()
        assert exc.value.code is ErrorCode.CANCELLED
        with pytest.raises(RequestFailed):
            await c.stat("b", "half")
        assert (await c.ping())["time"] > 0


async def test_late_cancel_after_result_keeps_the_connection(chunkd: ChunkdHandle) -> None:
    async with _raw(chunkd) as raw:
        assert isinstance(await raw.hello(chunkd.api_key), Welcome)
        await raw.stream.send_all(raw.conn.send(Request(request_id=1, op=Op.PING)))
        # CANCEL for request 1 sent after its RESULT left the server: crafted by hand, as
        # our own codec knows the request is finished once it reads the RESULT
        await trio.sleep(0.2)
        await raw.stream.send_all(raw_frame(0x0A, 1, b""))
        await raw.stream.send_all(raw.conn.send(Request(request_id=2, op=Op.PING)))
        finals: list[Event] = []
        with trio.fail_after(5):
            while len(finals) < 2:
                event = raw.conn.next_event()
                if event is NEED_DATA:
                    raw.conn.receive_data(await raw.stream.receive_some(65536))
                    continue
                assert isinstance(event, Result), event
                finals.append(event)
    assert [e.request_id for e in finals] == [1, 2]  # type: ignore[attr-defined]


async def test_idle_and_hello_timeouts(nursery: trio.Nursery, tmp_path: Path, api_key_file: Path,
                                       api_key: str) -> None:
    srv = await start_chunkd(nursery, tmp_path, key_file=api_key_file, api_key=api_key,
                             idle_timeout=0.3, hello_timeout=0.3)
    async with await trio.open_tcp_stream(srv.host, srv.port) as silent:
        with trio.fail_after(5):
            assert await silent.receive_some(100) == b""  # closed: no HELLO in time
    async with await trio.open_tcp_stream(srv.host, srv.port) as stream:
        raw = RawClient(stream)
        assert isinstance(await raw.hello(api_key), Welcome)
        assert isinstance((await raw.events())[-1], ConnectionClosed)  # idle timeout


async def test_over_capacity(nursery: trio.Nursery, tmp_path: Path, api_key_file: Path,
                             api_key: str) -> None:
    srv = await start_chunkd(nursery, tmp_path, key_file=api_key_file, api_key=api_key,
                             max_connections=1)
    async with srv.connect() as first:
        with pytest.raises(ConnectionFailed) as exc:
            async with srv.connect():
                pass
        assert exc.value.code is ErrorCode.OVER_CAPACITY
        assert "time" in await first.ping()


async def test_negotiated_frame_size_is_respected(nursery: trio.Nursery, tmp_path: Path,
                                                  api_key_file: Path, api_key: str) -> None:
    srv = await start_chunkd(nursery, tmp_path, key_file=api_key_file, api_key=api_key,
                             limits=Limits(max_frame_payload=16384, max_control_size=8192))
    async with srv.connect() as c:
        assert c.limits.max_frame_payload == 16384
        await c.create_bucket("b")
        body = os.urandom(100_000)
        await c.put("b", "k", body)
        call = await c.start(Op.GET, {"bucket": "b", "key": "k"})
        assert isinstance(await call.response(), Response)
        sizes = [len(f.data) async for f in call.body() if isinstance(f, Data)]
        assert max(sizes) <= 16384 and sum(sizes) == len(body)
        await call.result()
        await c.create_table("t", [("s", "text")])
        await c.insert("t", ["s"], [("x" * 1000,)] * 100)
        assert len((await c.scan("t")).rows) == 100


def test_sync_client_against_a_subprocess(chunkd_process) -> None:  # type: ignore[no-untyped-def]
    from l4proxy.client import SyncChunkClient

    with SyncChunkClient(chunkd_process.host, chunkd_process.port,
                         api_key=chunkd_process.api_key) as c:
        assert len(c.session_id) == 36
        c.create_bucket("s")
        c.put("s", "k", b"hello")
        assert c.get("s", "k")[0] == b"hello"
        assert c.list("s").result["count"] == 1
    with pytest.raises(ClientError):
        SyncChunkClient(chunkd_process.host, chunkd_process.port, api_key="wrong")


async def test_errors_raised_inside_connect_come_out_unwrapped(chunkd: ChunkdHandle) -> None:
    with pytest.raises(RequestFailed) as exc:
        async with chunkd.connect() as c:
            await c.stat("missing", "k")
    assert exc.value.code is ErrorCode.NOT_FOUND


async def test_declared_put_size_must_match_the_body(chunkd: ChunkdHandle) -> None:
    async with chunkd.connect() as c:
        await c.create_bucket("b")
    async with _raw(chunkd) as raw:
        assert isinstance(await raw.hello(chunkd.api_key), Welcome)
        put = Request(request_id=1, op=Op.PUT, args={"bucket": "b", "key": "k", "size": 10})
        await raw.stream.send_all(raw.conn.send(put))
        with trio.fail_after(5):
            while True:
                event = raw.conn.next_event()
                if event is NEED_DATA:
                    raw.conn.receive_data(await raw.stream.receive_some(65536))
                    continue
                break
        # five bytes and END_STREAM for a put that declared ten: hand-crafted, since our
        # own codec refuses to send it
        await raw.stream.send_all(raw_frame(5, 1, b"12345", flags=1))
        data = b""
        with trio.fail_after(5):
            while piece := await raw.stream.receive_some(65536):
                data += piece
        assert msgpack.unpackb(data[12:])["code"] == ErrorCode.PROTOCOL_ERROR
    async with chunkd.connect() as c:
        with pytest.raises(RequestFailed) as exc:
            await c.stat("b", "k")
        assert exc.value.code is ErrorCode.NOT_FOUND
