"""Output formats: which one a rendition gets, and with which encoder settings.

Decisions only, no pixels: the pipeline (service/pipeline.py) calls ``choose_format`` once per render and hands
``save_options`` to its single encode step. The request-side half of negotiation (which token an Accept header
earns) is a URL rule, shared with nginx, and lives in service/presets.py.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import pillow_avif  # noqa: F401  registers the AVIF encoder (and decoder) with Pillow: Pillow-SIMD has none of its own
from PIL import ExifTags, Image

if TYPE_CHECKING:  # config.py imports presets.py, which imports this module (Preset.quality_for)
    from service.config import Encoding

# The only Pillow decoders ever tried: Pillow can open dozens of formats (EPS would even run Ghostscript), and
# each one is attack surface the service does not need.
DECODERS = ("JPEG", "PNG", "WEBP", "GIF")
# Pillow's label of an opened image -> our format name. The JPEG decoder labels a JPEG that carries further
# images (MPO: phones' portrait and 3D modes, some cameras) "MPO": it is served as the JPEG it starts with.
SOURCE_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
SAVE_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}
CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "avif": "image/avif",
}
# Sources whose extra frames are an animation (an MPO's extra frames are other pictures, not frames).
ANIMATED_SOURCES = ("GIF", "WEBP", "PNG")
ANIMATED_OUTPUTS = ("gif", "webp")
ALPHA_OUTPUTS = ("png", "webp", "gif", "avif")  # outputs that keep transparency (others are flattened)
# The largest width or height each encoder can write. AVIF: libavif refuses images over 16384 px on a side
# (its default dimension limit; AV1 itself allows 65536).
MAX_DIMENSIONS = {"jpeg": 65_535, "png": 2**31 - 1, "webp": 16_383, "gif": 65_535, "avif": 16_384}
# AVIF's encoder quality (libavif's 0-100, a quantizer scale) reads differently from JPEG's and WebP's. Presets give
# one JPEG-scale quality, which WebP takes as is; AVIF, served instead of WebP to the browsers that take it, gets the
# quality whose mean luma SSIM matches WebP's (method 4) at that number: measured by bench/encoders.py at speed 9
# on corpus photos at 320 and 1600 px, the two sizes averaged (bench/results/encoders.md): WebP q76, q82, q88 ->
# AVIF 54, 63, 73, where AVIF is 14-25% smaller. Linear between those points and out to 0 and 100.
AVIF_QUALITY = ((0, 0), (76, 54), (82, 63), (88, 73), (100, 100))
# Animation fields both animated outputs can hold (GIF: 16-bit loop count, frame delays in 16-bit hundredths of a
# second; WebP: 16-bit loop count). APNG and WebP inputs can declare more: clamped, never a 500.
MAX_LOOP = 65_535
MAX_FRAME_MS = 655_350

ORIENTATION_TAG = 0x0112
EXIF_TAG_IDS = {name.lower(): int(tag) for name, tag in ExifTags.Base.__members__.items()}


def choose_format(
    source_format: str, has_alpha: bool, animated: bool, preset_format: str, forced: str | None, negotiated: str
) -> str:
    """The output format: URL-forced, else the preset's, else the source's ("source"), else negotiated ("auto").

    "auto" gives the negotiated format (the request's token: AVIF or WebP) to browsers that accept it; others get
    GIF for animations, PNG when transparency matters and JPEG for everything else. An animation whose token is
    AVIF is served as animated WebP: our AVIF output is a still, and every browser that takes AVIF takes WebP.
    """
    chosen = forced or preset_format
    if chosen == "source":
        return source_format
    if chosen != "auto":
        return chosen
    if negotiated:
        return "webp" if animated and negotiated == "avif" else negotiated
    if animated:
        return "gif"
    return "png" if has_alpha else "jpeg"


def avif_quality(quality: int) -> int:
    """AVIF's quality for a JPEG-scale ``quality`` (1-100), from the ``AVIF_QUALITY`` calibration."""
    for (q0, a0), (q1, a1) in itertools.pairwise(AVIF_QUALITY):
        if quality <= q1:
            return round(a0 + (a1 - a0) * (quality - q0) / (q1 - q0))
    return AVIF_QUALITY[-1][1]


def kept_exif(source: Image.Exif, keep: tuple[str, ...]) -> bytes | None:
    """An EXIF block holding only the tags config keeps (e.g. copyright); never the orientation."""
    exif = Image.Exif()
    for name in keep:
        tag = EXIF_TAG_IDS.get(name.lower())
        if tag is not None and tag != ORIENTATION_TAG and tag in source:
            exif[tag] = source[tag]
    return exif.tobytes() if len(exif) else None


def save_options(fmt: str, quality: int, pixels: int, encoding: Encoding, exif: bytes | None) -> dict[str, object]:
    """Encoder settings for one output. ``icc_profile=None`` because Pillow's PNG encoder would otherwise
    re-embed the profile that littleCMS left in ``im.info`` (we convert to sRGB and drop it); only the
    metadata passed in ``exif`` is written (never the orientation). A PNG (always a still: ANIMATED_OUTPUTS) is
    written with its rows filtered but stored, for service/png.py to compress."""
    options: dict[str, object] = {"icc_profile": None}
    if fmt == "jpeg":
        options.update(quality=quality, optimize=True, progressive=pixels >= encoding.progressive_min_pixels)
    elif fmt == "png":
        options.update(compress_level=0)  # png.deflate_rows compresses at encoding.png_compress_level
    elif fmt == "webp":
        options.update(quality=quality, method=encoding.webp_method)
    elif fmt == "avif":
        # One encoder thread: each render holds one core of the host's render budget (service/budget.py), and
        # libavif would otherwise spread one encode over every core. ``quality`` is already on AVIF's scale.
        options.update(quality=quality, speed=encoding.avif_speed, max_threads=1)
    elif fmt == "gif":
        options.update(disposal=2)  # every frame we write is complete: clear before drawing the next
    if exif and fmt != "gif":
        options["exif"] = exif
    return options
