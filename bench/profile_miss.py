"""Profile misses end to end: py-spy samples the one gunicorn worker of a real stack under a B5-like load.

``python -m bench.profile_miss [--seconds 30] [--memcached]``: one instance (every miss lands on the sampled worker),
the file origin over the bench's pool (memcached off, as in B5; ``--memcached`` stores each original there, as an
S3 origin does), sequential misses on one connection (each a new original: B5's two cases in turn).
Prints the top frames by own time (the leaf of each sample) and by cumulative time (anywhere on the stack); the raw
collapsed stacks go to state/bench/profile/. The service is not changed for this.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from bench.corpus import Originals
from bench.scenarios import B5_CASES
from service.config import REPO_ROOT
from service.launcher import Stack
from service.procs import children_by_parent, free_port

STATE = REPO_ROOT / "state" / "bench"
PY_SPY = Path(sys.executable).with_name("py-spy")


def _load(url: str, originals: Originals, seconds: float) -> dict[str, list[float]]:
    """Sequential misses for ``seconds``, cycling through B5's cases over new originals; wall times per case."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    times: dict[str, list[float]] = {f"{name} at {preset}": [] for name, preset in B5_CASES}
    i, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        name, preset = B5_CASES[i % len(B5_CASES)]
        # New content every time (a tagged copy): no per-instance intermediate or memcached entry can answer.
        key = originals.fresh_key(f"profile/{time.time_ns()}/{name}", name)
        start = time.perf_counter()
        conn.request("GET", f"/{preset}/{key}")
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200 or resp.getheader("X-Cache-Status") != "MISS":
            raise RuntimeError(f"{key}: {resp.status} {resp.getheader('X-Cache-Status')}")
        times[f"{name} at {preset}"].append(time.perf_counter() - start)
        i += 1
    conn.close()
    return times


def _tops(raw: Path, count: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(samples, top frames by own samples, top frames by cumulative samples) from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        total += int(n)
        if frames:
            own[frames[-1]] += int(n)
        for frame in set(frames):
            cumulative[frame] += int(n)
    return total, own.most_common(count), cumulative.most_common(count)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_miss", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--memcached", action="store_true", help="keep originals in memcached (B4's S3 origin does)")
    args = parser.parse_args()
    out = STATE / "profile"
    out.mkdir(parents=True, exist_ok=True)
    originals = Originals(STATE / "originals", 4)
    env = {"PHIZER_ORIGINS": f"file://{originals.root}?memcached={'on' if args.memcached else 'off'}"}
    with Stack(STATE / "profile-stack", port=free_port(), instances=1, env=env) as stack:
        master = stack.instances[0].pid
        worker = children_by_parent()[master][0]
        _load(stack.url, originals, 3)  # warm-up: imports, connections, the S3-less origin path
        raw = out / "misses.txt"
        spy = subprocess.Popen([str(PY_SPY), "record", "-p", str(worker), "-r", str(args.rate), "-d",
                                str(int(args.seconds)), "--format", "raw", "-o", str(raw), "--nonblocking"])
        time.sleep(1)
        times = _load(stack.url, originals, args.seconds - 2)
        spy.wait()
    total, own, cumulative = _tops(raw, args.top)
    for case, walls in times.items():
        print(f"{case}: {len(walls)} misses, median {statistics.median(walls) * 1000:.1f} ms")
    print(f"{total} samples of worker pid {worker} ({args.rate}/s for {int(args.seconds)} s, idle excluded)")
    for title, rows in (("own", own), ("cumulative", cumulative)):
        print(f"\n| {title} samples | share | frame |\n|---|---|---|")
        for frame, n in rows:
            print(f"| {n} | {n / total * 100:.1f}% | `{frame}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
