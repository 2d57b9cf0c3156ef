"""The libwebp fast path for still WebP originals (service/webp.py): the same pixels as Pillow's decode, taken for
stills only, and declined (Pillow then decodes and reports its own errors) for animations and damaged files.

Pixels are compared byte for byte with Pillow's decode of the same file, on the corpus WebP and on generated
files of every kind (lossy, lossless, alpha, 1x1, odd sizes, ICC and EXIF); metadata still comes from Pillow's
header, so a WebP must render exactly like a PNG of Pillow's decode carrying the same ICC profile and EXIF.
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, features

from service import webp
from service.decoding import FILE_ERRORS, load
from service.errors import PhizerError, TooLarge
from service.metrics import Timings
from service.pipeline import Pipeline, Rendition
from service.webp import LIBWEBP, decode_still
from tests.hostile import saved
from tests.imaging import DEFAULT_CONFIG, render

PIPELINE = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
# Keeps no intermediates: every render decodes (and says with which decoder).
DECODING = Pipeline(DEFAULT_CONFIG.encoding, dataclasses.replace(DEFAULT_CONFIG.limits, intermediate_cache_bytes=0))
SMALL, THUMB = DEFAULT_CONFIG.presets["small"], DEFAULT_CONFIG.presets["thumb"]
CORPUS_WEBP = "13_onestandsout.webp"


def pillow_decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def assert_same_pixels(data: bytes) -> Image.Image:
    """The fast decode of ``data`` equals Pillow's, mode and bytes; returns it."""
    ref = pillow_decode(data)
    fast = decode_still(data, ref.mode, ref.size)
    assert fast is not None
    assert (fast.mode, fast.size) == (ref.mode, ref.size)
    assert fast.tobytes() == ref.tobytes()
    return fast


@pytest.fixture(scope="module")
def photo(corpus: Path) -> Image.Image:
    """Photo content at an odd size (partial macroblocks on both edges)."""
    return Image.open(corpus / "06_fallenleaf_4mp_baseline.jpg").resize((603, 397), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def translucent(photo: Image.Image) -> Image.Image:
    """The photo with an alpha gradient and a fully transparent hole (whose colours only ``exact`` keeps)."""
    im = photo.convert("RGBA")
    alpha = Image.linear_gradient("L").resize(im.size)
    ImageDraw.Draw(alpha).rectangle((40, 30, 200, 120), fill=0)
    im.putalpha(alpha)
    return im


def unannounced(data: bytes) -> bytes:
    """``data`` (a VP8X file with an ALPH chunk) with the VP8X header's alpha flag cleared: Pillow still opens it
    as RGBA (libwebp's features see the chunk), and its demuxer then ignores the chunk (all opaque)."""
    assert data[12:16] == b"VP8X" and data[20] & 0x10
    return data[:20] + bytes([data[20] & ~0x10]) + data[21:]


# name -> how to make it from the photo and its translucent version
CASES: dict[str, Callable[[Image.Image, Image.Image], bytes]] = {
    "lossy": lambda photo, _: saved(photo, "WEBP", quality=80),
    "lossy-q10": lambda photo, _: saved(photo, "WEBP", quality=10),
    "lossless": lambda photo, _: saved(photo, "WEBP", lossless=True, method=0),
    "lossy-alpha": lambda _, alpha: saved(alpha, "WEBP", quality=80),
    "lossy-alpha-q20": lambda _, alpha: saved(alpha, "WEBP", quality=80, alpha_quality=20),  # lossy alpha plane
    "lossless-alpha": lambda _, alpha: saved(alpha, "WEBP", lossless=True, method=0),
    "lossless-alpha-exact": lambda _, alpha: saved(alpha, "WEBP", lossless=True, exact=True, method=0),
    "alpha-unannounced": lambda _, alpha: unannounced(saved(alpha, "WEBP", quality=80)),
    "opaque-rgba": lambda photo, _: saved(photo.convert("RGBA"), "WEBP", quality=80),  # stored without alpha
    "1x1": lambda photo, _: saved(photo.resize((1, 1)), "WEBP"),
    "1x1-lossless-alpha": lambda _, alpha: saved(alpha.resize((1, 1)), "WEBP", lossless=True),
    "1x17": lambda photo, _: saved(photo.resize((1, 17)), "WEBP"),
    "17x1-alpha": lambda _, alpha: saved(alpha.resize((17, 1)), "WEBP"),
    "3x5-lossless": lambda photo, _: saved(photo.resize((3, 5)), "WEBP", lossless=True),
    "1203x797": lambda photo, _: saved(photo.resize((1203, 797)), "WEBP", quality=90),
}


@pytest.fixture(scope="module")
def files(photo: Image.Image, translucent: Image.Image) -> dict[str, bytes]:
    return {name: make(photo, translucent) for name, make in CASES.items()}


def test_libwebp_is_the_copy_pillow_decodes_with() -> None:
    assert LIBWEBP is not None, "the fast path is off: libwebp could not be loaded"
    version = LIBWEBP.version()
    assert f"{version >> 16}.{(version >> 8) & 0xFF}.{version & 0xFF}" == features.version("webp")


def test_without_libwebp_the_fast_path_is_off_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, files: dict[str, bytes]
) -> None:
    def unloadable(path: str) -> ctypes.CDLL:
        raise OSError(f"{path}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", unloadable)
    with caplog.at_level(logging.WARNING, logger="service.webp"):
        assert webp._load() is None
    assert len(caplog.records) == 1 and "decoded by Pillow" in caplog.text
    monkeypatch.setattr(webp, "LIBWEBP", None)
    data = files["lossy"]
    assert decode_still(data, "RGB", Image.open(io.BytesIO(data)).size) is None
    timings = Timings()
    out = render(DECODING, data, SMALL, forced_format="png", timings=timings)
    assert timings.decoder == "" and out.width == 320


def test_corpus_webp_decodes_to_the_same_pixels(corpus: Path) -> None:
    assert_same_pixels((corpus / CORPUS_WEBP).read_bytes())


@pytest.mark.parametrize("name", list(CASES))
def test_generated_webps_decode_to_the_same_pixels(files: dict[str, bytes], name: str) -> None:
    fast = assert_same_pixels(files[name])
    assert fast.mode == ("RGBA" if "alpha" in name else "RGB")


@pytest.mark.parametrize("name", [*CASES, CORPUS_WEBP])
def test_the_pipeline_takes_the_fast_path_for_stills(corpus: Path, files: dict[str, bytes], name: str) -> None:
    data = (corpus / name).read_bytes() if name == CORPUS_WEBP else files[name]
    ctx = PIPELINE.plan(data, SMALL)
    decoded = load(ctx.source, ctx.data, ctx.layout.decode_size, ctx.timings)
    assert ctx.timings.decoder == "libwebp"
    ref = pillow_decode(data)
    whole = decoded.region(ref.size, (0, 0, ref.width, ref.height))
    assert (whole.mode, whole.tobytes()) == (ref.mode, ref.tobytes())


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_metadata_still_applies_like_a_png_of_the_same_pixels(photo: Image.Image, corpus: Path, fmt: str) -> None:
    """A WebP with an ICC profile (Adobe RGB) and EXIF orientation 6 renders byte for byte like a PNG holding
    Pillow's decode of it and the same metadata (the PNG goes through Pillow's decoder): rotated, converted."""
    icc = Image.open(corpus / "11_cups_adobergb.jpg").info["icc_profile"]
    exif = Image.Exif()
    exif[0x0112] = 6
    webp = saved(photo, "WEBP", quality=80, icc_profile=icc, exif=exif.tobytes())
    png = saved(pillow_decode(webp), "PNG", icc_profile=icc, exif=exif.tobytes())
    ctx = PIPELINE.plan(webp, SMALL)
    assert (ctx.orientation, ctx.icc) == (6, icc)
    for preset in (SMALL, THUMB):
        timings = Timings()
        fast = render(DECODING, webp, preset, forced_format=fmt, timings=timings)
        assert timings.decoder == "libwebp"
        assert fast == render(DECODING, png, preset, forced_format=fmt)
        assert fast.height > fast.width or preset is THUMB  # a landscape photo, upright as a portrait


def test_animations_are_left_to_pillow(photo: Image.Image) -> None:
    frames = [photo.rotate(angle) for angle in (0, 90, 180)]
    data = saved(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100)
    opened = Image.open(io.BytesIO(data))
    assert opened.n_frames == 3
    assert decode_still(data, opened.mode, opened.size) is None
    for forced in (None, "jpeg"):  # as an animation, and as a still of its first frame
        timings = Timings()
        render(DECODING, data, SMALL, forced_format=forced, timings=timings)
        assert timings.decoder == ""


def test_a_frame_other_than_the_header_said_is_declined(files: dict[str, bytes]) -> None:
    data = files["lossy"]
    im = Image.open(io.BytesIO(data))
    assert decode_still(data, im.mode, im.size) is not None
    assert decode_still(data, im.mode, (im.width + 1, im.height)) is None
    assert decode_still(data, "L", im.size) is None
    assert decode_still(data[:20], im.mode, im.size) is None


def test_the_pixel_limit_is_checked_before_decoding(corpus: Path) -> None:
    limits = dataclasses.replace(DEFAULT_CONFIG.limits, max_pixels=2560 * 1600 - 1)
    timings = Timings()
    with pytest.raises(TooLarge):
        Pipeline(DEFAULT_CONFIG.encoding, limits).render(
            (corpus / CORPUS_WEBP).read_bytes(), None, SMALL, timings=timings
        )
    assert timings.decoder == "" and "decode" not in timings.stages


def damaged(data: bytes, step: int) -> Iterator[tuple[str, bytes]]:
    """``data`` cut at every ``step``-th length, and with every ``step``-th byte inverted or one bit flipped."""
    for length in range(0, len(data), step):
        yield f"cut {length}", data[:length]
    for where in range(0, len(data), step):
        for mask in (0xFF, 1 << (where % 8)):
            flipped = bytearray(data)
            flipped[where] ^= mask
            yield f"flip {where}^{mask:#x}", bytes(flipped)


def outcome(data: bytes) -> Rendition | PhizerError:
    try:
        return PIPELINE.render(data, None, SMALL, forced_format="png")
    except PhizerError as exc:  # anything else (a 500) fails the test
        return exc


@pytest.mark.parametrize("name", ["lossy", "lossless", "lossy-alpha", "lossless-alpha"])
def test_damaged_files_decode_like_pillow_or_fall_back(photo: Image.Image, name: str) -> None:
    """Every cut and many bit flips of a small WebP: the fast decode either declines or gives exactly what
    Pillow's decode gives (never pixels where Pillow fails); the render ends in a rendition or a 4xx."""
    small = photo.resize((67, 41))
    alpha = small.convert("RGBA")
    alpha.putalpha(Image.linear_gradient("L").resize(small.size))
    data = saved(alpha if "alpha" in name else small, "WEBP", quality=70, lossless="lossless" in name)
    taken = declined = 0
    for label, variant in damaged(data, 1):
        try:
            im = Image.open(io.BytesIO(variant), formats=["WEBP"])
        except FILE_ERRORS:
            continue  # refused from the header: the pipeline never gets to decode
        fast = decode_still(variant, im.mode, im.size)
        try:
            im.load()
        except FILE_ERRORS:
            assert fast is None, label
            declined += 1
            continue
        assert fast is not None, label  # the fast path is not missed where Pillow succeeds
        assert fast.tobytes() == im.tobytes(), label
        taken += 1
    assert taken and declined
    for label, variant in damaged(data, 13):
        result = outcome(variant)
        assert isinstance(result, Rendition) or 400 <= result.status < 500, (label, result)


def test_damaged_corpus_webp_is_a_4xx_or_a_whole_image(corpus: Path) -> None:
    data = (corpus / CORPUS_WEBP).read_bytes()
    for label, variant in damaged(data, len(data) // 7):
        result = outcome(variant)
        if isinstance(result, Rendition):
            pillow_decode(result.body)
        else:
            assert 400 <= result.status < 500, (label, result)


def test_concurrent_decodes_own_their_buffers(corpus: Path, files: dict[str, bytes]) -> None:
    """Several native threads decoding at once (ctypes releases the GIL): each gets its own, correct pixels."""
    originals = [(corpus / CORPUS_WEBP).read_bytes(), files["lossy-alpha"], files["lossless"], files["1203x797"]]
    expected = [pillow_decode(data).tobytes() for data in originals]

    def decode(index: int) -> bytes:
        im = Image.open(io.BytesIO(originals[index]))
        fast = decode_still(originals[index], im.mode, im.size)
        assert fast is not None
        return fast.tobytes()

    jobs = [index % len(originals) for index in range(16)]
    with ThreadPoolExecutor(4) as pool:
        for index, got in zip(jobs, pool.map(decode, jobs), strict=True):
            assert got == expected[index], index
