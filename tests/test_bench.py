"""Smoke tests of the bench's own machinery (the bench itself runs with `make bench`, not here).

The URL walker is what keeps every miss a miss: if it repeated a path, nginx's cache would answer and the
bench would flatter phizer. Checked against a real HTTP server that counts what it is asked.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image, ImageFilter

from bench import encoders, recycle
from bench.peer import ipx_path, thumbor_path
from bench.scenarios import _browser_page
from bench.wrk import run_wrk
from service.presets import Preset
from tests.support import CountingProxy


def test_walker_requests_each_path_once_then_stops() -> None:
    paths = [f"/img/{i}.jpg" for i in range(40)]
    server = CountingProxy(files={p: b"x" * 100 for p in paths})
    try:
        result = run_wrk(server.url, paths, duration=3, connections=4, threads=2)
    finally:
        server.close()
    assert result.exhausted
    assert set(server.gets) == set(paths)
    # A thread that runs out sends the last path again while it stops; nothing else is ever repeated.
    assert {path for path, count in server.gets.items() if count > 1} <= {paths[-1]}
    assert result.errors == 0
    assert result.mean_body_bytes == 100  # bodies only, as each side's encoder made them


def test_cycling_walker_asks_every_path_round_and_round() -> None:
    """B1's page of hits: every path of the list, again and again, for the whole run."""
    paths = [f"/img/{i}.jpg" for i in range(10)]
    server = CountingProxy(files={p: b"x" * 100 for p in paths})
    try:
        result = run_wrk(server.url, paths, duration=2, connections=2, threads=2, cycle=True)
    finally:
        server.close()
    assert not result.exhausted and result.errors == 0
    assert set(server.gets) == set(paths)
    counts = sorted(server.gets.values())
    assert counts[0] >= 5 and counts[-1] - counts[0] <= 2 * 2, counts  # even: each thread walks the list in turn


def test_walker_counts_failed_answers() -> None:
    server = CountingProxy(files={})
    try:
        result = run_wrk(server.url, [f"/missing/{i}" for i in range(20)], duration=2, connections=2, threads=1)
    finally:
        server.close()
    assert result.errors >= 15


def test_thumbor_urls_match_phizer_presets() -> None:
    contain = Preset("small", width=320, quality=82)
    cover = Preset("thumb", width=150, height=150, fit="cover", quality=80, quality_by_format={"png": 90})
    assert thumbor_path(contain, "a/b.jpg", "jpeg") == "/unsafe/fit-in/320x0/filters:quality(82):format(jpeg)/a/b.jpg"
    assert thumbor_path(cover, "c.png", "png") == "/unsafe/150x150/filters:quality(90):format(png)/c.png"


def test_ipx_urls_match_phizer_presets() -> None:
    contain = Preset("small", width=320, quality=82)
    cover = Preset("thumb", width=150, height=150, fit="cover", quality=80, quality_by_format={"png": 90})
    box = Preset("box", width=400, height=300, quality=85)
    assert ipx_path(contain, "a/b.jpg", "jpeg") == "/w_320,q_82,f_jpeg/a/b.jpg"
    assert ipx_path(cover, "c.png", "webp") == "/s_150x150,q_80,f_webp/c.png"
    assert ipx_path(box, "d.jpg", "jpeg") == "/s_400x300,fit_inside,q_85,f_jpeg/d.jpg"
    # At each side's defaults the peer chooses its own quality.
    assert ipx_path(contain, "a/b.jpg", "webp", equal=False) == "/w_320,f_webp/a/b.jpg"
    assert thumbor_path(contain, "a/b.jpg", "webp", equal=False) == "/unsafe/fit-in/320x0/filters:format(webp)/a/b.jpg"


def test_browser_page_times_every_image(tmp_path: Path) -> None:
    """B7's Chromium run: a page of images from a local server, timed by the page's own load event."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), "teal").save(buf, "JPEG")
    paths = [f"/img/{i}.jpg" for i in range(5)]
    server = CountingProxy(files={p: buf.getvalue() for p in paths})
    try:
        result = _browser_page(tmp_path, [server.url + p for p in paths])
    finally:
        server.close()
    assert result["decoded"] == 5 and result["images"] == 5
    assert 0 < result["last_image_ms"] <= result["load_ms"]
    assert set(server.gets) == set(paths)


def test_encoder_curves_tool_runs_on_one_small_photo(tmp_path: Path) -> None:
    """bench.encoders end to end on the corpus' smallest photo at 64 px: every setting measured, a report with
    the tables and the choices, and the same report again from the saved figures."""
    out = tmp_path / "encoders.md"
    assert encoders.main(["--photos", "16", "--sizes", "64", "--repeat", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| webp q82 m0 |" in text and "| jpeg q82 |" in text and "- WebP method: " in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert len(saved["results"]) == len(encoders.default_settings())
    assert all(0.5 < r["ssim"] <= 1 and r["bytes"] > 0 for r in saved["results"])
    assert encoders.main(["--out", str(out), "--report-only"]) == 0
    assert out.read_text() == text


def test_ssim_orders_degradations() -> None:
    im = Image.linear_gradient("L").resize((128, 96)).convert("RGB")
    im.paste((200, 40, 90), (30, 20, 90, 70))
    blurred = im.filter(ImageFilter.GaussianBlur(1))
    assert encoders.ssim(im, im) == pytest.approx(1.0)
    assert 1.0 > encoders.ssim(im, blurred) > encoders.ssim(im, im.filter(ImageFilter.GaussianBlur(4)))


def test_recycle_tool_compares_both_ways(tmp_path: Path) -> None:
    """bench.recycle end to end, small: both ways recycle the workers under its load and answer every miss."""
    out = tmp_path / "recycle.md"
    argv = ["--requests", "48", "--clients", "4", "--limit", "8", "--rounds", "1", "--state", str(tmp_path)]
    assert recycle.main([*argv, "--out", str(out)]) == 0
    rows = {row["mode"]: row for row in json.loads(out.with_suffix(".json").read_text())}
    assert set(rows) == set(recycle.MODES)
    for row in rows.values():
        assert row["statuses"] == {"200": 48} and row["recycles"] >= 2, row
    assert "| hand-over |" in out.read_text() and "| gunicorn |" in out.read_text()
