"""Reading recordings: streaming verification, record iteration and byte-exact dumps.

Theory of operation
-------------------
A recording is untrusted input on the auditor's machine, so the reader never trusts a
size, a length or a key that the file states:

* **Frames are walked, not trusted.** Before a flush unit is decompressed, its zstd frame
  structure (frame header, then every block header) is walked with small reads, which
  gives its exact extent in the file. That is how the reader tells a frame cut short by a
  crash (EOF inside the frame) from a complete frame that fails to decode (corruption),
  finds where the verified prefix ends (what :func:`replay.seal_after_crash` keeps), and
  resynchronises on the next frame after bytes that are not a frame at all.
* **Decompression streams with caps.** Each frame is decompressed through
  ``ZstdDecompressor.stream_reader`` in :attr:`ReaderLimits.read_chunk` pieces, never
  with one-shot ``decompress`` (which allocates what the frame header claims). The output
  not yet covered by a checkpoint whose signature verified is capped at
  ``min(max_output, file size * max_ratio + output_slack)``: work on anything an attacker
  can produce is bounded (a bomb is refused after bounded work), while a genuine
  recording -- every stretch of which a trusted key signed -- may compress far better
  than ``max_ratio`` (4000:1 for a session moving repetitive bytes). Without trusted keys
  (:func:`dump` without ``trusted``) nothing resets the cap. A frame whose header claims
  more than what is left is refused before a byte is decompressed; the zstd window is
  capped by ``max_window_size``.
* **Msgpack is bounded.** An ``Unpacker`` with a buffer cap, length caps on bins,
  strings, arrays and maps, string map keys only and no ext types. Records are handled one
  at a time and dropped: memory stays bounded on multi-GB files. The exact bytes of each
  record (what the chain hashes) are sliced from the decompressed stream by the
  unpacker's position.

Verification walks the chain record by record and checks every CHECKPOINT and the
TRAILER (index, chain head, signature by a *trusted* key id, totals). The verified prefix
ends with the last frame whose final record is a checkpoint that verifies. The verdict:

* INTACT (0): everything verifies and the file ends with a valid trailer;
* TAMPERED (2): a checkpoint or trailer that does not verify (a changed, missing or
  reordered record, an unknown or untrusted key id, a bad signature, wrong totals); a
  complete frame that does not decompress; anything malformed that is followed by a
  checkpoint or trailer (they claim to cover data that does not verify); data after the
  trailer; with an index entry, a trailer missing or different although the index says
  the session was closed ("truncated after close");
* INCOMPLETE (3): verified up to checkpoint N at time T, and what follows cannot be
  verified but nothing contradicts a signature either: no trailer (a crash, or a session
  still running), a frame cut short, records after the last checkpoint (listed), bytes
  that are not a frame;
* UNREADABLE (4): not a recording (no header), an unsupported format version, or a limit
  exceeded anywhere (output cap, record size, lengths, window size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import os
import re
import sqlite3
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

import msgpack
import zstandard
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ._format import (
    MAX_CONTAINER_LEN,
    MAX_RECORD_SIZE,
    REDACTION_EVENT,
    Direction,
    RecordingError,
    RecordKind,
    Trailer,
    chain_next,
    chain_seed,
    check_checkpoint,
    check_header,
    checkpoint_message,
    key_id,
    parse_record,
    unpack_options,
)

__all__ = [
    "MAX_LISTED_UNVERIFIED",
    "CheckpointInfo",
    "DumpResult",
    "IndexEntry",
    "KeyringError",
    "ReaderLimits",
    "Record",
    "SessionIndex",
    "SessionIndexError",
    "Totals",
    "UnreadableRecording",
    "UnverifiedRecord",
    "Verdict",
    "VerifyStatus",
    "dump",
    "iter_records",
    "load_keyring",
    "load_public_key",
    "read_header",
    "scan",
    "verify",
]

#: A verdict lists at most this many unverified records (it counts all of them).
MAX_LISTED_UNVERIFIED = 100
_REASON_VALUE_MAX = 80
_MAX_KEY_IDS = 16  # listed in a verdict (unchecked signatures could name any number)

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_SKIPPABLE_MASK = 0xFFFFFFF0
_SKIPPABLE_MAGIC = 0x184D2A50
_MAX_BLOCK = 128 * 1024
_RESYNC_CHUNK = 1 << 20


class UnreadableRecording(RecordingError):
    """A recording cannot be read at all (not a recording, or over a reader limit)."""


class KeyringError(RecordingError):
    """A public key file or keyring directory is missing or not what it must be."""


class SessionIndexError(RecordingError):
    """The session index cannot be opened or read."""


# --- limits, verdicts ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReaderLimits:
    """Every bound the reader enforces on untrusted recordings.

    Attributes:
        max_output: cap on decompressed bytes not covered by a verified signed
            checkpoint (all of the file when signatures are not checked).
        max_ratio, output_slack: that cap also never exceeds ``file size * max_ratio +
            output_slack`` (a decompression bomb is refused after bounded work).
        max_record_size: the largest record (and bin or string) accepted.
        max_container_len: the most entries in one array or map.
        max_window_size: the largest zstd window accepted (decoder memory).
        read_chunk: how much decompressed data is read at a time.
    """

    max_output: int = 1 << 40
    max_ratio: int = 1000
    output_slack: int = 64 << 20
    max_record_size: int = MAX_RECORD_SIZE
    max_container_len: int = MAX_CONTAINER_LEN
    max_window_size: int = 1 << 27
    read_chunk: int = 256 << 10

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < (0 if f.name == "output_slack" else 1):
                raise ValueError(f"ReaderLimits.{f.name} must be a positive int")

    def output_cap(self, file_size: int) -> int:
        return min(self.max_output, file_size * self.max_ratio + self.output_slack)


DEFAULT_LIMITS = ReaderLimits()


class VerifyStatus(enum.IntEnum):
    """A verdict; the value is ``replay verify``'s exit code."""

    INTACT = 0
    TAMPERED = 2
    INCOMPLETE = 3
    UNREADABLE = 4

    @property
    def label(self) -> str:
        return str(self.name.lower())


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexEntry:
    """What the session index says about a recording (the lead's ``sessions`` row).

    ``ended`` means the gateway closed (or sealed) the session, so the file must end with
    a trailer; ``head``/``sig``, when known, must equal that trailer's.
    """

    session_id: str
    ended: bool
    head: bytes | None = None
    sig: bytes | None = None
    end_reason: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointInfo:
    """A verified checkpoint (or the trailer): the last chained record it covers."""

    upto: int
    time: float
    key_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    """Counts over a verified prefix (or a whole intact recording)."""

    records: int = 0
    bytes_to_gateway: int = 0
    bytes_to_client: int = 0
    sha256_to_gateway: bytes = hashlib.sha256().digest()
    sha256_to_client: bytes = hashlib.sha256().digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class UnverifiedRecord:
    """A record after the last verified checkpoint (``size`` is its packed size)."""

    index: int
    kind: str
    time: float
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """The result of :func:`verify` for one file.

    ``header`` is the decoded HEADER (verified only if ``last_checkpoint`` is set);
    ``trailer`` is set only when the trailer verified. ``verified`` holds the totals up to
    ``last_checkpoint``, which ends at byte ``verified_offset`` of the file;
    ``unverified_bytes`` (file bytes) and ``unverified_records`` follow it, the first
    :data:`MAX_LISTED_UNVERIFIED` of those records listed in ``unverified``.
    ``signatures_checked`` is False only for :func:`dump` without trusted keys.
    """

    path: str
    status: VerifyStatus
    reasons: tuple[str, ...]
    session_id: str | None = None
    header: Mapping[str, Any] | None = None
    trailer: Trailer | None = None
    file_size: int = 0
    verified_offset: int = 0
    last_checkpoint: CheckpointInfo | None = None
    verified: Totals = field(default_factory=Totals)
    unverified_bytes: int = 0
    unverified_records: int = 0
    unverified: tuple[UnverifiedRecord, ...] = ()
    key_ids: tuple[str, ...] = ()
    signatures_checked: bool = True

    @property
    def exit_code(self) -> int:
        return int(self.status)

    def summary(self) -> str:
        """One human line: the status, then why."""
        return f"{self.status.label} \u2014 {'; '.join(self.reasons)}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (bytes in hex)."""
        return {
            "file": self.path,
            "status": self.status.label,
            "exit_code": self.exit_code,
            "reasons": list(self.reasons),
            "session_id": self.session_id,
            "header": _jsonable(self.header),
            "trailer": self.trailer.to_json() if self.trailer else None,
            "file_size": self.file_size,
            "verified_offset": self.verified_offset,
            "last_checkpoint": dataclasses.asdict(self.last_checkpoint) if self.last_checkpoint else None,
            "verified": _jsonable(dataclasses.asdict(self.verified)),
            "unverified_bytes": self.unverified_bytes,
            "unverified_records": self.unverified_records,
            "unverified": [dataclasses.asdict(u) for u in self.unverified],
            "key_ids": list(self.key_ids),
            "signatures_checked": self.signatures_checked,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _show(value: object) -> str:
    """A value from the file, safe to put in a message (escaped, bounded)."""
    text = ascii(value)
    return text if len(text) <= _REASON_VALUE_MAX else text[:_REASON_VALUE_MAX - 3] + "..."


def _iso(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return repr(t)


def _show_key_id(value: str) -> str:
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else f"(malformed) {_show(value)}"


# --- frames -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Span:
    """One zstd frame's extent, or why the bytes at ``offset`` are not one."""

    offset: int
    end: int  # for "frame": one past the frame; otherwise the file size
    kind: str  # "frame" | "truncated" | "junk" | "limit"
    reason: str = ""
    content_size: int | None = None


def _walk_frame(f: IO[bytes], offset: int, size: int, limits: ReaderLimits) -> _Span:
    """Walk the frame at ``offset`` header and block headers only (RFC 8878)."""

    def read_at(pos: int, n: int) -> bytes:
        f.seek(pos)
        return f.read(n)

    magic = read_at(offset, 4)
    if len(magic) < 4:
        if _ZSTD_MAGIC.startswith(magic):
            return _Span(offset, size, "truncated", "the file ends inside a frame header")
        return _Span(offset, size, "junk", "bytes that are not a zstd frame")
    if magic != _ZSTD_MAGIC:
        (value,) = struct.unpack("<I", magic)
        if value & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
            return _Span(offset, size, "junk", "a skippable frame (never written by the gateway)")
        return _Span(offset, size, "junk", "bytes that are not a zstd frame")
    pos = offset + 4
    fhd_b = read_at(pos, 1)
    if not fhd_b:
        return _Span(offset, size, "truncated", "the file ends inside a frame header")
    fhd = fhd_b[0]
    fcs_flag, single, reserved = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1
    checksum, dict_flag = (fhd >> 2) & 1, fhd & 3
    if reserved:
        return _Span(offset, size, "junk", "a frame header with the reserved bit set")
    if dict_flag:
        return _Span(offset, size, "junk", "a frame that needs a dictionary")
    fcs_len = (1 if single else 0) if fcs_flag == 0 else (2, 4, 8)[fcs_flag - 1]
    header_rest = (0 if single else 1) + fcs_len
    rest = read_at(pos + 1, header_rest)
    if len(rest) < header_rest:
        return _Span(offset, size, "truncated", "the file ends inside a frame header")
    window: int | None = None
    if not single:
        wd = rest[0]
        base = 1 << (10 + (wd >> 3))
        window = base + (base // 8) * (wd & 7)
    content_size: int | None = None
    if fcs_len:
        raw = rest[-fcs_len:]
        content_size = int.from_bytes(raw, "little") + (256 if fcs_len == 2 else 0)
    if single:
        window = content_size
    if window is not None and window > limits.max_window_size:
        return _Span(offset, size, "limit", f"a frame needs a {window}-byte window "
                                             f"(the limit is {limits.max_window_size})")
    pos += 1 + header_rest
    while True:
        bh = read_at(pos, 3)
        if len(bh) < 3:
            return _Span(offset, size, "truncated", "the file ends inside a frame")
        value = int.from_bytes(bh, "little")
        last, btype, bsize = value & 1, (value >> 1) & 3, value >> 3
        if btype == 3:
            return _Span(offset, size, "junk", "a frame with a reserved block type")
        if bsize > _MAX_BLOCK:
            return _Span(offset, size, "junk", "a frame with an oversized block")
        pos += 3 + (1 if btype == 1 else bsize)
        if pos > size:
            return _Span(offset, size, "truncated", "the file ends inside a frame")
        if last:
            break
    if checksum:
        pos += 4
        if pos > size:
            return _Span(offset, size, "truncated", "the file ends inside a frame checksum")
    return _Span(offset, pos, "frame", content_size=content_size)


def _find_magic(f: IO[bytes], start: int, size: int) -> int | None:
    """The offset of the next zstd frame magic at or after ``start``."""
    pos = start
    carry = b""
    while pos < size:
        f.seek(pos)
        chunk = f.read(min(_RESYNC_CHUNK, size - pos))
        if not chunk:
            return None
        data = carry + chunk
        at = data.find(_ZSTD_MAGIC)
        if at >= 0:
            return pos - len(carry) + at
        carry = data[-3:]
        pos += len(chunk)
    return None


class _Slice:
    """A read-only window ``[start, end)`` of a file, for the zstd stream reader."""

    def __init__(self, f: IO[bytes], start: int, end: int) -> None:
        self._f, self._pos, self._end = f, start, end

    def read(self, n: int = -1) -> bytes:
        n = self._end - self._pos if n < 0 else min(n, self._end - self._pos)
        if n <= 0:
            return b""
        self._f.seek(self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data


class _Limit(Exception):
    """A reader limit was exceeded (the file is unreadable)."""


class _Corrupt(Exception):
    """zstd refused the frame's content."""


class _Malformed(Exception):
    """The decompressed bytes are not whole msgpack records."""


class _Budget:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.cap:
            raise _Limit(f"more than {self.cap} bytes decompressed without a verified checkpoint "
                         f"(the output cap for this file)")


def _decode_frame(f: IO[bytes], span: _Span, dctx: zstandard.ZstdDecompressor, budget: _Budget,
                  limits: ReaderLimits) -> Iterator[tuple[bytes, Any]]:
    """``(exact record bytes, decoded object)`` for each msgpack object in the frame.

    Raises:
        _Limit, _Corrupt, _Malformed.
    """
    if span.content_size is not None and budget.used + span.content_size > budget.cap:
        raise _Limit(f"a frame claims {span.content_size} bytes, over the output cap ({budget.cap})")
    reader = dctx.stream_reader(_Slice(f, span.offset, span.end), read_size=1 << 17,  # type: ignore[arg-type]
                                read_across_frames=False)
    unpacker = msgpack.Unpacker(max_buffer_size=limits.max_record_size + limits.read_chunk,
                                **unpack_options(max_record_size=limits.max_record_size,
                                                 max_container_len=limits.max_container_len))
    buf = bytearray()
    consumed = 0  # stream position of buf[0]
    while True:
        try:
            chunk = reader.read(limits.read_chunk)
        except zstandard.ZstdError as exc:
            raise _Corrupt(str(exc)) from exc
        if not chunk:
            break
        budget.take(len(chunk))
        try:
            unpacker.feed(chunk)
        except msgpack.BufferFull as exc:
            raise _Limit(f"a record is larger than the limit ({limits.max_record_size} bytes)") from exc
        buf += chunk
        start = 0
        while True:
            try:
                obj = next(unpacker)
            except StopIteration:
                break
            except msgpack.StackError as exc:
                raise _Limit("msgpack nesting too deep") from exc
            except ValueError as exc:  # FormatError, ExtraData, length limits, bad UTF-8, ext
                text = str(exc)
                if "exceeds max_" in text:
                    raise _Limit(f"a msgpack length is over the limit ({_show(text)})") from exc
                raise _Malformed(f"bad msgpack ({_show(text)})") from exc
            except TypeError as exc:  # e.g. an unhashable map key
                raise _Malformed(f"bad msgpack ({_show(str(exc))})") from exc
            end = unpacker.tell() - consumed
            raw = bytes(buf[start:end])
            start = end
            if len(raw) > limits.max_record_size:
                raise _Limit(f"a record is larger than the limit ({limits.max_record_size} bytes)")
            yield raw, obj
        del buf[:start]
        consumed += start
    if buf:
        raise _Malformed("the flush unit ends inside a record")


# --- keys -----------------------------------------------------------------------------------


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``recording.pub``, ``recording-keys/*.pub``).

    Raises:
        KeyringError: missing, unreadable, or not an Ed25519 public key.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyringError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyringError(f"{path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyringError(f"{path} is not an Ed25519 public key")
    return key


def load_keyring(dir: str | os.PathLike[str]) -> dict[str, Ed25519PublicKey]:
    """Every ``<key id>.pub`` in a keyring directory, by key id.

    ``dir`` may be the keyring itself or a CA directory holding ``recording-keys/``.

    Raises:
        KeyringError: the directory is missing or empty, or a file is corrupt or named for
            another key.
    """
    d = Path(dir)
    if (d / "recording-keys").is_dir():
        d = d / "recording-keys"
    if not d.is_dir():
        raise KeyringError(f"{dir} is not a directory")
    keyring: dict[str, Ed25519PublicKey] = {}
    for path in sorted(d.glob("*.pub")):
        key = load_public_key(path)
        kid = key_id(key)
        if path.stem != kid:
            raise KeyringError(f"{path} holds the key with id {kid}, not {path.stem}")
        keyring[kid] = key
    if not keyring:
        raise KeyringError(f"{d} holds no <key id>.pub files")
    return keyring


# --- the session index ---------------------------------------------------------------------


class SessionIndex:
    """The gateway's session index, opened read-only (SQLite).

    The table read is ``sessions(session_id TEXT PRIMARY KEY, file TEXT, trailer_head BLOB,
    trailer_sig BLOB, ended_at REAL, end_reason TEXT)``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Raises: SessionIndexError: the file is missing or not a readable index."""
        self.path = Path(path)
        if not self.path.is_file():
            raise SessionIndexError(f"{path}: no such index file")
        uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            self._db = sqlite3.connect(uri, uri=True)
            self._db.execute("SELECT session_id, file, trailer_head, trailer_sig, ended_at, end_reason "
                             "FROM sessions LIMIT 0")
        except sqlite3.Error as exc:
            with contextlib.suppress(Exception):
                self._db.close()
            raise SessionIndexError(f"{path} is not a readable session index ({exc})") from exc

    def __enter__(self) -> SessionIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def _row(self, session_id: str) -> tuple[Any, ...] | None:
        try:
            row: tuple[Any, ...] | None = self._db.execute(
                "SELECT session_id, file, trailer_head, trailer_sig, ended_at, end_reason "
                "FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        except sqlite3.Error as exc:
            raise SessionIndexError(f"{self.path}: cannot read the index ({exc})") from exc
        return row

    def entry(self, session_id: str) -> IndexEntry | None:
        """The row for ``session_id`` as an :class:`IndexEntry`, or None.

        Raises:
            SessionIndexError: the index cannot be read or the row is malformed.
        """
        row = self._row(session_id)
        if row is None:
            return None
        _sid, _file, head, sig, ended_at, reason = row
        if not (head is None or isinstance(head, bytes)) or not (sig is None or isinstance(sig, bytes)):
            raise SessionIndexError(f"{self.path}: the trailer head/signature of {session_id} are not blobs")
        return IndexEntry(session_id=session_id, ended=ended_at is not None, head=head, sig=sig,
                          end_reason=reason if isinstance(reason, str) else None)

    def file(self, session_id: str) -> Path | None:
        """The recording file of ``session_id`` (relative paths are taken from the index's
        directory), or None."""
        row = self._row(session_id)
        if row is None or not isinstance(row[1], str) or not row[1]:
            return None
        p = Path(row[1])
        return p if p.is_absolute() else self.path.parent / p


# --- the scanner ------------------------------------------------------------------------------


@dataclass(slots=True)
class _State:
    records: int
    head: bytes
    bytes_to_gateway: int
    bytes_to_client: int
    sha_to_gateway: Any
    sha_to_client: Any

    def copy(self) -> _State:
        return _State(self.records, self.head, self.bytes_to_gateway, self.bytes_to_client,
                      self.sha_to_gateway.copy(), self.sha_to_client.copy())

    def totals(self) -> Totals:
        return Totals(records=self.records, bytes_to_gateway=self.bytes_to_gateway,
                      bytes_to_client=self.bytes_to_client,
                      sha256_to_gateway=self.sha_to_gateway.digest(),
                      sha256_to_client=self.sha_to_client.digest())


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The chain state at the end of the verified prefix (for the seal)."""

    offset: int
    state: Any  # a _State, consumed by the writer's resume


@dataclass(frozen=True, slots=True)
class ScanResult:
    verdict: Verdict
    snapshot: Snapshot | None


class _Done(Exception):
    """Stop scanning: the verdict is settled."""


#: Receives ``(kind, body)`` of every chained record that continues the sequence, in order.
RecordSink = Callable[[RecordKind, Any], None]


class _Scanner:
    def __init__(self, path: Path, f: IO[bytes], size: int, *, trusted: Mapping[str, Ed25519PublicKey] | None,
                 limits: ReaderLimits, on_record: RecordSink | None) -> None:
        self.path, self.f, self.size = path, f, size
        self.trusted = trusted
        self.limits = limits
        self.on_record = on_record
        self.budget = _Budget(limits.output_cap(size))
        self.dctx = zstandard.ZstdDecompressor(max_window_size=limits.max_window_size)
        self.status: VerifyStatus | None = None
        self.reasons: list[str] = []
        self.header: dict[str, Any] | None = None
        self.session_id: str | None = None
        self.state: _State | None = None
        self.trailer: Trailer | None = None
        self.trailer_end = 0
        self.snapshot: Snapshot | None = None
        self.snapshot_totals = Totals()
        self.last_checkpoint: CheckpointInfo | None = None
        self.snapshot_checkpoint: CheckpointInfo | None = None
        self.pending: list[UnverifiedRecord] = []
        self.pending_count = 0
        self.key_ids: list[str] = []
        self.problem: str | None = None  # set once something after the prefix fails

    # verdict helpers
    def settle(self, status: VerifyStatus, reason: str) -> _Done:
        self.status = status
        self.reasons.append(reason)
        return _Done()

    def note_unverified(self, index: int, kind: RecordKind | int, time: float, size: int) -> None:
        self.pending_count += 1
        if len(self.pending) < MAX_LISTED_UNVERIFIED:
            name = kind.name.lower() if isinstance(kind, RecordKind) else str(kind)
            self.pending.append(UnverifiedRecord(index=index, kind=name, time=time, size=size))

    def run(self) -> None:
        try:
            if self.size == 0:
                raise self.settle(VerifyStatus.INCOMPLETE, "the file is empty: nothing was recorded")
            pos = 0
            while pos < self.size:
                span = _walk_frame(self.f, pos, self.size, self.limits)
                if span.kind == "limit" and self.problem is None:
                    raise self.settle(VerifyStatus.UNREADABLE, f"{span.reason} at offset {pos}")
                if self.trailer is not None:
                    raise self.settle(VerifyStatus.TAMPERED,
                                      f"{self.size - self.trailer_end} bytes follow the trailer")
                if span.kind in ("junk", "limit"):
                    if self.header is None and self.problem is None:
                        raise self.settle(VerifyStatus.UNREADABLE,
                                          f"not a recording: {span.reason} at offset {pos}")
                    self.fail(f"{span.reason} at offset {pos}")
                    nxt = _find_magic(self.f, pos + 1, self.size)
                    if nxt is None:
                        break
                    pos = nxt
                    continue
                if span.kind == "truncated":
                    self.frame(span, complete=False)
                    self.fail(f"the last flush unit (at offset {pos}) is cut short: {span.reason}")
                    break
                self.frame(span, complete=True)
                pos = span.end
            self.finish()
        except _Done:
            pass

    def fail(self, reason: str) -> None:
        """Something after the verified prefix does not verify."""
        if self.problem is None:
            self.problem = reason

    def frame(self, span: _Span, *, complete: bool) -> None:
        ended_signed = False
        frame_problem = False
        try:
            for raw, obj in _decode_frame(self.f, span, self.dctx, self.budget, self.limits):
                if self.problem is not None or frame_problem:
                    # past a failure: only look for a signed record claiming to cover it
                    try:
                        kind, index, time, _body = parse_record(obj)
                    except ValueError:
                        return  # not even record-shaped: give up on this frame
                    if kind in (RecordKind.CHECKPOINT, RecordKind.TRAILER) and complete:
                        raise self.settle(VerifyStatus.TAMPERED,
                                          f"{self.problem}; yet a {kind.name.lower()} (index {index}) "
                                          f"follows at offset {span.offset}: records were changed or removed")
                    if kind.chained:
                        self.note_unverified(index, kind, time, len(raw))
                    continue
                if ended_signed:
                    if complete:
                        raise self.settle(VerifyStatus.TAMPERED, "a record follows the checkpoint inside "
                                                                 f"the flush unit at offset {span.offset}")
                    return
                outcome = self.record(raw, obj, span, complete=complete)
                if outcome is None:  # the record failed; keep looking in this frame
                    frame_problem = True
                ended_signed = bool(outcome)
        except _Limit as exc:
            raise self.settle(VerifyStatus.UNREADABLE,
                              f"{exc} (in the flush unit at offset {span.offset})") from None
        except _Corrupt as exc:
            if not complete:
                return
            if self.header is None:
                raise self.settle(VerifyStatus.UNREADABLE, "not a recording: the first flush unit does not "
                                                           f"decompress ({_show(str(exc))})") from None
            if self.problem is None:
                raise self.settle(VerifyStatus.TAMPERED, f"the flush unit at offset {span.offset} is corrupt "
                                                         f"({_show(str(exc))})") from None
            return
        except _Malformed as exc:
            if self.header is None and self.problem is None:
                raise self.settle(VerifyStatus.UNREADABLE, f"not a recording: {exc}") from None
            if complete:
                self.fail(f"the flush unit at offset {span.offset} is malformed: {exc}")
            return
        if ended_signed and complete and self.problem is None and not frame_problem:
            assert self.state is not None
            self.snapshot = Snapshot(span.end, self.state.copy())
            self.snapshot_totals = self.state.totals()
            self.snapshot_checkpoint = self.last_checkpoint
            self.pending.clear()
            self.pending_count = 0
            if self.trailer is not None:
                self.trailer_end = span.end

    def record(self, raw: bytes, obj: Any, span: _Span, *, complete: bool) -> bool | None:
        """Check one record in sequence. True if it was a verified checkpoint/trailer, False
        for a chained record, None if it failed (``self.problem`` says why)."""
        try:
            kind, index, time, body = parse_record(obj)
        except ValueError as exc:
            if self.header is None:
                raise self.settle(VerifyStatus.UNREADABLE, f"not a recording: {exc}") from None
            self.fail(f"a malformed record at offset {span.offset}: {exc}")
            return None
        if self.header is None:
            if kind is not RecordKind.HEADER or index != 0:
                raise self.settle(VerifyStatus.UNREADABLE, "not a recording: it does not start with a header")
            problem = check_header(body)
            if problem is not None:
                why = problem if problem.startswith("unsupported") else f"not a recording: {problem}"
                raise self.settle(VerifyStatus.UNREADABLE, why)
            self.header = body
            self.session_id = body["session_id"]
            self.state = _State(0, chain_seed(body["session_id"]), 0, 0, hashlib.sha256(), hashlib.sha256())
        assert self.state is not None and self.session_id is not None
        st = self.state
        if kind.chained:
            if kind is RecordKind.HEADER and index != 0:
                self.fail(f"a second header (index {index})")
                return None
            if index != st.records:
                self.fail(f"record {index} where record {st.records} was expected "
                          f"(records missing or reordered)")
                return None
            st.head = chain_next(st.head, raw)
            st.records += 1
            if kind is RecordKind.TO_GATEWAY:
                st.bytes_to_gateway += len(body)
                st.sha_to_gateway.update(body)
            elif kind is RecordKind.TO_CLIENT:
                st.bytes_to_client += len(body)
                st.sha_to_client.update(body)
            self.note_unverified(index, kind, time, len(raw))
            if self.on_record is not None:
                self.on_record(kind, body)
            return False
        if not complete:
            # a crash cut this flush unit short: its checkpoint cannot count
            self.note_unverified(index, kind, time, len(raw))
            return None
        name = "trailer" if kind is RecordKind.TRAILER else "checkpoint"
        where = f"the {name} at offset {span.offset}"
        if index != st.records:
            raise self.settle(VerifyStatus.TAMPERED, f"{where} has index {index}, not {st.records}: "
                                                     f"records missing or reordered")
        trailer: Trailer | None = None
        if kind is RecordKind.CHECKPOINT:
            problem = check_checkpoint(body)
            if problem is not None:
                raise self.settle(VerifyStatus.TAMPERED, f"{where} is malformed: {problem}")
            upto, head, kid, sig = body["upto"], body["head"], body["key_id"], body["sig"]
            message = checkpoint_message(self.session_id, upto, head, time)
        else:
            try:
                trailer = Trailer.from_body(body)
            except ValueError as exc:
                raise self.settle(VerifyStatus.TAMPERED, f"{where} is malformed: {exc}") from None
            upto, head, kid, sig = trailer.upto, trailer.head, trailer.key_id, trailer.sig
            message = trailer.message(self.session_id)
            if time != trailer.ended_at:
                raise self.settle(VerifyStatus.TAMPERED, f"{where}: its time is not its ended_at")
        if upto != st.records - 1:
            raise self.settle(VerifyStatus.TAMPERED, f"{where} covers up to record {upto}, but "
                                                     f"{st.records} records precede it")
        if head != st.head:
            raise self.settle(VerifyStatus.TAMPERED,
                              f"{where} (up to record {upto}): the chain does not match, so records "
                              f"before it were changed, removed or reordered")
        if self.trusted is not None:
            key = self.trusted.get(kid)
            if key is None:
                raise self.settle(VerifyStatus.TAMPERED, f"{where} is signed by key id {_show_key_id(kid)}, "
                                                         f"which is not a trusted recording key")
            try:
                key.verify(sig, message)
            except InvalidSignature:
                raise self.settle(VerifyStatus.TAMPERED,
                                  f"{where} has a bad signature for key id {_show_key_id(kid)}") from None
            self.budget.used = 0  # a trusted key vouches for everything so far
        if trailer is not None:
            totals = st.totals()
            mismatch = [n for n, a, b in (
                ("records", trailer.records, totals.records),
                ("bytes_to_gateway", trailer.bytes_to_gateway, totals.bytes_to_gateway),
                ("bytes_to_client", trailer.bytes_to_client, totals.bytes_to_client),
                ("sha256_to_gateway", trailer.sha256_to_gateway, totals.sha256_to_gateway),
                ("sha256_to_client", trailer.sha256_to_client, totals.sha256_to_client)) if a != b]
            if mismatch:
                raise self.settle(VerifyStatus.TAMPERED, f"the trailer's {', '.join(mismatch)} do not match "
                                                         f"the records")
            self.trailer = trailer
        if kid not in self.key_ids and len(self.key_ids) < _MAX_KEY_IDS:
            self.key_ids.append(kid)
        self.last_checkpoint = CheckpointInfo(upto=upto, time=time, key_id=kid)
        return True

    def finish(self) -> None:
        if self.header is None:
            # only a cut-short first frame can get here
            raise self.settle(VerifyStatus.INCOMPLETE,
                              f"nothing verifies: {self.problem or 'no complete flush unit'}")
        if self.trailer is not None:
            self.status = VerifyStatus.INTACT
            signed = (f"signed by {', '.join(k[:16] for k in self.key_ids)}" if self.trusted is not None
                      else "signatures not checked")
            ended = _show(self.trailer.reason)
            self.reasons.append(f"{self.trailer.records} records, ended {ended}, {signed}")
            return
        cp = self.snapshot_checkpoint
        where = (f"verified up to record {cp.upto} (checkpoint at {_iso(cp.time)})" if cp
                 else "no checkpoint verifies")
        after = f"{self.size - (self.snapshot.offset if self.snapshot else 0)} bytes"
        if self.pending_count:
            after += f" and {self.pending_count} records"
        self.status = VerifyStatus.INCOMPLETE
        after += " after it" if cp else ""
        if self.problem is not None:
            self.reasons.append(f"{where}; {after} cannot be verified: {self.problem}")
        elif self.pending_count or (self.snapshot and self.snapshot.offset < self.size):
            self.reasons.append(f"{where}; {after} cannot be verified (no checkpoint covers them)")
        else:
            self.reasons.append(f"{where}; no trailer: the session was not closed (still running, or the "
                                f"gateway stopped)")

    def verdict(self) -> Verdict:
        assert self.status is not None
        offset = self.snapshot.offset if self.snapshot else 0
        return Verdict(
            path=str(self.path), status=self.status, reasons=tuple(self.reasons), session_id=self.session_id,
            header=self.header, trailer=self.trailer, file_size=self.size, verified_offset=offset,
            last_checkpoint=self.snapshot_checkpoint, verified=self.snapshot_totals,
            unverified_bytes=self.size - offset, unverified_records=self.pending_count,
            unverified=tuple(self.pending), key_ids=tuple(self.key_ids),
            signatures_checked=self.trusted is not None)


def _apply_index(verdict: Verdict, entry: IndexEntry) -> Verdict:
    if verdict.status is VerifyStatus.UNREADABLE:
        return verdict
    reasons: list[str] = []
    if verdict.session_id is not None and entry.session_id != verdict.session_id:
        reasons.append(f"the index entry is for session {_show(entry.session_id)}, "
                       f"not {_show(verdict.session_id)}")
    elif entry.ended:
        if verdict.trailer is None:
            reasons.append("the index says the session was closed"
                           + (f" ({_show(entry.end_reason)})" if entry.end_reason else "")
                           + " but the recording has no valid trailer: truncated after close")
        elif ((entry.head is not None and entry.head != verdict.trailer.head)
              or (entry.sig is not None and entry.sig != verdict.trailer.sig)):
            reasons.append("the trailer differs from the one the index recorded at close")
    if not reasons:
        return verdict
    return dataclasses.replace(verdict, status=VerifyStatus.TAMPERED,
                               reasons=tuple(reasons) + verdict.reasons)


def scan(path: str | os.PathLike[str], *, trusted: Mapping[str, Ed25519PublicKey] | None,
         index_entry: IndexEntry | None = None, limits: ReaderLimits = DEFAULT_LIMITS,
         on_record: RecordSink | None = None) -> ScanResult:
    """The verifier's engine: :func:`verify` plus the chain state at the end of the verified
    prefix (for :func:`replay.seal_after_crash`). ``trusted=None`` skips signature checks
    (chain, indexes and totals are still checked). ``on_record`` receives every chained
    record that continues the sequence, in order, as it is read."""
    p = Path(path)
    try:
        f = open(p, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        return ScanResult(Verdict(path=str(p), status=VerifyStatus.UNREADABLE,
                                  reasons=(f"cannot open: {exc.strerror or exc}",)), None)
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            scanner = _Scanner(p, f, size, trusted=trusted, limits=limits, on_record=on_record)
            scanner.run()
        except OSError as exc:
            return ScanResult(Verdict(path=str(p), status=VerifyStatus.UNREADABLE,
                                      reasons=(f"cannot read: {exc.strerror or exc}",)), None)
    verdict = scanner.verdict()
    if index_entry is not None:
        verdict = _apply_index(verdict, index_entry)
    snapshot = scanner.snapshot if verdict.status is VerifyStatus.INCOMPLETE else None
    return ScanResult(verdict, snapshot)


def verify(path: str | os.PathLike[str], *, trusted: Mapping[str, Ed25519PublicKey],
           index_entry: IndexEntry | None = None, limits: ReaderLimits = DEFAULT_LIMITS) -> Verdict:
    """Verify one recording, streaming, in bounded memory.

    Args:
        path: the recording file.
        trusted: the recording public keys to accept, by key id (see :func:`load_keyring`).
            A key id found in the file is only looked up here, never believed.
        index_entry: what the session index says about this session; a closed session must
            end with the trailer the index recorded.
        limits: the reader's bounds.

    Returns:
        The :class:`Verdict` (never raises for a bad file: unreadable is a verdict).
    """
    return scan(path, trusted=trusted, index_entry=index_entry, limits=limits).verdict


def read_header(path: str | os.PathLike[str], *, limits: ReaderLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The HEADER of a recording (unverified), reading only the start of the first frame.

    Raises:
        UnreadableRecording: the file does not start with a valid header.
    """
    for record in iter_records(path, limits=limits):
        if record.kind is not RecordKind.HEADER or record.index != 0:
            break
        problem = check_header(record.body)
        if problem is not None:
            raise UnreadableRecording(f"{path}: {problem}")
        header: dict[str, Any] = record.body
        return header
    raise UnreadableRecording(f"{path}: not a recording: it does not start with a header")


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """One decoded record. ``offset`` is its flush unit's offset in the file; ``size`` its
    packed size."""

    kind: RecordKind
    index: int
    time: float
    body: Any
    offset: int
    size: int


def iter_records(path: str | os.PathLike[str], *, limits: ReaderLimits = DEFAULT_LIMITS) -> Iterator[Record]:
    """Every record of a recording, in file order, without verifying anything.

    A flush unit cut short by a crash ends the iteration after its last whole record.

    Raises:
        UnreadableRecording: the file cannot be opened, holds something that is not a
            flush unit of records, or exceeds a limit.
    """
    p = Path(path)
    try:
        f = open(p, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise UnreadableRecording(f"{p}: cannot open: {exc.strerror or exc}") from exc
    with f:
        size = os.fstat(f.fileno()).st_size
        budget = _Budget(limits.output_cap(size))
        dctx = zstandard.ZstdDecompressor(max_window_size=limits.max_window_size)
        pos = 0
        while pos < size:
            span = _walk_frame(f, pos, size, limits)
            if span.kind in ("junk", "limit"):
                raise UnreadableRecording(f"{p}: {span.reason} at offset {pos}")
            complete = span.kind == "frame"
            try:
                for raw, obj in _decode_frame(f, span, dctx, budget, limits):
                    try:
                        kind, index, time, body = parse_record(obj)
                    except ValueError as exc:
                        raise UnreadableRecording(f"{p}: {exc} (flush unit at offset {pos})") from None
                    yield Record(kind=kind, index=index, time=time, body=body, offset=pos, size=len(raw))
            except _Limit as exc:
                raise UnreadableRecording(f"{p}: {exc}") from None
            except (_Corrupt, _Malformed) as exc:
                if complete:
                    raise UnreadableRecording(f"{p}: the flush unit at offset {pos}: {exc}") from None
            if not complete:
                return
            pos = span.end


# --- dump -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DumpResult:
    """What :func:`dump` wrote.

    ``sha256`` is over exactly the bytes written; ``verified_bytes`` of them are covered by
    the last verified checkpoint. ``redactions`` lists the header's redactions and every
    EVENT ``redaction``: where the recorded bytes differ from what was on the wire.
    """

    direction: Direction
    bytes_written: int
    sha256: bytes
    verified_bytes: int
    redactions: tuple[Any, ...]
    verdict: Verdict


def dump(path: str | os.PathLike[str], direction: Direction | str, out: BinaryIO, *,
         trusted: Mapping[str, Ed25519PublicKey] | None = None, index_entry: IndexEntry | None = None,
         limits: ReaderLimits = DEFAULT_LIMITS) -> DumpResult:
    """Write exactly the recorded bytes of one direction to ``out``, streaming.

    The file is verified in the same pass (signatures only if ``trusted`` is given): bytes
    are written as records are read, so for a recording that is not intact the output
    holds what was read up to the failure, and the verdict says what verified.

    Args:
        direction: :class:`Direction` or its name (``sent``/``received`` accepted).

    Returns:
        The :class:`DumpResult`; its ``verdict.status`` is INTACT only for a whole, verified
        recording.

    Raises:
        ValueError: an unknown direction.
        OSError: writing to ``out`` failed.
    """
    d = direction if isinstance(direction, Direction) else Direction.parse(direction)
    want = d.kind
    digest = hashlib.sha256()
    written = 0
    redactions: list[Any] = []

    def sink(kind: RecordKind, body: Any) -> None:
        nonlocal written
        if kind is want:
            out.write(body)
            digest.update(body)
            written += len(body)
        elif (kind is RecordKind.EVENT and body.get("kind") == REDACTION_EVENT
              and len(redactions) < MAX_LISTED_UNVERIFIED):
            redactions.append({k: v for k, v in body.items() if k != "kind"})

    verdict = scan(path, trusted=trusted, index_entry=index_entry, limits=limits, on_record=sink).verdict
    listed = list(verdict.header.get("redactions") or ()) if verdict.header is not None else []
    verified = verdict.verified
    verified_bytes = verified.bytes_to_gateway if want is RecordKind.TO_GATEWAY else verified.bytes_to_client
    return DumpResult(direction=d, bytes_written=written, sha256=digest.digest(),
                      verified_bytes=verified_bytes,
                      redactions=tuple(listed + redactions), verdict=verdict)
