"""The scenarios of issue 5 (B1-B6 and memory). Each returns a plain dict that goes into latest.json.

Paired scenarios (B1-B3) alternate phizer and its peer inside every round (which side goes first flips each
round, so slow drift of the machine hits both), and every round asks for names never asked for before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import statistics
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
from bench.peer import Peers, thumbor_path
from bench.wrk import WrkResult, run_wrk
from service.config import Config
from service.launcher import Stack
from service.pipeline import Pipeline
from service.procs import Process, free_port
from tests.support import AWS_ENV, moto_s3, s3_client

PAUSE = 1.0  # seconds between two timed runs: in-flight work of the previous one drains


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
    formats: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)  # (name, preset) -> format

    def phizer_pids(self) -> list[int]:
        """Every process of phizer's side: nginx (master + workers), memcached, instances (master + worker)."""
        procs = [self.stack.nginx, self.stack.memcached, *self.stack.instances]
        return [pid for proc in procs if proc is not None for pid in system.tree(proc.pid)]

    def peer_pids(self) -> list[int]:
        """Every process of the peer's side: its nginx (master + workers) and the thumbor servers."""
        return [pid for proc in self.peers.procs for pid in system.tree(proc.pid)]


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
    connections: int,
    duration: float,
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
            pids = bench.phizer_pids() if side == "phizer" else bench.peer_pids()
            before = system.cpu_seconds(pids)
            results[side] = run_wrk(base, paths, duration=duration, connections=connections, cpus=bench.cpus)
            cpu_ms[side] = (system.cpu_seconds(pids) - before) * 1000 / max(1, results[side].requests)
            time.sleep(PAUSE)
        phizer, peer = results["phizer"], results["peer"]
        rounds.append(
            {
                "round": r + 1,
                "phizer": {**phizer.as_dict(), "cpu_ms_per_request": round(cpu_ms["phizer"], 3)},
                "peer": {**peer.as_dict(), "cpu_ms_per_request": round(cpu_ms["peer"], 3)},
                "ratio": _ratio(phizer.rps, peer.rps),
                "p99_ratio": _ratio(phizer.p99_ms, peer.p99_ms),
                "cpu_ratio": _ratio(cpu_ms["peer"], cpu_ms["phizer"]),
            }
        )
        print(
            f"  round {r + 1}: phizer {phizer.rps:.0f} req/s p99 {phizer.p99_ms:.0f} ms, peer {peer.rps:.0f} req/s "
            f"p99 {peer.p99_ms:.0f} ms, ratio {rounds[-1]['ratio']}",
            flush=True,
        )
    return rounds


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "median_ratio": round(statistics.median(r["ratio"] for r in rounds), 3),
        "median_p99_ratio": round(statistics.median(r["p99_ratio"] for r in rounds), 3),
        "median_cpu_ratio": round(statistics.median(r["cpu_ratio"] for r in rounds), 3),
        "errors": sum(r["phizer"]["errors"] + r["peer"]["errors"] for r in rounds),
        "exhausted": any(r["phizer"]["exhausted"] or r["peer"]["exhausted"] for r in rounds),
    }


# ------------------------------------------------------------------------------------------------ formats


def check_formats(bench: Bench) -> dict[str, Any]:
    """Ask both sides for every image at every preset once (also warms both up).

    phizer's answer decides the output format; thumbor is then asked for that same format, so both encode
    the same thing. Any failure on either side is recorded and shown in the report.
    """
    failures, sizes = [], []
    for name in bench.originals.names:
        key = bench.originals.key("check", 0, name)
        for preset_name, preset in bench.config.presets.items():
            status, headers, body = get(bench.stack.url, f"/{preset_name}/{key}")
            if status != 200:
                failures.append(f"phizer /{preset_name}/{key}: {status} {body[:100]!r}")
                continue
            fmt = headers["content-type"].removeprefix("image/")
            bench.formats[(name, preset_name)] = fmt
            peer_status, peer_headers, peer_body = get(bench.peers.thumbor_url, thumbor_path(preset, key, fmt))
            if peer_status != 200 or peer_headers.get("content-type") != headers["content-type"]:
                failures.append(f"thumbor {preset_name}/{name}: {peer_status} {peer_headers.get('content-type')}")
            sizes.append({"name": name, "preset": preset_name, "format": fmt, "phizer": len(body),
                          "peer": len(peer_body)})
    return {"failures": failures, "outputs": sizes}


# --------------------------------------------------------------------------------------------- B1 - B3


B1_IMAGE = "05_storm_2_5mp_baseline.jpg"
B1_SECONDS = 5.0  # tens of thousands of hits a second: a few seconds are plenty


def b1_cache_hit(bench: Bench, static_root: Path) -> dict[str, Any]:
    """A cached rendition through phizer's nginx vs nginx serving the same bytes as a static file."""
    preset = "small" if "small" in bench.config.presets else next(iter(bench.config.presets))
    key = bench.originals.key("b1", 0, B1_IMAGE)
    path = f"/{preset}/{key}"
    statuses = []
    for _ in range(2):
        status, headers, body = get(bench.stack.url, path)
        statuses.append(f"{status} {headers.get('x-cache-status')}")
    if statuses[-1] != "200 HIT":
        raise RuntimeError(f"B1: {path} is not served from nginx's cache: {statuses}")
    static = static_root / "b1" / f"{preset}.jpg"
    static.parent.mkdir(parents=True, exist_ok=True)
    static.write_bytes(body)
    connections = 64
    for base in (bench.stack.url + path, bench.peers.static_url + "/b1/" + static.name):  # warm-up
        run_wrk(base, None, duration=1, connections=connections, cpus=bench.cpus)
    rounds = _rounds(
        bench,
        lambda r: ((bench.stack.url + path, None), (bench.peers.static_url + "/b1/" + static.name, None)),
        connections,
        B1_SECONDS,
    )
    return {"url": path, "bytes": len(body), "connections": connections, "cache_statuses": statuses,
            "rounds": rounds, **_summary(rounds)}


def _pair(bench: Bench, pairs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The phizer and thumbor paths of the same (preset, key) requests, in the same order."""
    phizer, peer = [], []
    for preset_name, key in pairs:
        phizer.append(f"/{preset_name}/{key}")
        fmt = bench.formats[(key.rsplit("/", 1)[1], preset_name)]
        peer.append(thumbor_path(bench.config.presets[preset_name], key, fmt))
    return phizer, peer


def b2_page_mix(bench: Bench) -> dict[str, Any]:
    """Every original at every preset, shuffled page by page, all misses on both sides."""

    def targets(r: int) -> tuple[tuple[str, list[str]], tuple[str, list[str]]]:
        pairs = []
        for page in range(bench.originals.pages):
            keys = bench.originals.page(f"b2/r{r}", page)
            pairs += shuffled([(p, k) for k in keys for p in bench.config.presets], seed=r * 100_003 + page)
        phizer, peer = _pair(bench, pairs)
        return (bench.stack.url, phizer), (bench.peers.thumbor_url, peer)

    rounds = _rounds(bench, targets, bench.connections, bench.duration)
    return {"connections": bench.connections, "presets": list(bench.config.presets), "rounds": rounds,
            **_summary(rounds)}


def b3_single_preset(bench: Bench) -> dict[str, Any]:
    """One preset, each original (all distinct) asked for once: no sharing of any work is possible."""
    preset = "small" if "small" in bench.config.presets else next(iter(bench.config.presets))

    def targets(r: int) -> tuple[tuple[str, list[str]], tuple[str, list[str]]]:
        keys = [k for page in range(bench.originals.pages) for k in bench.originals.page(f"b3/r{r}", page)]
        phizer, peer = _pair(bench, [(preset, k) for k in shuffled(keys, seed=r)])
        return (bench.stack.url, phizer), (bench.peers.thumbor_url, peer)

    rounds = _rounds(bench, targets, bench.connections, bench.duration)
    return {"preset": preset, "connections": bench.connections, "rounds": rounds, **_summary(rounds)}


# ------------------------------------------------------------------------------------------------ B5, B6


def service_pipeline(config: Config) -> Pipeline:
    """The pipeline exactly as the app builds it (service/app.py)."""
    return Pipeline(config.encoding, config.limits)


def _render_seconds(pipeline: Pipeline, data: bytes, preset_name: str, config: Config, clock: Callable[[], float],
                    tag: str) -> float:
    """One in-process render, timed with ``clock``; a unique digest so no per-instance cache can answer."""
    digest = hashlib.blake2b(data + tag.encode(), digest_size=16).hexdigest()
    start = clock()
    pipeline.render(data, digest, config.presets[preset_name])
    return clock() - start


B5_CASES = (("05_storm_2_5mp_baseline.jpg", "small"), ("01_kleiber_20mp_baseline.jpg", "medium"))


def b5_overhead(bench: Bench, requests: int = 30) -> dict[str, Any]:
    """Sequential misses through nginx + instance + memcached vs the same render called in-process.

    Each stack request is followed by the in-process render of the same bytes, so load that comes and goes
    on the machine hits both halves of a pair alike.
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
                start = time.perf_counter()
                conn.request("GET", f"/{preset_name}/{key}")
                resp = conn.getresponse()
                resp.read()
                stack_times.append(time.perf_counter() - start)
                if resp.status != 200 or resp.getheader("X-Cache-Status") != "MISS":
                    raise RuntimeError(f"B5: {key}: {resp.status} {resp.getheader('X-Cache-Status')}")
                data = bench.originals.pool_path(page, name).read_bytes()
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
                for r in range(rounds + 1):
                    trees = [system.tree(proc.pid) for proc in stack.instances]
                    before = [system.cpu_seconds(t) for t in trees]
                    page_time, answers = _page_fetch(stack.url, pages[r], concurrency)
                    spent = [round(system.cpu_seconds(t) - b, 2) for t, b in zip(trees, before, strict=True)]
                    bad = [a for a in answers if a[0] != 200 or a[1] != "MISS"]
                    if r == 0:
                        continue
                    results.append({"round": r, "page_s": round(page_time, 3), "ratio": round(page_time / model, 3),
                                    "slowest_s": round(max(a[2] for a in answers), 3), "not_cold_misses": len(bad),
                                    "instance_cpu_s": spent})
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
    """RSS after the run: each instance (gunicorn master + worker), memcached, nginx; thumbor for comparison."""
    instances = []
    for proc in stack.instances:
        pids = system.tree(proc.pid)
        instances.append({"name": proc.name, "rss_mb": round(sum(system.rss_mb(p) for p in pids), 1),
                          "worker_rss_mb": round(max(system.rss_mb(p) for p in pids), 1)})
    return {
        "instances": instances,
        "memcached_rss_mb": round(system.rss_mb(stack.memcached.pid), 1) if stack.memcached else None,
        "nginx_rss_mb": round(sum(system.rss_mb(p) for p in system.tree(stack.nginx.pid)), 1) if stack.nginx else None,
        "thumbor_rss_mb": [round(system.rss_mb(p), 1) for p in peers.thumbor_pids()],
        "max_instance_rss_mb": max(i["rss_mb"] for i in instances),
    }
