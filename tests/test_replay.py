"""Session recordings: the format, the writer, verification, dumps, the crash seal, the CLI.

Everything uses real Ed25519 keys and real zstd frames in tmp_path. Tampered files are
built by decoding flush units into their exact records and re-encoding them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import replay
from replay import (
    Direction,
    IndexEntry,
    ReaderLimits,
    RecordingWriter,
    RecordKind,
    SealError,
    Trailer,
    VerifyStatus,
    WriterClosed,
    dump,
    iter_records,
    key_id,
    new_compressor,
    read_header,
    seal_after_crash,
    verify,
)
from replay.cli import main

T0 = 1_700_000_000.0
SESSION = "3f2a9c1e-session"
HEADER: dict[str, Any] = {
    "identity": {"provider": "https://idp.example", "subject": "alice", "email": "alice@example.com",
                 "groups": ["eng", "oncall"]},
    "target": "chunkd", "client_address": "127.0.0.1:50123", "gateway_id": "gw-1",
    "redactions": [{"what": "client_credential", "direction": "to-gateway", "offset": 12, "length": 35}],
}


class Clock:
    """Deterministic Unix time: every read advances one millisecond."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


@dataclass
class Keys:
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    other: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def trusted(self) -> dict[str, Ed25519PublicKey]:
        return {key_id(self.key.public_key()): self.key.public_key()}


@pytest.fixture
def keys() -> Keys:
    return Keys()


@dataclass
class Made:
    path: Path
    frames: list[bytes]
    sent: bytes
    received: bytes
    writer: RecordingWriter


def make_recording(path: Path, key: Ed25519PrivateKey, *, flushes: int = 5, close: bool = True,
                   session_id: str = SESSION, seed: int = 1, reason: str = "client_closed") -> Made:
    """A recording of ``flushes`` flush units (each with bytes both ways and an event), then
    the trailer unit if ``close``. The frames are kept so tests can take them apart."""
    rng = random.Random(seed)
    writer = RecordingWriter(session_id=session_id, header=HEADER, signing_key=key, clock=Clock())
    cctx = new_compressor()
    frames: list[bytes] = []
    sent = bytearray()
    received = bytearray()
    for i in range(flushes):
        up = rng.randbytes(rng.randrange(1, 3000))
        down = rng.randbytes(rng.randrange(1, 3000))
        writer.add_to_gateway(up)
        writer.add_event("request", {"op": "PUT", "bucket": "b", "n": i})
        writer.add_to_client(down)
        writer.add_to_gateway(b"more" * (i + 1))
        sent += up + b"more" * (i + 1)
        received += down
        frames.append(writer.flush(cctx))
    if close:
        frames.append(writer.close(reason, cctx))
    path.write_bytes(b"".join(frames))
    return Made(path, frames, bytes(sent), bytes(received), writer)


def records_of(frame: bytes) -> list[bytes]:
    """The exact packed records inside one flush unit (test-made frames only)."""
    data = zstandard.ZstdDecompressor().decompress(frame)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    out, pos = [], 0
    for _ in unpacker:
        out.append(data[pos:unpacker.tell()])
        pos = unpacker.tell()
    assert pos == len(data)
    return out


def frame_of(records: list[bytes]) -> bytes:
    return new_compressor().compress(b"".join(records))


def decode(record: bytes) -> list[Any]:
    obj: list[Any] = msgpack.unpackb(record, raw=False)
    return obj


def encode(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def rewrite(made: Made, path: Path, frame_index: int, edit: Callable[[list[bytes]], list[bytes]]) -> Path:
    frames = list(made.frames)
    frames[frame_index] = frame_of(edit(records_of(frames[frame_index])))
    path.write_bytes(b"".join(frames))
    return path


def pem(public: Ed25519PublicKey, path: Path) -> Path:
    path.write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


# --- the format, independently of the reader ---------------------------------------------------


def test_file_follows_the_normative_format(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r.l4rec.zst", keys.key, flushes=3)
    public = keys.key.public_key()
    head = hashlib.sha256(b"l4rec/1\x00" + SESSION.encode()).digest()
    expected_index = 0
    sent = hashlib.sha256()
    for n, frame in enumerate(made.frames):
        params = zstandard.get_frame_parameters(frame)
        assert params.has_checksum and params.content_size > 0
        records = records_of(frame)
        for raw in records[:-1]:
            kind, index, t, body = decode(raw)
            assert kind in (1, 2, 3, 4) and index == expected_index and isinstance(t, float)
            if n == 0 and index == 0:
                assert kind == RecordKind.HEADER
                assert body["format"] == 1 and body["session_id"] == SESSION
                assert body["key_id"] == hashlib.sha256(public.public_bytes_raw()).hexdigest()
                assert body["identity"] == HEADER["identity"] and body["redactions"] == HEADER["redactions"]
            if kind == RecordKind.TO_GATEWAY:
                sent.update(body)
            head = hashlib.sha256(head + raw).digest()
            expected_index += 1
        kind, index, t, body = decode(records[-1])  # every unit ends signed
        assert index == expected_index and body["upto"] == expected_index - 1 and body["head"] == head
        if kind == RecordKind.CHECKPOINT:
            assert set(body) == {"upto", "head", "key_id", "sig"}
            public.verify(body["sig"], b"l4rec/1 checkpoint\x00" + encode([SESSION, body["upto"], head, t]))
        else:
            assert kind == RecordKind.TRAILER and n == len(made.frames) - 1 and t == body["ended_at"]
            assert body["records"] == expected_index and body["reason"] == "client_closed"
            assert body["sha256_to_gateway"] == sent.digest() == hashlib.sha256(made.sent).digest()
            assert body["bytes_to_client"] == len(made.received)
            public.verify(body["sig"], b"l4rec/1 trailer\x00" + encode(
                [SESSION, body["upto"], head, body["ended_at"], body["reason"], body["records"],
                 body["bytes_to_gateway"], body["bytes_to_client"], body["sha256_to_gateway"],
                 body["sha256_to_client"]]))


def test_writer_is_deterministic_for_a_key_and_clock(tmp_path: Path, keys: Keys) -> None:
    a = make_recording(tmp_path / "a", keys.key)
    b = make_recording(tmp_path / "b", keys.key)
    assert a.path.read_bytes() == b.path.read_bytes()


def test_public_surface_is_explicit() -> None:
    names = replay.__all__
    assert len(names) == len(set(names))
    public = {n for n, v in vars(replay).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public == set(names)
    assert [k.value for k in RecordKind] == [1, 2, 3, 4, 5, 6]
    assert {s.name: s.value for s in VerifyStatus} == {"INTACT": 0, "TAMPERED": 2, "INCOMPLETE": 3,
                                                       "UNREADABLE": 4}


@pytest.mark.parametrize("module", ["replay", "replay.cli"])
def test_replay_never_imports_trio(module: str) -> None:
    code = f"import sys, {module}; assert 'trio' not in sys.modules, [m for m in sys.modules if 'trio' in m]"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr


# --- the writer ------------------------------------------------------------------------------


def test_round_trip_intact_and_dump_is_byte_exact(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r.l4rec.zst", keys.key, flushes=8)
    verdict = verify(made.path, trusted=keys.trusted)
    assert verdict.status is VerifyStatus.INTACT, verdict.reasons
    trailer = made.writer.trailer
    assert trailer is not None and verdict.trailer == trailer
    assert verdict.session_id == SESSION and verdict.header is not None
    assert verdict.header["target"] == "chunkd"
    assert verdict.unverified_bytes == 0 and verdict.unverified_records == 0
    assert verdict.verified_offset == verdict.file_size == made.path.stat().st_size
    assert verdict.key_ids == (key_id(keys.key.public_key()),)
    for direction, expected in ((Direction.TO_GATEWAY, made.sent), (Direction.TO_CLIENT, made.received)):
        out = io.BytesIO()
        result = dump(made.path, direction, out, trusted=keys.trusted)
        assert out.getvalue() == expected
        assert result.sha256 == hashlib.sha256(expected).digest()
        assert result.bytes_written == result.verified_bytes == len(expected)
        assert result.verdict.status is VerifyStatus.INTACT
        assert result.redactions == tuple(HEADER["redactions"])
    assert trailer.sha256_to_gateway == hashlib.sha256(made.sent).digest()
    assert trailer.sha256_to_client == hashlib.sha256(made.received).digest()
    assert trailer.bytes_to_gateway == len(made.sent) and trailer.records == made.writer.records


def test_writer_splits_large_writes_and_flushes_nothing_when_idle(tmp_path: Path, keys: Keys) -> None:
    writer = RecordingWriter(session_id=SESSION, header=HEADER, signing_key=keys.key, clock=Clock())
    cctx = new_compressor()
    big = random.Random(2).randbytes(replay.MAX_DATA_PER_RECORD * 2 + 5)
    writer.add_to_gateway(big)
    writer.add_to_client(b"")  # records nothing
    assert writer.pending_records == 4 and writer.pending_bytes > len(big)
    frames = [writer.flush(cctx)]
    assert writer.pending_bytes == 0 and writer.flush(cctx) == b""
    assert writer.bytes_to_gateway == len(big) and writer.last_checkpoint is not None
    assert writer.last_checkpoint[0] == 3
    frames.append(writer.close("done", cctx))
    path = tmp_path / "r"
    path.write_bytes(b"".join(frames))
    sizes = [len(r.body) for r in iter_records(path) if r.kind is RecordKind.TO_GATEWAY]
    assert sizes == [replay.MAX_DATA_PER_RECORD, replay.MAX_DATA_PER_RECORD, 5]
    assert verify(path, trusted=keys.trusted).status is VerifyStatus.INTACT
    with pytest.raises(WriterClosed):
        writer.add_to_gateway(b"x")
    with pytest.raises(WriterClosed):
        writer.close("again", cctx)


# msgpack switches encodings at these lengths (bin8/16/32) and integers (fixint, uint8/16/32/64)
_BIN_LENGTHS = [0, 1, 255, 256, 65535, 65536, 1 << 20]
_INDEXES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32]


@pytest.mark.parametrize("size", _BIN_LENGTHS)
def test_byte_record_prefix_is_what_msgpack_puts_before_the_body(size: int) -> None:
    """The writer hashes and compresses ``prefix`` then ``body`` instead of packing the record
    (which would copy the body): the two must be exactly the standard packed record."""
    body = random.Random(size).randbytes(size)
    times = [T0 + 0.001, 0.0, -0.0, 1.5, 5e-324, 1.7976931348623157e308, float(2**53 + 1)]
    for kind in (RecordKind.TO_GATEWAY, RecordKind.TO_CLIENT):
        for index in _INDEXES:
            for t in times:
                prefix = replay._writer._byte_record_prefix(kind, index, t, len(body))
                assert prefix + body == encode([int(kind), index, t, body]), (kind, index, t)


@pytest.mark.parametrize("first", [126, 254, 65534, 2**32 - 2])
def test_flushed_byte_records_are_the_standard_encoding_and_chain(first: int, keys: Keys) -> None:
    """Byte records of every bin size, at indexes crossing msgpack's integer sizes, through
    the writer's real flush: each record is the standard encoding of what it decodes to, and
    the chain and the checkpoint are over exactly those bytes."""
    seed = hashlib.sha256(b"resumed head").digest()
    state = replay._writer._ChainState(records=first, head=seed, bytes_to_gateway=0, bytes_to_client=0,
                                       sha_to_gateway=hashlib.sha256(), sha_to_client=hashlib.sha256())
    writer = RecordingWriter._resume(session_id=SESSION, signing_key=keys.key, clock=Clock(), state=state)
    rng = random.Random(first)
    sent, received = bytearray(), bytearray()
    for n, size in enumerate([*_BIN_LENGTHS, (1 << 20) + 1]):  # the last one is split in two
        data = rng.randbytes(size)
        if n % 2:
            writer.add_to_client(data)
            received += data
        else:
            writer.add_to_gateway(bytearray(data))  # not bytes: copied when added
            sent += data
    assert writer.pending_records == len(_BIN_LENGTHS) + 1  # the empty write records nothing
    records = records_of(writer.flush(new_compressor()))
    head, index, got_sent, got_received = seed, first, bytearray(), bytearray()
    for raw in records[:-1]:
        kind, i, t, body = decode(raw)
        assert i == index and isinstance(t, float) and raw == encode([kind, i, t, body])
        (got_sent if kind == RecordKind.TO_GATEWAY else got_received).extend(body)
        head = hashlib.sha256(head + raw).digest()
        index += 1
    assert index == first + len(_BIN_LENGTHS) + 1
    assert (got_sent, got_received) == (sent, received)
    kind, i, t, body = decode(records[-1])
    assert kind == RecordKind.CHECKPOINT and i == index and body["upto"] == index - 1
    assert body["head"] == head == writer.head
    message = b"l4rec/1 checkpoint\x00" + encode([SESSION, index - 1, head, t])
    keys.key.public_key().verify(body["sig"], message)
    assert writer.bytes_to_gateway == len(sent) and writer.bytes_to_client == len(received)


def test_views_of_bytes_are_kept_and_mutable_buffers_copied(tmp_path: Path, keys: Keys) -> None:
    """A read-only view of bytes (what the gateway's codec hands out) is immutable and kept
    as it is; a view of a bytearray is copied when added: changing the buffer afterwards
    does not change what was recorded."""
    writer = RecordingWriter(session_id=SESSION, header=HEADER, signing_key=keys.key, clock=Clock())
    cctx = new_compressor()
    read = b"0123456789"
    buffer = bytearray(b"abc")
    writer.add_to_client(memoryview(read)[2:6])
    writer.add_to_client(memoryview(buffer))
    writer.add_to_gateway(buffer)
    buffer[:] = b"xyz"
    frames = [writer.flush(cctx), writer.close("client_closed", cctx)]
    path = tmp_path / "v.l4rec.zst"
    path.write_bytes(b"".join(frames))
    for direction, expected in ((Direction.TO_CLIENT, b"2345abc"), (Direction.TO_GATEWAY, b"abc")):
        out = io.BytesIO()
        assert dump(path, direction, out, trusted=keys.trusted).verdict.status is VerifyStatus.INTACT
        assert out.getvalue() == expected


def test_byte_records_of_every_size_round_trip(tmp_path: Path, keys: Keys) -> None:
    """Empty, tiny and maximal writes both ways, over several flushes: the recording verifies
    and dumps byte-exact, and the trailer's digests match."""
    writer = RecordingWriter(session_id=SESSION, header=HEADER, signing_key=keys.key, clock=Clock())
    cctx = new_compressor()
    rng = random.Random(7)
    sent, received, frames = bytearray(), bytearray(), []
    for size in [*_BIN_LENGTHS, (1 << 20) + 1, 3 << 20]:
        up, down = rng.randbytes(size), rng.randbytes(size // 3)
        writer.add_to_gateway(up)
        writer.add_event("request", {"size": size})
        writer.add_to_client(memoryview(down))
        writer.add_to_client(b"")
        sent += up
        received += down
        frames.append(writer.flush(cctx))
    frames.append(writer.close("client_closed", cctx))
    path = tmp_path / "r.l4rec.zst"
    path.write_bytes(b"".join(frames))
    assert verify(path, trusted=keys.trusted).status is VerifyStatus.INTACT
    for direction, expected in ((Direction.TO_GATEWAY, sent), (Direction.TO_CLIENT, received)):
        out = io.BytesIO()
        result = dump(path, direction, out, trusted=keys.trusted)
        assert result.verdict.status is VerifyStatus.INTACT and out.getvalue() == expected
    trailer = writer.trailer
    assert trailer is not None
    assert trailer.sha256_to_gateway == hashlib.sha256(sent).digest()
    assert trailer.sha256_to_client == hashlib.sha256(received).digest()
    assert (trailer.bytes_to_gateway, trailer.bytes_to_client) == (len(sent), len(received))


def test_writer_refuses_bad_events_and_headers(keys: Keys) -> None:
    writer = RecordingWriter(session_id=SESSION, header=HEADER, signing_key=keys.key, clock=Clock())
    with pytest.raises(ValueError, match="kind"):
        writer.add_event("decision", {"kind": "x"})
    with pytest.raises(ValueError, match="encode"):
        writer.add_event("decision", {"obj": object()})
    with pytest.raises(ValueError, match="limit"):
        writer.add_event("decision", {"blob": b"x" * (replay.MAX_RECORD_SIZE + 1)})
    with pytest.raises(ValueError):
        writer.add_event("decision", {"many": list(range(20000))})
    with pytest.raises(ValueError):
        writer.add_event("decision", {1: "non-string key"})  # type: ignore[dict-item]
    assert writer.records == 1  # nothing was added
    for header, match in (({**HEADER, "target": 5}, "target"), ({**HEADER, "format": 2}, "itself"),
                          ({k: v for k, v in HEADER.items() if k != "identity"}, "identity")):
        with pytest.raises(ValueError, match=match):
            RecordingWriter(session_id=SESSION, header=header, signing_key=keys.key, clock=Clock())
    with pytest.raises(ValueError):
        RecordingWriter(session_id="", header=HEADER, signing_key=keys.key, clock=Clock())


def test_adds_from_another_thread_during_flushes(tmp_path: Path, keys: Keys) -> None:
    writer = RecordingWriter(session_id=SESSION, header=HEADER, signing_key=keys.key, clock=Clock())
    cctx = new_compressor()
    pieces = [os.urandom(100 + i) for i in range(3000)]
    done = threading.Event()

    def feed() -> None:
        for p in pieces:
            writer.add_to_gateway(p)
        done.set()

    thread = threading.Thread(target=feed)
    path = tmp_path / "r"
    with open(path, "wb") as f:
        thread.start()
        while not done.is_set():
            f.write(writer.flush(cctx))
        thread.join(timeout=30)
        f.write(writer.close("done", cctx))
    out = io.BytesIO()
    result = dump(path, "sent", out, trusted=keys.trusted)
    assert result.verdict.status is VerifyStatus.INTACT
    assert out.getvalue() == b"".join(pieces)


def test_a_large_session_verifies_and_dumps_in_bounded_memory(tmp_path: Path, keys: Keys) -> None:
    """64 MiB each way... well, 64 MiB sent and 8 MiB received, in 256 KiB writes and 1 MiB
    flushes; verify and dump keep well under the size of the session."""
    path = tmp_path / "big.l4rec.zst"
    writer = RecordingWriter(session_id=SESSION, header=HEADER, signing_key=keys.key, clock=Clock())
    cctx = new_compressor()
    block = random.Random(3).randbytes(256 << 10)
    sent, received = hashlib.sha256(), hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(256):
            up = block[i:] + block[:i]  # all different, mostly incompressible
            writer.add_to_gateway(up)
            sent.update(up)
            if i % 8 == 0:
                down = block[: 256 << 10] [::-1]
                writer.add_to_client(down)
                received.update(down)
            if i % 4 == 3:
                f.write(writer.flush(cctx))
        f.write(writer.close("done", cctx))

    class Sink(io.RawIOBase):
        def __init__(self) -> None:
            self.h = hashlib.sha256()
            self.n = 0

        def write(self, b: Any) -> int:
            self.h.update(b)
            self.n += len(b)
            return len(b)

    tracemalloc.start()
    try:
        verdict = verify(path, trusted=keys.trusted)
        _, peak_verify = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sink = Sink()
        result = dump(path, Direction.TO_GATEWAY, sink, trusted=keys.trusted)  # type: ignore[arg-type]
        _, peak_dump = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert verdict.status is VerifyStatus.INTACT, verdict.reasons
    assert verdict.trailer is not None and verdict.trailer.bytes_to_gateway == 64 << 20
    assert verdict.trailer.sha256_to_gateway == sent.digest()
    assert verdict.trailer.sha256_to_client == received.digest()
    assert sink.n == 64 << 20 and sink.h.digest() == sent.digest() == result.sha256
    assert peak_verify < 12 << 20, peak_verify
    assert peak_dump < 12 << 20, peak_dump


def test_a_genuine_recording_may_compress_beyond_the_ratio_cap(tmp_path: Path, keys: Keys) -> None:
    """Verified checkpoints reset the output cap; without signatures nothing does."""
    path = tmp_path / "x.l4rec.zst"
    writer = RecordingWriter(session_id=SESSION, header=HEADER, signing_key=keys.key, clock=Clock())
    cctx = new_compressor()
    with open(path, "wb") as f:
        for i in range(96):
            writer.add_to_gateway(b"x" * (1 << 20))
            if i % 4 == 3:
                f.write(writer.flush(cctx))
        f.write(writer.close("done", cctx))
    limits = ReaderLimits(max_ratio=100, output_slack=8 << 20)
    assert path.stat().st_size * 100 + (8 << 20) < 96 << 20
    assert verify(path, trusted=keys.trusted, limits=limits).status is VerifyStatus.INTACT
    unsigned = dump(path, "sent", io.BytesIO(), limits=limits)
    assert unsigned.verdict.status is VerifyStatus.UNREADABLE
    assert "output cap" in unsigned.verdict.reasons[0]
    # the CLI: without keys the default cap refuses it, --max-ratio lets the auditor through
    out = tmp_path / "sent.bin"
    assert path.stat().st_size * 1000 + (64 << 20) < 96 << 20
    assert main(["dump", str(path), "--direction", "sent", "-o", str(out)]) == 4
    assert main(["dump", str(path), "--direction", "sent", "-o", str(out), "--max-ratio", "100000"]) == 0
    assert out.stat().st_size == 96 << 20
    assert main(["verify", "--pubkey", str(pem(keys.key.public_key(), tmp_path / "k.pub")), str(path)]) == 0
    assert main(["dump", str(path), "--direction", "sent", "--max-ratio", "0"]) == 64


# --- tampering ----------------------------------------------------------------------------------


def test_flipped_bit_in_a_flush_unit_is_tampered(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r", keys.key, flushes=6)
    data = bytearray(made.path.read_bytes())
    start = sum(len(f) for f in made.frames[:2])
    data[start + len(made.frames[2]) // 2] ^= 0x10
    path = tmp_path / "flipped"
    path.write_bytes(bytes(data))
    verdict = verify(path, trusted=keys.trusted)
    assert verdict.status is VerifyStatus.TAMPERED, verdict.reasons
    assert verdict.verified_offset == start  # the first two units still verify
    assert verdict.last_checkpoint is not None


def test_flipped_bit_without_zstd_checksums_is_caught_by_the_chain(tmp_path: Path, keys: Keys) -> None:
    writer = RecordingWriter(session_id=SESSION, header=HEADER, signing_key=keys.key, clock=Clock())
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=False)
    writer.add_to_gateway(random.Random(4).randbytes(5000))  # incompressible: stored as a raw block
    frames = [writer.flush(cctx)]
    writer.add_to_gateway(b"second")
    frames.append(writer.close("done", cctx))
    data = bytearray(b"".join(frames))
    data[len(frames[0]) // 2] ^= 1
    path = tmp_path / "r"
    path.write_bytes(bytes(data))
    verdict = verify(path, trusted=keys.trusted)
    assert verdict.status is VerifyStatus.TAMPERED
    assert "chain does not match" in verdict.reasons[0]


@pytest.mark.parametrize("renumber", [False, True])
def test_deleted_record_is_tampered(tmp_path: Path, keys: Keys, renumber: bool) -> None:
    made = make_recording(tmp_path / "r", keys.key)

    def delete(records: list[bytes]) -> list[bytes]:
        kept = records[:1] + records[2:]  # drop the unit's first byte record
        if renumber:
            kept = [encode([k, i - 1 if n >= 1 and k != 5 else i, t, b])
                    for n, (k, i, t, b) in enumerate(decode(r) for r in kept)]
        return kept

    verdict = verify(rewrite(made, tmp_path / "deleted", 2, delete), trusted=keys.trusted)
    assert verdict.status is VerifyStatus.TAMPERED, verdict.reasons
    assert verdict.last_checkpoint is not None and verdict.last_checkpoint.upto == 8


def test_swapped_records_are_tampered(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r", keys.key)
    verdict = verify(rewrite(made, tmp_path / "swapped", 1, lambda r: [r[1], r[0], *r[2:]]),
                     trusted=keys.trusted)
    assert verdict.status is VerifyStatus.TAMPERED
    assert "reordered" in verdict.reasons[0]

    def swap_keep_numbers(records: list[bytes]) -> list[bytes]:
        a, b = decode(records[0]), decode(records[2])
        return [encode([b[0], a[1], a[2], b[3]]), records[1], encode([a[0], b[1], b[2], a[3]]), *records[3:]]

    verdict = verify(rewrite(made, tmp_path / "swapped2", 1, swap_keep_numbers), trusted=keys.trusted)
    assert verdict.status is VerifyStatus.TAMPERED
    assert "chain does not match" in verdict.reasons[0]


def _resign_trailer(made: Made, path: Path, signer: Ed25519PrivateKey, claimed: Ed25519PrivateKey,
                    change: Callable[[dict[str, Any]], None]) -> Path:
    def edit(records: list[bytes]) -> list[bytes]:
        kind, index, _, body = decode(records[-1])
        assert kind == RecordKind.TRAILER
        change(body)
        body["key_id"] = key_id(claimed.public_key())
        body["sig"] = signer.sign(Trailer(**body).message(SESSION))
        return [*records[:-1], encode([kind, index, body["ended_at"], body])]

    return rewrite(made, path, len(made.frames) - 1, edit)


def test_replaced_trailer_is_tampered(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r", keys.key)

    def new_reason(body: dict[str, Any]) -> None:
        body["reason"] = "policy_denied"

    def resigned(name: str, signer: Ed25519PrivateKey, claimed: Ed25519PrivateKey,
                 change: Callable[[dict[str, Any]], None] = new_reason) -> replay.Verdict:
        return verify(_resign_trailer(made, tmp_path / name, signer, claimed, change), trusted=keys.trusted)

    # signed by another key, named as such: that key is not trusted
    other = resigned("a", keys.other, keys.other)
    assert other.status is VerifyStatus.TAMPERED and "not a trusted recording key" in other.reasons[0]
    # signed by another key, claiming to be the trusted one
    forged = resigned("b", keys.other, keys.key)
    assert forged.status is VerifyStatus.TAMPERED and "bad signature" in forged.reasons[0]
    # the same trailer re-signed by the right key verifies (the helper itself is sound)
    ok = resigned("c", keys.key, keys.key)
    assert ok.status is VerifyStatus.INTACT and ok.trailer is not None
    assert ok.trailer.reason == "policy_denied"

    def fewer_bytes(body: dict[str, Any]) -> None:
        body["bytes_to_client"] -= 1

    totals = resigned("d", keys.key, keys.key, fewer_bytes)
    assert totals.status is VerifyStatus.TAMPERED and "bytes_to_client" in totals.reasons[0]


def test_a_file_signed_by_another_key_is_tampered(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r", keys.other)
    verdict = verify(made.path, trusted=keys.trusted)
    assert verdict.status is VerifyStatus.TAMPERED
    assert key_id(keys.other.public_key()) in verdict.reasons[0] and "not a trusted" in verdict.reasons[0]
    assert verify(made.path, trusted={}).status is VerifyStatus.TAMPERED
    # the key id in the file is never believed: a forged header key id changes nothing
    assert verify(made.path, trusted={key_id(keys.other.public_key()): keys.key.public_key()}).status \
        is VerifyStatus.TAMPERED


def test_data_after_the_trailer_is_tampered(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r", keys.key)
    path = tmp_path / "extra"
    path.write_bytes(made.path.read_bytes() + made.frames[1])
    verdict = verify(path, trusted=keys.trusted)
    assert verdict.status is VerifyStatus.TAMPERED and "follow the trailer" in verdict.reasons[0]


def test_a_checkpoint_after_garbage_is_tampered(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r", keys.key)
    frames = list(made.frames)
    frames[2] = b"\x00" * 40  # not a frame: the reader resynchronises on the next one
    path = tmp_path / "g"
    path.write_bytes(b"".join(frames))
    verdict = verify(path, trusted=keys.trusted)
    assert verdict.status is VerifyStatus.TAMPERED and "follows" in verdict.reasons[0]


# --- incomplete ----------------------------------------------------------------------------------


def test_crash_truncation_is_incomplete_with_the_prefix_reported(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r", keys.key, flushes=5, close=False)
    data = made.path.read_bytes()
    prefix = sum(len(f) for f in made.frames[:3])
    path = tmp_path / "cut"
    path.write_bytes(data[: prefix + len(made.frames[3]) // 2])
    verdict = verify(path, trusted=keys.trusted)
    assert verdict.status is VerifyStatus.INCOMPLETE, verdict.reasons
    assert verdict.verified_offset == prefix
    assert verdict.unverified_bytes == len(made.frames[3]) // 2
    assert verdict.last_checkpoint is not None and verdict.last_checkpoint.upto == 12
    assert verdict.verified.records == 13
    assert "cut short" in verdict.reasons[0] and "verified up to record 12" in verdict.reasons[0]
    # an unclosed recording cut exactly at a unit boundary: intact prefix, no trailer
    path.write_bytes(data[:prefix])
    verdict = verify(path, trusted=keys.trusted)
    assert verdict.status is VerifyStatus.INCOMPLETE and "no trailer" in verdict.reasons[0]
    assert verdict.unverified_bytes == 0
    # cut inside the very first unit: nothing verifies
    path.write_bytes(data[:10])
    assert verify(path, trusted=keys.trusted).status is VerifyStatus.INCOMPLETE
    path.write_bytes(b"")
    assert verify(path, trusted=keys.trusted).status is VerifyStatus.INCOMPLETE


def test_records_after_the_last_checkpoint_are_incomplete_and_listed(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r", keys.key, flushes=3, close=False)
    nxt = made.writer.records
    appended = frame_of([encode([2, nxt, T0 + 9, b"rm -rf /"]), encode([3, nxt + 1, T0 + 9.5, b"ok"])])
    path = tmp_path / "appended"
    path.write_bytes(made.path.read_bytes() + appended)
    verdict = verify(path, trusted=keys.trusted)
    assert verdict.status is VerifyStatus.INCOMPLETE, verdict.reasons
    assert verdict.unverified_records == 2 and verdict.unverified_bytes == len(appended)
    assert [(u.index, u.kind) for u in verdict.unverified] == [(nxt, "to_gateway"), (nxt + 1, "to_client")]
    assert "no checkpoint covers them" in verdict.reasons[0]
    # the same records rewritten in place of a real unit whose checkpoint is gone
    def strip_checkpoint(records: list[bytes]) -> list[bytes]:
        return [encode([k, i, t, b"rewritten" if k == 2 else b]) for k, i, t, b in map(decode, records[:-1])]

    verdict = verify(rewrite(made, tmp_path / "rewritten", 2, strip_checkpoint), trusted=keys.trusted)
    assert verdict.status is VerifyStatus.INCOMPLETE
    assert verdict.unverified_records == 4 and verdict.last_checkpoint is not None
    assert verdict.last_checkpoint.upto == 8


def test_truncation_after_close_is_tampered_with_the_index(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r", keys.key)
    trailer = made.writer.trailer
    assert trailer is not None
    entry = IndexEntry(session_id=SESSION, ended=True, head=trailer.head, sig=trailer.sig,
                       end_reason="client_closed")
    assert verify(made.path, trusted=keys.trusted, index_entry=entry).status is VerifyStatus.INTACT
    path = tmp_path / "cut"
    path.write_bytes(b"".join(made.frames[:-1]))
    assert verify(path, trusted=keys.trusted).status is VerifyStatus.INCOMPLETE
    verdict = verify(path, trusted=keys.trusted, index_entry=entry)
    assert verdict.status is VerifyStatus.TAMPERED and "truncated after close" in verdict.reasons[0]
    # an open session in the index leaves an incomplete file incomplete
    open_entry = IndexEntry(session_id=SESSION, ended=False)
    assert verify(path, trusted=keys.trusted, index_entry=open_entry).status is VerifyStatus.INCOMPLETE
    # a valid trailer that is not the one the index recorded
    other = IndexEntry(session_id=SESSION, ended=True, head=bytes(32), sig=trailer.sig)
    verdict = verify(made.path, trusted=keys.trusted, index_entry=other)
    assert verdict.status is VerifyStatus.TAMPERED and "differs" in verdict.reasons[0]
    wrong = IndexEntry(session_id="someone-else", ended=True)
    assert verify(made.path, trusted=keys.trusted, index_entry=wrong).status is VerifyStatus.TAMPERED


# --- hostile files -------------------------------------------------------------------------------


def _bounded(fn: Callable[[], replay.Verdict], *, peak: int = 8 << 20) -> replay.Verdict:
    tracemalloc.start()
    started = time.monotonic()
    try:
        verdict = fn()
        _, used = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert used < peak, used
    assert time.monotonic() - started < 10
    return verdict


def test_frame_header_claiming_8_gib_is_refused_before_decompressing(tmp_path: Path, keys: Keys) -> None:
    eight_gib = 8 << 30
    rle_block = ((128 << 10) << 3 | 1 << 1 | 1).to_bytes(3, "little") + b"\x00"
    multi_segment = b"\x28\xb5\x2f\xfd" + bytes([0xC0, 11 << 3]) + eight_gib.to_bytes(8, "little") + rle_block
    single_segment = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + eight_gib.to_bytes(8, "little") + rle_block
    for name, data in (("multi", multi_segment), ("single", single_segment)):
        path = tmp_path / name
        path.write_bytes(data)
        verdict = _bounded(lambda p=path: verify(p, trusted=keys.trusted))  # type: ignore[misc]
        assert verdict.status is VerifyStatus.UNREADABLE, verdict.reasons
        assert "8589934592" in verdict.reasons[0]


def test_decompression_bombs_are_unreadable(tmp_path: Path, keys: Keys) -> None:
    # 256 MiB of zeros in a frame of a few KiB (no content size in its header)
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(1 << 20)
    bomb = b"".join(cobj.compress(zeros) for _ in range(256)) + cobj.flush()
    assert len(bomb) < 64 << 10
    path = tmp_path / "zeros"
    path.write_bytes(bomb)
    assert _bounded(lambda: verify(path, trusted=keys.trusted)).status is VerifyStatus.UNREADABLE
    # a bomb of well-formed records (signed by a key nobody trusts) in one flush unit: the
    # output cap stops it before its checkpoint is ever reached
    writer = RecordingWriter(session_id=SESSION, header=HEADER, signing_key=keys.other, clock=Clock())
    for _ in range(48):
        writer.add_to_gateway(zeros)
    path.write_bytes(writer.flush(new_compressor()))
    limits = ReaderLimits(output_slack=16 << 20)
    verdict = _bounded(lambda: verify(path, trusted=keys.trusted, limits=limits))
    assert verdict.status is VerifyStatus.UNREADABLE and "output cap" in verdict.reasons[0]


def test_huge_msgpack_lengths_are_unreadable(tmp_path: Path, keys: Keys) -> None:
    header = encode([1, 0, T0, {"format": 1}])[:-len(encode({"format": 1}))]  # [1, 0, T0, ...
    cases = {
        "bin32": b"\xc6\xff\xff\xff\xff" + b"\x00" * 1000,
        "array32": b"\xdd\xff\xff\xff\xff",
        "record-bin32": header + b"\xc6\xff\xff\xff\xff" + b"\x00" * 1000,
        "map32": header + b"\xdf\x7f\xff\xff\xff",
        "nested": b"\x91" * 100_000,
    }
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(new_compressor().compress(payload))
        verdict = _bounded(lambda p=path: verify(p, trusted=keys.trusted))  # type: ignore[misc]
        assert verdict.status is VerifyStatus.UNREADABLE, (name, verdict.reasons)


def test_a_record_over_the_buffer_limit_is_unreadable(tmp_path: Path, keys: Keys) -> None:
    payload = encode([2, 0, T0, b"\x01" * (replay.MAX_RECORD_SIZE + 10)])
    path = tmp_path / "big"
    path.write_bytes(new_compressor().compress(payload))
    verdict = verify(path, trusted=keys.trusted)
    assert verdict.status is VerifyStatus.UNREADABLE and "the limit" in verdict.reasons[0]


def test_garbage_and_unsupported_versions_are_unreadable(tmp_path: Path, keys: Keys) -> None:
    cases = {
        "random": random.Random(5).randbytes(10000),
        "text": b"hello, auditor\n" * 10,
        "magic-then-junk": b"\x28\xb5\x2f\xfd" + random.Random(6).randbytes(500),
        "skippable": b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd",
        "not-a-record": new_compressor().compress(encode({"hello": "world"})),
        "ext-type": new_compressor().compress(encode([1, 0, T0, msgpack.ExtType(5, b"x")])),
        "version-2": new_compressor().compress(encode([1, 0, T0, {**HEADER, "format": 2}])),
        "no-header": new_compressor().compress(encode([2, 0, T0, b"data"])),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        verdict = verify(path, trusted=keys.trusted)
        assert verdict.status is VerifyStatus.UNREADABLE, (name, verdict.reasons)
    assert "unsupported format version 2" in verify(tmp_path / "version-2", trusted=keys.trusted).reasons[0]
    missing = verify(tmp_path / "missing", trusted=keys.trusted)
    assert missing.status is VerifyStatus.UNREADABLE and "cannot open" in missing.reasons[0]
    with pytest.raises(replay.UnreadableRecording):
        read_header(tmp_path / "random")
    with pytest.raises(replay.UnreadableRecording):
        list(iter_records(tmp_path / "text"))


def test_window_over_the_limit_is_unreadable(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r", keys.key)
    verdict = verify(made.path, trusted=keys.trusted, limits=ReaderLimits(max_window_size=1024))
    assert verdict.status is VerifyStatus.UNREADABLE and "window" in verdict.reasons[0]


# --- sealing after a crash -----------------------------------------------------------------------


def test_seal_after_crash_truncates_and_signs_a_trailer(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r.l4rec.zst", keys.key, flushes=5, close=False)
    data = made.path.read_bytes()
    prefix = sum(len(f) for f in made.frames[:3])
    made.path.write_bytes(data[: prefix + 17])  # a crash mid-write of the fourth unit
    before = verify(made.path, trusted=keys.trusted)
    assert before.status is VerifyStatus.INCOMPLETE
    result = seal_after_crash(made.path, keys.key, now=T0 + 3600, trusted=keys.trusted)
    assert result.sealed and not result.rewritten and result.discarded_bytes == 17
    assert result.last_checkpoint_time == before.last_checkpoint.time  # type: ignore[union-attr]
    verdict = verify(made.path, trusted=keys.trusted)
    assert verdict.status is VerifyStatus.INTACT, verdict.reasons
    assert verdict.trailer == result.trailer and result.trailer.reason == replay.REASON_SEALED_AFTER_CRASH
    assert made.path.read_bytes()[:prefix] == data[:prefix]
    # the totals are those of the verified prefix, plus the seal's own event
    assert result.trailer.records == before.verified.records + 1
    assert result.trailer.bytes_to_gateway == before.verified.bytes_to_gateway
    assert result.trailer.sha256_to_gateway == before.verified.sha256_to_gateway
    assert result.trailer.ended_at == T0 + 3600
    sealed = [r.body for r in iter_records(made.path) if r.kind is RecordKind.EVENT][-1]
    assert sealed == {"kind": replay.SEALED_EVENT, "last_checkpoint_time": result.last_checkpoint_time,
                      "discarded_bytes": 17, "discarded_records": 0}
    out = io.BytesIO()
    dumped = dump(made.path, "to-gateway", out, trusted=keys.trusted)
    assert dumped.sha256 == result.trailer.sha256_to_gateway
    assert made.sent.startswith(out.getvalue())
    # sealing again changes nothing
    again = seal_after_crash(made.path, keys.key, now=T0 + 7200, trusted=keys.trusted)
    assert not again.sealed and again.trailer == result.trailer


def test_seal_continues_after_a_key_rotation(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r", keys.key, close=False)
    seal_after_crash(made.path, keys.other, now=T0 + 60, trusted=keys.trusted)
    both = {**keys.trusted, key_id(keys.other.public_key()): keys.other.public_key()}
    verdict = verify(made.path, trusted=both)
    assert verdict.status is VerifyStatus.INTACT and len(verdict.key_ids) == 2
    assert verify(made.path, trusted=keys.trusted).status is VerifyStatus.TAMPERED


def test_seal_refuses_tampered_files_and_rewrites_empty_ones(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r", keys.key, close=False)
    bad = rewrite(made, tmp_path / "bad", 1, lambda r: [r[1], r[0], *r[2:]])
    original = bad.read_bytes()
    with pytest.raises(SealError, match="tampered"):
        seal_after_crash(bad, keys.key, now=T0, trusted=keys.trusted)
    assert bad.read_bytes() == original
    empty = tmp_path / "empty"
    empty.write_bytes(made.frames[0][:7])
    with pytest.raises(SealError, match="nothing in the recording verifies"):
        seal_after_crash(empty, keys.key, now=T0)
    result = seal_after_crash(empty, keys.key, now=T0, session_id=SESSION, header=HEADER)
    assert result.rewritten and result.trailer.records == 2
    verdict = verify(empty, trusted=keys.trusted)
    assert verdict.status is VerifyStatus.INTACT and verdict.header is not None
    assert verdict.header["identity"] == HEADER["identity"]


# --- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def recordings(tmp_path: Path, keys: Keys) -> dict[str, Path]:
    made = make_recording(tmp_path / f"{SESSION}.l4rec.zst", keys.key)
    cut = tmp_path / "cut.l4rec.zst"
    cut.write_bytes(b"".join(made.frames[:-1])[:-5])
    swapped = rewrite(made, tmp_path / "swapped.l4rec.zst", 1, lambda r: [r[1], r[0], *r[2:]])
    junk = tmp_path / "junk.l4rec.zst"
    junk.write_bytes(b"junk" * 100)
    return {"intact": made.path, "incomplete": cut, "tampered": swapped, "unreadable": junk}


def test_cli_verify_exit_codes(tmp_path: Path, keys: Keys, recordings: dict[str, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    pub = pem(keys.key.public_key(), tmp_path / "recording.pub")
    expected = {"intact": 0, "tampered": 2, "incomplete": 3, "unreadable": 4}
    for name, code in expected.items():
        assert main(["verify", "--pubkey", str(pub), str(recordings[name])]) == code
        line = capsys.readouterr().out.strip()
        assert line.startswith(f"{recordings[name]}: {name} \u2014 "), line
    everything = [str(recordings[n]) for n in ("intact", "tampered", "incomplete")]
    assert main(["verify", "--pubkey", str(pub), *everything]) == 3
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["verify", "--pubkey", str(pub), *everything, str(recordings["unreadable"])]) == 4
    capsys.readouterr()


def test_cli_verify_json_and_keyring(tmp_path: Path, keys: Keys, recordings: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    ring = tmp_path / "ca" / "recording-keys"
    ring.mkdir(parents=True)
    for k in (keys.key, keys.other):
        pem(k.public_key(), ring / f"{key_id(k.public_key())}.pub")
    files = [str(recordings[n]) for n in ("intact", "incomplete")]
    assert main(["verify", "--keyring", str(tmp_path / "ca"), "--json", *files]) == 3
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["status"] for d in lines] == ["intact", "incomplete"]
    assert [d["exit_code"] for d in lines] == [0, 3]
    assert lines[0]["trailer"]["reason"] == "client_closed" and lines[0]["session_id"] == SESSION
    assert lines[1]["last_checkpoint"]["upto"] == 16 and lines[1]["unverified_bytes"] > 0
    assert main(["verify", "--keyring", str(ring), files[0]]) == 0
    capsys.readouterr()
    # a keyring file named for another key is refused, not trusted
    (ring / f"{'0' * 64}.pub").write_bytes((ring / f"{key_id(keys.key.public_key())}.pub").read_bytes())
    assert main(["verify", "--keyring", str(ring), files[0]]) == 4
    assert "holds the key with id" in capsys.readouterr().err


def test_cli_usage_and_input_errors(tmp_path: Path, keys: Keys, recordings: dict[str, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    pub = pem(keys.key.public_key(), tmp_path / "recording.pub")
    intact = str(recordings["intact"])
    assert main(["verify", intact]) == 64  # no trusted key given
    assert main(["verify", "--pubkey", str(pub), "--keyring", str(tmp_path), intact]) == 64
    assert main(["verify", "--pubkey", str(pub)]) == 64
    assert main(["frobnicate"]) == 64
    assert main([]) == 64
    assert main(["dump", intact]) == 64  # no --direction
    assert main(["dump", intact, "--direction", "sideways"]) == 64
    assert main(["dump", "no-such-session", "--direction", "sent"]) == 64
    assert main(["--version"]) == 0
    capsys.readouterr()
    assert main(["verify", "--pubkey", str(tmp_path / "missing.pub"), intact]) == 4
    assert main(["verify", "--pubkey", intact, intact]) == 4  # not a key
    assert main(["verify", "--pubkey", str(pub), "--index", str(tmp_path / "missing.db"), intact]) == 4
    (tmp_path / "notdb").write_bytes(b"not sqlite" * 100)
    assert main(["verify", "--pubkey", str(pub), "--index", str(tmp_path / "notdb"), intact]) == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("replay: error:") == 4


def _index(tmp_path: Path, rows: list[tuple[Any, ...]]) -> Path:
    db = tmp_path / "index.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE sessions(session_id TEXT PRIMARY KEY, file TEXT, trailer_head BLOB, "
                     "trailer_sig BLOB, ended_at REAL, end_reason TEXT)")
        conn.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)", rows)
    conn.close()
    return db


def test_cli_verify_with_the_index(tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    made = make_recording(tmp_path / f"{SESSION}.l4rec.zst", keys.key)
    trailer = made.writer.trailer
    assert trailer is not None
    db = _index(tmp_path, [(SESSION, str(made.path), trailer.head, trailer.sig, trailer.ended_at,
                            "client_closed")])
    pub = pem(keys.key.public_key(), tmp_path / "recording.pub")
    assert main(["verify", "--pubkey", str(pub), "--index", str(db), str(made.path)]) == 0
    cut = tmp_path / "copy" / f"{SESSION}.l4rec.zst"
    cut.parent.mkdir()
    cut.write_bytes(b"".join(made.frames[:-1]))
    assert main(["verify", "--pubkey", str(pub), str(cut)]) == 3
    assert main(["verify", "--pubkey", str(pub), "--index", str(db), str(cut)]) == 2
    out = capsys.readouterr().out
    assert "truncated after close" in out
    # another session's intact recording under this session's name
    other = make_recording(tmp_path / "other-session.l4rec.zst", keys.key, session_id="other-session")
    swapped = tmp_path / "swap" / f"{SESSION}.l4rec.zst"
    swapped.parent.mkdir()
    swapped.write_bytes(other.path.read_bytes())
    assert main(["verify", "--pubkey", str(pub), "--index", str(db), str(swapped)]) == 2
    assert "named for indexed session" in capsys.readouterr().out
    assert main(["verify", "--pubkey", str(pub), "--index", str(db), str(other.path)]) == 0
    assert "not in the index" in capsys.readouterr().out
    assert db.read_bytes()  # opened read-only, left as it was
    assert not (tmp_path / "index.db-wal").exists()


def test_cli_dump(tmp_path: Path, keys: Keys, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    (tmp_path / "rec").mkdir()
    made = make_recording(tmp_path / "rec" / f"{SESSION}.l4rec.zst", keys.key)
    trailer = made.writer.trailer
    assert trailer is not None
    db = _index(tmp_path, [(SESSION, f"rec/{SESSION}.l4rec.zst", trailer.head, trailer.sig, trailer.ended_at,
                            "client_closed")])
    pub = pem(keys.key.public_key(), tmp_path / "recording.pub")
    out = tmp_path / "sent.bin"
    assert main(["dump", str(made.path), "--direction", "sent", "-o", str(out), "--pubkey", str(pub)]) == 0
    assert out.read_bytes() == made.sent and out.stat().st_mode & 0o777 == 0o600
    err = capfdbinary.readouterr().err.decode()
    assert "redaction" in err and "client_credential" in err
    assert hashlib.sha256(made.sent).hexdigest() in err
    # by session id through the index, to standard output
    assert main(["dump", SESSION, "--index", str(db), "--direction", "received"]) == 0
    captured = capfdbinary.readouterr()
    assert captured.out == made.received
    assert b"signatures not checked" in captured.err
    assert main(["dump", str(made.path), "--direction", "to-client", "-o", str(out)]) == 0
    assert out.read_bytes() == made.received
    capfdbinary.readouterr()
    # an incomplete recording: the prefix is written, the exit code says what it is
    cut = tmp_path / "cut"
    cut.write_bytes(b"".join(made.frames[:-1]) + made.frames[-1][:30])
    assert main(["dump", str(cut), "--direction", "sent", "-o", str(out), "--pubkey", str(pub)]) == 3
    assert made.sent.startswith(out.read_bytes())
    assert main(["dump", str(tmp_path / "nope"), "--index", str(db), "--direction", "sent"]) == 4
    junk = tmp_path / "junk"
    junk.write_bytes(b"junk")
    assert main(["dump", str(junk), "--direction", "sent", "-o", str(out)]) == 4
    assert b"Traceback" not in capfdbinary.readouterr().err


def test_cli_runs_as_a_program(tmp_path: Path, keys: Keys) -> None:
    made = make_recording(tmp_path / "r.l4rec.zst", keys.key)
    pub = pem(keys.key.public_key(), tmp_path / "recording.pub")
    result = subprocess.run([sys.executable, "-m", "replay.cli", "verify", "--pubkey", str(pub),
                             str(made.path)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and ": intact" in result.stdout
    result = subprocess.run([sys.executable, "-m", "replay.cli", "verify"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 64 and "Traceback" not in result.stderr

