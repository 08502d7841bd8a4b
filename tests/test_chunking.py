"""Tests of l4proxy.chunking: specs, fixed and content-defined cuts, incremental feeding."""

from __future__ import annotations

import hashlib
import itertools
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyfastcdc import FastCDC

from l4proxy import chunking
from l4proxy.chunking import (
    DEFAULT_FIXED_SIZE,
    READ_SIZE,
    Chunker,
    ChunkRecord,
    ChunkSpec,
    ChunkSpecError,
    chunk_file,
    chunk_spec,
)

KiB = 1 << 10
MiB = 1 << 20

SMALL_CDC = chunk_spec("cdc", avg_size=256, min_size=64, max_size=1024)


def randbytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def run(spec: ChunkSpec, pieces: list[bytes]) -> list[tuple[ChunkRecord, bytes]]:
    chunker = Chunker(spec)
    out = []
    for piece in pieces:
        out += chunker.feed(piece)
    out += chunker.finish()
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def reference(spec: ChunkSpec, data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each chunk, computed independently of Chunker."""
    if spec.strategy == "fixed":
        assert spec.size is not None
        return [(o, min(spec.size, len(data) - o)) for o in range(0, len(data), spec.size)]
    assert spec.avg_size is not None
    cdc = FastCDC(spec.avg_size, min_size=spec.min_size, max_size=spec.max_size,
                  normalized_chunking=1, seed=0)
    return [(c.offset, c.length) for c in cdc.cut_buf(data)]


def check_chunks(data: bytes, chunks: list[tuple[ChunkRecord, bytes]]) -> None:
    """Indexes count up, offsets are contiguous, bytes and hashes match the input."""
    offset = 0
    for i, (record, piece) in enumerate(chunks):
        assert record.index == i
        assert record.offset == offset
        assert record.length == len(piece) > 0
        assert piece == data[offset : offset + record.length]
        assert record.sha256 == hashlib.sha256(piece).hexdigest()
        offset += record.length
    assert offset == len(data)


# --- spec ---------------------------------------------------------------------------------


def test_spec_defaults() -> None:
    assert chunk_spec("fixed") == ChunkSpec(strategy="fixed", size=DEFAULT_FIXED_SIZE)
    assert chunk_spec("fixed").size == MiB
    cdc = chunk_spec("cdc")
    assert (cdc.min_size, cdc.avg_size, cdc.max_size) == (16 * KiB, 64 * KiB, 256 * KiB)
    assert cdc.size is None
    big = chunk_spec("cdc", avg_size=4 * MiB)
    assert (big.min_size, big.max_size) == (MiB, 16 * MiB)
    assert chunk_spec("cdc", avg_size=512, max_size=100_000).min_size == 128
    assert chunk_spec("fixed", size=64 * MiB).max_chunk_size == 64 * MiB
    assert cdc.max_chunk_size == 256 * KiB


def test_spec_is_frozen() -> None:
    spec = chunk_spec("fixed")
    with pytest.raises(AttributeError):
        spec.size = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "param", "fragment"),
    [
        ({"strategy": "rabin"}, "strategy", "'fixed' or 'cdc'"),
        ({"strategy": "fixed", "size": 63}, "size", "64..67108864"),
        ({"strategy": "fixed", "size": (64 * MiB) + 1}, "size", "64..67108864"),
        ({"strategy": "fixed", "size": 0}, "size", "within"),
        ({"strategy": "fixed", "size": True}, "size", "integer"),
        ({"strategy": "fixed", "size": 1024.0}, "size", "integer"),
        ({"strategy": "fixed", "avg_size": 4096}, "avg_size", "only applies to strategy 'cdc'"),
        ({"strategy": "cdc", "size": 4096}, "size", "only applies to strategy 'fixed'"),
        ({"strategy": "cdc", "avg_size": 100_000}, "avg_size", "power of two"),
        ({"strategy": "cdc", "avg_size": 128}, "avg_size", "256..4194304"),
        ({"strategy": "cdc", "avg_size": 8 * MiB}, "avg_size", "256..4194304"),
        ({"strategy": "cdc", "avg_size": "65536"}, "avg_size", "integer"),
        ({"strategy": "cdc", "min_size": 1001}, "min_size", "even"),
        ({"strategy": "cdc", "min_size": 32}, "min_size", "64..1048576"),
        ({"strategy": "cdc", "min_size": 2 * MiB, "avg_size": 4 * MiB}, "min_size", "64..1048576"),
        ({"strategy": "cdc", "max_size": 512, "avg_size": 256}, "max_size", "1024..16777216"),
        ({"strategy": "cdc", "max_size": 32 * MiB}, "max_size", "1024..16777216"),
        ({"strategy": "cdc", "min_size": 128 * KiB}, "min_size", "larger than avg_size"),
        ({"strategy": "cdc", "max_size": 32 * KiB}, "max_size", "smaller than avg_size"),
    ],
)
def test_spec_errors_name_the_parameter(kwargs: dict[str, object], param: str, fragment: str) -> None:
    with pytest.raises(ChunkSpecError) as info:
        chunk_spec(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == param
    assert str(info.value).startswith(f"{param}: ")
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_spec_validated_on_direct_construction() -> None:
    with pytest.raises(ChunkSpecError, match=r"^avg_size: is required"):
        ChunkSpec(strategy="cdc", min_size=64, max_size=1024)
    with pytest.raises(ChunkSpecError, match=r"^size: is required"):
        ChunkSpec(strategy="fixed")
    with pytest.raises(ChunkSpecError, match=r"^strategy:"):
        ChunkSpec(strategy="gear")  # type: ignore[arg-type]


def test_pyfastcdc_accepts_every_valid_extreme() -> None:
    """The spec's bounds are within what pyfastcdc's constructor accepts."""
    for kwargs in (
        {"avg_size": 256, "min_size": 64, "max_size": 1024},
        {"avg_size": 4 * MiB, "min_size": MiB, "max_size": 16 * MiB},
        {"avg_size": 1024, "min_size": 1024, "max_size": 1024},
    ):
        spec = chunk_spec("cdc", **kwargs)
        check_chunks(randbytes(5000), run(spec, [randbytes(5000)]))


# --- fixed --------------------------------------------------------------------------------


def test_fixed_sizes_exact_and_last_chunk_shorter() -> None:
    data = randbytes(10 * 4096 + 123)
    chunks = run(chunk_spec("fixed", size=4096), [data])
    assert [r.length for r, _ in chunks] == [4096] * 10 + [123]
    check_chunks(data, chunks)


def test_fixed_exact_multiple_has_no_empty_tail() -> None:
    data = randbytes(3 * 4096)
    chunks = run(chunk_spec("fixed", size=4096), [data])
    assert [r.length for r, _ in chunks] == [4096] * 3


@pytest.mark.parametrize("spec", [chunk_spec("fixed", size=64), SMALL_CDC, chunk_spec("cdc")])
def test_empty_input_gives_no_chunks(spec: ChunkSpec) -> None:
    assert run(spec, []) == []
    assert run(spec, [b"", b""]) == []


@pytest.mark.parametrize("spec", [chunk_spec("fixed", size=64), SMALL_CDC])
def test_input_smaller_than_a_chunk_is_one_chunk(spec: ChunkSpec) -> None:
    chunks = run(spec, [b"x"])
    assert [(r.offset, r.length) for r, _ in chunks] == [(0, 1)]
    assert chunks[0][0].sha256 == hashlib.sha256(b"x").hexdigest()


def test_sha256_of_known_chunk() -> None:
    (record, piece), = run(chunk_spec("fixed", size=64), [b"abc"])
    assert piece == b"abc"
    assert record.sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# --- cdc ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [SMALL_CDC, chunk_spec("cdc"), chunk_spec("cdc", min_size=1000, avg_size=4096, max_size=5001)],
)
def test_cdc_respects_min_and_max(spec: ChunkSpec) -> None:
    assert spec.min_size is not None and spec.max_size is not None
    data = randbytes(2 * MiB + 17, seed=3)
    chunks = run(spec, [data])
    check_chunks(data, chunks)
    lengths = [r.length for r, _ in chunks]
    assert all(spec.min_size <= n <= spec.max_size for n in lengths[:-1])
    assert 0 < lengths[-1] <= spec.max_size
    assert len(set(lengths)) >= 20  # really content-defined, not fixed
    assert [(r.offset, r.length) for r, _ in chunks] == reference(spec, data)


def test_cdc_zero_runs_cut_at_max_size() -> None:
    data = bytes(10_000)
    chunks = run(SMALL_CDC, [data])
    assert [r.length for r, _ in chunks] == [1024] * 9 + [784]


def test_cdc_final_chunk_may_be_below_min() -> None:
    spec = chunk_spec("cdc", avg_size=256, min_size=200, max_size=1024)
    data = randbytes(64 * KiB, seed=5)
    for end in range(len(data) - 400, len(data)):
        lengths = [r.length for r, _ in run(spec, [data[:end]])]
        if lengths[-1] < 200:
            break
    else:
        pytest.fail("no input in range ended with a chunk shorter than min_size")
    assert all(n >= 200 for n in lengths[:-1])


# --- incremental == one shot --------------------------------------------------------------


@st.composite
def cdc_specs(draw: st.DrawFn) -> ChunkSpec:
    avg = draw(st.sampled_from([256, 512, 1024, 2048]))
    low = draw(st.integers(32, avg // 2)) * 2
    high = draw(st.integers(max(avg, 1024), 4096))
    return chunk_spec("cdc", avg_size=avg, min_size=low, max_size=high)


specs = st.one_of(
    st.integers(64, 3000).map(lambda n: chunk_spec("fixed", size=n)),
    cdc_specs(),
)
contents = st.one_of(
    st.tuples(st.integers(0, 20_000), st.integers(0, 2**32)).map(lambda t: randbytes(*t)),
    st.binary(max_size=6000),  # low-entropy: long zero runs, repeats
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, data=contents, cuts=st.data())
def test_incremental_equals_one_shot(spec: ChunkSpec, data: bytes, cuts: st.DataObject) -> None:
    points = cuts.draw(st.lists(st.integers(0, len(data)), max_size=40))
    whole = run(spec, [data])
    assert [(r.offset, r.length) for r, _ in whole] == reference(spec, data)
    check_chunks(data, whole)
    assert run(spec, split(data, points)) == whole


@pytest.mark.parametrize("spec", [chunk_spec("fixed", size=100), SMALL_CDC])
def test_one_byte_at_a_time_equals_one_shot(spec: ChunkSpec) -> None:
    data = randbytes(9000, seed=11)
    whole = run(spec, [data])
    assert run(spec, [data[i : i + 1] for i in range(len(data))]) == whole


@pytest.mark.parametrize("spec", [SMALL_CDC, chunk_spec("cdc", avg_size=512, min_size=66, max_size=1025)])
def test_every_two_piece_split_equals_one_shot(spec: ChunkSpec) -> None:
    """Exhaustive over the split point: hits every position relative to a chunk's start."""
    rng = random.Random(7)
    data = b"".join(rng.randbytes(rng.randrange(2000)) + bytes(rng.randrange(3000)) for _ in range(4))
    whole = run(spec, [data])
    for p in range(len(data) + 1):
        assert run(spec, [data[:p], data[p:]]) == whole, p


@pytest.mark.parametrize("spec", [chunk_spec("fixed", size=64 * KiB), chunk_spec("cdc")])
def test_memory_is_bounded(spec: ChunkSpec) -> None:
    """Never more than about max chunk + a quarter of it + one piece is held."""
    data = randbytes(6 * MiB, seed=2)
    for piece_size in (MiB, 1000, 256 * KiB + 1):
        chunker = Chunker(spec)
        out = []
        for start in range(0, len(data), piece_size):
            out += chunker.feed(data[start : start + piece_size])
            assert chunker.buffered <= spec.max_chunk_size * 5 // 4 + piece_size
            assert chunker.offset + chunker.buffered == min(start + piece_size, len(data))
        out += chunker.finish()
        assert chunker.buffered == 0
        assert chunker.count == len(out)
        check_chunks(data, out)


def test_feed_copies_mutable_buffers() -> None:
    buf = bytearray(b"a" * 100)
    chunker = Chunker(chunk_spec("fixed", size=64))
    first = chunker.feed(buf)
    buf[:] = b"b" * 100
    rest = chunker.feed(memoryview(buf)[:10]) + chunker.finish()
    assert [piece for _, piece in first + rest] == [b"a" * 64, b"a" * 36 + b"b" * 10]


def test_feed_after_finish_is_an_error() -> None:
    chunker = Chunker(SMALL_CDC)
    chunker.finish()
    with pytest.raises(ValueError, match="after finish"):
        chunker.feed(b"x")
    with pytest.raises(ValueError, match="twice"):
        chunker.finish()


# --- boundary stability -------------------------------------------------------------------


def unchanged_later_chunks(spec: ChunkSpec, data: bytes, edited: bytes) -> float:
    """Fraction of the original chunks after the first 256 KiB whose hash survives an edit."""
    before = [r for r, _ in run(spec, [data]) if r.offset >= 256 * KiB]
    after = {r.sha256 for r, _ in run(spec, [edited])}
    return sum(r.sha256 in after for r in before) / len(before)


def test_insertion_near_start_keeps_cdc_chunks_but_shifts_fixed_ones() -> None:
    data = randbytes(4 * MiB, seed=42)
    edited = data[:1000] + b"\x01\x02\x03" + data[1000:]
    assert unchanged_later_chunks(chunk_spec("cdc"), data, edited) >= 0.8
    assert unchanged_later_chunks(chunk_spec("fixed", size=64 * KiB), data, edited) <= 0.05


# --- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [chunk_spec("fixed", size=300 * KiB), chunk_spec("cdc")])
def test_chunk_file_matches_one_shot(tmp_path: Path, spec: ChunkSpec) -> None:
    data = randbytes(2 * READ_SIZE + 12345, seed=8)
    path = tmp_path / "object.bin"
    path.write_bytes(data)
    assert list(chunk_file(path, spec)) == run(spec, [data])
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert list(chunk_file(str(empty), spec)) == []


def test_chunk_file_missing_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        next(chunk_file(tmp_path / "nope", chunk_spec("fixed")))


def test_public_surface() -> None:
    for name in chunking.__all__:
        assert hasattr(chunking, name), name
    assert {"Chunker", "ChunkRecord", "ChunkSpec", "ChunkSpecError", "chunk_file",
            "chunk_spec"} <= set(chunking.__all__)

