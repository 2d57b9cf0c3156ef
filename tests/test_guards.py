"""Guards that bound an original's cost before the expensive step: JPEG scans, every frame's canvas, PNG text,
and the output size each encoder can write; every refusal is a 4xx (TooLarge/Unprocessable), never a 500."""

from __future__ import annotations

import io
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from service.config import Limits
from service.errors import TooLarge, Unprocessable
from service.guards import configure_decoders, jpeg_scans
from service.pipeline import Pipeline
from service.presets import Preset
from tests.imaging import DEFAULT_CONFIG, decode, render

SMALL = Preset("small", 320)


@pytest.fixture
def decoders() -> Iterator[None]:
    """Pillow's limits are process-wide: whatever a test sets, the defaults come back afterwards."""
    yield
    configure_decoders(DEFAULT_CONFIG.limits)


def crafted_jpeg_scans(count: int) -> bytes:
    """A marker stream with ``count`` scans whose data holds stuffed 0xFF00 bytes and restart markers."""
    sos = b"\xff\xda" + struct.pack(">H", 8) + b"\x01\x01\x00\x00\x3f\x00"
    scan = sos + b"\x12\xff\x00\x34\xff\xd0\x56\xff\x00"
    table = b"\xff\xc4" + struct.pack(">H", 5) + b"\x00\xff\xda"  # a segment whose body holds FF DA: skipped
    return b"\xff\xd8" + table + scan * count + b"\xff\xd9"


def test_scans_are_counted_from_markers(corpus: Path) -> None:
    assert jpeg_scans((corpus / "05_storm_2.5mp_baseline.jpg").read_bytes(), 100) == 1
    assert jpeg_scans((corpus / "02_seeding_16mp_progressive.jpg").read_bytes(), 100) == 10
    assert jpeg_scans(crafted_jpeg_scans(37), 100) == 37
    started = time.perf_counter()
    assert jpeg_scans(crafted_jpeg_scans(200_000), 100) == 101  # stops counting past the limit
    assert time.perf_counter() - started < 0.5


def test_too_many_scans_is_refused_before_decoding(corpus: Path) -> None:
    strict = Pipeline(DEFAULT_CONFIG.encoding, Limits(max_jpeg_scans=5))
    with pytest.raises(TooLarge, match="max_jpeg_scans"):
        render(strict, (corpus / "04_picos_8mp_progressive.jpg").read_bytes(), SMALL)
    assert render(strict, (corpus / "16_storm_720_30k.jpg").read_bytes(), SMALL).width == 320


def growing_gif(screen: int, frame: int) -> bytes:
    """A two-frame GIF whose second frame's descriptor is ``frame`` px square on a ``screen`` px logical screen."""
    out = io.BytesIO()
    first = Image.new("P", (screen, screen), 1)
    first.putpalette([0, 0, 0, 255, 0, 0])
    first.save(out, "GIF")
    data = out.getvalue()
    descriptor = data.index(b"\x2c\x00\x00\x00\x00")  # the first (only) image descriptor, at 0,0
    image_block = data[descriptor:-1]  # descriptor, LZW data; without the trailer
    grown = b"\x2c" + struct.pack("<HHHH", 0, 0, frame, frame) + image_block[9:]
    return data[:-1] + grown + b"\x3b"


def test_a_frame_growing_the_canvas_past_max_pixels_is_refused(decoders: None) -> None:
    limits = Limits(max_pixels=100_000)
    configure_decoders(limits)
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, limits)
    with pytest.raises(TooLarge):
        render(pipeline, growing_gif(100, 4000), SMALL)  # 10,000 px in the header, 16 MP in frame two


def test_png_text_is_bounded(decoders: None) -> None:
    configure_decoders(DEFAULT_CONFIG.limits)
    assert DEFAULT_CONFIG.limits.max_png_text_bytes == PngImagePlugin.MAX_TEXT_MEMORY
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (2 * 1024 * 1024), zip=True)  # 2 MiB of text in a few KB
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(out, "PNG", pnginfo=info)
    with pytest.raises(Unprocessable):
        render(Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits), out.getvalue(), SMALL)


def test_an_output_over_an_encoders_maximum_is_a_4xx() -> None:
    out = io.BytesIO()
    Image.new("L", (2, 70_000), 128).save(out, "PNG")
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    tall = Preset("w", 320)  # width only: a 2 px wide original is not enlarged, so the output is 2x70000
    with pytest.raises(TooLarge, match="webp's 16383 px"):
        render(pipeline, out.getvalue(), tall, negotiated="webp")
    with pytest.raises(TooLarge, match="jpeg's 65535 px"):
        render(pipeline, out.getvalue(), tall, forced_format="jpeg")
    assert decode(render(pipeline, out.getvalue(), tall, forced_format="png").body).size == (2, 70_000)
