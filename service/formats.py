"""Output formats: which one a rendition gets, and with which encoder settings.

Decisions only, no pixels: the pipeline (service/pipeline.py) calls ``choose_format`` once per render and hands
``save_options`` to its single encode step. The request-side half of negotiation (which token an Accept header
earns) is a URL rule, shared with nginx, and lives in service/presets.py.
"""

from __future__ import annotations

from PIL import ExifTags, Image

from service.config import Encoding

# The only Pillow decoders ever tried: Pillow can open dozens of formats (EPS would even run Ghostscript), and
# each one is attack surface the service does not need.
DECODERS = ("JPEG", "PNG", "WEBP", "GIF")
# Pillow's label of an opened image -> our format name. The JPEG decoder labels a JPEG that carries further
# images (MPO: phones' portrait and 3D modes, some cameras) "MPO": it is served as the JPEG it starts with.
SOURCE_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
SAVE_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif"}
# Sources whose extra frames are an animation (an MPO's extra frames are other pictures, not frames).
ANIMATED_SOURCES = ("GIF", "WEBP", "PNG")
ANIMATED_OUTPUTS = ("gif", "webp")
# The largest width or height each encoder can write.
MAX_DIMENSIONS = {"jpeg": 65_535, "png": 2**31 - 1, "webp": 16_383, "gif": 65_535}
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

    "auto" gives the negotiated format (the request's token, e.g. WebP) to browsers that accept it; others get
    GIF for animations, PNG when transparency matters and JPEG for everything else.
    """
    chosen = forced or preset_format
    if chosen == "source":
        return source_format
    if chosen != "auto":
        return chosen
    if negotiated:
        return negotiated
    if animated:
        return "gif"
    return "png" if has_alpha else "jpeg"


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
    metadata passed in ``exif`` is written (never the orientation)."""
    options: dict[str, object] = {"icc_profile": None}
    if fmt == "jpeg":
        options.update(quality=quality, optimize=True, progressive=pixels >= encoding.progressive_min_pixels)
    elif fmt == "png":
        options.update(compress_level=encoding.png_compress_level)
    elif fmt == "webp":
        options.update(quality=quality, method=encoding.webp_method)
    elif fmt == "gif":
        options.update(disposal=2)  # every frame we write is complete: clear before drawing the next
    if exif and fmt != "gif":
        options["exif"] = exif
    return options
