"""A worker's memory: glibc malloc tuned for threaded renders, and given back to the system once the worker idles.

Renders allocate and free big buffers all the time: a decoded original (a 20 MP JPEG decoded whole for a 1600 px
rendition is 80 MB, at 1/2 scale 20 MB), a progressive JPEG's coefficients (44 MB for 16 MP, even when only its DC
scans are decoded), the resampler's intermediate, the output. Where such a buffer comes from decides a miss's cost:

- a fresh mapping is faulted in page by page, 4 KiB at a time, zeroed by the kernel and charged to the cgroup: in
  make bench's page mix of misses, 12% of all CPU was page faults with glibc's mmap threshold at 8 MiB
  (``perf record -a``);
- a heap chunk freed by an earlier render is already resident: no fault at all.

glibc hands out fresh mappings in three ways, and each is closed here:

- an allocation above the mmap threshold gets a mapping of its own, unmapped when freed; the threshold cannot go
  above 32 MiB, so a 16 MP progressive JPEG's coefficients were mapped afresh on every decode. ``mmap`` is off
  (``M_MMAP_MAX`` 0): every allocation comes from the heap;
- a thread other than the main one gets an arena of its own, made of 64 MiB heaps, and glibc unmaps a heap as soon
  as it is entirely free: render threads created and dropped a heap every two or three renders (seen with
  ``strace``). One arena (``ARENAS``): the render threads share the main heap, which has no such limit;
- the main heap gives back what is free at its top beyond the trim threshold after each free. ``TRIM_THRESHOLD``
  keeps up to 128 MiB there for the next renders.

Measured on 40 `small` thumbnails of distinct corpus originals through 2 instances (6 clients, six pages per run,
two runs each): 81,000-99,000 minor faults and 1.43-1.47 s of instance CPU per page (medians) with 32 MiB thresholds
and two arenas, the previous tuning; 9,800-10,300 faults and 1.32-1.36 s with this one, and the page 9% sooner. The
same renders in one plain process take 1.23-1.26 s (with a single thread, glibc's defaults fault 6,000-15,000 times
per page).

The price is memory that stays resident after a burst: the freed chunks are the next render's, and glibc gives
back only what sits at the heap's top beyond the threshold. ``IdleTrim`` gives the rest back (``malloc_trim(0)``,
which also releases free pages inside the heap) once the worker has gone quiet after work, so an instance that
served a burst returns to its idle size within seconds, while a busy one keeps reusing its buffers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

from gevent import monkey

log = logging.getLogger(__name__)

TRIM_THRESHOLD = 128 * 1024 * 1024  # free memory the heap keeps at its top for the next allocations
ARENAS = 1  # every thread allocates from the main heap (a thread's own arena unmaps its heaps as they empty)
MMAPS = 0  # no allocation gets a mapping of its own: all come from the heap
IDLE_CHECK_SECONDS = 1.0  # how often the idle trim looks at the worker's CPU time
IDLE_CPU_SHARE = 0.02  # below this share of one core over a check, the worker is idle

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def rss_bytes() -> int:
    """Resident size of this process: the second field of /proc/self/statm, in pages."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


def tune_malloc() -> None:
    """Set glibc's arena count, mappings and trim threshold for this process (see the module's docstring).

    Called before the worker starts any thread: a thread that allocated earlier would keep an arena of its own."""
    libc = _libc()
    libc.mallopt(_M_ARENA_MAX, ARENAS)
    libc.mallopt(_M_MMAP_MAX, MMAPS)
    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def cpu_seconds() -> float:
    """CPU time of the whole process, every thread's, user and system."""
    times = os.times()
    return times.user + times.system


class IdleTrim:
    """Gives free heap memory back to the system once, each time the process goes from work to idle.

    ``check`` is called every ``IDLE_CHECK_SECONDS`` (``start`` runs it on a native thread of its own): a check
    that saw the process use more than ``IDLE_CPU_SHARE`` of a core since the last one marks it busy; the first
    quiet check after that trims. A worker that stays busy is never trimmed (its free chunks are its next
    renders'), and an idle one is trimmed once, not every second.
    """

    def __init__(
        self,
        interval: float = IDLE_CHECK_SECONDS,
        idle_share: float = IDLE_CPU_SHARE,
        trim: Callable[[int], object] | None = None,
    ) -> None:
        self.interval = interval
        self.idle_share = idle_share
        self._busy = False
        self._last = cpu_seconds()
        # glibc's malloc_trim by default; ctypes releases the GIL for the call: the loop is not held meanwhile.
        self._trim = trim or _libc().malloc_trim

    def check(self) -> bool:
        """Look at the CPU used since the last check; trim when the process just went quiet. True if it trimmed."""
        now = cpu_seconds()
        used, self._last = now - self._last, now
        if used > self.idle_share * self.interval:
            self._busy = True
            return False
        if not self._busy:
            return False
        self._busy = False
        before = rss_bytes() if log.isEnabledFor(logging.DEBUG) else 0
        self._trim(0)
        if before:
            log.debug("idle: gave back %d MB of free heap", (before - rss_bytes()) // 2**20)
        return True

    def start(self) -> None:
        """Check forever on a native daemon thread (a greenlet would not run while renders hold the loop)."""
        sleep = monkey.get_original("time", "sleep")
        start_thread = monkey.get_original("_thread", "start_new_thread")

        def run() -> None:
            while True:
                sleep(self.interval)
                self.check()

        start_thread(run, ())
