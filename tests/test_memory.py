"""Memory: an idle worker gives back what a burst of renders left it holding (service/memory.py); metadata cannot
pin memory (a real instance serving many distinct originals with fat metadata, megabytes of JPEG APPn segments
each, which Pillow keeps on the image object and which the original's bytes back, keeps only their pixels, so its
RSS stays within the intermediates budget plus a stated margin); workers recycled for their size or request count
fail no request in flight."""

from __future__ import annotations

import io
import json
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from service.launcher import Stack
from service.memory import IDLE_CHECK_SECONDS, IdleTrim
from service.procs import children_by_parent, free_port
from tests import support
from tests.hostile import fat_metadata_jpeg

ORIGINALS = 40
SEGMENTS = 64  # 64 x 64 KB: 4 MB of metadata per 64x64 original
BUDGET = 16 * 1024 * 1024  # limits.intermediate_cache_bytes for this instance
RECYCLE_REQUESTS = 240  # at most this many misses per recycling test, each a render
RECYCLES = 4  # the recycling test sends misses until it has seen this many recycles
MARGIN = 64 * 1024 * 1024  # allocator slack, transient buffers (kept decodes pinning metadata: 160 MiB measured)


def worker_rss(master_pid: int) -> int:
    """Resident bytes of gunicorn's worker (the master's only child) from /proc."""
    (worker,) = children_by_parent()[master_pid]
    status = Path(f"/proc/{worker}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


def test_fat_metadata_originals_leave_rss_within_budget(tmp_path: Path) -> None:
    folder = tmp_path / "originals"
    folder.mkdir()
    for i in range(ORIGINALS + 3):
        (folder / f"fat-{i:02d}.jpg").write_bytes(fat_metadata_jpeg(SEGMENTS, seed=i))
    config = {"limits": {"intermediate_cache_bytes": BUDGET}}
    with support.instance(tmp_path, [f"file://{folder}"], config=config) as (proc, url):
        for i in range(3):  # warm up: imports, first allocations, thread pool
            assert requests.get(f"{url}/thumb/fat-{ORIGINALS + i:02d}.jpg", timeout=30).status_code == 200
        before = worker_rss(proc.pid)
        for i in range(ORIGINALS):
            response = requests.get(f"{url}/thumb/fat-{i:02d}.jpg", timeout=30)
            assert response.status_code == 200 and len(response.content) < 20_000  # no metadata in the output
        growth = worker_rss(proc.pid) - before
    print(f"RSS growth after {ORIGINALS} fat-metadata originals: {growth / 2**20:.1f} MiB")
    assert growth < BUDGET + MARGIN


@pytest.mark.parametrize(
    ("trigger", "log_line"),
    [
        ({"PHIZER_MAX_REQUESTS": "8", "PHIZER_MAX_REQUESTS_JITTER": "2"}, "requests served (PHIZER_MAX_REQUESTS)"),
        ({"PHIZER_MAX_RSS_MB": "1"}, "> PHIZER_MAX_RSS_MB=1"),  # every request finds the worker over 1 MiB
    ],
    ids=["max_requests", "max_rss"],
)
def test_recycled_workers_fail_no_request_in_flight(
    corpus: Path, tmp_path: Path, trigger: dict[str, str], log_line: str
) -> None:
    """Workers recycled again and again (their request count, or the RSS check in service/gunicorn_conf.py) under
    concurrent misses through nginx: every request is answered 200 with the right image, none fails, and each old
    worker exits only once its replacement has started (the instance never stops serving meanwhile)."""
    folder = tmp_path / "originals"
    folder.mkdir()
    photo = (corpus / "05_storm_2.5mp_baseline.jpg").read_bytes()
    for i in range(RECYCLE_REQUESTS):
        (folder / f"copy-{i:03d}.jpg").write_bytes(photo + f"copy {i}".encode())
    width, height = Image.open(folder / "copy-000.jpg").size
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"origins": [f"file://{folder}"], "presets": {"small": {"width": 320}}}))
    env = {"PHIZER_CONFIG": str(config), **trigger}
    with Stack(tmp_path / "state", port=free_port(), instances=2, env=env) as stack:
        workers_before = {pid for proc in stack.instances for pid in children_by_parent().get(proc.pid, [])}

        def recycles() -> int:
            return sum(path.read_text().count(log_line) for path in stack.logs.glob("*.log"))

        # Start-up's own requests (readiness) may already have recycled: count only the load's recycles, so that it
        # runs until workers started after ``workers_before`` have replaced those.
        before = recycles()

        def miss(i: int) -> tuple[int, tuple[int, int] | str] | None:
            # A worker past its limit keeps serving until its replacement has started, so misses that all land
            # within that time would see one recycle per instance: send them spread over time, until enough
            # recycles happened (how many misses that takes depends on how fast this machine loads a worker).
            if recycles() - before >= RECYCLES:
                return None
            time.sleep(0.3)
            try:
                response = requests.get(
                    f"{stack.url}/small/copy-{i:03d}.jpg", headers={"Accept": "image/jpeg"}, timeout=60
                )
            except requests.RequestException as exc:
                return 0, repr(exc)
            if response.status_code != 200:
                return response.status_code, response.text
            return 200, Image.open(io.BytesIO(response.content)).size

        with ThreadPoolExecutor(6) as pool:
            results = [result for result in pool.map(miss, range(RECYCLE_REQUESTS)) if result is not None]
        workers_after = {pid for proc in stack.instances for pid in children_by_parent().get(proc.pid, [])}
        logs = [(stack.logs / f"{stack.instance_name(i)}.log").read_text() for i in range(2)]
        seen = recycles() - before
        restarts = list(stack.restarts)
    print(f"{len(results)} misses, {seen} recycles ({log_line!r}): {Counter(s for s, _ in results)}")
    assert seen >= RECYCLES and workers_after != workers_before and not restarts  # recycled, not crashed instances
    assert [r for r in results if r != (200, (320, round(height * 320 / width)))] == []
    for log in logs:
        assert exits_before_replacement(log) == [], log


def exits_before_replacement(log: str) -> list[int]:
    """Workers of an instance's log that exited while no newer worker had been started to replace them."""
    booted: list[int] = []
    orphans = []
    for line in log.splitlines():
        message = json.loads(line).get("msg", "")
        if match := re.match(r"Booting worker with pid: (\d+)", message):
            booted.append(int(match[1]))
        elif (match := re.match(r"Worker exiting \(pid: (\d+)\)", message)) and booted[-1] == int(match[1]):
            orphans.append(int(match[1]))
    return orphans


def test_workers_recycling_together_under_load_fail_no_request(tmp_path: Path) -> None:
    """Both instances' workers recycled again and again while nginx keeps their connections busy.

    A request nginx writes on a kept-alive connection just as a recycling worker closes it fails with a broken
    pipe; nginx retries it on the next instance, but used to count it against this one. With ``max_fails=1`` that
    one race took the instance out of the ring for ``fail_timeout``, and when both instances recycled within those
    seconds, every request met "no live upstreams": 6,757 502s in one second of make bench, 7,422 of 8,850 here.
    With ``max_fails=0`` (nginx/nginx.conf.j2) a request fails only if it meets such a connection on both
    instances at once: measured 0-2 in 6,000-7,000 requests with 10 recycles, a rate production's recycles
    (every 5,000 requests, not 40) make far rarer. ``/presets.json`` is never cached: every request reaches an
    instance."""
    env = {"PHIZER_ORIGINS": "file:///nonexistent", "PHIZER_MAX_REQUESTS": "40"}  # jitter: 10%, as deployed
    with Stack(tmp_path / "state", port=free_port(), instances=2, env=env) as stack:

        def session(_: int) -> Counter[int]:
            statuses: Counter[int] = Counter()
            with requests.Session() as http:
                deadline = time.monotonic() + 6
                while time.monotonic() < deadline:
                    statuses[http.get(f"{stack.url}/presets.json", timeout=30).status_code] += 1
            return statuses

        with ThreadPoolExecutor(8) as pool:
            statuses = sum(pool.map(session, range(8)), Counter())
        recycles = sum(
            (stack.logs / f"{stack.instance_name(i)}.log").read_text().count("Recycling worker") for i in range(2)
        )
    print(f"{sum(statuses.values())} requests, {recycles} recycles: {statuses}")
    assert recycles >= 4, recycles
    assert set(statuses) <= {200, 502} and statuses[502] <= sum(statuses.values()) / 1000, statuses


IDLE_SLACK = 16 * 1024 * 1024  # what an idle worker may keep beyond its kept decodes after a burst
BURST_ORIGINALS = ("01_kleiber_20mp_baseline.jpg", "02_seeding_16mp_progressive.jpg", "04_picos_8mp_progressive.jpg")


def test_an_idle_instance_gives_back_the_memory_of_a_burst(tmp_path: Path) -> None:
    """Renders reuse freed heap memory instead of faulting in fresh pages (service/memory.py), so a burst of large
    renders leaves the worker big; once it idles, it must give that memory back (malloc_trim), within seconds."""
    folder = tmp_path / "originals"
    folder.mkdir()
    copies = 12
    for i in range(copies):  # distinct bytes (a trailing pad after EOI): distinct digests, no kept decode reused
        name = BURST_ORIGINALS[i % len(BURST_ORIGINALS)]
        (folder / f"{i:02d}.jpg").write_bytes((support.CORPUS / name).read_bytes() + b"\0" * (i + 1))
    config = {"limits": {"intermediate_cache_bytes": BUDGET}}
    with support.instance(tmp_path, [f"file://{folder}"], config=config) as (proc, url):
        assert requests.get(f"{url}/thumb/{0:02d}.jpg", timeout=30).status_code == 200  # imports, thread pool
        time.sleep(3 * IDLE_CHECK_SECONDS)
        before = worker_rss(proc.pid)
        with ThreadPoolExecutor(2) as pool:
            statuses = list(
                pool.map(lambda i: requests.get(f"{url}/large/{i:02d}.jpg", timeout=60).status_code, range(1, copies))
            )
        assert statuses == [200] * (copies - 1)
        after_burst = worker_rss(proc.pid)
        deadline = time.monotonic() + 10 * IDLE_CHECK_SECONDS
        while (idle := worker_rss(proc.pid)) > before + BUDGET + IDLE_SLACK and time.monotonic() < deadline:
            time.sleep(0.2)
    print(
        f"worker RSS: {before / 2**20:.0f} MiB idle before, {after_burst / 2**20:.0f} MiB after the burst, "
        f"{idle / 2**20:.0f} MiB once idle"
    )
    assert after_burst > before + BUDGET + IDLE_SLACK  # the burst did leave the worker big: the check below can fail
    assert idle <= before + BUDGET + IDLE_SLACK


def test_idle_trim_trims_once_when_work_stops() -> None:
    """Not while the process works (its free chunks are its next renders'), once when it goes quiet, not again."""
    trims: list[int] = []
    trim = IdleTrim(interval=0.05, idle_share=0.5, trim=trims.append)  # busy: over 25 ms of CPU between checks
    time.sleep(0.05)
    assert not trim.check() and trims == []  # idle from the start: nothing to give back
    until = time.process_time() + 0.1
    while time.process_time() < until:
        pass
    assert not trim.check() and trims == []  # working
    time.sleep(0.1)
    assert trim.check() and trims == [0]  # quiet after work: trimmed
    time.sleep(0.1)
    assert not trim.check() and trims == [0]  # still quiet: once is enough
