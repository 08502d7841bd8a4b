"""Memory management for ``l4proxy serve``: glibc's allocator and Python's cycle collector.

The allocator
-------------

Why: the data path allocates and frees buffers of up to ``limits.read_size`` (1 MiB)
per read -- the ciphertext read, the plaintext, the frame re-encoded upstream -- and the
recorder a few MiB per flush unit. glibc serves allocations above its mmap threshold
(128 KiB at start, raised dynamically up to 32 MiB only after such a block is freed) with a
fresh ``mmap`` and returns the heap's free top to the kernel above its trim threshold, so
in practice nearly every relayed 4 KiB page was a fresh page: a page fault and a kernel
zero-fill per page. Measured on the benchmark machine (``benchmarks/README.md``): about
180,000 minor faults per GB relayed, and a quarter of the gateway's CPU per byte.

What: a fixed mmap threshold of 32 MiB (glibc's own dynamic ceiling on 64-bit) keeps
those buffers in the heap, where freed memory is reused; a trim threshold of 64 MiB
keeps up to that much freed memory at the heap's top for the next burst instead of
unmapping and faulting it in again. The price is resident memory that is not returned to
the kernel after a burst, bounded by the trim threshold per arena (plus fragmentation,
which glibc has either way); idle sessions cost the same.

An operator who sets any of glibc's own knobs (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, or ``glibc.malloc`` tunables in
``GLIBC_TUNABLES``) keeps exactly those: nothing is changed then. Other C libraries
(musl) and other systems are left alone.

The cycle collector
-------------------
:func:`tune_gc` moves everything that exists once the gateway has started (modules, the
configuration, keys: tens of thousands of objects that never become garbage) into the
collector's permanent generation (``gc.freeze``), and lets the youngest generation grow to
``GC_THRESHOLD`` container objects before it is collected (Python's default is 700: every
few relayed reads, since each creates frames, events and trio bookkeeping). Measured: 2-6 %
of the relay's CPU per byte. Cyclic garbage waits a little longer to be freed (at most
that many young objects); nothing else changes.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import sys
from collections.abc import Mapping

__all__ = ["GC_THRESHOLD", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_allocator", "tune_gc"]

#: allocations at least this large get their own mapping (glibc's dynamic ceiling)
MMAP_THRESHOLD = 32 << 20
#: freed memory at the heap's top kept for reuse, up to this much
TRIM_THRESHOLD = 64 << 20

#: young container objects allocated before the collector runs (Python's default: 700)
GC_THRESHOLD = 50_000

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_ENV_KNOBS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_allocator(environ: Mapping[str, str] | None = None) -> str:
    """Set glibc's mmap and trim thresholds for this process (see the module doc).

    Never raises: the gateway runs the same, only slower, without it.

    Returns:
        One line for the log saying what was done, or why nothing was.
    """
    env = os.environ if environ is None else environ
    if sys.platform != "linux":
        return f"allocator left at its defaults ({sys.platform})"
    knobs = [k for k in _ENV_KNOBS if k in env]
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        knobs.append("GLIBC_TUNABLES")
    if knobs:
        return f"allocator left to the environment ({', '.join(knobs)})"
    libc, _version = platform.libc_ver()
    if libc != "glibc":
        return f"allocator left at its defaults (C library: {libc or 'unknown'})"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "allocator left at its defaults (mallopt not found)"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "allocator left at its defaults (mallopt refused)"
    return (f"allocator: glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
            f"trim threshold {TRIM_THRESHOLD >> 20} MiB")


def tune_gc() -> str:
    """Freeze what exists now and raise the young generation's threshold (see the module
    doc); call it once, when start-up is done.

    Returns:
        One line for the log.
    """
    gc.collect()  # what start-up left as garbage is not frozen
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, middle, old)
    return f"collector: {gc.get_freeze_count()} start-up objects frozen, young generation {GC_THRESHOLD}"
