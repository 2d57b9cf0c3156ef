"""Run wrk (Debian's package) with bench/walk.lua and read back its one-line JSON summary."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

WALK_LUA = Path(__file__).with_name("walk.lua")


@dataclasses.dataclass(frozen=True)
class WrkResult:
    """One wrk run, reduced to what the report shows."""

    requests: int
    ok_requests: int  # answered 2xx/3xx
    seconds: float
    rps: float
    ok_rps: float  # successful (2xx/3xx) answers per second: a fast 503 must not count as work done
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # socket errors, timeouts and non-2xx/3xx answers
    exhausted: bool  # a thread ran out of distinct URLs before the time was up
    mean_body_bytes: float  # mean response body size (URL-list runs only; 0 for a single URL)

    def as_dict(self) -> dict[str, float | int | bool]:
        return dataclasses.asdict(self)


def run_wrk(
    base_url: str,
    paths: Sequence[str] | None = None,
    *,
    duration: float,
    connections: int,
    threads: int = 2,
    cpus: set[int] | None = None,
    accept: str | None = None,
    timeout: float = 30.0,
    cycle: bool = False,
) -> WrkResult:
    """Load ``base_url`` for ``duration`` s: its own path when ``paths`` is None, else each of ``paths`` once, or
    round and round with ``cycle`` (cache hits)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (make bench installs the Debian package)")
    threads = max(1, min(threads, connections))
    env = {**os.environ, "BENCH_ACCEPT": accept or "", "BENCH_CYCLE": "1" if cycle else ""}
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="bench-urls-") as url_file:
        if paths is not None:
            url_file.write("\n".join(paths) + "\n")
            url_file.flush()
            env["BENCH_URLS"] = url_file.name
        argv = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s", "--timeout", f"{timeout:g}s"]
        argv += ["-s", str(WALK_LUA), base_url, "--", str(threads)]
        proc = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=duration + timeout + 30,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = raw["duration_us"] / 1e6
    return WrkResult(
        requests=raw["requests"],
        ok_requests=raw["requests"] - raw["status_errors"],
        seconds=round(seconds, 3),
        rps=round(raw["requests"] / seconds, 1) if seconds else 0.0,
        ok_rps=round((raw["requests"] - raw["status_errors"]) / seconds, 1) if seconds else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        errors=sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")),
        exhausted=bool(raw["threads_exhausted"]),
        mean_body_bytes=round(raw["body_bytes"] / raw["requests"], 1) if raw["requests"] else 0.0,
    )
