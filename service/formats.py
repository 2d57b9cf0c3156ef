"""Output formats: which one a request gets, and how each is encoded.

A preset's "auto" format is negotiated from one bit, "the client accepts WebP" (service/app.py reads it from
Accept; nginx's cache key holds the same bit as a token), so the response varies on Accept only through it.
"""

from __future__ import annotations

import io

from PIL import ExifTags, Image

from service.config import Encoding
from service.presets import Preset

# Pillow plugin name -> our format name. Only these decoders are ever tried: Pillow can open dozens of formats
# (EPS would even run Ghostscript), and each one is attack surface the service does not need.
SOURCE_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
SAVE_FORMATS = {fmt: name for name, fmt in SOURCE_FORMATS.items()}
CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif"}
ANIMATED_OUTPUTS = ("gif", "webp")

ORIENTATION_TAG = 0x0112
EXIF_TAG_IDS = {name.lower(): int(tag) for name, tag in ExifTags.Base.__members__.items()}


def choose_format(
    source_format: str, has_alpha: bool, animated: bool, preset_format: str, forced: str | None, accepts_webp: bool
) -> str:
    """The output format: URL-forced, else the preset's, else the source's ("source"), else negotiated ("auto").

    "auto" gives WebP to browsers that accept it; others get GIF for animations, PNG when transparency matters
    and JPEG for everything else.
    """
    chosen = forced or preset_format
    if chosen == "source":
        return source_format
    if chosen != "auto":
        return chosen
    if accepts_webp:
        return "webp"
    if animated:
        return "gif"
    return "png" if has_alpha else "jpeg"


def varies_on_accept(preset: Preset, forced_format: str | None) -> bool:
    """Whether the output format (hence the response) depends on the Accept header: only "auto" negotiates."""
    return forced_format is None and preset.format == "auto"


def kept_exif(source: Image.Exif, keep: tuple[str, ...]) -> bytes | None:
    """An EXIF block holding only the tags config keeps (e.g. copyright); never the orientation."""
    exif = Image.Exif()
    for name in keep:
        tag = EXIF_TAG_IDS.get(name.lower())
        if tag is not None and tag != ORIENTATION_TAG and tag in source:
            exif[tag] = source[tag]
    return exif.tobytes() if len(exif) else None


def save_options(fmt: str, quality: int, pixels: int, encoding: Encoding) -> dict[str, object]:
    """Encoder settings per output format. ``icc_profile=None`` because Pillow's PNG encoder would otherwise
    re-embed the profile that littleCMS left in ``im.info`` (we convert to sRGB and drop it)."""
    options: dict[str, object] = {"icc_profile": None}
    if fmt == "jpeg":
        options.update(quality=quality, optimize=True, progressive=pixels >= encoding.progressive_min_pixels)
    elif fmt == "png":
        options.update(compress_level=encoding.png_compress_level)
    elif fmt == "webp":
        options.update(quality=quality, method=encoding.webp_method)
    return options


def encode(im: Image.Image, fmt: str, quality: int, encoding: Encoding, exif: bytes | None) -> bytes:
    """Encode one still image; only the metadata passed in ``exif`` is written (no ICC, no orientation)."""
    options = save_options(fmt, quality, im.width * im.height, encoding)
    if exif and fmt != "gif":
        options["exif"] = exif
    out = io.BytesIO()
    im.save(out, SAVE_FORMATS[fmt], **options)
    return out.getvalue()
