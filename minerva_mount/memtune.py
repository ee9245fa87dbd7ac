"""Keep freed memory in the process, so block buffers are reused instead of faulted in again.

A cold read allocates a 1 MiB block per MiB read and frees it once read. With glibc's defaults
each worker thread gets its own malloc arena, and freed megabytes go back to the kernel
(trimmed, or whole per-thread heaps unmapped), so every new block is faulted in page by page:
~0.15 s of CPU per GiB on a 2-core VM. One arena, a higher trim threshold and blocks below
the mmap threshold make freed blocks come straight back. Memory stays bounded: what is kept
is at most the peak the daemon used plus the trim threshold.
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger("minerva.memtune")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
TRIM_THRESHOLD = 64 << 20
MMAP_THRESHOLD = 4 << 20  # above the 1 MiB blocks (glibc's default is 128 KiB, adapting)


def keep_freed_memory() -> bool:
    """Tune glibc's malloc (before worker threads start); False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    if not done:
        log.debug("mallopt refused a setting; malloc keeps its defaults")
    return done
