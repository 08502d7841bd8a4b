"""Writing recordings: the pure, synchronous writer core and the crash seal.

Theory of operation
-------------------
:class:`RecordingWriter` is the whole format on the writing side, with no I/O: the
gateway feeds it what the session does (``add_to_gateway``, ``add_to_client``,
``add_event``), and every ~100 ms asks for a flush unit (``flush``), which it appends to
the session's file; ``close`` returns the last unit, ending with the TRAILER.

Adding is cheap (a clock read, a list append; events are packed and size-checked at once
so a bad event fails where it was added): it may run on the event loop. ``flush`` and
``close`` do the packing, hashing, signing and compression, so they belong on a worker
thread. The writer is thread-safe for that split: adds may run concurrently with a flush
(each flush takes the records pending when it starts), and flushes serialise. The zstd
compressor is passed in so one can serve many sessions -- but a ``ZstdCompressor`` must
not be used by two threads at once, so share it only among flushes that cannot overlap
(or keep one per worker thread).

Index numbers are assigned when a record is added; the chain head and the per-direction
totals advance when it is flushed. If a flush raises, the writer is broken for good (the
session must end with RECORDING_FAILED): records were consumed and cannot be re-emitted
consistently.

:func:`seal_after_crash` is the other half of crash safety: at start-up the gateway seals
every recording the index still shows open. It verifies the file up to its last valid
checkpoint, truncates whatever follows, and appends an EVENT ``recording_sealed`` (what
was discarded) and a TRAILER with reason ``sealed_after_crash`` that continue the chain,
then fsyncs.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._format import (
    FORMAT_VERSION,
    MAX_DATA_PER_RECORD,
    MAX_RECORD_SIZE,
    REASON_SEALED_AFTER_CRASH,
    SEALED_EVENT,
    RecordingError,
    RecordKind,
    Trailer,
    as_mapping,
    chain_next,
    chain_seed,
    check_header,
    checkpoint_message,
    key_id,
    pack,
    trailer_message,
    unpack_options,
)

__all__ = [
    "DEFAULT_COMPRESSION_LEVEL",
    "RecordingWriter",
    "SealError",
    "SealResult",
    "WriterClosed",
    "new_compressor",
    "seal_after_crash",
]

#: The zstd level :func:`new_compressor` uses by default.
DEFAULT_COMPRESSION_LEVEL = 3
# a pending byte record's estimated overhead (array, kind, index, time, bin header)
_RECORD_OVERHEAD = 24
# msgpack bin headers: bin8, bin16, bin32 (marker, then the length big-endian)
_BIN8 = struct.Struct(">BB")
_BIN16 = struct.Struct(">BH")
_BIN32 = struct.Struct(">BI")


class WriterClosed(RecordingError):
    """The writer was closed, or broken by a failed flush; nothing more can be added."""


class SealError(RecordingError):
    """A recording cannot be sealed (tampered, unreadable, or nothing verifiable in it)."""


def new_compressor(level: int = DEFAULT_COMPRESSION_LEVEL) -> zstandard.ZstdCompressor:
    """A compressor suited to recordings: content size and checksum in every frame.

    The checksum is not what makes a recording tamper-evident (the signed chain is), but
    it lets a reader tell a corrupted flush unit from one cut short by a crash.
    """
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)


@dataclass(slots=True)
class _Pending:
    kind: RecordKind
    index: int
    time: float
    body: Any  # bytes for byte records; packed record bytes for events


@dataclass(slots=True)
class _ChainState:
    """What a flush advances; also how :func:`seal_after_crash` resumes a chain."""

    records: int
    head: bytes
    bytes_to_gateway: int
    bytes_to_client: int
    sha_to_gateway: Any  # hashlib objects
    sha_to_client: Any


class RecordingWriter:
    """Builds one session's recording, flush unit by flush unit (no I/O).

    Args:
        session_id: the session's id (also seeds the chain).
        header: the HEADER's fields besides ``format``, ``session_id`` and ``key_id``
            (which the writer sets): ``identity`` (``provider``, ``subject``, ``email``,
            ``groups``), ``target``, ``client_address``, ``gateway_id``, ``redactions``
            (a list; default empty) and optionally ``started_at`` (default: now). Extra
            keys are recorded too.
        signing_key: the gateway's current recording key.
        clock: Unix time in seconds (float), read for every record.

    Raises:
        ValueError: the header is incomplete or not encodable within the format's limits.
    """

    def __init__(self, *, session_id: str, header: Mapping[str, Any], signing_key: Ed25519PrivateKey,
                 clock: Callable[[], float]) -> None:
        self._init(session_id=session_id, signing_key=signing_key, clock=clock)
        reserved = {"format", "session_id", "key_id"} & set(header)
        if reserved:
            raise ValueError(f"the writer sets {sorted(reserved)} itself")
        now = self._now()
        body = {"format": FORMAT_VERSION, "session_id": session_id, "key_id": self._key_id,
                "started_at": now, "redactions": [], **as_mapping(header)}
        if isinstance(body["started_at"], int):
            body["started_at"] = float(body["started_at"])
        if isinstance(body.get("redactions"), tuple):
            body["redactions"] = list(body["redactions"])
        if isinstance(body.get("identity"), Mapping):
            identity = as_mapping(body["identity"])
            if isinstance(identity.get("groups"), tuple | frozenset | set):
                identity["groups"] = sorted(identity["groups"])
            body["identity"] = identity
        problem = check_header(body)
        if problem is not None:
            raise ValueError(problem)
        self._pending.append(_Pending(RecordKind.HEADER, 0, now, self._pack_checked(RecordKind.HEADER, 0,
                                                                                   now, body)))
        self._next_index = 1
        self._pending_bytes = len(self._pending[0].body)

    def _init(self, *, session_id: str, signing_key: Ed25519PrivateKey, clock: Callable[[], float]) -> None:
        if not isinstance(session_id, str) or not session_id or len(session_id) > 256:
            raise ValueError("session_id must be a non-empty string of at most 256 characters")
        self._session_id = session_id
        self._key = signing_key
        self._key_id = key_id(signing_key.public_key())
        self._clock = clock
        self._lock = threading.Lock()  # pending list, next index, closed flag
        self._flush_lock = threading.Lock()  # chain state; one flush at a time
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._next_index = 0
        self._closed = False
        self._broken = False
        self._trailer: Trailer | None = None
        self._last_checkpoint: tuple[int, float] | None = None
        self._state = _ChainState(records=0, head=chain_seed(session_id), bytes_to_gateway=0,
                                  bytes_to_client=0, sha_to_gateway=hashlib.sha256(),
                                  sha_to_client=hashlib.sha256())

    @classmethod
    def _resume(cls, *, session_id: str, signing_key: Ed25519PrivateKey, clock: Callable[[], float],
                state: _ChainState) -> RecordingWriter:
        """A writer that continues a verified chain (for :func:`seal_after_crash`)."""
        self = cls.__new__(cls)
        self._init(session_id=session_id, signing_key=signing_key, clock=clock)
        self._state = state
        self._next_index = state.records
        return self

    # --- what the gateway reads -------------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def key_id(self) -> str:
        """The id of the key signing this recording's checkpoints."""
        return self._key_id

    @property
    def pending_bytes(self) -> int:
        """Roughly how many bytes are waiting for the next flush (for back-pressure)."""
        return self._pending_bytes

    @property
    def pending_records(self) -> int:
        return len(self._pending)

    @property
    def records(self) -> int:
        """Chained records added so far (flushed or pending), the header included."""
        return self._next_index

    @property
    def bytes_to_gateway(self) -> int:
        """Bytes the client sent, as flushed so far."""
        return self._state.bytes_to_gateway

    @property
    def bytes_to_client(self) -> int:
        """Bytes the client received, as flushed so far."""
        return self._state.bytes_to_client

    @property
    def head(self) -> bytes:
        """The chain head after the last flush."""
        return self._state.head

    @property
    def last_checkpoint(self) -> tuple[int, float] | None:
        """``(upto, time)`` of the last checkpoint written, if any."""
        return self._last_checkpoint

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def trailer(self) -> Trailer | None:
        """The TRAILER once :meth:`close` returned (its ``head`` and ``sig`` go to the index)."""
        return self._trailer

    # --- adding -------------------------------------------------------------------------------

    def add_to_gateway(self, data: bytes | bytearray | memoryview) -> None:
        """Record bytes exactly as the client sent them (empty data records nothing).

        Raises:
            WriterClosed: after :meth:`close` or a failed flush.
        """
        self._add_data(RecordKind.TO_GATEWAY, data)

    def add_to_client(self, data: bytes | bytearray | memoryview) -> None:
        """Record bytes exactly as the client received them (empty data records nothing).

        Raises:
            WriterClosed: after :meth:`close` or a failed flush.
        """
        self._add_data(RecordKind.TO_CLIENT, data)

    def add_event(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Record an event ``{"kind": kind, **fields}``.

        Values must be msgpack-encodable (str, bytes, int, float, bool, None, lists, maps
        with string keys) within the format's size limits.

        Raises:
            ValueError: ``kind`` is empty, ``fields`` has a ``kind`` key, or the event cannot
                be encoded within the limits (nothing is recorded then).
            WriterClosed: after :meth:`close` or a failed flush.
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError("an event kind must be a non-empty string")
        if "kind" in fields:
            raise ValueError("event fields must not contain 'kind'")
        body = {"kind": kind, **as_mapping(fields)}
        with self._lock:
            self._check_open()
            now = self._now()
            index = self._next_index
            packed = self._pack_checked(RecordKind.EVENT, index, now, body)
            self._pending.append(_Pending(RecordKind.EVENT, index, now, packed))
            self._next_index = index + 1
            self._pending_bytes += len(packed)

    def _add_data(self, kind: RecordKind, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("recorded data must be bytes-like")
        if not data:
            with self._lock:
                self._check_open()
            return
        if len(data) <= MAX_DATA_PER_RECORD and (
                type(data) is bytes
                or (type(data) is memoryview and data.readonly and data.c_contiguous
                    and data.format == "B" and type(data.obj) is bytes)):
            # immutable already (bytes, or a read-only view of bytes): kept as is, not copied
            pieces: list[bytes | memoryview] = [data]
        else:
            view = memoryview(data).cast("B")
            pieces = [bytes(view[start:start + MAX_DATA_PER_RECORD])
                      for start in range(0, len(view), MAX_DATA_PER_RECORD)]
        with self._lock:
            self._check_open()
            now = self._now()
            for piece in pieces:
                self._pending.append(_Pending(kind, self._next_index, now, piece))
                self._next_index += 1
                self._pending_bytes += len(piece) + _RECORD_OVERHEAD

    # --- flushing -------------------------------------------------------------------------

    def flush(self, compressor: zstandard.ZstdCompressor) -> bytes:
        """One flush unit: every pending record, then a signed CHECKPOINT, as one zstd frame.

        Returns:
            The frame to append to the file, or ``b""`` when nothing is pending.

        Raises:
            WriterClosed: after :meth:`close` or a failed flush.
        """
        with self._flush_lock:
            with self._lock:
                self._check_open()
                batch, self._pending, self._pending_bytes = self._pending, [], 0
            if not batch:
                return b""
            return self._emit(batch, compressor, trailer_reason=None)

    def close(self, reason: str, compressor: zstandard.ZstdCompressor) -> bytes:
        """The last flush unit: any pending records, then the TRAILER.

        After this :attr:`trailer` holds the trailer; nothing more can be added.

        Raises:
            WriterClosed: already closed, or broken by a failed flush.
        """
        if not isinstance(reason, str):
            raise TypeError("reason must be a string")
        with self._flush_lock:
            with self._lock:
                self._check_open()
                self._closed = True
                batch, self._pending, self._pending_bytes = self._pending, [], 0
            return self._emit(batch, compressor, trailer_reason=reason)

    def _emit(self, batch: list[_Pending], compressor: zstandard.ZstdCompressor, *,
              trailer_reason: str | None) -> bytes:
        try:
            state = self._state
            parts: list[bytes] = []
            for rec in batch:
                if rec.index != state.records:  # pragma: no cover - guarded by the locks
                    raise RuntimeError("recording index out of sequence")
                if rec.kind in (RecordKind.TO_GATEWAY, RecordKind.TO_CLIENT):
                    # The packed record is prefix + body, but packing it whole would copy
                    # the body (up to 1 MiB) only for the compressor input to copy it
                    # again: hash and hand on the two pieces instead. Hashing prefix then
                    # body is chain_next(head, prefix + body), byte for byte.
                    data = rec.body
                    prefix = _byte_record_prefix(rec.kind, rec.index, rec.time, len(data))
                    if rec.kind is RecordKind.TO_GATEWAY:
                        state.bytes_to_gateway += len(data)
                        state.sha_to_gateway.update(data)
                    else:
                        state.bytes_to_client += len(data)
                        state.sha_to_client.update(data)
                    h = hashlib.sha256(state.head)
                    h.update(prefix)
                    h.update(data)
                    state.head = h.digest()
                    parts.append(prefix)
                    parts.append(data)
                else:
                    state.head = chain_next(state.head, rec.body)  # packed when it was added
                    parts.append(rec.body)
                state.records += 1
            upto = state.records - 1
            now = self._now()
            if trailer_reason is None:
                sig = self._key.sign(checkpoint_message(self._session_id, upto, state.head, now))
                body: dict[str, Any] = {"upto": upto, "head": state.head, "key_id": self._key_id, "sig": sig}
                parts.append(pack([int(RecordKind.CHECKPOINT), state.records, now, body]))
                self._last_checkpoint = (upto, now)
            else:
                unsigned = Trailer(ended_at=now, reason=trailer_reason, records=state.records,
                                   bytes_to_gateway=state.bytes_to_gateway,
                                   bytes_to_client=state.bytes_to_client,
                                   sha256_to_gateway=state.sha_to_gateway.digest(),
                                   sha256_to_client=state.sha_to_client.digest(),
                                   upto=upto, head=state.head, key_id=self._key_id, sig=b"")
                sig = self._key.sign(trailer_message(self._session_id, unsigned))
                trailer = Trailer(**{**unsigned.to_body(), "sig": sig})
                parts.append(pack([int(RecordKind.TRAILER), state.records, now, trailer.to_body()]))
                self._trailer = trailer
                self._last_checkpoint = (upto, now)
            # One copy into one buffer, compressed in one call. zstd's streaming APIs
            # (compressobj, stream_writer) would skip the join, but they copy the input
            # into their window and the output out of their buffer: measured slower at
            # every level, incompressible data and text alike.
            frame: bytes = compressor.compress(b"".join(parts))
            return frame
        except BaseException:
            self._broken = True
            raise

    # --- helpers ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._broken:
            raise WriterClosed("the recording writer failed; the session must end")
        if self._closed:
            raise WriterClosed("the recording is closed")

    def _now(self) -> float:
        return float(self._clock())

    @staticmethod
    def _pack_checked(kind: RecordKind, index: int, time: float, body: Mapping[str, Any]) -> bytes:
        try:
            packed = pack([int(kind), index, time, body])
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"cannot encode the {kind.name.lower()} record: {exc}") from exc
        if len(packed) > MAX_RECORD_SIZE:
            raise ValueError(f"the {kind.name.lower()} record is {len(packed)} bytes packed; "
                             f"the limit is {MAX_RECORD_SIZE}")
        try:  # exactly what a reader accepts (lengths, map keys, no ext types)
            msgpack.unpackb(packed, **unpack_options())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"the {kind.name.lower()} record exceeds the format's limits: {exc}") from exc
        return packed


def _byte_record_prefix(kind: RecordKind, index: int, time: float, size: int) -> bytes:
    """The bytes of ``pack([kind, index, time, body])`` before ``body``, for a ``body`` of
    ``size`` bytes: so that the record is ``prefix + body`` without building it.

    msgpack encodes an array as its header then its elements, one after the other, so this
    is ``pack([kind, index, time])`` with the array header of 3 (fixarray ``0x93``) made 4
    (``0x94``), then the header of a bin of ``size`` bytes -- the smallest that fits, as
    msgpack picks. Anything else and the records would no longer be the standard encoding
    the chain and the readers expect.
    """
    elements = pack([int(kind), index, time])
    if size < 0x100:
        bin_header = _BIN8.pack(0xC4, size)
    elif size < 0x10000:
        bin_header = _BIN16.pack(0xC5, size)
    else:  # a byte record carries at most MAX_DATA_PER_RECORD (1 MiB): far below bin32's 4 GiB
        bin_header = _BIN32.pack(0xC6, size)
    return b"\x94" + elements[1:] + bin_header


# --- sealing after a crash --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SealResult:
    """What :func:`seal_after_crash` did.

    ``sealed`` is False when the file already ended with a valid trailer (then nothing was
    changed and ``trailer`` is the existing one). ``trailer.head``/``trailer.sig`` go to
    the session index and the audit log.
    """

    path: str
    sealed: bool
    session_id: str
    trailer: Trailer
    discarded_bytes: int
    discarded_records: int
    last_checkpoint_time: float | None
    rewritten: bool = False  # nothing was verifiable: the file was rewritten from ``header``


def seal_after_crash(path: str | os.PathLike[str], signing_key: Ed25519PrivateKey, *, now: float,
                     trusted: Mapping[str, Ed25519PublicKey] | None = None,
                     session_id: str | None = None, header: Mapping[str, Any] | None = None,
                     compressor: zstandard.ZstdCompressor | None = None) -> SealResult:
    """Close a recording its gateway died writing: keep what verifies, sign the end.

    Verifies the file up to its last valid checkpoint (signatures checked against
    ``trusted`` plus ``signing_key``'s own public key), truncates everything after that
    checkpoint's flush unit, and appends one flush unit holding an EVENT
    ``recording_sealed`` (``last_checkpoint_time``, ``discarded_bytes``,
    ``discarded_records``) and a TRAILER with reason ``sealed_after_crash`` whose totals are
    recomputed from the verified records. Writes with fsync.

    Args:
        path: the recording.
        signing_key: the gateway's current recording key (signs the new trailer).
        now: the time for the new records (Unix seconds).
        trusted: the keyring (every recording key ever used, by key id), so a prefix signed
            before a key rotation still verifies.
        session_id, header: used only when not even the first flush unit verifies (the
            gateway died before its first write reached the disk): the file is then
            rewritten as ``header`` plus the trailer (as :class:`RecordingWriter` takes
            them). Without them that case raises :class:`SealError`.
        compressor: defaults to :func:`new_compressor`.

    Returns:
        What was done; ``sealed`` False if the file already had a valid trailer.

    Raises:
        SealError: the file is tampered or unreadable (it is left untouched as evidence),
            or nothing in it verifies and no ``header`` was given.
        OSError: the file cannot be read, truncated, written or synced.
    """
    from ._reader import VerifyStatus, scan  # the reader does not import the writer

    p = Path(path)
    keys: dict[str, Ed25519PublicKey] = dict(trusted or {})
    own = signing_key.public_key()
    keys.setdefault(key_id(own), own)
    result = scan(p, trusted=keys)
    verdict = result.verdict
    cctx = compressor if compressor is not None else new_compressor()
    if verdict.status is VerifyStatus.INTACT:
        assert verdict.trailer is not None and verdict.session_id is not None
        last = verdict.last_checkpoint
        return SealResult(path=str(p), sealed=False, session_id=verdict.session_id, trailer=verdict.trailer,
                          discarded_bytes=0, discarded_records=0,
                          last_checkpoint_time=last.time if last else None)
    if verdict.status is not VerifyStatus.INCOMPLETE:
        raise SealError(f"{p}: will not seal a recording that is {verdict.status.label}: "
                        + "; ".join(verdict.reasons))
    event = {"last_checkpoint_time": verdict.last_checkpoint.time if verdict.last_checkpoint else None,
             "discarded_bytes": verdict.unverified_bytes, "discarded_records": verdict.unverified_records}
    snapshot = result.snapshot
    if snapshot is not None and verdict.session_id is not None:
        writer = RecordingWriter._resume(session_id=verdict.session_id, signing_key=signing_key,
                                         clock=lambda: now, state=snapshot.state)
        offset = snapshot.offset
        sid = verdict.session_id
        rewritten = False
    else:
        if header is None or session_id is None:
            raise SealError(f"{p}: nothing in the recording verifies (no checkpoint); "
                            "pass session_id and header to rewrite it")
        writer = RecordingWriter(session_id=session_id, header=header, signing_key=signing_key,
                                 clock=lambda: now)
        offset = 0
        sid = session_id
        rewritten = True
    writer.add_event(SEALED_EVENT, event)
    frame = writer.close(REASON_SEALED_AFTER_CRASH, cctx)
    trailer = writer.trailer
    assert trailer is not None
    with open(p, "r+b") as f:
        f.truncate(offset)
        f.seek(offset)
        f.write(frame)
        f.flush()
        os.fsync(f.fileno())
    return SealResult(path=str(p), sealed=True, session_id=sid, trailer=trailer,
                      discarded_bytes=verdict.unverified_bytes, discarded_records=verdict.unverified_records,
                      last_checkpoint_time=event["last_checkpoint_time"], rewritten=rewritten)
