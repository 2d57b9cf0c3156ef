"""Metadata cannot pin memory: a real instance serving many distinct originals with fat metadata (megabytes of
JPEG APPn segments each, which Pillow keeps on the image object and which the original's bytes back) keeps only
their pixels, so its RSS stays within the intermediates budget plus a stated margin."""

from __future__ import annotations

from pathlib import Path

import requests

from service.procs import children_by_parent
from tests import support
from tests.hostile import fat_metadata_jpeg

ORIGINALS = 40
SEGMENTS = 64  # 64 x 64 KB: 4 MB of metadata per 64x64 original
BUDGET = 16 * 1024 * 1024  # limits.intermediate_cache_bytes for this instance
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
