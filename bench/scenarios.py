"""The scenarios of issues 5 and 13 (B1-B7 and memory). Each returns a plain dict that goes into latest.json.

Paired scenarios (B1-B3) alternate phizer and its peer inside every round (which side goes first flips each
round, so slow drift of the machine hits both), and every round asks for names never asked for before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from bench import system
from bench.corpus import Originals, megapixel_series, shuffled
from bench.peer import Peer, Peers
from bench.wrk import WrkResult, run_wrk
from service.config import Config
from service.launcher import Stack
from service.memory import IDLE_CHECK_SECONDS
from service.pipeline import Pipeline
from service.procs import Process, free_port
from tests.support import AWS_ENV, moto_s3, pid_of, s3_client

PAUSE = 1.0  # seconds between two timed runs: in-flight work of the previous one drains


SUFFIX = {"jpeg": "jpg", "webp": "webp"}  # phizer's format suffix for each compared output format


@dataclasses.dataclass(frozen=True)
class Variant:
    """One paired comparison: which peer, which output format, and whose encoder settings.

    ``equal``: the peer gets phizer's preset quality (the fair comparison); otherwise each side runs at its own
    defaults (phizer's presets as configured, the peer's default quality), and the bytes columns show what that buys.
    phizer's side is the same in both: only the peer's settings change.
    """

    peer: str
    fmt: str
    equal: bool

    @property
    def tag(self) -> str:
        return f"{self.peer}-{self.fmt}-{'equal' if self.equal else 'defaults'}"


@dataclasses.dataclass
class Bench:
    """Everything a paired scenario needs: both sides running, the originals, the run's knobs."""

    config: Config
    stack: Stack
    peers: Peers
    originals: Originals
    cpus: set[int]
    rounds: int
    duration: float
    connections: int
    peer_names: Sequence[str] = ("thumbor", "ipx")
    formats: Sequence[str] = ("jpeg", "webp")
    settings: Sequence[bool] = (True, False)  # equal encoder settings, then each side's defaults

    def phizer_pids(self) -> list[int]:
        """Every process of phizer's side: nginx (master + workers), memcached, instances (master + worker)."""
        procs = [self.stack.nginx, self.stack.memcached, *self.stack.instances]
        return [pid for proc in procs if proc is not None for pid in system.tree(proc.pid)]

    def peer(self, name: str) -> Peer:
        return {"thumbor": self.peers.thumbor, "ipx": self.peers.ipx}[name]


def get(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One GET on a fresh connection: status, headers (lower-case names), body."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def _rounds(
    bench: Bench,
    targets: Callable[[int], tuple[tuple[str, Sequence[str] | None], tuple[str, Sequence[str] | None]]],
    peer_pids: Callable[[], list[int]],
    connections: int,
    duration: float,
    cycle: bool = False,
) -> list[dict[str, Any]]:
    """Run phizer and the peer once per round, alternating which goes first; ``targets(r)`` gives (base, paths)."""
    rounds = []
    for r in range(bench.rounds):
        (phizer_base, phizer_paths), (peer_base, peer_paths) = targets(r)
        order = [("phizer", phizer_base, phizer_paths), ("peer", peer_base, peer_paths)]
        if r % 2:
            order.reverse()
        results: dict[str, WrkResult] = {}
        cpu_ms: dict[str, float] = {}
        for side, base, paths in order:
            pids = bench.phizer_pids if side == "phizer" else peer_pids
            before = system.cpu_seconds(pids())
            results[side] = run_wrk(base, paths, duration=duration, connections=connections, cpus=bench.cpus,
                                    cycle=cycle)
            # Per successful answer: a quick 503 must not dilute the CPU an answered request took. The tree is
            # listed again: a worker that replaced a recycled one is counted too.
            cpu_ms[side] = (system.cpu_seconds(pids()) - before) * 1000 / max(1, results[side].ok_requests)
            time.sleep(PAUSE)
        phizer, peer = results["phizer"], results["peer"]
        rounds.append(
            {
                "round": r + 1,
                "phizer": {**phizer.as_dict(), "cpu_ms_per_request": round(cpu_ms["phizer"], 3)},
                "peer": {**peer.as_dict(), "cpu_ms_per_request": round(cpu_ms["peer"], 3)},
                "ratio": _ratio(phizer.ok_rps, peer.ok_rps),
                "p99_ratio": _ratio(phizer.p99_ms, peer.p99_ms),
                "cpu_ratio": _ratio(cpu_ms["peer"], cpu_ms["phizer"]),
            }
        )
        print(
            f"  round {r + 1}: phizer {phizer.ok_rps:.0f} req/s p99 {phizer.p99_ms:.0f} ms, "
            f"peer {peer.ok_rps:.0f} req/s p99 {peer.p99_ms:.0f} ms, ratio {rounds[-1]['ratio']}",
            flush=True,
        )
    return rounds


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def median(side: str, field: str) -> float:
        return round(statistics.median(r[side][field] for r in rounds), 3)

    return {
        "median_ratio": round(statistics.median(r["ratio"] for r in rounds), 3),
        "median_p99_ratio": round(statistics.median(r["p99_ratio"] for r in rounds), 3),
        "median_cpu_ratio": round(statistics.median(r["cpu_ratio"] for r in rounds), 3),
        "medians": {
            side: {field: median(side, field)
                   for field in ("ok_rps", "p50_ms", "p99_ms", "cpu_ms_per_request", "mean_body_bytes", "errors")}
            for side in ("phizer", "peer")
        },
        "errors": sum(r["phizer"]["errors"] + r["peer"]["errors"] for r in rounds),
        "exhausted": any(r["phizer"]["exhausted"] or r["peer"]["exhausted"] for r in rounds),
    }


# ------------------------------------------------------------------------------------------------ formats


def phizer_path(preset_name: str, key: str, fmt: str) -> str:
    """phizer's URL for ``key`` at ``preset_name`` forced to ``fmt`` by the format suffix (no Accept needed)."""
    return f"/{preset_name}/{key}.{SUFFIX[fmt]}"


def check_formats(bench: Bench) -> dict[str, Any]:
    """Ask every side for every image at every preset in every compared format and setting once (also a warm-up).

    Each answer must be that format; any failure is recorded and shown in the report. The bytes of these answers
    (the same set of renditions on every side) are the report's mean bytes per response: a timed run's own mean
    would compare different subsets (each side gets through different URLs in the same time).
    """
    failures, sizes = [], []
    for fmt in bench.formats:
        for name in bench.originals.names:
            key = bench.originals.key("check", 0, name)
            for preset_name, preset in bench.config.presets.items():
                row: dict[str, Any] = {"name": name, "preset": preset_name, "format": fmt}
                sides = [("phizer", bench.stack.url, phizer_path(preset_name, key, fmt))]
                for peer_name in bench.peer_names:
                    peer = bench.peer(peer_name)
                    for equal in bench.settings:
                        side = f"{peer_name}-{'equal' if equal else 'defaults'}"
                        sides.append((side, peer.url, peer.path(preset, key, fmt, equal)))
                for side, base, path in sides:
                    status, headers, body = get(base, path)
                    if status != 200 or headers.get("content-type") != f"image/{fmt}":
                        failures.append(f"{side} {path}: {status} {headers.get('content-type')} {body[:100]!r}")
                    row[side] = len(body)
                sizes.append(row)
    sides = [side for side in sizes[0] if side not in ("name", "preset", "format")]

    def means(rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Mean bytes per side, and the median over renditions of phizer's bytes / the side's (one outlier, such
        as a peer keeping a CMYK JPEG as CMYK at 15x the bytes, moves the mean but not this)."""
        return {side: round(statistics.mean(row[side] for row in rows)) for side in sides} | {
            f"median_ratio_{side}": round(statistics.median(row["phizer"] / max(1, row[side]) for row in rows), 3)
            for side in sides if side != "phizer"
        }

    mean_bytes = {
        fmt: {p: means([row for row in sizes if row["format"] == fmt and p in ("all", row["preset"])])
              for p in ("all", *bench.config.presets)}
        for fmt in bench.formats
    }
    return {"failures": failures, "outputs": sizes, "mean_bytes": mean_bytes}


# --------------------------------------------------------------------------------------------- B1 - B3


B1_IMAGE = "05_storm_2_5mp_baseline.jpg"
B1_SECONDS = 5.0  # tens of thousands of hits a second: a few seconds are plenty


def b1_cache_hit(bench: Bench, static_root: Path) -> dict[str, Any]:
    """Cached renditions through phizer's nginx vs nginx serving the same bytes as static files.

    Two measures. The target is a page of hits: every corpus image at every preset (JPEG), requested round and
    round, so the answers have the sizes a site's pages are made of. The other is one `small` rendition of a
    few KB over and over: there the fixed cost per request of a proxy_cache hit (key, zone lookup, stored
    headers re-read: bench/results/b1.md) outweighs the bytes, which makes it the worst case, kept as a figure.
    """
    connections = 64
    preset = "small" if "small" in bench.config.presets else next(iter(bench.config.presets))
    page_paths, static_paths, sizes = [], [], []
    for name in bench.originals.names:
        key = bench.originals.key("b1", 0, name)
        for preset_name in bench.config.presets:
            path = phizer_path(preset_name, key, "jpeg")
            # The first is the miss that fills the cache. nginx may send a miss's last bytes before it has put the
            # response in its cache (seen: a 96 KB `large` answered MISS twice in a row): ask again, a moment later.
            for attempt in range(5):
                status, headers, body = get(bench.stack.url, path)
                if headers.get("x-cache-status") == "HIT":
                    break
                time.sleep(0.05 * attempt)
            if status != 200 or headers.get("x-cache-status") != "HIT":
                raise RuntimeError(f"B1: {path} is not served from nginx's cache: {status} {headers}")
            static = static_root / "b1" / preset_name / f"{Path(name).stem}.jpg"
            static.parent.mkdir(parents=True, exist_ok=True)
            static.write_bytes(body)
            page_paths.append(path)
            static_paths.append(f"/b1/{preset_name}/{static.name}")
            sizes.append(len(body))
            if (name, preset_name) == (B1_IMAGE, preset):
                single = (path, static_paths[-1], len(body))
    page = lambda r: ((bench.stack.url, page_paths), (bench.peers.static_url, static_paths))  # noqa: E731
    stock = lambda r: ((bench.stack.url, page_paths), (bench.peers.static_sendfile_url, static_paths))  # noqa: E731
    one = lambda r: ((bench.stack.url + single[0], None), (bench.peers.static_url + single[1], None))  # noqa: E731
    for targets in (page, stock, one):  # warm-up
        for base, paths in targets(0):
            run_wrk(base, paths, duration=1, connections=connections, cpus=bench.cpus, cycle=True)
    page_rounds = _rounds(bench, page, bench.peers.nginx_pids, connections, B1_SECONDS, cycle=True)
    stock_rounds = _rounds(bench, stock, bench.peers.nginx_pids, connections, B1_SECONDS, cycle=True)
    one_rounds = _rounds(bench, one, bench.peers.nginx_pids, connections, B1_SECONDS)
    return {"urls": len(page_paths), "mean_bytes": round(statistics.mean(sizes)), "connections": connections,
            "rounds": page_rounds, **_summary(page_rounds),
            "sendfile": {"rounds": stock_rounds, **_summary(stock_rounds)},
            "single": {"url": single[0], "bytes": single[2], "rounds": one_rounds,
                       **_summary(one_rounds)}}


def _paired_variants(
    bench: Bench, scenario: str, variants: list[Variant], pairs_for: Callable[[str], list[tuple[str, str]]]
) -> list[dict[str, Any]]:
    """Each variant's rounds; ``pairs_for(prefix)`` gives the (preset, key) requests of one round under new names."""
    out = []
    for variant in variants:
        peer = bench.peer(variant.peer)
        print(f"  {scenario} {variant.tag}", flush=True)

        def targets(r: int, variant: Variant = variant, peer: Peer = peer) -> tuple[tuple[str, list[str]], ...]:
            pairs = pairs_for(f"{scenario}/{variant.tag}/r{r}")
            phizer = [phizer_path(p, k, variant.fmt) for p, k in pairs]
            other = [peer.path(bench.config.presets[p], k, variant.fmt, variant.equal) for p, k in pairs]
            return (bench.stack.url, phizer), (peer.url, other)

        rounds = _rounds(bench, targets, lambda peer=peer: bench.peers.pids(peer), bench.connections, bench.duration)
        out.append({"peer": variant.peer, "format": variant.fmt, "equal": variant.equal, "rounds": rounds,
                    **_summary(rounds)})
    return out


def b2_page_mix(bench: Bench) -> dict[str, Any]:
    """Every original at every preset, shuffled page by page, all misses on both sides; per peer, format, settings."""

    def pairs_for(prefix: str) -> list[tuple[str, str]]:
        seed = int(hashlib.blake2b(prefix.encode(), digest_size=4).hexdigest(), 16)
        pairs = []
        for page in range(bench.originals.pages):
            keys = bench.originals.page(prefix, page)
            pairs += shuffled([(p, k) for k in keys for p in bench.config.presets], seed=seed + page)
        return pairs

    variants = [Variant(p, f, e) for p in bench.peer_names for f in bench.formats for e in bench.settings]
    return {"connections": bench.connections, "presets": list(bench.config.presets),
            "variants": _paired_variants(bench, "b2", variants, pairs_for)}


def b3_single_preset(bench: Bench) -> dict[str, Any]:
    """One preset, each original (all distinct) asked for once: no sharing of any work is possible. JPEG, equal."""
    preset = "small" if "small" in bench.config.presets else next(iter(bench.config.presets))

    def pairs_for(prefix: str) -> list[tuple[str, str]]:
        keys = [k for page in range(bench.originals.pages) for k in bench.originals.page(prefix, page)]
        seed = int(hashlib.blake2b(prefix.encode(), digest_size=4).hexdigest(), 16)
        return [(preset, k) for k in shuffled(keys, seed=seed)]

    variants = [Variant(p, "jpeg", True) for p in bench.peer_names]
    return {"preset": preset, "connections": bench.connections,
            "variants": _paired_variants(bench, "b3", variants, pairs_for)}


# ------------------------------------------------------------------------------------------------ B5, B6


def service_pipeline(config: Config) -> Pipeline:
    """The pipeline exactly as the app builds it (service/app.py)."""
    return Pipeline(config.encoding, config.limits, config.presets.values())


def _render_seconds(pipeline: Pipeline, data: bytes, preset_name: str, config: Config, clock: Callable[[], float],
                    tag: str) -> float:
    """One in-process render, timed with ``clock``; a unique digest so no per-instance cache can answer."""
    digest = hashlib.blake2b(data + tag.encode(), digest_size=16).hexdigest()
    start = clock()
    pipeline.render(data, digest, config.presets[preset_name])
    return clock() - start


B5_CASES = (("05_storm_2_5mp_baseline.jpg", "small"), ("01_kleiber_20mp_baseline.jpg", "medium"))


def b5_overhead(bench: Bench, requests: int = 30) -> dict[str, Any]:
    """Sequential misses through nginx and an instance (memcached off) vs the same render called in-process.

    Each stack request is followed by the in-process render of the same bytes, so load that comes and goes
    on the machine hits both halves of a pair alike. The original is read (untimed) before the stack's request:
    otherwise the stack alone paid a disk read whenever the page cache had dropped that pool file (measured:
    the 20 MP original's fetch stage 8.5-10 ms cold vs 4.9-6.2 ms cached, with SHA-256).
    """
    requests = min(requests, bench.originals.pages // bench.rounds)
    pipeline = service_pipeline(bench.config)
    parts = urllib.parse.urlsplit(bench.stack.url)
    cases = []
    for name, preset_name in B5_CASES:
        if preset_name not in bench.config.presets:
            continue
        rounds = []
        for r in range(bench.rounds):
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            stack_times, local_times = [], []
            for i in range(requests):
                # Each round its own pool pages: the same bytes again would hit the instance's intermediates.
                page = (r * requests + i) % bench.originals.pages
                key = bench.originals.key(f"b5/r{r}", page, name)
                # Read before the stack's request: both halves then start from the page cache (the pool is larger
                # than what the page cache kept of it, and a disk read is neither half's overhead).
                data = bench.originals.pool_path(page, name).read_bytes()
                start = time.perf_counter()
                conn.request("GET", f"/{preset_name}/{key}")
                resp = conn.getresponse()
                resp.read()
                stack_times.append(time.perf_counter() - start)
                if resp.status != 200 or resp.getheader("X-Cache-Status") != "MISS":
                    raise RuntimeError(f"B5: {key}: {resp.status} {resp.getheader('X-Cache-Status')}")
                local_times.append(
                    _render_seconds(pipeline, data, preset_name, bench.config, time.perf_counter, f"b5-{r}")
                )
            conn.close()
            stack_ms, local_ms = statistics.median(stack_times) * 1000, statistics.median(local_times) * 1000
            rounds.append({"round": r + 1, "stack_ms": round(stack_ms, 2), "in_process_ms": round(local_ms, 2),
                           "overhead": round(stack_ms / local_ms - 1, 3)})
        cases.append({"image": name, "preset": preset_name, "requests": requests, "rounds": rounds,
                      "median_overhead": round(statistics.median(x["overhead"] for x in rounds), 3)})
    return {"cases": cases, "max_median_overhead": max(c["median_overhead"] for c in cases)}


B6_SOURCE = "01_kleiber_20mp_baseline.jpg"  # the largest baseline JPEG: the series' top end


def b6_scaling(config: Config, originals: Originals, workdir: Path, repeats: int = 3) -> dict[str, Any]:
    """In-process CPU time per miss against source megapixels: one photo at 0.3-20 MP, plus the corpus JPEGs.

    Curves: the smallest and the largest preset as the service renders a miss (shrink-on-load sized for it).
    """
    served = service_pipeline(config)
    by_width = sorted(config.presets.values(), key=lambda p: (p.width or 0) * (p.height or p.width or 0))
    smallest, largest = by_width[0].name, by_width[-1].name
    curves = {
        f"{smallest}, as served": (served, smallest),
        f"{largest}, as served": (served, largest),
    }
    source = originals.pool_path(0, B6_SOURCE)
    series = megapixel_series(workdir / "b6" / Path(B6_SOURCE).stem, source)

    def measure(data: bytes) -> dict[str, float]:
        return {
            label: round(
                min(_render_seconds(pipe, data, name, config, time.process_time, f"{label}{i}") for i in range(repeats))
                * 1000,
                2,
            )
            for label, (pipe, name) in curves.items()
        }

    points = [{"megapixels": mp, **measure(path.read_bytes())} for mp, path in series]
    corpus_points = []
    for name in originals.names:
        if name.endswith(".jpg"):
            path = originals.pool_path(0, name)
            with Image.open(path) as im:
                mp = round(im.width * im.height / 1e6, 2)
            corpus_points.append({"image": name, "megapixels": mp, **measure(path.read_bytes())})
    first, last = points[0], points[-1]
    return {
        "source": source.name, "curves": list(curves), "series": points, "corpus": corpus_points,
        "pixel_growth": round(last["megapixels"] / first["megapixels"], 1),
        "cpu_growth": {label: round(last[label] / first[label], 1) for label in curves},
    }


# --------------------------------------------------------------------------------------------------- B4


def _page_fetch(base: str, paths: list[str], concurrency: int) -> tuple[float, list[tuple[int, str, float]]]:
    """Fetch ``paths`` with ``concurrency`` parallel connections; the page time and each (status, cache, secs)."""
    parts = urllib.parse.urlsplit(base)
    barrier = threading.Barrier(min(concurrency, len(paths)) + 1)
    queue = list(reversed(paths))
    lock = threading.Lock()
    results: list[tuple[int, str, float]] = []

    def worker() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        conn.connect()
        barrier.wait()
        while True:
            with lock:
                if not queue:
                    break
                path = queue.pop()
            start = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            with lock:
                results.append((resp.status, resp.getheader("X-Cache-Status") or "", time.perf_counter() - start))
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(min(concurrency, len(paths)))]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, results


def b4_cold_page(
    config: Config, originals: Originals, cpus: set[int], rounds: int, workdir: Path,
    page_size: int = 40, delay: float = 0.2, concurrency: int = 40,
) -> dict[str, Any]:
    """40 distinct originals in S3 behind a 200 ms proxy, fetched at once as one page, vs 200 ms + CPU / cores."""
    names = originals.names
    presets = list(config.presets)
    layout = [(names[i % len(names)], presets[i % len(presets)], i // len(names)) for i in range(page_size)]
    pipeline = service_pipeline(config)
    cpu_seconds = 0.0
    for name, preset_name, pool_page in layout:  # the page's pure CPU time: each render warm, in-process
        data = originals.pool_path(pool_page, name).read_bytes()
        _render_seconds(pipeline, data, preset_name, config, time.process_time, "b4-warm")
        cpu_seconds += _render_seconds(pipeline, data, preset_name, config, time.process_time, "b4")
    model = delay + cpu_seconds / len(cpus)

    logs = workdir / "b4-logs"
    with moto_s3(logs) as endpoint:
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket="bench")
        pages = {}
        for r in range(rounds + 1):  # page 0 warms the instances' S3 clients up
            pages[r] = []
            for i, (name, preset_name, pool_page) in enumerate(layout):
                key = f"b4/r{r}/{i:02d}-{name}"
                # Each round its own pool pages: the same bytes again would hit the instances' intermediates.
                fresh = (pool_page + r * (layout[-1][2] + 1)) % originals.pages
                s3.put_object(Bucket="bench", Key=key, Body=originals.pool_path(fresh, name).read_bytes())
                pages[r].append(f"/{preset_name}/{key}")
        (logs / "delay-proxy.log").unlink(missing_ok=True)  # its first line will be this run's address
        proxy = Process(
            "delay-proxy",
            [sys.executable, "-m", "bench.delay_proxy", "--upstream", endpoint, "--delay", str(delay)],
            logs / "delay-proxy.log",
            cwd=Path(__file__).resolve().parent.parent,
        )
        try:
            proxy.wait_ready(lambda: "listening on" in proxy.log_tail(1))
            proxy_url = proxy.log_tail(1).rsplit(" ", 1)[1].strip()
            origin_time = _origin_page_time(proxy_url, [p.split("/", 2)[2] for p in pages[0]], concurrency)
            env = {**AWS_ENV, "PHIZER_ORIGINS": "s3://bench", "AWS_ENDPOINT_URL": proxy_url}
            with Stack(workdir / "b4-stack", port=free_port(), instances=len(cpus), env=env) as stack:
                for proc in [stack.nginx, stack.memcached, *stack.instances]:
                    if proc is not None:
                        system.pin(proc.pid, cpus)
                results = []
                # What the same cores also run for the page, outside phizer and outside the model: the S3 server
                # and the delay proxy (Python, copying every original), and this process's 40 client threads.
                moto = pid_of(["moto_server", endpoint.rsplit(":", 1)[1]])
                others = {"origin": [moto, proxy.pid], "client": [os.getpid()]}
                for r in range(rounds + 1):
                    trees = [system.tree(proc.pid) for proc in stack.instances]
                    before = [system.cpu_seconds(t) for t in trees]
                    before_others = {k: system.cpu_seconds(v) for k, v in others.items()}
                    page_time, answers = _page_fetch(stack.url, pages[r], concurrency)
                    spent = [round(system.cpu_seconds(t) - b, 2) for t, b in zip(trees, before, strict=True)]
                    spent_others = {f"{k}_cpu_s": round(system.cpu_seconds(v) - before_others[k], 2)
                                    for k, v in others.items()}
                    bad = [a for a in answers if a[0] != 200 or a[1] != "MISS"]
                    if r == 0:
                        continue
                    results.append({"round": r, "page_s": round(page_time, 3), "ratio": round(page_time / model, 3),
                                    "slowest_s": round(max(a[2] for a in answers), 3), "not_cold_misses": len(bad),
                                    "instance_cpu_s": spent, **spent_others})
                    print(f"  round {r}: page {page_time * 1000:.0f} ms, model {model * 1000:.0f} ms", flush=True)
        finally:
            proxy.stop()
    return {
        "page_size": page_size, "concurrency": concurrency, "delay_s": delay,
        "cpu_seconds": round(cpu_seconds, 3), "cores": len(cpus), "model_s": round(model, 3),
        "origin_only_page_s": round(origin_time, 3), "rounds": results,
        "median_ratio": round(statistics.median(x["ratio"] for x in results), 3),
    }


def _origin_page_time(proxy_url: str, keys: list[str], concurrency: int) -> float:
    """The page's originals alone, straight from S3 through the slow proxy: the floor under any page time."""
    import boto3
    import botocore.config

    parallel = boto3.client(
        "s3", endpoint_url=proxy_url, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        config=botocore.config.Config(max_pool_connections=concurrency),
    )
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda k: parallel.get_object(Bucket="bench", Key=k)["Body"].read(), keys))
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ memory


def memory(stack: Stack, peers: Peers) -> dict[str, Any]:
    """RSS of each instance (gunicorn master + worker): its worker's peak, and after the run once the instances went
    idle and gave their free heap back (service/memory.py); memcached, nginx; thumbor for comparison."""
    instances = []
    for proc in stack.instances:
        pids = system.tree(proc.pid)
        instances.append({"name": proc.name, "peak_rss_mb": round(sum(system.rss_mb(p, "VmHWM") for p in pids), 1)})
    time.sleep(3 * IDLE_CHECK_SECONDS)  # the first quiet check trims
    for proc, inst in zip(stack.instances, instances, strict=True):
        pids = system.tree(proc.pid)
        inst.update(rss_mb=round(sum(system.rss_mb(p) for p in pids), 1),
                    worker_rss_mb=round(max(system.rss_mb(p) for p in pids), 1))
    return {
        "instances": instances,
        "memcached_rss_mb": round(system.rss_mb(stack.memcached.pid), 1) if stack.memcached else None,
        "nginx_rss_mb": round(sum(system.rss_mb(p) for p in system.tree(stack.nginx.pid)), 1) if stack.nginx else None,
        "thumbor_rss_mb": [round(system.rss_mb(p), 1) for p in peers.thumbor_pids()],
        "max_instance_rss_mb": max(i["rss_mb"] for i in instances),
        "max_instance_peak_rss_mb": max(i["peak_rss_mb"] for i in instances),
    }


# --------------------------------------------------------------------------------------------------- B7

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,2400",
)  # fmt: skip
# Runs at the window's load event (every <img> done): the page's own clock, so Chromium's start-up is not counted.
PAGE_SCRIPT = """<script>
addEventListener("load", () => {
  const imgs = performance.getEntriesByType("resource").filter((e) => e.initiatorType === "img");
  document.body.dataset.result = JSON.stringify({
    load_ms: performance.timing.loadEventStart - performance.timing.navigationStart,
    last_image_ms: Math.max(...imgs.map((e) => e.responseEnd)),
    images: imgs.length,
    decoded: [...document.images].filter((i) => i.complete && i.naturalWidth > 0).length,
  });
});
</script>"""


def _browser_page(workdir: Path, srcs: list[str]) -> dict[str, Any]:
    """Open a page of ``srcs`` in a fresh headless Chromium profile; the page's timings from its load event."""
    workdir.mkdir(parents=True, exist_ok=True)
    page = workdir / "page.html"
    imgs = "\n".join(f'<img src="{src}" width="160">' for src in srcs)
    page.write_text(f"<!doctype html><html><head>{PAGE_SCRIPT}</head><body>\n{imgs}\n</body></html>\n")
    profile = workdir / "profile"
    shutil.rmtree(profile, ignore_errors=True)
    run = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    match = re.search(r'data-result="([^"]*)"', run.stdout)
    if run.returncode != 0 or match is None:
        raise RuntimeError(f"B7: chromium gave no timings ({run.returncode}): {run.stderr[-1000:]}")
    return json.loads(html.unescape(match.group(1)))


# A B7 round is one page load per side: one sample, where a B2 round is 20 s of requests. Page loads of the same
# code spread over +-5% on this machine (3-round medians of one day 0.745-0.792x), so B7 takes more rounds than
# --rounds' default: each costs about 5 s per side.
B7_MIN_ROUNDS = 7


def b7_browser_page(bench: Bench, workdir: Path, page_size: int = 40) -> dict[str, Any]:
    """A cold page of ``page_size`` `small` thumbnails of distinct originals in headless Chromium, each side alike.

    Every round and side gets originals with content never seen before (tagged copies), under new names: nginx's
    caches, memcached, phizer's per-instance intermediates and the peers' storages all miss, as with emptied
    caches; each Chromium starts from an empty profile. Chromium asks as browsers do (HTTP/1.1, 6 connections per
    host, its own Accept: phizer negotiates AVIF, what browsers get by default); the peers are asked for WebP at the
    same quality (their default output here).
    """
    preset_name = "small" if "small" in bench.config.presets else next(iter(bench.config.presets))
    preset = bench.config.presets[preset_name]
    names = bench.originals.names
    sides = ["phizer", *bench.peer_names]
    rounds = []
    for r in range(max(bench.rounds, B7_MIN_ROUNDS)):
        order = sides if r % 2 == 0 else list(reversed(sides))
        row: dict[str, Any] = {"round": r + 1}
        for side in order:
            keys = [bench.originals.fresh_key(f"b7/{time.time_ns()}/{side}/{i:02d}-{names[i % len(names)]}",
                                              names[i % len(names)]) for i in range(page_size)]
            if side == "phizer":
                srcs = [f"{bench.stack.url}/{preset_name}/{key}" for key in keys]
            else:
                peer = bench.peer(side)
                srcs = [peer.url + peer.path(preset, key, "webp", True) for key in keys]
            row[side] = _browser_page(workdir / side, srcs)  # "decoded" < page_size: some images failed (shown)
            time.sleep(PAUSE)
        for peer_name in bench.peer_names:
            row[f"ratio_{peer_name}"] = _ratio(row["phizer"]["load_ms"], row[peer_name]["load_ms"])
        print(f"  round {r + 1}: " + ", ".join(f"{s} {row[s]['load_ms']} ms" for s in sides), flush=True)
        rounds.append(row)
    return {
        "preset": preset_name, "page_size": page_size, "sides": sides, "rounds": rounds,
        "median_load_ms": {s: statistics.median(x[s]["load_ms"] for x in rounds) for s in sides},
        "median_ratio": {p: round(statistics.median(x[f"ratio_{p}"] for x in rounds), 3) for p in bench.peer_names},
    }
