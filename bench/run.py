"""``make bench``: phizer against thumbor, ipx and nginx on this machine; writes bench/results/latest.{md,json,png}.

Starts the real stack (service.launcher.Stack: nginx, memcached, one gunicorn+gevent instance per core) and
the peers (bench.peer: thumbor and ipx behind nginx, nginx static), pins both to the same cores, then runs the
scenarios of issues 5 and 13. Runtime files go to state/bench/ (git-ignored); the pool of originals there is reused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import report, scenarios, system
from bench.corpus import Originals
from bench.peer import IPX_CLI, IPX_DIR, THUMBOR_PYTHON, Peers
from service.config import REPO_ROOT, load_config
from service.launcher import Stack
from service.procs import free_port

STATE = REPO_ROOT / "state" / "bench"
RESULTS = REPO_ROOT / "bench" / "results"
SCENARIOS = ("b1", "b2", "b3", "b4", "b5", "b6", "b7")
PEERS = ("thumbor", "ipx")
FORMATS = ("jpeg", "webp")
SETTINGS = ("equal", "defaults")


def _thumbor_version() -> str:
    out = subprocess.run(
        [str(THUMBOR_PYTHON), "-c", "import importlib.metadata as m; print(m.version('thumbor'))"],
        capture_output=True, text=True, check=True,
    )
    return out.stdout.strip()


def _ipx_versions() -> dict[str, str]:
    """ipx's and sharp's versions, and the libvips sharp carries, as installed in bench/ipx."""
    out = subprocess.run(
        ["node", "-e", "const s = require('sharp'), fs = require('fs');"
         "const ipx = JSON.parse(fs.readFileSync('node_modules/ipx/package.json')).version;"
         "console.log(JSON.stringify({ipx, sharp: s.versions.sharp, libvips: s.versions.vips}))"],
        capture_output=True, text=True, check=True, cwd=IPX_DIR,
    )
    return json.loads(out.stdout)


def _scenario(results: dict[str, Any], name: str, run: Callable[[], dict[str, Any]]) -> None:
    """Run one scenario; a failure is reported (with its reason) instead of losing the others' figures."""
    print(f"bench: {name}", flush=True)
    try:
        results[name] = run()
    except Exception as exc:
        traceback.print_exc()
        results.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per paired scenario (default 3)")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds per side per round of B2/B3 (default 20; B1 runs 5)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections for B2/B3 (default 16)")
    parser.add_argument("--pages", type=int, default=120,
                        help="distinct copies of the corpus in the pool (default 120, ~2.6 GB under state/bench)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated subset, e.g. b2,b3")
    parser.add_argument("--peers", default=",".join(PEERS), help="resizing peers for B2, B3, B7 (default thumbor,ipx)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="B2's output formats (default jpeg,webp)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="B2's encoder settings: equal (the peer gets phizer's quality), defaults (each its own)")
    parser.add_argument("--results", default=str(RESULTS), help="folder for latest.md/json/png")
    args = parser.parse_args(argv)

    def pick(option: str, value: str, allowed: tuple[str, ...]) -> list[str]:
        chosen = [v.strip().lower() for v in value.split(",") if v.strip()]
        if not chosen or set(chosen) - set(allowed):
            parser.error(f"--{option}: expected some of {', '.join(allowed)}, got {value!r}")
        return chosen

    wanted = set(pick("only", args.only, SCENARIOS))
    peer_names = pick("peers", args.peers, PEERS)
    formats = pick("formats", args.formats, FORMATS)
    settings = [s == "equal" for s in pick("settings", args.settings, SETTINGS)]
    if not THUMBOR_PYTHON.exists():
        parser.error(f"{THUMBOR_PYTHON} is missing: run `make bench` (it installs thumbor there)")
    if not IPX_CLI.exists():
        parser.error(f"{IPX_CLI} is missing: run `make bench` (it installs ipx there)")

    started = time.monotonic()
    cpus = os.sched_getaffinity(0)
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "make bench" if argv is None and len(sys.argv) == 1 else "python -m bench.run "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": system.describe_machine(),
        "settings": {
            "rounds": args.rounds, "duration_s": args.duration, "connections": args.connections,
            "pages": args.pages, "cpus": sorted(cpus), "instances": len(cpus),
            "thumbor_version": _thumbor_version(), "ipx_versions": _ipx_versions(),
            "peers": peer_names, "formats": formats, "settings": ["equal" if e else "defaults" for e in settings],
            "phizer_webp_method": load_config(
                environ={**os.environ, "PHIZER_ORIGINS": "file:///"}).encoding.webp_method,
        },
    }
    print(f"bench: preparing {args.pages} copies of the corpus under {STATE / 'originals'}", flush=True)
    originals = Originals(STATE / "originals", args.pages)
    for old in ("stack", "b4-stack", "peer"):  # caches of an earlier run would turn misses into hits
        shutil.rmtree(STATE / old, ignore_errors=True)

    if wanted & {"b1", "b2", "b3", "b5", "b7"}:
        # A folder on this disk, as a production folder origin is best configured: memcached would only copy
        # what the page cache already holds (README, Origins); B4 keeps memcached in front of its S3 origin.
        env = {"PHIZER_ORIGINS": f"file://{originals.root}?memcached=off"}
        with (
            Stack(STATE / "stack", port=free_port(), instances=len(cpus), env=env) as stack,
            Peers(STATE / "peer", originals.root, STATE / "static", len(cpus), stack.config.encoding, cpus) as peers,
        ):
            for proc in [stack.nginx, stack.memcached, *stack.instances]:
                if proc is not None:
                    system.pin(proc.pid, cpus)
            bench = scenarios.Bench(stack.config, stack, peers, originals, cpus, args.rounds, args.duration,
                                    args.connections, peer_names, formats, settings)
            if wanted & {"b2", "b3"}:
                print("bench: checking every image at every preset and format on every side", flush=True)
                results["formats"] = scenarios.check_formats(bench)
            for name, run in (
                ("b1", lambda: scenarios.b1_cache_hit(bench, STATE / "static")),
                ("b2", lambda: scenarios.b2_page_mix(bench)),
                ("b3", lambda: scenarios.b3_single_preset(bench)),
                ("b5", lambda: scenarios.b5_overhead(bench)),
                ("b7", lambda: scenarios.b7_browser_page(bench, STATE / "b7")),
            ):
                if name in wanted:
                    _scenario(results, name, run)
            results["memory"] = scenarios.memory(stack, peers)
            if stack.restarts or stack.failure:
                results["stack_incidents"] = {"restarts": stack.restarts, "failure": stack.failure}
    config = load_config(environ={**os.environ, "PHIZER_ORIGINS": f"file://{originals.root}"})
    if "b4" in wanted:
        _scenario(results, "b4", lambda: scenarios.b4_cold_page(config, originals, cpus, args.rounds, STATE))
    if "b6" in wanted:
        _scenario(results, "b6", lambda: scenarios.b6_scaling(config, originals, STATE))
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report.write(results, Path(args.results))
    print((Path(args.results) / "latest.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
