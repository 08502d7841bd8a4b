"""The allocator tuning of ``l4proxy serve`` (l4proxy._alloc).

Each check runs in a child process: mallopt changes the whole process, and the effect is
measured as page faults (a count, not a time): buffers of the relay's read size that are
freed and allocated again must reuse memory instead of faulting in fresh pages.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from l4proxy._alloc import tune_allocator

GLIBC_LINUX = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

_CHILD = r"""
import resource, sys
from l4proxy._alloc import tune_allocator
if sys.argv[1] == "tune":
    print(tune_allocator(), file=sys.stderr)
size = 256 << 10  # limits.read_size
held = [bytearray(size)]  # glibc raises its dynamic threshold after the first free
held.clear()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    # what one relayed read holds at once: ciphertext, plaintext, the re-encoded frame
    # (zero-filled: every page is touched)
    held = [bytearray(size), bytearray(size), bytearray(size + 12)]
    held.clear()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", _CHILD, mode], env={**clean, **env},
                          capture_output=True, text=True, timeout=60, check=True)
    return int(done.stdout.strip()), done.stderr.strip()


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc's mallopt is Linux/glibc only")
def test_tuned_process_reuses_large_buffers() -> None:
    tuned, said = _faults("tune")
    assert said.startswith("allocator: glibc mmap threshold 32 MiB")
    untuned, _ = _faults("as is")
    # 200 x 3 buffers of 64 pages each: untuned glibc faults in about half of them here
    assert untuned > 200 * 3 * 64 // 4
    assert tuned < untuned // 20


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc's mallopt is Linux/glibc only")
def test_an_operators_glibc_setting_wins() -> None:
    # a threshold below the buffer size: every buffer is mapped afresh, as configured
    faults, said = _faults("tune", MALLOC_MMAP_THRESHOLD_="65536")
    assert said == "allocator left to the environment (MALLOC_MMAP_THRESHOLD_)"
    assert faults >= 200 * 3 * 64 // 2


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "0"},
                                 {"MALLOC_TOP_PAD_": "0"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}])
def test_environment_knobs_are_left_alone(env: dict[str, str]) -> None:
    said = tune_allocator(env)
    if sys.platform == "linux":
        assert said == f"allocator left to the environment ({next(iter(env))})"
    else:
        assert "defaults" in said


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc's mallopt is Linux/glibc only")
def test_unrelated_tunables_do_not_count() -> None:
    _, said = _faults("tune", GLIBC_TUNABLES="glibc.pthread.rseq=0")
    assert said.startswith("allocator: glibc mmap threshold")


def test_tune_gc_freezes_start_up_and_raises_the_young_threshold() -> None:
    child = ("import gc, sys; from l4proxy._alloc import GC_THRESHOLD, tune_gc; "
             "said = tune_gc(); print(gc.get_freeze_count(), gc.get_threshold()[0] == GC_THRESHOLD, said)")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=60, check=True)
    frozen, raised, said = done.stdout.split(" ", 2)
    assert int(frozen) > 1000 and raised == "True"
    assert said.startswith(f"collector: {frozen} start-up objects frozen")
