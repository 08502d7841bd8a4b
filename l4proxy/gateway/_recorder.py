"""Recording sessions: the gateway side of ``replay``'s format.

Theory of operation: :class:`Recorder` is shared by all sessions; each session gets a
:class:`SessionRecorder`, an observer that appends what it sees to a pure
``replay.RecordingWriter`` (no I/O). While records arrive, a flusher task (one per busy
session, in the session's nursery) turns the pending records into one zstd frame and
appends it to the session's file every ``flush_interval`` -- early, once a quarter of
``max_pending_bytes`` waits, so compression overlaps the relaying. The file is fsynced
at least every ``fsync_interval`` by a task of its own, beside the flushes rather than
between them (a slow disk's fsync must not stall the session while the next frame could
be compressed and written); once the session is quiet and its last write is fsynced the
flusher ends, and the next record starts a new one. Compression and signing run in worker
threads with one compressor per thread (shared by every session), never on the event
loop and never a compressor per session; the file is opened for each flush and closed
again. So a quiet session holds no task, no compressor and no open file. When a session
has ``max_pending_bytes`` waiting it flushes before taking more, so a slow disk slows the
session down and no record is dropped. Any write failure ends the session with
RECORDING_FAILED (fail closed); :meth:`SessionRecorder.finish` writes the trailer and
fsyncs at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from l4proxy.config import RecordingConfig
from l4proxy.wire import ErrorCode
from replay import RecordingWriter, Trailer, new_compressor

from ._hooks import ObserverFailed, SessionInfo
from ._session import SessionControl

__all__ = ["Recorder", "RecordingFailed", "SessionRecorder"]

log = logging.getLogger("l4proxy.gateway.recorder")

#: worker threads that compress and write recordings (each holds one compressor)
WRITER_THREADS = 2
#: worker threads that fsync recordings (they wait for the disk, not the CPU)
SYNC_THREADS = 8


class RecordingFailed(ObserverFailed):
    def __init__(self, message: str) -> None:
        super().__init__(message, code=ErrorCode.RECORDING_FAILED,
                         public_message="the session cannot be recorded, so it may not continue")


class Recorder:
    """What all sessions share: configuration, key, worker threads and their compressors."""

    def __init__(self, config: RecordingConfig, *, signing_key: Ed25519PrivateKey,
                 gateway_id: str) -> None:
        self.config = config
        self.signing_key = signing_key
        self.gateway_id = gateway_id
        self.limiter = trio.CapacityLimiter(WRITER_THREADS)
        self.sync_limiter = trio.CapacityLimiter(SYNC_THREADS)
        self._local = threading.local()
        config.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def compressor(self) -> zstandard.ZstdCompressor:
        """The calling worker thread's compressor (created once per thread)."""
        comp: zstandard.ZstdCompressor | None = getattr(self._local, "compressor", None)
        if comp is None:
            comp = new_compressor(level=self.config.zstd_level)
            self._local.compressor = comp
        return comp

    def free_space_ok(self) -> bool:
        """False while the recording directory has less than ``min_free_bytes`` free."""
        try:
            return shutil.disk_usage(self.config.dir).free >= self.config.min_free_bytes
        except OSError:
            return False

    def path_for(self, session_id: str, started: datetime) -> Path:
        return self.config.dir / started.strftime("%Y-%m-%d") / f"{session_id}.l4rec.zst"

    def session(self, info: SessionInfo, control: SessionControl) -> SessionRecorder:
        return SessionRecorder(self, info, control)


class SessionRecorder:
    """One session's recording; a ``SessionObserver``. Call :meth:`start` with the
    session's nursery when the session starts (flusher tasks run there) and :meth:`finish`
    after the session has ended."""

    __slots__ = ("_created", "_flushing", "_hurry", "_last_fsync", "_nursery", "_reported",
                 "_sync_lock", "_synced", "_syncing", "_wake", "_write_lock", "_writes", "control",
                 "early_events", "failed", "info", "path", "recorder", "redactions", "trailer",
                 "writer")

    def __init__(self, recorder: Recorder, info: SessionInfo, control: SessionControl) -> None:
        self.recorder = recorder
        self.info = info
        self.control = control
        self.path = recorder.path_for(info.session_id, datetime.now(UTC))
        self.writer: RecordingWriter | None = None
        self.redactions: list[Mapping[str, Any]] = []
        self.early_events: list[tuple[str, Mapping[str, Any]]] = []
        self.trailer: Trailer | None = None
        self.failed: str | None = None
        self._write_lock = trio.Lock()
        #: set when records are added; the flusher waits on it
        self._wake = trio.Event()
        #: set when a quarter of ``max_pending_bytes`` is waiting: flush before the interval
        self._hurry = trio.Event()
        #: frames appended so far, and how many of them an fsync covers
        self._writes = 0
        self._synced = 0
        #: one fsync at a time (beside the writes, not under ``_write_lock``)
        self._sync_lock = trio.Lock()
        #: a background fsync task is running
        self._syncing = False
        #: where flusher tasks run (the session's nursery, from :meth:`start`)
        self._nursery: trio.Nursery | None = None
        #: a flusher task is running
        self._flushing = False
        self._last_fsync = time.monotonic()
        self._created = False
        self._reported = False

    # --- the observer ---------------------------------------------------------------------

    def _writer(self) -> RecordingWriter:
        if self.writer is None:
            identity = self.info.identity
            self.writer = RecordingWriter(
                session_id=self.info.session_id,
                header={"identity": {"provider": identity.provider, "subject": identity.subject,
                                     "email": identity.email, "groups": list(identity.groups)},
                        "target": self.info.target, "client_address": self.info.client_address,
                        "gateway_id": self.recorder.gateway_id,
                        "redactions": [dict(r) for r in self.redactions]},
                signing_key=self.recorder.signing_key, clock=time.time)
            for kind, fields in self.early_events:
                self.writer.add_event(kind, fields)
            self.early_events.clear()
        return self.writer

    async def _backpressure(self) -> None:
        self._wake.set()
        self._kick()
        if self.failed is not None:
            if self._reported:
                return  # the session is already ending because of it
            self._reported = True
            raise RecordingFailed(self.failed)
        writer = self.writer
        if writer is not None:
            pending, limit = writer.pending_bytes, self.recorder.config.max_pending_bytes
            if pending >= limit // 4:
                self._hurry.set()  # the flusher starts now, while the session goes on
            if pending >= limit:
                await self.flush()  # the disk or the compressor cannot keep up: wait

    async def client_bytes(self, data: bytes) -> None:
        self._writer().add_to_gateway(data)
        await self._backpressure()

    async def server_bytes(self, data: bytes) -> None:
        self._writer().add_to_client(data)
        await self._backpressure()

    async def server_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """One message in parts: every part is recorded before the first checkpoint (a
        session cancelled while the recorder makes it wait never leaves half a frame)."""
        writer = self._writer()
        for part in parts:
            writer.add_to_client(part)
        await self._backpressure()

    async def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        if kind == "redaction" and self.writer is None:
            self.redactions.append(dict(fields))  # listed in the header
        if self.writer is None:
            self.early_events.append((kind, dict(fields)))
            return
        self.writer.add_event(kind, fields)
        await self._backpressure()

    async def closed(self, reason: str) -> None:
        return None  # finish() seals the file once the session task is done

    # --- writing ---------------------------------------------------------------------------

    def _append(self, data: bytes, *, sync: bool) -> None:
        """Append one frame (blocking; in a worker thread)."""
        if not self._created:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        else:
            flags = os.O_WRONLY | os.O_APPEND
        fd = os.open(self.path, flags, 0o600)
        try:
            good = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if sync:
                    os.fsync(fd)
            except OSError:
                # no torn frame stays behind: the file ends at its last whole unit
                try:
                    os.ftruncate(fd, good)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)
        self._created = True

    async def flush(self, *, final_reason: str | None = None) -> None:
        """Write what is pending as one frame (with the trailer when ``final_reason``)."""
        async with self._write_lock:
            if self.failed is not None:
                if self._reported and final_reason is None:
                    return
                raise RecordingFailed(self.failed)
            writer = self._writer()
            final = final_reason is not None
            if not final and not writer.pending_records:
                return

            def work() -> bytes:
                comp = self.recorder.compressor()
                frame = (writer.close(final_reason, comp) if final_reason is not None
                         else writer.flush(comp))
                if frame:
                    self._append(frame, sync=final)
                return frame

            try:
                frame = await trio.to_thread.run_sync(work, limiter=self.recorder.limiter)
            except OSError as exc:
                raise self._failure(f"cannot write {self.path}: {exc.strerror or exc}") from None
            if frame:
                self._writes += 1
            if final:
                self._synced = self._writes
                self._last_fsync = time.monotonic()
                self.trailer = writer.trailer
            elif time.monotonic() - self._last_fsync >= self.recorder.config.fsync_interval:
                self._start_sync()

    def _failure(self, message: str) -> RecordingFailed:
        """Mark the recording failed for good (logged once, reported by the caller)."""
        self.failed = message
        log.error("session %s (%s): recording failed: %s", self.info.session_id,
                  self.info.identity.name, message)
        self._reported = True
        return RecordingFailed(message)

    @property
    def _unsynced(self) -> bool:
        """A frame was appended that no fsync covers yet."""
        return self._writes > self._synced

    async def sync(self) -> None:
        """fsync what earlier flushes wrote (may run while the next frame is written)."""
        async with self._sync_lock:
            upto = self._writes  # appends finished before the fsync starts are covered
            if upto <= self._synced or self.failed is not None:
                return

            def work() -> None:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

            try:
                await trio.to_thread.run_sync(work, limiter=self.recorder.sync_limiter)
            except OSError as exc:
                raise self._failure(f"cannot sync {self.path}: {exc.strerror or exc}") from None
            self._last_fsync = time.monotonic()
            self._synced = max(self._synced, upto)

    def _start_sync(self) -> None:
        """fsync in a task of its own (one at a time), so the session's next flush need not
        wait for the disk."""
        if self._nursery is None or self._syncing:
            return
        self._syncing = True
        self._nursery.start_soon(self._syncer, name="recording.sync")

    async def _syncer(self) -> None:
        try:
            await self.sync()
        except RecordingFailed as exc:
            self.control.end(ErrorCode.RECORDING_FAILED, str(exc))
        finally:
            self._syncing = False

    def start(self, nursery: trio.Nursery) -> None:
        """Flush in ``nursery`` (the session's) from now on, beginning with the header."""
        self._nursery = nursery
        self._kick(at_once=True)

    def _kick(self, *, at_once: bool = False) -> None:
        """Make sure a flusher task runs (one at a time; none while the session is quiet)."""
        if self._nursery is None or self._flushing:
            return
        self._flushing = True
        self._nursery.start_soon(self._flusher, at_once, name="recording.flusher")

    async def _flusher(self, at_once: bool) -> None:
        """Flush ``flush_interval`` after records arrived (at once for the header), keep
        flushing while they keep arriving, fsync the last write ``fsync_interval`` after
        the session went quiet, then end: a quiet session holds no task, no compressor and
        no open file. Ends the session on failure."""
        config = self.recorder.config
        try:
            while True:
                if not at_once:
                    with trio.move_on_after(config.flush_interval):
                        await self._hurry.wait()
                at_once = False
                self._hurry = trio.Event()
                self._wake = trio.Event()  # records added from here on need another flush
                await self.flush()
                while not self._wake.is_set():
                    if not self._unsynced:
                        return  # quiet and on disk: the next record starts a new flusher
                    with trio.move_on_after(config.fsync_interval):
                        await self._wake.wait()
                    if not self._wake.is_set():
                        await self.sync()
        except RecordingFailed as exc:
            self.control.end(ErrorCode.RECORDING_FAILED, str(exc))
        finally:
            self._flushing = False

    async def finish(self, reason: str) -> Trailer | None:
        """Write the last records and the signed trailer (fsync). None if that failed."""
        with trio.CancelScope(shield=True):
            try:
                await self.flush(final_reason=reason)
            except RecordingFailed:
                return None
        return self.trailer
