"""The machine the figures were taken on, and per-process facts read from /proc (pinning, RSS, CPU time).

Affinity is set with sched_setaffinity, the system call behind ``taskset``, on every thread of a process tree:
nginx and gunicorn fork their workers before the bench can prefix a command line, so pinning after start-up
is the only way to give both sides exactly the same cores.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

from service.procs import children_by_parent

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    children = children_by_parent()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        if Path(f"/proc/{current}").exists():
            found.append(current)
            todo.extend(children.get(current, []))
    return found


def pin(pid: int, cpus: set[int]) -> None:
    """Bind every thread of ``pid`` and of its descendants to ``cpus`` (``taskset -a -p``, for a whole tree)."""
    for proc in tree(pid):
        try:
            tids = [int(t.name) for t in Path(f"/proc/{proc}/task").iterdir()]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):  # the thread ended meanwhile
                os.sched_setaffinity(tid, cpus)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident set size of one process, in MiB (0 when it is gone); ``field="VmHWM"``: its peak so far."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time consumed so far by ``pids``, each with its children that have exited (a recycled
    gunicorn worker's time moves to its master when it is reaped: a tree measured before and after a run keeps
    counting it, where the processes' own times alone would drop it and could even go backwards)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(field) for field in fields[11:15])  # utime, stime, cutime, cstime (fields 14-17 of stat)
    return total / CLOCK_TICKS


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _pillow_simd_avx2() -> bool | None:
    """Whether phizer's PIL was compiled with AVX2 code paths (its _imaging module uses ymm registers)."""
    import PIL

    libs = list(Path(PIL.__file__).parent.glob("_imaging.cpython-*.so"))
    if not libs:
        return None
    try:
        dump = subprocess.run(["objdump", "-d", str(libs[0])], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return "ymm" in dump


def describe_machine() -> dict[str, object]:
    """CPU model, cores, AVX2 (CPU and pillow-simd build), memory, OS: the facts every figure depends on."""
    import PIL

    flags = Path("/proc/cpuinfo").read_text()
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cpu_avx2": " avx2" in flags,
        "pillow_simd_version": PIL.__version__,
        "pillow_simd_avx2": _pillow_simd_avx2(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],  # others' work skews every figure
    }
