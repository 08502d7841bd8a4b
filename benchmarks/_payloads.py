"""The two payloads recording is measured with: incompressible and text-like.

Random bytes are the worst case for the recorder (zstd spends its time and saves
nothing); real sessions often carry logs, JSON and CSV, which is where the zstd level
matters. The text-like payload is JSON lines of request logs: fixed keys and small
vocabularies (what zstd removes) mixed with random ids, sizes, addresses and timestamps
(what it cannot), about 3.3x compressible at zstd level -1 and 4.9x at level 1.
Deterministic for a given seed, so every run and every level sees the same bytes.
"""

from __future__ import annotations

import os
import random

__all__ = ["PAYLOADS", "payload", "random_bytes", "text_like"]

PAYLOADS = ("random", "text")

_OPS = ("put", "get", "get", "get", "list", "delete", "stat", "query")
_STATUS = (200, 200, 200, 200, 200, 200, 404, 403)
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR", "INFO", "INFO")
_MSGS = ("request completed", "cache miss, fetched from store", "object stored",
         "permission denied for bucket", "conflict: object exists", "chunked upload finished",
         "slow request", "request completed")
_RAND_PER_LINE = 24
_LINES_PER_BLOCK = 4096


def random_bytes(size: int) -> bytes:
    """Incompressible bytes (the bulk rounds' object)."""
    return os.urandom(size)


def text_like(size: int, seed: int = 6) -> bytes:
    """``size`` bytes of JSON-lines request logs (about 250 bytes a line; the last line is
    cut at ``size``). All randomness comes from one seeded block per 4096 lines, which
    keeps generation at about 30 MB/s."""
    rng = random.Random(seed)
    out = bytearray()
    t = 1_795_000_000_000_000  # µs
    n = 0
    while len(out) < size:
        block = rng.randbytes(_RAND_PER_LINE * _LINES_PER_BLOCK)
        lines = []
        for i in range(0, len(block), _RAND_PER_LINE):
            r = block[i:i + _RAND_PER_LINE]
            n += 1
            t += r[0] * 37 + r[1]
            obj = int.from_bytes(r[15:18])
            lines.append(
                f'{{"ts":{t // 1_000_000}.{t % 1_000_000:06d},"level":"{_LEVELS[r[2] & 7]}",'
                f'"req":"{r[3:11].hex()}","user":"user{int.from_bytes(r[11:13]) % 500:04d}",'
                f'"op":"{_OPS[r[13] & 7]}","bucket":"bench-{r[14] % 40:02d}",'
                f'"key":"obj/{obj % 100000:06d}/part-{r[18] & 15}","bytes":{obj * (r[19] | 1)},'
                f'"ms":{r[19] * 0.173 + r[1] * 0.001:.3f},"status":{_STATUS[r[13] >> 5]},'
                f'"seq":{n},"client":"10.{r[20]}.{r[21]}.{r[22]}:{40000 + r[23] * 97}",'
                f'"msg":"{_MSGS[r[2] >> 5]}"}}\n')
        out += "".join(lines).encode()
    del out[size:]
    return bytes(out)


def payload(kind: str, size: int) -> bytes:
    """One of :data:`PAYLOADS` of ``size`` bytes."""
    if kind == "random":
        return random_bytes(size)
    if kind == "text":
        return text_like(size)
    raise ValueError(f"unknown payload {kind!r}; expected one of {PAYLOADS}")
