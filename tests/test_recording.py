"""Session recording through the real gateway: byte-exact, signed, indexed, sealed after a
crash, and fail-closed when it cannot be written."""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import stat
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

import replay
from l4proxy.client import ClientError
from l4proxy.config import RecordingConfig
from l4proxy.gateway._recorder import SessionRecorder
from l4proxy.identity import load_recording_keyring
from l4proxy.store import SessionRecord
from l4proxy.wire import ErrorCode

from .conftest import TaskSteps
from .test_gateway import Env, _close_after_everything, _env  # noqa: F401


class Tap:
    """An observer that keeps everything, to compare with the recording."""

    def __init__(self) -> None:
        self.client = bytearray()
        self.server = bytearray()

    async def client_bytes(self, data: bytes) -> None:
        self.client += data

    async def server_bytes(self, data: bytes) -> None:
        self.server += data

    async def event(self, kind: str, fields: Any) -> None:
        return None

    async def closed(self, reason: str) -> None:
        return None


async def _recorded_env(nursery: trio.Nursery, tmp: Path, **recording: Any) -> Env:
    env = await _env(nursery, tmp)
    # rebuild the gateway with recording on (same listeners and targets)
    config = dataclasses.replace(env.config, recording=RecordingConfig(dir=tmp / "recordings",
                                                                       **recording))
    from l4proxy.audit import AuditLog
    from l4proxy.gateway import Gateway

    from .test_gateway import _CLOSE_LATER

    audit = AuditLog(tmp / "audit2.jsonl")
    _CLOSE_LATER.append(audit)
    gateway = Gateway(config, store=env.store, audit=audit)
    addresses = await nursery.start(gateway.serve)
    return dataclasses.replace(env, gateway=gateway, config=config, address=addresses["main"],
                               audit_path=tmp / "audit2.jsonl")


async def _ended(env: Env, session: str) -> SessionRecord:
    with trio.fail_after(10):
        while True:
            record = await env.store.get_session(session)
            if record is not None and record.ended_at is not None:
                return record
            await trio.sleep(0.02)


async def test_a_session_is_recorded_byte_exact_signed_and_indexed(nursery: trio.Nursery,
                                                                   tmp_path: Path) -> None:
    env = await _recorded_env(nursery, tmp_path)
    tap = Tap()
    env.gateway.observer_factory = lambda info: tap
    body = os.urandom(5 << 20)
    async with env.connect("rita") as c:
        await c.create_bucket("rec")
        await c.put("rec", "k", body)
        assert (await c.get("rec", "k"))[0] == body
        session = c.session_id
    record = await _ended(env, session)
    assert record.file is not None and record.trailer_head is not None
    path = Path(record.file)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.name == f"{session}.l4rec.zst"
    keyring = load_recording_keyring(tmp_path / "certs")
    verdict = replay.verify(path, trusted=keyring)
    assert verdict.status is replay.VerifyStatus.INTACT, verdict.reasons
    assert verdict.trailer is not None and verdict.trailer.head == record.trailer_head
    assert verdict.header is not None and verdict.header["identity"]["subject"] == "rita"
    for direction, expected in ((replay.Direction.TO_GATEWAY, tap.client),
                                (replay.Direction.TO_CLIENT, tap.server)):
        out = io.BytesIO()
        replay.dump(path, direction, out, trusted=keyring)
        assert out.getvalue() == bytes(expected)
    assert record.bytes_to_gateway == len(tap.client) and record.bytes_to_client == len(tap.server)
    raw = path.read_bytes()
    assert env.secret.encode() not in raw + bytes(tap.client) + bytes(tap.server)


async def test_a_crashed_session_is_sealed_on_the_next_start(nursery: trio.Nursery,
                                                             tmp_path: Path) -> None:
    env = await _recorded_env(nursery, tmp_path)
    recorder = env.gateway.recorder
    assert recorder is not None
    # what a gateway killed with -9 leaves behind: an open index row and a file that ends
    # after some flushed units (and a torn tail)
    from l4proxy.gateway import SessionControl, SessionInfo
    from l4proxy.identity import Identity

    info = SessionInfo(session_id="01a2-crash", identity=Identity(provider="dev", subject="zed"),
                       serial=1, not_after=__import__("datetime").datetime.now(
                           __import__("datetime").UTC), target="chunks", client_address="x")
    rec = SessionRecorder(recorder, info, SessionControl())
    await rec.client_bytes(b"hello")
    await rec.flush()
    await rec.server_bytes(b"world")
    await rec.flush()
    async with await trio.open_file(rec.path, "ab") as f:
        await f.write(b"\x28\xb5\x2f\xfd torn")  # a frame cut off by the crash
    await env.store.index_session_start(SessionRecord(
        session_id="01a2-crash", identity="dev/zed", target="chunks", client_address="x",
        started_at=time.time(), file=str(rec.path)))
    await env.gateway.seal_crashed_sessions()
    record = await env.store.get_session("01a2-crash")
    assert record is not None and record.end_reason == "sealed_after_crash"
    verdict = replay.verify(rec.path, trusted=load_recording_keyring(tmp_path / "certs"))
    assert verdict.status is replay.VerifyStatus.INTACT, verdict.reasons
    assert verdict.trailer is not None and verdict.trailer.reason == "sealed_after_crash"
    assert verdict.trailer.head == record.trailer_head
    out = io.BytesIO()
    replay.dump(rec.path, replay.Direction.TO_CLIENT, out,
                trusted=load_recording_keyring(tmp_path / "certs"))
    assert out.getvalue() == b"world"


async def test_a_slow_fsync_does_not_hold_up_the_next_write(
        nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the periodic fsync runs beside the writes: while the disk takes its time, the next
    # frame is still compressed and appended (a session waits for its writes, never for
    # an fsync); the trailer's own fsync waits for nothing else either
    env = await _recorded_env(nursery, tmp_path, fsync_interval=0.0)
    recorder = env.gateway.recorder
    assert recorder is not None
    from l4proxy.gateway import SessionControl, SessionInfo
    from l4proxy.identity import Identity

    entered, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        entered.set()
        release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    info = SessionInfo(session_id="01a2-slow-disk", identity=Identity(provider="dev", subject="sid"),
                       serial=1, not_after=datetime.now(UTC), target="chunks", client_address="x")
    rec = SessionRecorder(recorder, info, SessionControl())
    try:
        rec.start(nursery)  # writes the header, then starts an fsync: it hangs
        with trio.fail_after(5):
            while not entered.is_set():
                await trio.sleep(0.01)
            size = rec.path.stat().st_size
            await rec.client_bytes(b"written while the disk syncs")
            await rec.flush()
        assert rec.path.stat().st_size > size
        assert rec._unsynced  # nothing has been synced yet
    finally:
        release.set()
    with trio.fail_after(10):
        trailer = await rec.finish("done")
    assert trailer is not None and not rec._unsynced
    verdict = replay.verify(rec.path, trusted=load_recording_keyring(tmp_path / "certs"))
    assert verdict.status is replay.VerifyStatus.INTACT, verdict.reasons
    out = io.BytesIO()
    replay.dump(rec.path, replay.Direction.TO_GATEWAY, out,
                trusted=load_recording_keyring(tmp_path / "certs"))
    assert out.getvalue() == b"written while the disk syncs"


async def test_a_write_failure_ends_the_session_with_recording_failed(
        nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = await _recorded_env(nursery, tmp_path)
    calls = {"n": 0}
    real_append = SessionRecorder._append

    def failing_append(self: SessionRecorder, data: bytes, *, sync: bool) -> None:
        calls["n"] += 1
        if calls["n"] > 2:  # the header and a first unit land, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(self, data, sync=sync)

    monkeypatch.setattr(SessionRecorder, "_append", failing_append)
    with pytest.raises(ClientError) as exc:
        with trio.fail_after(10):
            async with env.connect("sam") as c:
                await c.create_bucket("full")
                while True:
                    await c.put("full", "k", os.urandom(256 << 10))
    assert exc.value.code is ErrorCode.RECORDING_FAILED, repr(exc.value)


async def test_new_sessions_are_refused_while_space_is_low(nursery: trio.Nursery,
                                                           tmp_path: Path) -> None:
    env = await _recorded_env(nursery, tmp_path, min_free_bytes=1 << 60)
    with pytest.raises(ClientError) as exc:
        async with env.connect("tom") as c:
            await c.ping()
    assert exc.value.code is ErrorCode.RECORDING_FAILED


async def test_tcp_sessions_and_a_large_session_are_recorded_byte_exact(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    env = await _recorded_env(nursery, tmp_path)
    keyring = load_recording_keyring(tmp_path / "certs")
    # a tcp target: opaque bytes both ways
    host, port = env.address
    tls = trio.SSLStream(await trio.open_tcp_stream(host, port), env.context("alice"),
                         server_hostname="echo.gw.test")
    sent = os.urandom(300_000)
    async with tls:
        await tls.send_all(sent)
        got = b""
        with trio.fail_after(10):
            while len(got) < len(sent):
                got += await tls.receive_some(1 << 16)
    assert got == sent
    # a large CWP session (256 MiB up and down) through the recording gateway
    body = os.urandom(1 << 20) * 256
    async with env.connect("bulk") as c:
        await c.create_bucket("big")
        await c.put("big", "k", body)
        got_body, _ = await c.get("big", "k")
        assert got_body == body
        big_session = c.session_id
    with trio.fail_after(30):
        while True:
            records = [r for r in [await env.store.get_session(big_session)] if r and r.ended_at]
            if records:
                break
            await trio.sleep(0.05)
    tcp_files = sorted((tmp_path / "recordings").rglob("*.l4rec.zst"))
    assert len(tcp_files) == 2
    for path in tcp_files:
        verdict = await trio.to_thread.run_sync(lambda p=path: replay.verify(p, trusted=keyring))
        assert verdict.status is replay.VerifyStatus.INTACT, verdict.reasons
    tcp_file = next(p for p in tcp_files if big_session not in p.name)
    for direction in (replay.Direction.TO_GATEWAY, replay.Direction.TO_CLIENT):
        out = io.BytesIO()
        replay.dump(tcp_file, direction, out, trusted=keyring)
        assert out.getvalue() == sent  # the echo: what went up came back
    big = next(p for p in tcp_files if big_session in p.name)
    digest = await trio.to_thread.run_sync(lambda: _dump_sha(big, keyring))
    record = records[0]
    assert record.bytes_to_gateway > len(body) and record.bytes_to_client > len(body)
    assert digest[0] == record.bytes_to_gateway and digest[1] == record.bytes_to_client


def _dump_sha(path: Path, keyring: Any) -> tuple[int, int]:
    sizes = []
    for direction in (replay.Direction.TO_GATEWAY, replay.Direction.TO_CLIENT):

        class Count(io.RawIOBase):
            n = 0

            def writable(self) -> bool:
                return True

            def write(self, b: Any) -> int:
                Count.n += len(b)
                return len(b)

        Count.n = 0
        replay.dump(path, direction, Count(), trusted=keyring)  # type: ignore[arg-type]
        sizes.append(Count.n)
    return sizes[0], sizes[1]


def _tasks_named(name: str) -> int:
    """How many tasks of this trio run have ``name`` in their name."""
    todo = [trio.lowlevel.current_root_task()]
    found = 0
    while todo:
        task = todo.pop()
        found += name in task.name
        todo += [t for n in task.child_nurseries for t in n.child_tasks]
    return found


async def test_an_idle_session_costs_the_recorder_no_wakeups(nursery: trio.Nursery,
                                                             tmp_path: Path) -> None:
    env = await _recorded_env(nursery, tmp_path, flush_interval=0.05, fsync_interval=0.2)
    counter = TaskSteps("recording.flusher")
    trio.lowlevel.add_instrument(counter)
    try:
        async with env.connect("ida") as c:
            record = await env.store.get_session(c.session_id)
            assert record is not None and record.file is not None
            path = Path(record.file)
            size = path.stat().st_size  # the header, written at the start
            await c.ping(b"x" * 100)
            with trio.fail_after(5):  # the ping is written soon after, without more traffic
                while path.stat().st_size == size:
                    await trio.sleep(0.01)
            await trio.sleep(0.5)  # the flush and the fsync after fsync_interval are done
            assert _tasks_named("recording.flusher") == 0  # a quiet session holds no task
            before = counter.steps
            await trio.sleep(1.0)  # ten flush intervals of silence
            assert counter.steps == before
            assert before > 0  # the counter does see the recorder's task
            await c.ping(b"y")
            with trio.fail_after(5):  # and activity wakes it again
                while counter.steps == before:
                    await trio.sleep(0.01)
    finally:
        trio.lowlevel.remove_instrument(counter)
