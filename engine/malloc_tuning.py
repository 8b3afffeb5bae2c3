"""glibc malloc settings for the long-running pipeline process of ``serve``.

The pipeline allocates a few MB of variable-size buffers per Kafka batch (record values,
Arrow columns, numpy arrays, LMDB pages) next to long-lived small objects. With glibc's
defaults its anonymous memory drifted upward for as long as it ran (a 30-minute
``bench/soak.py`` at 3,000 events/s: +96 MB/h) while the live bytes stayed flat: the
heap's *free* bytes grew. Two glibc behaviours cause it:

* the dynamic mmap threshold: after the first multi-MB buffer is freed, glibc raises the
  threshold to that size, so later big buffers come from the heap arenas, where they leave
  holes among small long-lived objects that are never given back;
* one arena per thread (up to 8 per core): Beam's, librdkafka's and LMDB's threads each
  keep their own free lists.

``tune_malloc`` pins the mmap threshold (big buffers are mmap'd and returned on free),
caps the arenas, and, with ``trim_every_s``, runs ``malloc_trim(0)`` from a daemon thread
so free pages inside the heap go back to the kernel. It is a no-op off glibc, and
``HEADRACE_MALLOC_TUNING=0`` in the environment turns it off (to compare, or if a
different allocator is preloaded). The trainer does not call it: torch allocates and
frees the same large tensors every step, and mmap'ing each of them would cost page faults
per step; its memory was flat in the same soak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

__all__ = ["tune_malloc", "MMAP_THRESHOLD", "ARENA_MAX", "TRIM_EVERY_S"]

log = logging.getLogger(__name__)

#: mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: glibc's own initial threshold; setting it explicitly stops the dynamic raise.
MMAP_THRESHOLD = 128 << 10
ARENA_MAX = 2
TRIM_EVERY_S = 10.0


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    # musl and other libcs have no mallopt/malloc_trim
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune_malloc(*, mmap_threshold: int = MMAP_THRESHOLD, arena_max: int = ARENA_MAX,
                trim_every_s: float = TRIM_EVERY_S) -> threading.Thread | None:
    """Apply the settings above to this process (call it first thing in the process, before
    threads start). Returns the trimming thread (a daemon), or None when nothing trims (not
    glibc, turned off, or ``trim_every_s <= 0``)."""
    if os.environ.get("HEADRACE_MALLOC_TUNING", "1").strip().lower() in ("0", "off", "false", "no"):
        log.debug("malloc tuning off (HEADRACE_MALLOC_TUNING)")
        return None
    libc = _libc()
    if libc is None:
        return None
    applied = [libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1,
               libc.mallopt(_M_ARENA_MAX, int(arena_max)) == 1,
               # the trim threshold is tied to the mmap one unless set: keep glibc's 128 KiB
               libc.mallopt(_M_TRIM_THRESHOLD, int(mmap_threshold)) == 1]
    if not all(applied):
        log.warning("glibc mallopt refused some settings (%s); memory may drift upward", applied)
    if trim_every_s <= 0:
        return None
    stop = threading.Event()

    def trim() -> None:
        while not stop.wait(trim_every_s):
            libc.malloc_trim(0)

    thread = threading.Thread(target=trim, name="headrace-malloc-trim", daemon=True)
    thread.start()
    return thread
