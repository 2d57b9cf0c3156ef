"""Guards that bound an original's cost before the expensive step: JPEG scans, every frame's canvas, PNG text,
and the output size each encoder can write; every refusal is a 4xx (TooLarge/Unprocessable), never a 500."""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import PngImagePlugin

from service.config import Limits
from service.errors import TooLarge, Unprocessable
from service.guards import configure_decoders, gif_frames, jpeg_segments
from service.pipeline import Pipeline
from service.presets import Preset
from tests.hostile import (
    fat_icc_jpeg,
    growing_gif,
    many_chunks_png,
    many_comments_gif,
    many_frames_gif,
    many_segments_jpeg,
    png_iccp_bomb,
    stray_bytes_jpeg,
    tall_png,
    text_png,
    tiny_scans,
)
from tests.imaging import DEFAULT_CONFIG, decode, render

SMALL = Preset("small", 320)


@pytest.fixture
def decoders() -> Iterator[None]:
    """Pillow's limits are process-wide: whatever a test sets, the defaults come back afterwards."""
    yield
    configure_decoders(DEFAULT_CONFIG.limits)


def test_scans_are_counted_from_markers(corpus: Path) -> None:
    assert jpeg_segments((corpus / "05_storm_2.5mp_baseline.jpg").read_bytes(), 10**9, 100)[1] == 1
    assert jpeg_segments((corpus / "02_seeding_16mp_progressive.jpg").read_bytes(), 10**9, 100)[1] == 10
    assert jpeg_segments(b'\xff\xd8' + tiny_scans(37) + b'\xff\xd9', 10**9, 100)[1] == 37
    # stops counting past the limit
    started = time.perf_counter()
    assert jpeg_segments(b'\xff\xd8' + tiny_scans(200_000) + b'\xff\xd9', 10**9, 100)[1] == 101
    assert time.perf_counter() - started < 0.5


def test_too_many_scans_is_refused_before_decoding(corpus: Path) -> None:
    strict = Pipeline(DEFAULT_CONFIG.encoding, Limits(max_jpeg_scans=5))
    with pytest.raises(TooLarge, match="max_jpeg_scans"):
        render(strict, (corpus / "04_picos_8mp_progressive.jpg").read_bytes(), SMALL)
    assert render(strict, (corpus / "16_storm_720_30k.jpg").read_bytes(), SMALL).width == 320


def test_a_frame_growing_the_canvas_past_max_pixels_is_refused(decoders: None) -> None:
    limits = Limits(max_pixels=100_000)
    configure_decoders(limits)
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, limits)
    with pytest.raises(TooLarge):
        render(pipeline, growing_gif(100, 4000), SMALL)  # 10,000 px in the header, 16 MP in frame two


def test_png_text_is_bounded(decoders: None) -> None:
    configure_decoders(DEFAULT_CONFIG.limits)
    assert DEFAULT_CONFIG.limits.max_png_text_bytes == PngImagePlugin.MAX_TEXT_MEMORY
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    with pytest.raises(Unprocessable, match="max_png_text_bytes"):
        render(pipeline, text_png(2 * 1024 * 1024), SMALL)  # 2 MiB of text in a few KB
    with pytest.raises(Unprocessable, match="max_png_text_bytes"):
        render(pipeline, png_iccp_bomb(2 * 1024 * 1024), SMALL)  # an ICC profile inflating to 2 MiB
    assert render(pipeline, text_png(10_000), SMALL).width == 64  # ordinary text is fine


def test_an_output_over_an_encoders_maximum_is_a_4xx() -> None:
    data = tall_png(70_000)
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    tall = Preset("w", 320)  # width only: a 2 px wide original is not enlarged, so the output is 2x70000
    with pytest.raises(TooLarge, match="webp's 16383 px"):
        render(pipeline, data, tall, negotiated="webp")
    with pytest.raises(TooLarge, match="jpeg's 65535 px"):
        render(pipeline, data, tall, forced_format="jpeg")
    assert decode(render(pipeline, data, tall, forced_format="png").body).size == (2, 70_000)


def test_gif_frames_are_counted_from_blocks_with_an_early_exit() -> None:
    assert gif_frames(many_frames_gif(7), 100) == (7, (1, 1))
    assert gif_frames(growing_gif(100, 4000), 100) == (2, (4000, 4000))
    started = time.perf_counter()
    assert gif_frames(many_frames_gif(200_000), 100)[0] == 101
    assert time.perf_counter() - started < 0.1


def test_a_gif_of_200k_frames_is_a_quick_still() -> None:
    data = many_frames_gif(200_000)
    started = time.perf_counter()
    rendition = render(Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits), data, SMALL)
    assert time.perf_counter() - started < 1.0
    assert getattr(decode(rendition.body), "n_frames", 1) == 1  # over limits.max_frames: served as a still


def test_a_frame_beyond_the_header_is_refused_from_the_blocks() -> None:
    """Without Pillow's own limit (set per process), the block walk alone refuses the grown canvas."""
    with pytest.raises(TooLarge, match="12000x12000"):
        render(Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits), growing_gif(100, 12000), SMALL)


@pytest.mark.parametrize(
    "make",
    [
        lambda n: many_comments_gif(n),  # Pillow joins a frame's comments quadratically: 3M empty ones took minutes
        lambda n: many_chunks_png(n),
        lambda n: many_segments_jpeg(n),
        lambda n: stray_bytes_jpeg(n, 0xFF),  # fill bytes: 10 MB of them took 8.7 s
        lambda n: stray_bytes_jpeg(n, 0x00),
    ],
    ids=["gif-extensions", "png-chunks", "jpeg-segments", "jpeg-fill-bytes", "jpeg-junk"],
)
def test_too_many_structures_are_refused_before_pillow_parses_them(make: Callable[[int], bytes]) -> None:
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    assert render(pipeline, make(1000), SMALL).width in (1, 64)  # ordinary counts are fine
    data = make(2_000_000)  # 6-24 MB of empty structures
    started = time.perf_counter()
    with pytest.raises(TooLarge, match="max_blocks"):
        render(pipeline, data, SMALL)
    assert time.perf_counter() - started < 0.5
    strict = Pipeline(DEFAULT_CONFIG.encoding, Limits(max_blocks=500))
    with pytest.raises(TooLarge, match="max_blocks"):
        render(strict, make(1000), SMALL)


def test_gif_comment_bytes_are_bounded_like_png_text() -> None:
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    assert render(pipeline, many_comments_gif(10, 1000), SMALL).width == 1
    started = time.perf_counter()
    with pytest.raises(TooLarge, match="max_png_text_bytes"):
        render(pipeline, many_comments_gif(10, 200_000), SMALL)  # 2 MB of comments in one frame
    assert time.perf_counter() - started < 0.5


def test_embedded_profiles_are_not_kept_after_the_render() -> None:
    """The sRGB transforms are cached by the profile's digest: megabyte profiles do not stay in memory."""
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    render(pipeline, fat_icc_jpeg(1000, 0), SMALL)  # warm up
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for seed in range(1, 9):
            assert render(pipeline, fat_icc_jpeg(2 * 1024 * 1024, seed), SMALL).width == 64
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth < 1024 * 1024  # keyed by the profiles themselves: 16 MiB
