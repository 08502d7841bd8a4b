"""Throughput of ``l4proxy.chunking.Chunker``, fixed-size and content-defined.

Run ``python -m benchmarks.bench_chunking [--quick]``. Each round chunks a 64 MiB
(``--quick``: 8 MiB) pseudo-random buffer, fed in 1 MiB pieces as ``chunk_file`` reads it,
including the SHA-256 of every chunk, with the default specs (``fixed``: 1 MiB chunks;
``cdc``: 16 KiB / 64 KiB / 256 KiB). For scale, it also measures the two parts alone:
``sha256`` over the same buffer in 1 MiB pieces, and ``pyfastcdc_cut`` (FastCDC boundaries
over the whole buffer, no hashing, no copies).

Prints one JSON object: ``{"benchmark": "chunking", "results": [{"metric", "unit",
"rounds", "min", "median", "max"}]}``. MB is 10**6 bytes. Bounded: < 30 s, ``--quick`` < 5 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from pyfastcdc import FastCDC

from l4proxy.chunking import READ_SIZE, Chunker, ChunkSpec, chunk_spec

MB = 1_000_000


def through_chunker(spec: ChunkSpec) -> Callable[[bytes], int]:
    def run(data: bytes) -> int:
        chunker = Chunker(spec)
        view = memoryview(data)
        count = 0
        for offset in range(0, len(data), READ_SIZE):
            count += len(chunker.feed(view[offset : offset + READ_SIZE]))
        return count + len(chunker.finish())

    return run


def sha256_only(data: bytes) -> int:
    view = memoryview(data)
    for offset in range(0, len(data), READ_SIZE):
        hashlib.sha256(view[offset : offset + READ_SIZE]).digest()
    return 0


def cut_only(spec: ChunkSpec) -> Callable[[bytes], int]:
    assert spec.avg_size is not None
    cdc = FastCDC(spec.avg_size, min_size=spec.min_size, max_size=spec.max_size)
    return lambda data: sum(1 for _ in cdc.cut_buf(data))


def rate(fn: Callable[[bytes], int], data: bytes) -> float:
    start = time.perf_counter()
    fn(data)
    return len(data) / MB / (time.perf_counter() - start)


def summary(metric: str, unit: str, values: list[float]) -> dict[str, Any]:
    return {"metric": metric, "unit": unit, "rounds": len(values), "min": round(min(values), 1),
            "median": round(statistics.median(values), 1), "max": round(max(values), 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, 8 MiB (< 5 s)")
    args = parser.parse_args(argv)
    rounds, size = (3, 8 << 20) if args.quick else (5, 64 << 20)

    data = random.Random(0).randbytes(size)
    cases: dict[str, Callable[[bytes], int]] = {
        "fixed_chunking": through_chunker(chunk_spec("fixed")),
        "cdc_chunking": through_chunker(chunk_spec("cdc")),
        "sha256": sha256_only,
        "pyfastcdc_cut": cut_only(chunk_spec("cdc")),
    }
    for fn in cases.values():
        fn(data[: 4 << 20])  # warm up
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            rates[name].append(rate(fn, data))
    print(json.dumps({"benchmark": "chunking", "results": [
        summary(name, "MB/s", values) for name, values in rates.items()
    ]}))


if __name__ == "__main__":
    main()
