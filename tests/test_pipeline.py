"""The image pipeline end to end (bytes in, rendition out): the Pillow build, golden geometry, format
negotiation, encoding, alpha, animation and every bad-input error class."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import itertools
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import ExifTags, Image, features

from service.config import Encoding, Limits
from service.errors import TooLarge, Unprocessable, UnsupportedMedia
from service.formats import choose_format
from service.geometry import output_size
from service.intermediates import Decode, Intermediate, IntermediateCache
from service.metrics import Timings
from service.pipeline import Pipeline
from service.presets import Preset
from tests.imaging import DEFAULT_CONFIG, corpus_files, decode, psnr, render
from tests.support import REPO

PIPELINE = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
SMALL = DEFAULT_CONFIG.presets["small"]
# Per corpus file and format token: the format served and its decoded mode.
GOLDEN = {
    # Grayscale stays grayscale (WebP has no gray mode; AVIF has, with libavif >= 1.3).
    "08_grey_4mp_grayscale.jpg": {"": ("jpeg", "L"), "webp": ("webp", "RGB"), "avif": ("avif", "L")},
    "12_kite_alpha.png": {"": ("png", "RGBA"), "webp": ("webp", "RGBA"), "avif": ("avif", "RGBA")},
    # An animation stays one: an AVIF browser gets animated WebP.
    "14_sunset_anim.gif": {"": ("gif", "P"), "webp": ("webp", "RGBA"), "avif": ("webp", "RGBA")},
}
DEFAULT_GOLDEN = {"": ("jpeg", "RGB"), "webp": ("webp", "RGB"), "avif": ("avif", "RGB")}


def save(im: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


def test_imported_pil_is_the_simd_build_with_the_codecs_we_need() -> None:
    import PIL

    assert ".post" in PIL.__version__, f"plain Pillow {PIL.__version__} replaced pillow-simd"
    for feature in ("jpg", "webp", "zlib", "littlecms2"):
        assert features.check(feature), f"pillow-simd was built without {feature}"
    # AVIF would need libavif >= 1.0 in the build; Debian bookworm ships 0.11: it comes from pillow-avif-plugin.
    assert Image.SAVE["AVIF"].__module__ == "pillow_avif.AvifImagePlugin"


def test_avif_plugin_leaves_pillow_simd_in_place() -> None:
    """pillow-avif-plugin must not bring plain Pillow (which would overwrite pillow-simd's PIL/): it declares no
    Pillow dependency outside its test extra, the constraint against plain Pillow is still there, pip resolves the
    plugin under it without an index, and no plain Pillow is installed."""
    requires = importlib.metadata.requires("pillow-avif-plugin") or []
    assert not [r for r in requires if r.lower().startswith("pillow") and "extra ==" not in r], requires
    assert "pillow<0" in (REPO / "constraints.txt").read_text().splitlines()
    version = importlib.metadata.version("pillow-avif-plugin")
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-c", str(REPO / "constraints.txt")]
    resolved = subprocess.run([*pip, f"pillow-avif-plugin=={version}"], capture_output=True, text=True, timeout=120)
    assert resolved.returncode == 0, resolved.stdout + resolved.stderr
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("pillow")


def test_avif_encodes_and_decodes_with_the_plugin(corpus: Path) -> None:
    """The AVIF rendition decodes (the plugin decodes too) to the preset's size and shows the JPEG's picture;
    quality follows the preset (its JPEG-scale quality mapped to AVIF's, or a per-format override)."""
    data = (corpus / "05_storm_2.5mp_baseline.jpg").read_bytes()
    avif = render(PIPELINE, data, SMALL, negotiated="avif")
    jpeg = decode(render(PIPELINE, data, SMALL).body).convert("RGB")
    out = decode(avif.body)
    assert (avif.format, avif.content_type, out.format, out.size) == ("avif", "image/avif", "AVIF", (320, 213))
    assert psnr(out.convert("RGB"), jpeg) > 32
    low = render(PIPELINE, data, dataclasses.replace(SMALL, quality_by_format={"avif": 20}), negotiated="avif")
    assert len(low.body) < len(avif.body) / 2
    forced = render(PIPELINE, data, SMALL, forced_format="avif")
    assert forced.body == avif.body  # the suffix and the token give the same rendition
    with pytest.raises(UnsupportedMedia):  # an output only: the plugin's decoder is not among ours
        render(PIPELINE, avif.body, SMALL)


def test_simd_build_uses_avx2_when_the_cpu_has_it() -> None:
    cpu_flags = Path("/proc/cpuinfo").read_text().split()
    if "avx2" not in cpu_flags:
        pytest.skip(reason="this CPU has no AVX2, so the SSE4 build is the right one")
    objdump = shutil.which("objdump")
    assert objdump, "objdump missing: `make install` installs binutils"
    from PIL import _imaging

    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", _imaging.__file__], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    # 256-bit ymm registers only appear when the resampling code was compiled with -mavx2.
    assert "%ymm" in listing, "pillow-simd was compiled without -mavx2 on an AVX2 CPU"


@pytest.mark.parametrize("token", ["", "webp", "avif"], ids=["accept-default", "accept-webp", "accept-avif"])
def test_golden_geometry_format_and_mode(corpus: Path, token: str) -> None:
    """Every corpus file x every default preset: exact size, negotiated format, pixel mode, frames."""
    for item in corpus_files(corpus):
        data = item.path.read_bytes()
        fmt, mode = GOLDEN.get(item.path.name, DEFAULT_GOLDEN)[token]
        for preset in DEFAULT_CONFIG.presets.values():
            rendition = render(PIPELINE, data, preset, negotiated=token)
            out = decode(rendition.body)
            size = output_size(*item.upright, preset)
            where = (item.path.name, preset.name, token)
            assert (rendition.width, rendition.height) == size == out.size, where
            assert rendition.format == fmt and out.format == fmt.upper(), where
            assert rendition.content_type == f"image/{fmt}", where
            assert out.mode == mode, where
            assert getattr(out, "n_frames", 1) == (12 if item.path.name == "14_sunset_anim.gif" else 1), where
            assert ExifTags.Base.Orientation not in out.getexif(), where


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("jpeg", False, False, "auto", None, ""), "jpeg"),
        (("jpeg", False, False, "auto", None, "webp"), "webp"),
        (("png", True, False, "auto", None, ""), "png"),
        (("gif", True, True, "auto", None, ""), "gif"),
        (("gif", True, True, "auto", None, "webp"), "webp"),
        (("webp", False, False, "source", None, ""), "webp"),
        (("png", True, False, "jpeg", None, "webp"), "jpeg"),
        (("jpeg", False, False, "auto", "png", "webp"), "png"),
        (("jpeg", False, False, "jpeg", "webp", ""), "webp"),
        (("jpeg", False, False, "auto", None, "avif"), "avif"),
        (("png", True, False, "auto", None, "avif"), "avif"),  # AVIF keeps alpha
        (("gif", True, True, "auto", None, "avif"), "webp"),  # animations: AVIF browsers take animated WebP
        (("jpeg", False, False, "avif", None, ""), "avif"),
        (("gif", True, True, "auto", "avif", "webp"), "avif"),  # a forced AVIF of an animation is a still
    ],
)
def test_choose_format(args: tuple, expected: str) -> None:
    assert choose_format(*args) == expected


def test_forced_format_and_source_format(corpus: Path) -> None:
    data = (corpus / "05_storm_2.5mp_baseline.jpg").read_bytes()
    assert render(PIPELINE, data, SMALL, negotiated="webp", forced_format="png").format == "png"
    gif = render(PIPELINE, data, SMALL, forced_format="gif")
    assert decode(gif.body).format == "GIF"
    webp = (corpus / "13_onestandsout.webp").read_bytes()
    assert render(PIPELINE, webp, dataclasses.replace(SMALL, format="source")).format == "webp"


def test_jpeg_encoding_progressive_above_threshold_quality_per_format(corpus: Path) -> None:
    data = (corpus / "05_storm_2.5mp_baseline.jpg").read_bytes()
    preset = Preset("p", 400, quality=90, quality_by_format={"jpeg": 30})
    low = render(PIPELINE, data, preset)
    high = render(PIPELINE, data, dataclasses.replace(preset, quality_by_format={}))
    assert len(low.body) < len(high.body) / 2  # the per-format quality won
    assert decode(high.body).info.get("progressive")  # 400x267 is above the default 100k pixels
    tiny = render(PIPELINE, data, Preset("t", 100))
    assert not decode(tiny.body).info.get("progressive")


def test_metadata_stripped_except_what_config_keeps(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Copyright] = "(c) phizer tests"
    exif[ExifTags.Base.Make] = "Secret Camera"
    exif[ExifTags.Base.Orientation] = 3
    data = save(Image.new("RGB", (200, 100), "teal"), "JPEG", exif=exif.tobytes())
    stripped = decode(render(PIPELINE, data, SMALL).body)
    assert len(stripped.getexif()) == 0 and "icc_profile" not in stripped.info
    keeping = Pipeline(Encoding(keep_metadata=("copyright", "orientation")), Limits())
    kept = decode(render(keeping, data, SMALL).body).getexif()
    assert dict(kept) == {ExifTags.Base.Copyright: "(c) phizer tests"}


def soft_disc(size: int = 200) -> Image.Image:
    """A red disc with a soft edge on fully transparent *black*, the classic source of black fringes."""
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    for y in range(size):
        for x in range(size):
            d = ((x - size / 2) ** 2 + (y - size / 2) ** 2) ** 0.5
            alpha = max(0, min(255, int((size * 0.4 - d) * 16)))
            if alpha:
                im.putpixel((x, y), (255, 0, 0, alpha))
    return im


def test_alpha_kept_for_png_and_flattened_on_white_for_jpeg(corpus: Path) -> None:
    kite = render(PIPELINE, (corpus / "12_kite_alpha.png").read_bytes(), SMALL)
    out = decode(kite.body)
    assert kite.format == "png" and out.mode == "RGBA" and out.getchannel("A").getextrema()[0] < 255

    data = save(soft_disc(), "PNG")
    as_png = decode(render(PIPELINE, data, Preset("p", 100)).body)
    assert as_png.mode == "RGBA" and as_png.getpixel((0, 0))[3] == 0 and as_png.getpixel((50, 50))[3] == 255
    as_jpeg = decode(render(PIPELINE, data, Preset("p", 100), forced_format="jpeg").body)
    assert as_jpeg.mode == "RGB"
    # Red and white both have R=255: any dark fringe (alpha flattened on black) pulls R down.
    red_min = as_jpeg.getchannel("R").getextrema()[0]
    assert red_min > 230, f"dark fringe: min R {red_min}"
    assert min(as_jpeg.getpixel((0, 0))) > 245  # the background is white
    green = Pipeline(dataclasses.replace(DEFAULT_CONFIG.encoding, background="#00ff00"), DEFAULT_CONFIG.limits)
    corner = decode(render(green, data, Preset("p", 100), forced_format="jpeg").body).getpixel((0, 0))
    assert corner[0] < 10 and corner[1] > 245


def test_opaque_alpha_channel_is_dropped() -> None:
    data = save(Image.new("RGBA", (300, 200), (10, 20, 30, 255)), "PNG")
    rendition = render(PIPELINE, data, SMALL)
    assert rendition.format == "jpeg" and decode(rendition.body).mode == "RGB"


def frame_durations(im: Image.Image) -> list[int]:
    """Every frame's duration in ms (WebP only fills it in once the frame is loaded)."""
    durations = []
    for i in range(im.n_frames):
        im.seek(i)
        im.load()
        durations.append(im.info["duration"])
    return durations


def test_animation_keeps_frames_durations_and_loop(corpus: Path) -> None:
    source = Image.open(corpus / "14_sunset_anim.gif")
    durations = frame_durations(source)
    assert len(durations) == 12
    data = (corpus / "14_sunset_anim.gif").read_bytes()
    for webp in (False, True):
        out = decode(render(PIPELINE, data, SMALL, negotiated="webp" if webp else "").body)
        assert out.n_frames == 12 and out.size == (320, 213)
        assert frame_durations(out) == durations, webp
        assert out.info.get("loop") == source.info.get("loop")


def test_animated_webp_stays_animated(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (400, 200), colour) for colour in ("red", "lime", "blue")]
    path = tmp_path / "anim.webp"
    frames[0].save(path, "WEBP", save_all=True, append_images=frames[1:], duration=[50, 100, 150], loop=0)
    data = path.read_bytes()
    as_webp = decode(render(PIPELINE, data, Preset("p", 100), negotiated="webp").body)
    assert (as_webp.format, as_webp.n_frames, as_webp.size) == ("WEBP", 3, (100, 50))
    assert frame_durations(as_webp) == [50, 100, 150]
    as_gif = decode(render(PIPELINE, data, Preset("p", 100)).body)
    assert (as_gif.format, as_gif.n_frames, frame_durations(as_gif)) == ("GIF", 3, [50, 100, 150])
    as_gif.seek(1)
    red, green, blue = as_gif.convert("RGB").getpixel((50, 25))
    assert red < 15 and green > 240 and blue < 15  # the second frame is the green one (lossy WebP: nearly)


@pytest.mark.parametrize(
    ("encoding", "limits"),
    [
        (Encoding(), Limits(max_frames=11)),
        (Encoding(), Limits(max_animation_pixels=11 * 480 * 320)),
        (Encoding(animation=False), Limits()),
    ],
    ids=["over-frame-limit", "over-animation-pixels", "animation-disabled"],
)
def test_animation_over_limits_is_a_still(corpus: Path, encoding: Encoding, limits: Limits) -> None:
    data = (corpus / "14_sunset_anim.gif").read_bytes()
    for webp in (False, True):
        out = decode(render(Pipeline(encoding, limits), data, SMALL, negotiated="webp" if webp else "").body)
        assert getattr(out, "n_frames", 1) == 1 and out.size == (320, 213)
        assert out.format == ("WEBP" if webp else "JPEG")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` and has no pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def corrupt_png() -> bytes:
    """A PNG whose compressed pixel stream is garbage in the middle (valid chunk layout, so it opens)."""
    data = bytearray(save(Image.radial_gradient("L").convert("RGB"), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 2 : start + 1002] = b"\xff" * 1000
    return bytes(data)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda corpus: b"hello, I am not an image", UnsupportedMedia),
        (lambda corpus: b"", UnsupportedMedia),
        (lambda corpus: save(Image.new("RGB", (50, 50)), "BMP"), UnsupportedMedia),
        (lambda corpus: save(Image.new("RGB", (50, 50)), "TIFF"), UnsupportedMedia),
        (lambda corpus: (corpus / "16_storm_720_30k.jpg").read_bytes()[:15000], Unprocessable),
        (lambda corpus: (corpus / "12_kite_alpha.png").read_bytes()[:100000], Unprocessable),
        (lambda corpus: (corpus / "14_sunset_anim.gif").read_bytes()[:200000], Unprocessable),
        (lambda corpus: corrupt_png(), Unprocessable),
        (lambda corpus: png_header_only(10000, 6000), TooLarge),  # over the 50 MP limit, under Pillow's bomb check
        (lambda corpus: png_header_only(200000, 200000), TooLarge),  # Pillow's own DecompressionBombError
    ],
    ids=[
        "text",
        "empty",
        "bmp",
        "tiff",
        "truncated-jpeg",
        "truncated-png",
        "truncated-gif",
        "corrupt-png",
        "too-many-pixels",
        "decompression-bomb",
    ],
)
def test_bad_input_maps_to_the_right_error(corpus: Path, make, error: type) -> None:
    with pytest.raises(error) as raised:
        render(PIPELINE, make(corpus), SMALL)
    assert raised.value.reason and "\n" not in raised.value.reason


def test_pixel_limit_is_checked_from_the_header(corpus: Path) -> None:
    strict = Pipeline(DEFAULT_CONFIG.encoding, Limits(max_pixels=720 * 480 - 1))
    with pytest.raises(TooLarge):
        render(strict, (corpus / "16_storm_720_30k.jpg").read_bytes(), SMALL)


def keep(cache: IntermediateCache, digest: str, entry: Intermediate) -> None:
    """Decode-and-keep as a render does: claim the decode, hand the result back."""
    claim = cache.lookup(digest, (1, 1), lambda: (1, 1))
    assert isinstance(claim, Decode), f"{digest} was kept already"
    cache.done(claim, entry)


def kept(cache: IntermediateCache, digest: str) -> bool:
    """Whether ``digest`` is kept (a lookup that finds nothing claims a decode: given back at once)."""
    found = cache.lookup(digest, (10, 10), lambda: (10, 10))
    if isinstance(found, Decode):
        cache.done(found, None)
    return isinstance(found, Intermediate)


def test_intermediate_cache_is_an_lru_bounded_in_bytes() -> None:
    cache = IntermediateCache(max_bytes=3 * 100 * 100 * 4)  # Pillow keeps RGB in 4 bytes a pixel

    def entry(size: int = 100) -> Intermediate:
        return Intermediate(Image.new("RGB", (size, size)), 1.0)

    for name in "abc":
        keep(cache, name, entry())
    assert kept(cache, "a")  # a is now the most recently used
    keep(cache, "d", entry())
    assert not kept(cache, "b")  # b was the least recently used
    assert all(kept(cache, name) for name in "acd")
    assert cache.nbytes == 3 * 100 * 100 * 4
    keep(cache, "huge", entry(1000))
    assert not kept(cache, "huge") and cache.nbytes <= cache.max_bytes


def test_an_intermediate_that_served_every_preset_is_evicted_first() -> None:
    """nginx caches each rendition: the kept original done with every preset goes before one still in use."""
    cache = IntermediateCache(max_bytes=2 * 100 * 100 * 4, presets=("thumb", "large"))

    def serve(digest: str, preset: str) -> None:
        found = cache.lookup(digest, (10, 10), lambda: (10, 10), preset)
        if isinstance(found, Decode):
            cache.done(found, Intermediate(Image.new("RGB", (100, 100)), 1.0))

    serve("busy", "thumb")
    serve("done", "thumb")
    serve("done", "large")  # most recently used, but it has served both presets
    serve("new", "thumb")
    assert kept(cache, "busy") and not kept(cache, "done")


def test_a_kept_intermediate_shrinks_to_what_its_presets_still_to_come_need() -> None:
    """Once an original's largest preset is rendered, its kept decode is reduced for the smaller ones."""
    cache = IntermediateCache(max_bytes=10**8, presets=("thumb", "medium", "large"))
    needs = {"thumb": (150, 100), "medium": (800, 600), "large": (1600, 1200)}
    claim = cache.lookup("x", (1600, 1200), lambda: needs["large"], "large")
    assert isinstance(claim, Decode)
    cache.done(claim, Intermediate(Image.new("RGB", (2400, 1800)), 2.0))
    cache.shrink("x", lambda: needs)  # large rendered: medium needs 1200x900 of it
    medium = cache.lookup("x", (800, 600), lambda: needs["large"], "medium")
    assert isinstance(medium, Intermediate) and (medium.size, medium.scale) == ((1200, 900), 4.0)
    assert cache.nbytes == 1200 * 900 * 4
    cache.shrink("x", lambda: needs)  # thumb needs 225x150: reduced by 5 more (beyond what draft can do)
    thumb = cache.lookup("x", (150, 100), lambda: needs["large"], "thumb")
    assert isinstance(thumb, Intermediate) and (thumb.size, thumb.scale) == ((240, 180), 20.0)
    assert cache.nbytes == 240 * 180 * 4
    cache.shrink("x", lambda: needs)  # every preset served: left as it is, first to go
    assert cache.nbytes == 240 * 180 * 4
    again = cache.lookup("x", (1600, 1200), lambda: needs["large"], "large")  # another format of large: decode again
    assert isinstance(again, Decode) and again.target == (1600, 1200)
    cache.done(again, None)


def test_a_kept_intermediate_is_not_shrunk_below_what_a_preset_to_come_needs() -> None:
    cache = IntermediateCache(max_bytes=10**8, presets=("medium", "large"))
    needs = {"medium": (1000, 750), "large": (1600, 1200)}
    claim = cache.lookup("x", (1600, 1200), lambda: needs["large"], "large")
    assert isinstance(claim, Decode)
    cache.done(claim, Intermediate(Image.new("RGB", (2400, 1800)), 2.0))
    cache.shrink("x", lambda: needs)  # medium needs 1500 of 2400 px: no integer factor serves it
    assert cache.nbytes == 2400 * 1800 * 4
    unconfigured = IntermediateCache(max_bytes=10**8)  # presets unknown: nothing to plan for
    keep(unconfigured, "x", Intermediate(Image.new("RGB", (2400, 1800)), 2.0))
    unconfigured.shrink("x", lambda: needs)
    assert unconfigured.nbytes == 2400 * 1800 * 4


def test_a_decode_under_way_is_waited_for_when_it_is_big_enough() -> None:
    """Renders of one original arriving together share its decode; one needing more claims the widest at once."""
    cache = IntermediateCache(max_bytes=10**8)
    widest = (1600, 1200)
    first = cache.lookup("x", (300, 200), lambda: widest)
    assert isinstance(first, Decode) and first.target == (300, 200)  # an original's first decode is its own size
    bigger = cache.lookup("x", (800, 600), lambda: widest)
    assert isinstance(bigger, Decode) and bigger.target == widest  # asked at several sizes: decode for them all

    found: dict[str, Intermediate | Decode] = {}
    waiting = [
        threading.Thread(target=lambda: found.update(small=cache.lookup("x", (150, 100), lambda: widest))),
        threading.Thread(target=lambda: found.update(large=cache.lookup("x", (1600, 1200), lambda: widest))),
    ]
    for thread in waiting:
        thread.start()
    time.sleep(0.2)
    assert all(thread.is_alive() for thread in waiting)  # both wait: neither decodes the same file again
    cache.done(first, Intermediate(Image.new("RGB", (450, 300)), 8.0))
    waiting[0].join(5)
    assert isinstance(found["small"], Intermediate) and found["small"].size == (450, 300)
    assert waiting[1].is_alive()  # the small decode does not serve 1600 px: still waiting for the widest
    cache.done(bigger, Intermediate(Image.new("RGB", (2400, 1800)), 2.0))
    waiting[1].join(5)
    assert isinstance(found["large"], Intermediate) and found["large"].size == (2400, 1800)
    assert (cache.misses, cache.hits) == (2, 2)


def test_a_failed_decode_wakes_its_waiters_to_decode_themselves() -> None:
    cache = IntermediateCache(max_bytes=10**8)
    first = cache.lookup("x", (300, 200), lambda: (300, 200))
    assert isinstance(first, Decode)
    found: list[Intermediate | Decode] = []
    waiter = threading.Thread(target=lambda: found.append(cache.lookup("x", (300, 200), lambda: (300, 200))))
    waiter.start()
    time.sleep(0.1)
    cache.done(first, None)  # the decode raised: nothing kept
    waiter.join(5)
    assert not waiter.is_alive() and isinstance(found[0], Decode) and found[0].target == (300, 200)
    cache.done(found[0], None)


def test_concurrent_presets_of_one_original_decode_it_at_most_twice(corpus: Path) -> None:
    """A page's four presets of one image rendered at once: the same bytes as alone, from at most two decodes."""
    data = (corpus / "02_seeding_16mp_progressive.jpg").read_bytes()
    presets = DEFAULT_CONFIG.presets

    def fresh() -> Pipeline:
        return Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits, presets.values())

    def after(earlier: tuple[Preset, ...], preset: Preset) -> bytes:
        pipeline = fresh()
        for first in earlier:
            render(pipeline, data, first)
        return render(pipeline, data, preset).body

    # Each rendition is one rendered alone after some sequence of the other presets (whose decodes it may have used,
    # and which shrank the kept decode to what the presets not rendered yet need), or after itself.
    expected = {
        name: {after((preset,), preset)}
        | {
            after(earlier, preset)
            for count in range(len(presets))
            for earlier in itertools.permutations([p for p in presets.values() if p != preset], count)
        }
        for name, preset in presets.items()
    }
    for _ in range(5):
        shared = fresh()
        with ThreadPoolExecutor(len(presets)) as pool:
            futures = {name: pool.submit(render, shared, data, preset) for name, preset in presets.items()}
            together = {name: future.result().body for name, future in futures.items()}
        assert shared.intermediates.misses <= 2 and shared.intermediates.hits >= len(presets) - 2
        assert all(together[name] in expected[name] for name in presets)


def test_intermediate_serves_only_presets_it_is_big_enough_for() -> None:
    drafted = Intermediate(Image.new("RGB", (400, 300)), 4.0)
    assert drafted.serves((200, 150)) and not drafted.serves((400, 300))
    assert Intermediate(Image.new("RGB", (400, 300)), 1.0).serves((4000, 3000))  # full resolution serves all


def test_other_presets_of_an_original_render_from_its_intermediate(corpus: Path) -> None:
    data = (corpus / "01_kleiber_20mp_baseline.jpg").read_bytes()
    presets = DEFAULT_CONFIG.presets
    per_request = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    for name in ("thumb", "small", "large", "medium", "thumb"):
        assert render(per_request, data, presets[name]).width == output_size(6028, 3391, presets[name])[0]
    # thumb decodes small; small fits in it; large needs a bigger decode, which then serves the rest.
    assert (per_request.intermediates.misses, per_request.intermediates.hits) == (2, 3)

    # With the configured presets known, the second decode is made for the largest of them at once: thumb, then
    # medium (too big for thumb's decode: decoded for large too), then large and small render from it.
    knowing = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits, presets.values())
    for name in ("thumb", "medium", "large", "small"):
        assert render(knowing, data, presets[name]).width == output_size(6028, 3391, presets[name])[0]
    assert (knowing.intermediates.misses, knowing.intermediates.hits) == (2, 2)
    unknowing = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    for name in ("thumb", "medium", "large", "small"):
        render(unknowing, data, presets[name])
    assert (unknowing.intermediates.misses, unknowing.intermediates.hits) == (3, 1)
    # One preset alone never decodes bigger than it needs: the first decode of an original is its own.
    alone = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits, presets.values())
    render(alone, data, presets["thumb"])
    assert alone.intermediates.nbytes < 800 * 450 * 4

    off = Pipeline(DEFAULT_CONFIG.encoding, dataclasses.replace(DEFAULT_CONFIG.limits, intermediate_cache_bytes=0))
    render(off, data, presets["small"])
    render(off, data, presets["small"])
    assert off.intermediates.nbytes == 0 and off.intermediates.hits == 0


def test_encoding_a_rendition_leaves_the_gil_to_other_threads() -> None:
    """Pillow holds the GIL while its JPEG encoder writes into a BytesIO, for the whole encode; ``encode`` writes
    into a memfd, where Pillow releases it. A thread ticking meanwhile (a render's event loop, the instance's other
    render) must never be held up for most of the encode: with a BytesIO, it was held up for all of it."""
    noise = Image.merge("RGB", [Image.effect_noise((3000, 3000), 80) for _ in range(3)])
    source = io.BytesIO()
    noise.save(source, "JPEG", quality=95)
    timings = Timings()
    longest = [0.0]
    done = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            now = time.perf_counter()
            longest[0] = max(longest[0], now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        out = render(
            PIPELINE, source.getvalue(), Preset("big", 3000, quality=95), forced_format="jpeg", timings=timings
        )
    finally:
        done.set()
        ticker.join()
    assert decode(out.body).size == (3000, 3000)
    encode = timings.stages["encode"]
    print(f"encode {encode * 1000:.0f} ms; the ticking thread's longest wait {longest[0] * 1000:.1f} ms")
    assert encode > 0.05 and longest[0] < encode / 2, (encode, longest[0])
