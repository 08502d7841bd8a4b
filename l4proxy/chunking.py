"""Splitting a byte stream into chunks: fixed-size or content-defined (FastCDC).

Theory of operation
-------------------
A :class:`ChunkSpec` is one validated, frozen description of how to cut: ``fixed`` cuts
every ``size`` bytes; ``cdc`` (content-defined chunking) cuts where a rolling gear hash of
the content hits a mask, so an insertion near the start of an object moves only the
boundaries next to it and later chunks keep their hashes. CDC is delegated to the compiled
``pyfastcdc.FastCDC`` (the FastCDC 2020 algorithm with normalized chunking level 1 and the
default gear table), which is pinned here because changing it changes every boundary.

:class:`Chunker` is incremental with bounded memory: feed it the object piece by piece and
it returns the chunks that are complete. The boundaries are exactly those of chunking the
whole object at once. For ``fixed`` that is trivial. For ``cdc`` it rests on how FastCDC
finds a cut: starting at a chunk's first byte, it scans positions from ``min_size`` up to
``max_size`` and cuts at the *first* position whose hash (which depends only on the bytes
up to and including that position) matches. So when FastCDC is run over a partial buffer:

* a cut it finds *before the end* of the buffer is final: more data cannot change the
  hashes of earlier positions;
* a chunk that reaches ``max_size`` is final: the scan never goes further;
* the last chunk, when it ends at the end of the buffer and is shorter than ``max_size``,
  is not a real cut (FastCDC simply ran out of data). Its bytes are carried over and
  scanned again, from its start, together with the next piece.

Because pyfastcdc cannot resume a scan, a carried-over tail is rescanned; to keep that
linear for tiny pieces, CDC scans only once ``max_size // 4`` new bytes have arrived (fixed
cuts once a whole chunk is buffered). A :class:`Chunker` therefore holds at most about
``max_size`` (cdc) or ``size`` (fixed) bytes of carry-over plus the pieces not yet scanned
(under a quarter of ``max_size``, plus the last piece fed), never the whole object.
:meth:`Chunker.finish` cuts whatever remains; the last chunk may be shorter than
``min_size``.

pyfastcdc's constraints (checked by :func:`chunk_spec` so that a bad spec is our error
message, not a library exception halfway through an object):

* ``avg_size`` in 256 B..4 MiB, ``min_size`` in 64 B..1 MiB, ``max_size`` in 1 KiB..16 MiB,
  and ``min_size <= avg_size <= max_size``;
* ``avg_size`` must be a power of two: FastCDC picks its cut masks from
  ``round(log2(avg_size))``, so an ``avg_size`` of 100 000 would silently behave like
  131 072 (and 5 000 like 4 096);
* ``min_size`` must be even: the scan starts at ``min_size`` rounded down to even, so an odd
  ``min_size`` could produce a chunk one byte shorter than asked;
* the mean chunk size is about ``min_size + avg_size``, not ``avg_size`` (the first
  ``min_size`` bytes of each chunk are skipped; FastCDC paper, section 3.4).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from pyfastcdc import FastCDC

__all__ = [
    "CDC_AVG_SIZE_RANGE",
    "CDC_MAX_SIZE_RANGE",
    "CDC_MIN_SIZE_RANGE",
    "DEFAULT_CDC_AVG_SIZE",
    "DEFAULT_FIXED_SIZE",
    "FIXED_SIZE_RANGE",
    "READ_SIZE",
    "ChunkRecord",
    "ChunkSpec",
    "ChunkSpecError",
    "Chunker",
    "Strategy",
    "chunk_file",
    "chunk_spec",
]

Strategy = Literal["fixed", "cdc"]

#: Default chunk size of the ``fixed`` strategy.
DEFAULT_FIXED_SIZE = 1 << 20
#: Default ``avg_size`` of the ``cdc`` strategy (``min_size`` defaults to a quarter of it,
#: ``max_size`` to four times it).
DEFAULT_CDC_AVG_SIZE = 64 << 10
#: Bounds (inclusive) of each size parameter. Every size is within 64 B..64 MiB; the CDC
#: ranges are narrower because they are what pyfastcdc accepts.
FIXED_SIZE_RANGE = (64, 64 << 20)
CDC_MIN_SIZE_RANGE = (64, 1 << 20)
CDC_AVG_SIZE_RANGE = (256, 4 << 20)
CDC_MAX_SIZE_RANGE = (1 << 10, 16 << 20)
#: Size of the reads :func:`chunk_file` makes.
READ_SIZE = 1 << 20

# FastCDC parameters that are part of the boundary definition: never change them.
_NORMALIZED_CHUNKING: Literal[1] = 1
_GEAR_SEED = 0

class ChunkSpecError(ValueError):
    """A chunking parameter is invalid. ``param`` names it (e.g. ``"avg_size"``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _size(param: str, value: object, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChunkSpecError(param, f"must be an integer, got {type(value).__name__}")
    low, high = bounds
    if not low <= value <= high:
        raise ChunkSpecError(param, f"must be within {low}..{high} bytes, got {value}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkSpec:
    """How to cut: validated on construction (build it with :func:`chunk_spec`).

    ``fixed`` uses ``size`` only; ``cdc`` uses ``min_size``, ``avg_size`` and ``max_size``
    only; the parameters of the other strategy are ``None``.

    Raises:
        ChunkSpecError: a parameter is missing, out of range or not allowed.
    """

    strategy: Strategy
    size: int | None = None
    min_size: int | None = None
    avg_size: int | None = None
    max_size: int | None = None

    def __post_init__(self) -> None:
        if self.strategy == "fixed":
            for name in ("min_size", "avg_size", "max_size"):
                if getattr(self, name) is not None:
                    raise ChunkSpecError(name, "only applies to strategy 'cdc'")
            if self.size is None:
                raise ChunkSpecError("size", "is required for strategy 'fixed'")
            _size("size", self.size, FIXED_SIZE_RANGE)
        elif self.strategy == "cdc":
            if self.size is not None:
                raise ChunkSpecError("size", "only applies to strategy 'fixed'")
            for name in ("min_size", "avg_size", "max_size"):
                if getattr(self, name) is None:
                    raise ChunkSpecError(name, "is required for strategy 'cdc'")
            avg = _size("avg_size", self.avg_size, CDC_AVG_SIZE_RANGE)
            low = _size("min_size", self.min_size, CDC_MIN_SIZE_RANGE)
            high = _size("max_size", self.max_size, CDC_MAX_SIZE_RANGE)
            if avg & (avg - 1):
                raise ChunkSpecError("avg_size", f"must be a power of two, got {avg}")
            if low % 2:
                raise ChunkSpecError("min_size", f"must be even, got {low}")
            if low > avg:
                raise ChunkSpecError("min_size", f"{low} is larger than avg_size {avg}")
            if high < avg:
                raise ChunkSpecError("max_size", f"{high} is smaller than avg_size {avg}")
        else:
            raise ChunkSpecError("strategy", f"must be 'fixed' or 'cdc', got {self.strategy!r}")

    @property
    def max_chunk_size(self) -> int:
        """The largest chunk this spec can produce (``size`` or ``max_size``)."""
        largest = self.size if self.strategy == "fixed" else self.max_size
        assert largest is not None
        return largest


def chunk_spec(
    strategy: str,
    *,
    size: int | None = None,
    min_size: int | None = None,
    avg_size: int | None = None,
    max_size: int | None = None,
) -> ChunkSpec:
    """Validate chunking parameters and fill in the defaults.

    Args:
        strategy: ``"fixed"`` or ``"cdc"``.
        size: ``fixed`` only; default :data:`DEFAULT_FIXED_SIZE` (1 MiB).
        min_size: ``cdc`` only; default ``avg_size // 4``.
        avg_size: ``cdc`` only, a power of two; default :data:`DEFAULT_CDC_AVG_SIZE`
            (64 KiB). The mean chunk is about ``min_size + avg_size``.
        max_size: ``cdc`` only; default ``avg_size * 4``.

    Returns:
        The validated :class:`ChunkSpec`.

    Raises:
        ChunkSpecError: a parameter is of the wrong type, out of range, inconsistent
            (``min_size <= avg_size <= max_size``), or belongs to the other strategy.
    """
    if strategy == "fixed":
        return ChunkSpec(strategy="fixed", size=DEFAULT_FIXED_SIZE if size is None else size,
                         min_size=min_size, avg_size=avg_size, max_size=max_size)
    if strategy == "cdc":
        # checked here too, so defaults are never derived from a bad avg_size
        avg = _size("avg_size", DEFAULT_CDC_AVG_SIZE if avg_size is None else avg_size,
                    CDC_AVG_SIZE_RANGE)
        return ChunkSpec(
            strategy="cdc", size=size, avg_size=avg,
            min_size=avg // 4 if min_size is None else min_size,
            max_size=avg * 4 if max_size is None else max_size,
        )
    raise ChunkSpecError("strategy", f"must be 'fixed' or 'cdc', got {strategy!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkRecord:
    """One chunk: its position in the object and the SHA-256 (lowercase hex) of its bytes."""

    index: int
    offset: int
    length: int
    sha256: str


_Chunk = tuple[ChunkRecord, bytes]


class Chunker:
    """Incremental chunker with bounded memory (see the module docstring).

    Feed the object in pieces of any size with :meth:`feed`, then call :meth:`finish`
    once. The chunks returned, in order, are exactly those of chunking the whole object in
    one go. Not thread-safe.

    Args:
        spec: how to cut.
    """

    def __init__(self, spec: ChunkSpec) -> None:
        self.spec = spec
        self._cdc: FastCDC | None = None
        if spec.strategy == "cdc":
            assert spec.avg_size is not None  # ChunkSpec is validated on construction
            self._cdc = FastCDC(spec.avg_size, min_size=spec.min_size, max_size=spec.max_size,
                                normalized_chunking=_NORMALIZED_CHUNKING, seed=_GEAR_SEED)
            # pieces are collected until this many new bytes arrive, then scanned
            self._scan_at = max(spec.max_chunk_size // 4, 1)
        else:
            self._scan_at = spec.max_chunk_size
        self._carry = b""  # bytes already scanned, not yet part of a final chunk
        self._pending: list[bytes] = []  # pieces not yet scanned
        self._pending_len = 0
        self._offset = 0  # object offset of the first byte of ``_carry``
        self._index = 0
        self._finished = False

    @property
    def offset(self) -> int:
        """Bytes of the object already returned in chunks."""
        return self._offset

    @property
    def count(self) -> int:
        """Number of chunks returned so far."""
        return self._index

    @property
    def buffered(self) -> int:
        """Bytes held, fed but not yet returned in a chunk."""
        return len(self._carry) + self._pending_len

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[ChunkRecord, bytes]]:
        """Add the next piece of the object.

        Args:
            data: the next bytes (copied; the caller may reuse its buffer).

        Returns:
            The chunks completed so far, in order, each with its bytes; often empty.

        Raises:
            ValueError: the chunker is already finished.
        """
        if self._finished:
            raise ValueError("Chunker.feed() after finish()")
        if not data:
            return []
        self._pending.append(bytes(data))
        self._pending_len += len(data)
        if self._cdc is None:
            if len(self._carry) + self._pending_len < self._scan_at:
                return []
        elif self._pending_len < self._scan_at:
            return []
        return self._cut(final=False)

    def finish(self) -> list[tuple[ChunkRecord, bytes]]:
        """Mark the end of the object and return the remaining chunks.

        The last chunk may be shorter than ``size`` / ``min_size``. An empty object has no
        chunks.

        Raises:
            ValueError: already finished.
        """
        if self._finished:
            raise ValueError("Chunker.finish() called twice")
        self._finished = True
        return self._cut(final=True)

    def _take(self) -> bytes:
        if not self._carry and len(self._pending) == 1:
            buf = self._pending[0]  # the common case of big pieces: no copy
        else:
            buf = b"".join([self._carry, *self._pending])
        self._pending.clear()
        self._pending_len = 0
        return buf

    def _cut(self, *, final: bool) -> list[_Chunk]:
        buf = self._take()
        if self._cdc is None:
            size = self._scan_at
            bounds = [(start, min(size, len(buf) - start)) for start in range(0, len(buf), size)]
        else:
            bounds = [(c.offset, c.length) for c in self._cdc.cut_buf(buf)]
        if not final and bounds and bounds[-1][1] < self.spec.max_chunk_size:
            start, _ = bounds.pop()  # ran out of data: not a real cut, scan it again later
            self._carry = buf[start:]
        else:
            self._carry = b""
        out: list[_Chunk] = []
        for start, length in bounds:
            piece = buf[start : start + length]
            record = ChunkRecord(index=self._index, offset=self._offset, length=length,
                                 sha256=hashlib.sha256(piece).hexdigest())
            out.append((record, piece))
            self._index += 1
            self._offset += length
        return out


def chunk_file(path: str | os.PathLike[str], spec: ChunkSpec) -> Iterator[tuple[ChunkRecord, bytes]]:
    """Chunk a file, reading it in :data:`READ_SIZE` (1 MiB) pieces.

    Args:
        path: the file to read.
        spec: how to cut.

    Returns:
        An iterator over the chunks in order; the file is open while it is being consumed
        (close the generator to stop early).

    Raises:
        OSError: the file cannot be opened or read.
    """
    chunker = Chunker(spec)
    with open(path, "rb") as f:
        while piece := f.read(READ_SIZE):
            yield from chunker.feed(piece)
    yield from chunker.finish()
