"""What recording costs per byte, in process: ``replay.RecordingWriter`` over zstd levels.

Run ``python -m benchmarks.bench_recording [--quick] [--levels L,L,...] [--markdown]``.
This is the measurement behind the default of ``recording.zstd_level`` (see
benchmarks/README.md, "Choosing recording.zstd_level").

For each payload (``random``: incompressible; ``text``: JSON-lines logs, see
``benchmarks._payloads``) and each level, one writer records the payload as the gateway
records a ``put`` and then a ``get`` of it: ``add_to_gateway`` in 256 KiB pieces (the
gateway's ``read_size``), then ``add_to_client`` likewise, a ``flush(compressor)`` each
time 4 MiB are pending (the gateway flushes every 100 ms, or at ``max_pending_bytes`` =
8 MiB; at the 60-100 MB/s the recording gateway relays one session, 100 ms is 6-10 MB),
and ``close``. One compressor per level, made by ``replay.new_compressor(level=...)`` and
reused, as the gateway's worker threads do. Level ``none`` is the writer with a
pass-through compressor: its fixed cost (msgpack, the SHA-256 chain and the per-direction
digests, signatures), which no level can remove.

Per payload and level:

* ``mb_per_cpu_s``: input MB (both directions) per CPU second of this thread, i.e. the
  throughput of one core spent on nothing else;
* ``bytes_out_per_byte_in``: bytes of flush units written per byte recorded.

Prints one JSON object: ``{"benchmark": "recording", "object_bytes", "flush_bytes",
"results": [{"metric", "payload", "zstd_level", "unit", "rounds", "min", "median",
"max"}]}`` (``--markdown``: the README table instead). Rounds interleave the levels in a
rotated order. Single-threaded. Bounded: about 25 s, ``--quick`` about 6 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from benchmarks._payloads import PAYLOADS, payload
from l4proxy.config import LimitsConfig
from replay import RecordingWriter, new_compressor

MB = 1_000_000
READ_SIZE = LimitsConfig().read_size
FLUSH_BYTES = 4 << 20
DEFAULT_LEVELS = "-7,-5,-3,-1,1,3"
_HEADER = {"identity": {"provider": "dev", "subject": "bench", "email": None, "groups": ["bench"]},
           "target": "chunks", "client_address": "127.0.0.1", "gateway_id": "gw-bench"}


class _PassThrough:
    """A stand-in compressor (``compress`` only, which is all the writer calls): the
    writer's own cost without zstd."""

    @staticmethod
    def compress(data: bytes) -> bytes:
        return data


def _compressor(level: int | None) -> Any:
    return _PassThrough() if level is None else new_compressor(level=level)


def record_once(body: bytes, compressor: Any, key: Ed25519PrivateKey) -> tuple[float, int]:
    """Record ``body`` as a put then a get. Returns (CPU seconds of this thread, bytes out)."""
    writer = RecordingWriter(session_id="bench-session", header=_HEADER, signing_key=key,
                             clock=time.time)
    view = memoryview(body)
    out = 0
    cpu = time.thread_time()
    for add in (writer.add_to_gateway, writer.add_to_client):
        for start in range(0, len(view), READ_SIZE):
            add(view[start:start + READ_SIZE])
            if writer.pending_bytes >= FLUSH_BYTES:
                out += len(writer.flush(compressor))
    out += len(writer.close("client_closed", compressor))
    return time.thread_time() - cpu, out


def _level_label(level: int | None) -> str:
    return "none" if level is None else str(level)


def _summ(values: list[float], digits: int) -> dict[str, Any]:
    return {"rounds": [round(v, digits) for v in values], "min": round(min(values), digits),
            "median": round(statistics.median(values), digits), "max": round(max(values), digits)}


def run(size: int, rounds: int, levels: list[int | None]) -> list[dict[str, Any]]:
    key = Ed25519PrivateKey.generate()
    compressors = {level: _compressor(level) for level in levels}
    results: list[dict[str, Any]] = []
    for kind in PAYLOADS:
        body = payload(kind, size)
        speed: dict[int | None, list[float]] = {level: [] for level in levels}
        ratio: dict[int | None, list[float]] = {level: [] for level in levels}
        # warm up, not timed: every compressor allocates its context once (as the
        # gateway's long-lived ones have), and the heap reaches the shape it keeps; before
        # that a pass can spend half its time in page faults
        for level in levels:
            record_once(body[:2 * FLUSH_BYTES], compressors[level], key)
        for r in range(rounds):
            for level in levels[r % len(levels):] + levels[:r % len(levels)]:
                cpu, out = record_once(body, compressors[level], key)
                speed[level].append(2 * size / cpu / MB)
                ratio[level].append(out / (2 * size))
        for level in levels:
            results.append({"metric": "mb_per_cpu_s", "payload": kind, "zstd_level": level,
                            "unit": "MB/s", **_summ(speed[level], 1)})
            results.append({"metric": "bytes_out_per_byte_in", "payload": kind, "zstd_level": level,
                            "unit": "B/B", **_summ(ratio[level], 4)})
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    """The README table: one row per level, speed and output size per payload."""
    cell = {(r["metric"], r["payload"], r["zstd_level"]): r for r in results}
    levels = list(dict.fromkeys(r["zstd_level"] for r in results))
    head = ["zstd_level"]
    for kind in PAYLOADS:
        head += [f"{kind}: MB/s per core", f"{kind}: CPU s/GB", f"{kind}: bytes out/in"]
    lines = ["| " + " | ".join([*head, "text: ratio"]) + " |",
             "|---|" + "---:|" * len(head)]
    for level in levels:
        row = [_level_label(level)]
        for kind in PAYLOADS:
            speed = cell[("mb_per_cpu_s", kind, level)]["median"]
            row += [str(speed), f"{1000 / speed:.2f}",
                    str(cell[("bytes_out_per_byte_in", kind, level)]["median"])]
        text = cell[("bytes_out_per_byte_in", "text", level)]["median"]
        row.append(f"{1 / text:.2f}x" if text else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _levels(text: str) -> list[int | None]:
    out: list[int | None] = [None]
    for part in text.split(","):
        level = int(part)
        if not -7 <= level <= 19:
            raise argparse.ArgumentTypeError(f"zstd level {level} is outside -7..19 (what the "
                                             "configuration accepts)")
        out.append(level)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 MiB, 2 rounds (about 6 s)")
    parser.add_argument("--levels", type=_levels, default=_levels(DEFAULT_LEVELS),
                        help=f"comma-separated zstd levels (default {DEFAULT_LEVELS}); "
                             "'none' is always measured")
    parser.add_argument("--markdown", action="store_true", help="print the README table, not JSON")
    args = parser.parse_args(argv)
    size, rounds = (16 << 20, 2) if args.quick else (64 << 20, 3)
    started = time.monotonic()
    results = run(size, rounds, args.levels)
    if args.markdown:
        print(markdown(results), end="")
    else:
        print(json.dumps({"benchmark": "recording", "object_bytes": size, "flush_bytes": FLUSH_BYTES,
                          "read_bytes": READ_SIZE, "rounds": rounds, "results": results,
                          "elapsed_s": round(time.monotonic() - started, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
