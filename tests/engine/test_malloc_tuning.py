"""``engine.malloc_tuning`` on the real glibc of this machine, each case in a fresh process
(mallopt settings last for the life of a process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")

PRELUDE = textwrap.dedent("""
    import ctypes, time
    from engine.malloc_tuning import tune_malloc, _libc

    class MI2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        print("SKIP no glibc >= 2.33"); raise SystemExit(0)
    libc.mallinfo2.restype = MI2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def rss_anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
""")


def run(body: str, tuning: str = "1") -> str:
    out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                         env={"HEADRACE_MALLOC_TUNING": tuning, "PATH": "/usr/bin:/bin"}, cwd=_root(), timeout=60)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    return out.stdout.strip()


def _root() -> str:
    import os

    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# glibc raises its mmap threshold to the size of a freed mmap'd chunk: after one 8 MiB buffer
# is freed, a 2 MiB buffer comes from the heap (where it fragments) unless the threshold is pinned.
BIG_AFTER_BIGGER = """
    tune_malloc(trim_every_s=0)
    libc.free(libc.malloc(8 << 20))
    before = libc.mallinfo2().hblks
    p = libc.malloc(2 << 20)
    print(libc.mallinfo2().hblks - before)
"""


def test_pinned_mmap_threshold_keeps_big_buffers_out_of_the_heap():
    assert run(BIG_AFTER_BIGGER, tuning="1") == "1"   # mmap'd: returned to the kernel on free
    assert run(BIG_AFTER_BIGGER, tuning="0") == "0"   # glibc's default: from the heap


# 64 MiB in 64 KiB heap chunks, touched, all freed but the last (so the heap's top is pinned
# and glibc's automatic trim of the top cannot give it back): only malloc_trim returns it.
HOLES = """
    t = tune_malloc(trim_every_s=0.2)
    ptrs = [libc.malloc(64 << 10) for _ in range(1024)]
    for p in ptrs:
        ctypes.memset(p, 1, 64 << 10)
    full = rss_anon_kb()
    for p in ptrs[:-1]:
        libc.free(p)
    time.sleep(1.0)
    print(t is not None, (full - rss_anon_kb()) // 1024)
"""


def test_the_trim_thread_returns_free_heap_pages():
    trimmed, freed_mb = run(HOLES, tuning="1").split()
    assert trimmed == "True" and int(freed_mb) >= 48, freed_mb
    kept, freed_mb = run(HOLES, tuning="0").split()
    assert kept == "False" and int(freed_mb) < 16, freed_mb  # off: the pages stay with the process
