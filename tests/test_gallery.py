"""The gallery (GET /) in a real browser: Debian's Chromium, headless, against the real stack serving the samples.

Every <img> must load with the rendition's exact width (as the pipeline computes it from the original), and the
page's own script must have filled in each caption; the test saves a screenshot and prints its path.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from service.config import parse_config
from service.gallery import page
from service.launcher import Stack
from service.pipeline import Pipeline
from service.procs import free_port
from tests.support import REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=20000", "--window-size=1400,2400",
]  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"PHIZER_ORIGINS": f"file://{REPO / 'samples'}"}
    with Stack(tmp_path_factory.mktemp("gallery"), port=free_port(), instances=2, env=env) as started:
        yield started


def chromium(tmp_path: Path, *args: str) -> str:
    run = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_gallery_loads_every_rendition_in_chromium(stack: Stack, tmp_path: Path) -> None:
    dom = chromium(tmp_path, "--dump-dom", stack.url + "/")
    images = re.findall(r"<img ([^>]*)>", dom)
    keys = sorted(p.name for p in (REPO / "samples").iterdir() if p.suffix in (".jpg", ".webp"))
    assert len(images) == len(keys) * len(stack.config.presets)
    assert f'data-loaded="{len(images)}"' in dom  # the page's script saw every image finish
    pipeline = Pipeline(stack.config.encoding, stack.config.limits)
    for attributes in images:
        fields = dict(re.findall(r'([\w-]+)="([^"]*)"', attributes))
        path = urllib.parse.urlsplit(fields["src"]).path  # absolute with ?retry=N when a shed one was retried
        key = urllib.parse.unquote(path.split("/", 2)[2])
        preset = stack.config.presets[fields["data-preset"]]
        expected = pipeline.plan((REPO / "samples" / key).read_bytes(), preset).layout.out_size[0]
        assert int(fields["data-natural"]) == expected, (key, preset.name)
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", dom)
    assert captions and not any("loading" in caption for caption in captions)
    # Chrome gets AVIF for stills (WebP for animations); each caption names the preset's negotiation order.
    assert all(re.search(r"\d+×\d+ · (avif|webp|gif) · [\d.]+ KB", caption) for caption in captions), captions
    assert all("auto: avif &gt; webp &gt; jpeg/png" in caption for caption in captions), captions
    shot = tmp_path / "gallery.png"
    chromium(tmp_path, f"--screenshot={shot}", stack.url + "/")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    print(f"gallery screenshot: {shot}")


def test_gallery_pages(stack: Stack) -> None:
    first = requests.get(stack.url + "/", timeout=30)
    assert first.status_code == 200 and first.headers["Content-Type"].startswith("text/html")
    assert first.headers["X-Cache-Status"] == "BYPASS"
    beyond = requests.get(stack.url + "/?page=99", timeout=30)
    assert beyond.status_code == 200 and "No originals." in beyond.text and "previous" in beyond.text


def test_page_size_is_configurable() -> None:
    """gallery_page_size originals a page (5 samples: pages of 2, 2, 1), with links to the others."""
    raw = {"origins": [f"file://{REPO / 'samples'}"], "presets": {"s": {"width": 320}}, "gallery_page_size": 2}
    config = parse_config(raw, {})
    pages = [page(config, number) for number in range(3)]
    assert [html.count("<section>") for html in pages] == [2, 2, 1]
    assert ["next" in html for html in pages] == [True, True, False]
    assert ["previous" in html for html in pages] == [False, True, True]


def test_captions_describe_fit_gravity_and_background() -> None:
    presets = {
        "t": {"width": 150, "height": 150, "fit": "cover", "gravity": "smart"},
        "p": {"width": 200, "height": 100, "fit": "pad", "background": "#000"},
        "n": {"width": 200, "height": 100, "fit": "pad", "gravity": "north"},
        "s": {"width": 320},
    }
    html = page(parse_config({"origins": [f"file://{REPO / 'samples'}"], "presets": presets}, {}), 0)
    for caption in ("150×150 cover smart", "200×100 pad on #000", "200×100 pad north on #ffffff", "320×auto contain"):
        assert f"({caption}, auto: avif &gt; webp &gt; jpeg/png)" in html
