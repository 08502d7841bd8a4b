"""The session recording format, version 1 (normative).

Theory of operation
-------------------
A recording is one file per session (``<session-id>.l4rec.zst``). The gateway appends to
it while the session runs, so the format is built for three things at once: byte-exact
content, tamper evidence that holds after every write, and a file that a crash at any
instant leaves readable up to its last signed point.

**Flush units.** A file is a sequence of independent zstd frames (RFC 8878), one per
flush; nothing else (no skippable frames, no dictionaries). Writers should set the
frame's content size and checksum (the checksum is not the integrity mechanism -- the
signed chain is -- but it tells corruption from a crash). Each frame decompresses to
whole, consecutive msgpack records: a record never spans two frames.

**Records.** A record is a msgpack array of four elements ``[kind, index, time, body]``:

* ``kind`` -- an integer, :class:`RecordKind`;
* ``index`` -- an integer. The *chained* records (HEADER, TO_GATEWAY, TO_CLIENT, EVENT)
  are numbered 0, 1, 2, ... strictly consecutively; the HEADER is record 0 and the first
  record of the file. A CHECKPOINT or TRAILER carries the number of chained records
  before it (the index the next chained record would take), which is ``upto + 1``;
* ``time`` -- a float64, Unix seconds (finite);
* ``body`` -- by kind:

  ============  ==========================================================================
  HEADER        map ``{format: 1, session_id: str, key_id: str, started_at: float,
                identity: {provider: str, subject: str, email: str|nil, groups: [str]},
                target: str, client_address: str, gateway_id: str, redactions: [...]}``
                (further keys may follow; they are covered by the chain like the rest)
  TO_GATEWAY    bin: bytes exactly as the client sent them, in order
  TO_CLIENT     bin: bytes exactly as the client received them, in order
  EVENT         map ``{"kind": str, ...}``: a decoded request, a decision, a NOTICE,
                ``redaction`` (a marker replaced something in the byte stream), ...
  CHECKPOINT    map, exactly ``{upto: int, head: bin 32, key_id: str, sig: bin 64}``
  TRAILER       map, exactly ``{ended_at: float, reason: str, records: int,
                bytes_to_gateway: int, bytes_to_client: int, sha256_to_gateway: bin 32,
                sha256_to_client: bin 32, upto: int, head: bin 32, key_id: str,
                sig: bin 64}``; its ``time`` equals ``ended_at``
  ============  ==========================================================================

**The hash chain** runs over the chained records only, using the exact bytes of each
record as they appear in the decompressed stream::

    head[-1] = SHA-256(b"l4rec/1\\x00" || utf8(session_id))
    head[i]  = SHA-256(head[i-1] || msgpack bytes of record i)

**Checkpoints.** Every flush unit that carries new records ends with a CHECKPOINT whose
``upto`` is the index of the last chained record so far and ``head`` is ``head[upto]``.
A CHECKPOINT (or TRAILER) is always the last record of its frame. Its ``sig`` is an
Ed25519 signature by the key whose id is ``key_id`` over::

    b"l4rec/1 checkpoint\\x00" || msgpack([session_id, upto, head, time])

where ``time`` is the CHECKPOINT record's own time.

**The trailer** is the final checkpoint plus totals, and the last record of the file:
nothing follows it.
``records`` is the number of chained records (``upto + 1``); the byte counts and SHA-256
digests are over the concatenated bodies of all TO_GATEWAY (resp. TO_CLIENT) records. Its
``sig`` is over::

    b"l4rec/1 trailer\\x00" || msgpack([session_id, upto, head, ended_at, reason, records,
        bytes_to_gateway, bytes_to_client, sha256_to_gateway, sha256_to_client])

``reason`` says how the session ended; ``"sealed_after_crash"`` is written by
:func:`replay.seal_after_crash` when the gateway restarts after dying mid-session (the
sealed file carries an EVENT ``recording_sealed`` saying what was discarded).

**Keys.** A key id is the SHA-256 hex digest of the raw 32-byte Ed25519 public key
(:func:`key_id`). Readers look key ids up in a keyring they trust; a key found in a file
is never trusted. The HEADER's ``key_id`` names the key the session started with; any
checkpoint may be signed by any trusted key (a session sealed after a key rotation).

**Sizes.** Msgpack encodings are the standard ones (``use_bin_type``; strings UTF-8, map
keys strings, no ext types). A writer keeps every record at most :data:`MAX_RECORD_SIZE`
bytes packed (byte records carry at most :data:`MAX_DATA_PER_RECORD` bytes; longer
writes are split) and every array or map at most :data:`MAX_CONTAINER_LEN` entries, so
readers can refuse anything larger without refusing a genuine recording.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "CHAIN_SEED_PREFIX",
    "CHECKPOINT_CONTEXT",
    "CHECKPOINT_KEYS",
    "FILE_SUFFIX",
    "FORMAT_VERSION",
    "HASH_SIZE",
    "MAX_CONTAINER_LEN",
    "MAX_DATA_PER_RECORD",
    "MAX_RECORD_SIZE",
    "REASON_SEALED_AFTER_CRASH",
    "REDACTION_EVENT",
    "SEALED_EVENT",
    "SIGNATURE_SIZE",
    "TRAILER_CONTEXT",
    "TRAILER_KEYS",
    "Direction",
    "RecordKind",
    "RecordingError",
    "Trailer",
    "chain_next",
    "chain_seed",
    "checkpoint_message",
    "key_id",
    "pack",
    "trailer_message",
    "unpack_options",
]

#: The only format version this code reads and writes (the HEADER's ``format``).
FORMAT_VERSION = 1
#: Recording file names end with this.
FILE_SUFFIX = ".l4rec.zst"

#: Domain separation for the chain seed, checkpoint and trailer signatures.
CHAIN_SEED_PREFIX = b"l4rec/1\x00"
CHECKPOINT_CONTEXT = b"l4rec/1 checkpoint\x00"
TRAILER_CONTEXT = b"l4rec/1 trailer\x00"

HASH_SIZE = 32
SIGNATURE_SIZE = 64

#: A byte record carries at most this many bytes; a writer splits longer writes.
MAX_DATA_PER_RECORD = 1 << 20
#: No record is larger than this packed (header and events included).
MAX_RECORD_SIZE = 4 << 20
#: No array or map in a record has more entries than this.
MAX_CONTAINER_LEN = 16384

#: The trailer ``reason`` written by :func:`replay.seal_after_crash`.
REASON_SEALED_AFTER_CRASH = "sealed_after_crash"
#: The EVENT kind a seal appends before its trailer.
SEALED_EVENT = "recording_sealed"
#: The EVENT kind saying recorded bytes differ from the wire (a marker replaced something);
#: ``replay dump`` lists these with the header's ``redactions``.
REDACTION_EVENT = "redaction"

CHECKPOINT_KEYS = frozenset({"upto", "head", "key_id", "sig"})
TRAILER_KEYS = frozenset({"ended_at", "reason", "records", "bytes_to_gateway", "bytes_to_client",
                          "sha256_to_gateway", "sha256_to_client", "upto", "head", "key_id", "sig"})


class RecordKind(enum.IntEnum):
    """The first element of every record."""

    HEADER = 1
    TO_GATEWAY = 2  # bytes the client sent
    TO_CLIENT = 3  # bytes the client received
    EVENT = 4
    CHECKPOINT = 5
    TRAILER = 6

    @property
    def chained(self) -> bool:
        """Whether records of this kind are in the hash chain (and numbered)."""
        return self not in (RecordKind.CHECKPOINT, RecordKind.TRAILER)


class Direction(enum.StrEnum):
    """A byte direction, as ``replay dump --direction`` names it."""

    TO_GATEWAY = "to-gateway"
    TO_CLIENT = "to-client"

    @classmethod
    def parse(cls, text: str) -> Direction:
        """``to-gateway``/``sent`` or ``to-client``/``received``.

        Raises:
            ValueError: anything else.
        """
        aliases = {"to-gateway": cls.TO_GATEWAY, "sent": cls.TO_GATEWAY,
                   "to-client": cls.TO_CLIENT, "received": cls.TO_CLIENT}
        try:
            return aliases[text]
        except KeyError:
            raise ValueError(f"unknown direction {text!r} (to-gateway, to-client, sent, received)") from None

    @property
    def kind(self) -> RecordKind:
        return RecordKind.TO_GATEWAY if self is Direction.TO_GATEWAY else RecordKind.TO_CLIENT


class RecordingError(Exception):
    """Base class of every error ``replay`` raises about recordings, keys and indexes."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A recording key's id: SHA-256 hex of the raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()


def pack(obj: Any) -> bytes:
    """The one msgpack encoding of the format (bin type for bytes, float64 floats)."""
    data: bytes = msgpack.packb(obj, use_bin_type=True, use_single_float=False, strict_types=False)
    return data


def unpack_options(*, max_record_size: int = MAX_RECORD_SIZE,
                   max_container_len: int = MAX_CONTAINER_LEN) -> dict[str, Any]:
    """Keyword arguments for ``msgpack.Unpacker``/``unpackb`` that refuse anything a writer
    never produces: strings and bins over ``max_record_size``, arrays and maps over
    ``max_container_len``, non-string map keys, and every ext type."""
    return {
        "raw": False,
        "strict_map_key": True,
        "use_list": True,
        "max_bin_len": max_record_size,
        "max_str_len": max_record_size,
        "max_array_len": max_container_len,
        "max_map_len": max_container_len,
        "max_ext_len": 0,
        "ext_hook": _refuse_ext,
    }


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed in a recording")


def chain_seed(session_id: str) -> bytes:
    """``head[-1]``: where a session's chain starts."""
    return hashlib.sha256(CHAIN_SEED_PREFIX + session_id.encode("utf-8")).digest()


def chain_next(head: bytes, record: bytes) -> bytes:
    """``head[i]`` from ``head[i-1]`` and the exact packed bytes of record ``i``."""
    h = hashlib.sha256(head)
    h.update(record)
    return h.digest()


def checkpoint_message(session_id: str, upto: int, head: bytes, time: float) -> bytes:
    """The bytes a CHECKPOINT's signature covers."""
    return CHECKPOINT_CONTEXT + pack([session_id, upto, head, time])


@dataclass(frozen=True, slots=True, kw_only=True)
class Trailer:
    """A recording's TRAILER: the final checkpoint plus totals.

    ``head`` and ``sig`` are what the gateway also writes to the session index and the
    audit log, so a recording truncated after close is detectable.
    """

    ended_at: float
    reason: str
    records: int
    bytes_to_gateway: int
    bytes_to_client: int
    sha256_to_gateway: bytes
    sha256_to_client: bytes
    upto: int
    head: bytes
    key_id: str
    sig: bytes

    def message(self, session_id: str) -> bytes:
        """The bytes :attr:`sig` covers."""
        return trailer_message(session_id, self)

    def to_body(self) -> dict[str, Any]:
        """The TRAILER record's body."""
        return {"ended_at": self.ended_at, "reason": self.reason, "records": self.records,
                "bytes_to_gateway": self.bytes_to_gateway, "bytes_to_client": self.bytes_to_client,
                "sha256_to_gateway": self.sha256_to_gateway, "sha256_to_client": self.sha256_to_client,
                "upto": self.upto, "head": self.head, "key_id": self.key_id, "sig": self.sig}

    @classmethod
    def from_body(cls, body: object) -> Trailer:
        """Parse a TRAILER body.

        Raises:
            ValueError: the body is not exactly a trailer map of the right types.
        """
        if not isinstance(body, dict) or set(body) != TRAILER_KEYS:
            raise ValueError("the trailer is not a map with exactly the trailer's fields")
        for name in ("records", "bytes_to_gateway", "bytes_to_client", "upto"):
            if not _is_int(body[name]) or body[name] < (-1 if name == "upto" else 0):
                raise ValueError(f"the trailer's {name} is not a count")
        for name, size in (("sha256_to_gateway", HASH_SIZE), ("sha256_to_client", HASH_SIZE),
                           ("head", HASH_SIZE), ("sig", SIGNATURE_SIZE)):
            if not isinstance(body[name], bytes) or len(body[name]) != size:
                raise ValueError(f"the trailer's {name} is not {size} bytes")
        if not isinstance(body["reason"], str) or not isinstance(body["key_id"], str):
            raise ValueError("the trailer's reason and key_id must be strings")
        if not is_time(body["ended_at"]):
            raise ValueError("the trailer's ended_at is not a time")
        return cls(**body)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form (digests, head and signature in hex)."""
        return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in self.to_body().items()}


def trailer_message(session_id: str, t: Trailer) -> bytes:
    """The bytes a TRAILER's signature covers."""
    return TRAILER_CONTEXT + pack([session_id, t.upto, t.head, t.ended_at, t.reason, t.records,
                                   t.bytes_to_gateway, t.bytes_to_client, t.sha256_to_gateway,
                                   t.sha256_to_client])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_time(value: object) -> bool:
    """A record time: a finite float."""
    return isinstance(value, float) and math.isfinite(value)


def check_header(body: object) -> str | None:
    """Why a HEADER body is not one this version understands, or None.

    The format version is checked first so the caller can say "unsupported version".
    """
    if not isinstance(body, dict):
        return "the header is not a map"
    fmt = body.get("format")
    if fmt != FORMAT_VERSION or not _is_int(fmt):
        return f"unsupported format version {fmt!r}" if _is_int(fmt) else "the header has no format version"
    sid = body.get("session_id")
    if not isinstance(sid, str) or not sid or len(sid) > 256:
        return "the header has no valid session_id"
    if not isinstance(body.get("key_id"), str):
        return "the header has no key_id"
    if not (is_time(body.get("started_at"))):
        return "the header has no valid started_at"
    for name in ("target", "client_address", "gateway_id"):
        if not isinstance(body.get(name), str):
            return f"the header's {name} is not a string"
    identity = body.get("identity")
    if not isinstance(identity, dict):
        return "the header's identity is not a map"
    if not isinstance(identity.get("provider"), str) or not isinstance(identity.get("subject"), str):
        return "the header's identity has no provider or subject"
    if not (identity.get("email") is None or isinstance(identity.get("email"), str)):
        return "the header's identity email is not a string"
    groups = identity.get("groups")
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        return "the header's identity groups are not a list of strings"
    if not isinstance(body.get("redactions"), list):
        return "the header's redactions are not a list"
    return None


def check_checkpoint(body: object) -> str | None:
    """Why a CHECKPOINT body is malformed, or None."""
    if not isinstance(body, dict) or set(body) != CHECKPOINT_KEYS:
        return "the checkpoint is not a map with exactly upto, head, key_id, sig"
    if not _is_int(body["upto"]) or body["upto"] < 0:
        return "the checkpoint's upto is not an index"
    if not isinstance(body["head"], bytes) or len(body["head"]) != HASH_SIZE:
        return "the checkpoint's head is not 32 bytes"
    if not isinstance(body["sig"], bytes) or len(body["sig"]) != SIGNATURE_SIZE:
        return "the checkpoint's signature is not 64 bytes"
    if not isinstance(body["key_id"], str):
        return "the checkpoint's key_id is not a string"
    return None


def parse_record(obj: object) -> tuple[RecordKind, int, float, Any]:
    """``(kind, index, time, body)`` from one decoded msgpack object.

    Checks the shape and the body's type for the kind (a bin for byte records, a map with a
    string ``kind`` for events); header, checkpoint and trailer bodies are checked by their
    own functions.

    Raises:
        ValueError: the object is not a record.
    """
    if not isinstance(obj, list) or len(obj) != 4:
        raise ValueError("not a record (a 4-element array)")
    kind, index, time, body = obj
    if not _is_int(kind) or kind not in RecordKind._value2member_map_:
        raise ValueError(f"unknown record kind {kind!r}" if _is_int(kind)
                         else "the record kind is not an int")
    k = RecordKind(kind)
    if not _is_int(index) or index < 0:
        raise ValueError("the record index is not a non-negative int")
    if not is_time(time):
        raise ValueError("the record time is not a finite float")
    if k in (RecordKind.TO_GATEWAY, RecordKind.TO_CLIENT) and not isinstance(body, bytes):
        raise ValueError("a byte record's body is not bin")
    if k is RecordKind.EVENT and not (isinstance(body, dict) and isinstance(body.get("kind"), str)):
        raise ValueError("an event's body is not a map with a string kind")
    return k, index, time, body


def as_mapping(value: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict copy of a caller-supplied mapping.

    Raises:
        ValueError: a key is not a string.
    """
    out: dict[str, Any] = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise ValueError(f"map keys must be strings, not {type(k).__name__}")
        out[k] = v
    return out
