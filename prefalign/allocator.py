"""glibc's malloc set up for tensor work: memory a step frees is reused by the next step, not faulted in again.

PyTorch's CPU tensors come straight from ``malloc``. glibc serves every block above its mmap threshold
(128 KiB at start, raised adaptively up to 32 MiB) with a fresh ``mmap`` and returns it with ``munmap`` on
free, and trims the top of the heap whenever more than twice that is free. A training step allocates and
frees gigabytes of activations and gradients, so every step the kernel zero-fills those pages again: a
135M-parameter PPO run on 2 cores took ~3.5 M minor page faults and ~20 s of system time in 4 iterations
(BENCHMARKS.md, "Page faults"). With the threshold fixed at its maximum (32 MiB) and trimming off, freed
blocks stay in the heap and the next step reuses them: about a third fewer faults and a third less system time.

The peak RSS measured the same (PPO, fp32: 7.22 GB tuned against 7.22-7.24 GB); what changes is that the
process keeps that peak resident between steps instead of handing it back and faulting it in again. Blocks over 32 MiB
(logits, the embedding's gradient) are still mapped per use: glibc allows no larger threshold.

It is a process-wide setting, so it is applied once, by a run (`prefalign.trainers.run.Run`) and by the CLI,
never by importing prefalign; it is skipped when the process is not on glibc, when a ``MALLOC_*``
variable or ``GLIBC_TUNABLES`` already tunes glibc (the user's choice wins), when ``LD_PRELOAD`` brings
another malloc (jemalloc, tcmalloc, mimalloc), or when ``PREFALIGN_MALLOC`` is anything but ``tuned``
(``PREFALIGN_MALLOC=default``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""``mallopt`` parameter numbers (glibc's malloc.h)."""

MMAP_THRESHOLD = 32 * 1024 * 1024
"""Blocks at least this large are mapped per allocation: glibc's maximum (``DEFAULT_MMAP_THRESHOLD_MAX``
on 64-bit), so every smaller tensor comes from the reusable heap."""

TRIM_NEVER = -1
"""``M_TRIM_THRESHOLD`` of -1: glibc never returns the heap's free top to the kernel (the next step reuses it)."""

_state: str | None = None  # what `tune_malloc` did in this process: "tuned" or why not


def tune_malloc() -> str:
    """Set glibc's mmap and trim thresholds once per process; returns ``"tuned"`` or why it was left as is
    (``run.json`` records it as ``malloc``)."""
    global _state
    if _state is None:
        _state = _tune()
    return _state


def _tune() -> str:
    if (choice := os.environ.get("PREFALIGN_MALLOC", "tuned")) != "tuned":
        return f"default (PREFALIGN_MALLOC={choice})"
    libs = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    if preload := [lib for lib in libs if "malloc" in os.path.basename(lib)]:
        return f"default (LD_PRELOAD={' '.join(preload)})"  # jemalloc, tcmalloc, mimalloc: glibc's malloc unused
    user = sorted(k for k in os.environ if k.startswith("MALLOC_"))  # MALLOC_ARENA_MAX, MALLOC_TOP_PAD_, ...
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return f"default ({', '.join(user)} set)"
    if not sys.platform.startswith("linux"):
        return f"default (not glibc: {sys.platform})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, version = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt / gnu_get_libc_version
        return "default (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    version.restype = ctypes.c_char_p
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_NEVER) == 1):
        return f"default (glibc {version().decode()} refused mallopt)"
    return "tuned"
