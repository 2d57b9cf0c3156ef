"""``python -m bench.recycle``: what a worker recycle costs the requests in flight, hand-over vs gunicorn's own.

A worker is replaced after PHIZER_MAX_REQUESTS requests (service/gunicorn_conf.py). Both ways run here against the
real stack (service.launcher.Stack, two instances on a file origin), one after the other, with the same load:

- ``hand-over``: phizer's; the worker asks its master for a replacement and serves on until the new one has loaded.
- ``gunicorn``: gunicorn's own ``--max-requests`` (through GUNICORN_CMD_ARGS, phizer's count off): the new worker
  starts only after the old one has exited.

The load: ``--clients`` threads, each with its own kept-alive connection to nginx, ask for ``--requests`` distinct
misses (the ``thumb`` preset of copies of a 2.5 MP corpus photo made distinct by a few trailing bytes), with a
recycle limit small enough that each instance recycles a few times. Writes bench/results/recycle.md (``--out``) and
its figures beside it (.json).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.run import STATE
from service.launcher import Stack
from service.procs import free_port
from tests.support import CORPUS

RESULTS = Path(__file__).resolve().parent / "results" / "recycle.md"
PHOTO = "05_storm_2.5mp_baseline.jpg"
MODES = {
    "hand-over": {"PHIZER_MAX_REQUESTS": "{limit}", "PHIZER_MAX_REQUESTS_JITTER": "10"},
    "gunicorn": {"PHIZER_MAX_REQUESTS": "0", "GUNICORN_CMD_ARGS": "--max-requests {limit} --max-requests-jitter 10"},
}


def run(mode: str, state: Path, folder: Path, requests: int, clients: int, limit: int) -> dict[str, Any]:
    """One stack (its files under ``state``), one load; latencies of every request, and how many recycles its
    instances logged."""
    env = {"PHIZER_ORIGINS": f"file://{folder}?memcached=off"}
    env.update({name: value.format(limit=limit) for name, value in MODES[mode].items()})
    shutil.rmtree(state, ignore_errors=True)
    answers: list[tuple[int, float]] = []  # (status, seconds): list.append is atomic, a shared Counter's += is not
    with Stack(state, port=free_port(), instances=2, env=env) as stack:
        host, port = stack.url.removeprefix("http://").split(":")

        def client(first: int) -> None:
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            for i in range(first, requests, clients):
                start = time.perf_counter()
                conn.request("GET", f"/thumb/copy-{i}.jpg")
                response = conn.getresponse()
                response.read()
                answers.append((response.status, time.perf_counter() - start))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        logs = [(stack.logs / f"{stack.instance_name(i)}.log").read_text() for i in range(2)]
    recycles = sum(log.count("Recycling worker") + log.count("Autorestarting worker") for log in logs)
    ordered = sorted(seconds for _, seconds in answers)
    statuses = Counter(status for status, _ in answers)
    return {
        "mode": mode,
        "seconds": round(elapsed, 2),
        "per_second": round(len(ordered) / elapsed, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
        "recycles": recycles,
        "statuses": dict(statuses),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--limit", type=int, default=150, help="requests per worker before it is recycled")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--state", type=Path, default=STATE / "recycle", help="the stacks' and originals' folder")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    folder = args.state / "originals"
    folder.mkdir(parents=True, exist_ok=True)
    photo = (CORPUS / PHOTO).read_bytes()
    for i in range(args.requests):
        (folder / f"copy-{i}.jpg").write_bytes(photo + f"copy {i}".encode())
    rows = [
        run(mode, args.state / mode, folder, args.requests, args.clients, args.limit)
        for _ in range(args.rounds)
        for mode in MODES
    ]
    lines = [
        "# Worker recycles under load",
        "",
        f"`python -m bench.recycle`: {args.requests} distinct `thumb` misses of copies of {PHOTO}, {args.clients} "
        f"clients, 2 instances, each worker recycled after {args.limit} requests (+ up to 10); sides alternate "
        f"({args.rounds} rounds). See the module's docstring.",
        "",
        "| recycle | seconds | requests/s | p50 ms | p99 ms | max ms | recycles | statuses |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['mode']} | {r['seconds']} | {r['per_second']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} "
            f"| {r['recycles']} | {r['statuses']} |"
            for r in rows
        ),
        "",
    ]
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
