"""Reading an original: open it within the limits, read its header facts, decode its pixels as fast as each format
allows, and turn whatever Pillow raises on bad bytes into the service's client errors.

The pipeline (service/pipeline.py) calls these for its first step: ``open_image`` and the header readers when it
plans a render, ``load`` to decode a still (shrinking on load), ``decoded_frames`` for an animation. Everything here
works on the render's own opened file and returns new images: nothing is shared between renders.

Fast decodes, each giving the pixels the plain decode gives (or, for a progressive JPEG at 1/4, within 40 dB):
- JPEGs are decoded with ``Image.draft`` (DCT scaling on load) to a size still at least ``DRAFT_GAP`` times the
  output. At 1/8 a progressive JPEG is decoded from its DC scans alone, at 1/4 without its AC refinement scans
  (service/jpeg.py).
- A still WebP is decoded by libwebp straight into a buffer of ours (service/webp.py).
- A PNG's image data is inflated by libdeflate and handed to Pillow stored (service/png.py).
Anything a fast path declines or fails on decodes the usual way, and reports its own errors.

Errors: anything that is not a JPEG/PNG/WebP/GIF is ``UnsupportedMedia``; a corrupt or truncated file is
``Unprocessable`` (never a half-decoded image); too many pixels, checked from the header before decoding, is
``TooLarge``. Only errors raised inside Pillow while it opens or decodes count as the file's fault (``decoding()``
wraps nothing else): a bug of ours stays a logged 500, even when Pillow raises it.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

import PIL
from PIL import Image, ImageFile, ImageSequence, JpegImagePlugin, PngImagePlugin

from service.config import Encoding, Limits
from service.errors import TooLarge, Unprocessable, UnsupportedMedia
from service.formats import ANIMATED_SOURCES, DECODERS, ORIENTATION_TAG, SOURCE_FORMATS
from service.geometry import DRAFT_GAP
from service.guards import check_canvas, check_structure, gif_frames
from service.intermediates import Intermediate
from service.jpeg import dc_only, quarter
from service.metrics import Timings
from service.png import inflated
from service.webp import decode_still

# A truncated file must fail, never come out with a grey bottom half (this is Pillow's default; made explicit).
ImageFile.LOAD_TRUNCATED_IMAGES = False

PIL_DIR = os.path.dirname(PIL.__file__) + os.sep
# The progressive-JPEG rewrites by draft scale (service/jpeg.py), with the decoder name that timings report:
# at 1/8 the DC scans alone (same pixels), at 1/4 without the luma AC refinement scans (within 40 dB).
FAST_PATHS = {8: ("dc-only", dc_only), 4: ("quarter", quarter)}
# What Pillow raises on bad bytes (besides its bomb and unidentified-image errors).
FILE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError)


def _raised_by_pillow(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside Pillow (the file's fault), not in our own code (a bug)."""
    tb: TracebackType | None = exc.__traceback__
    last = tb
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and last.tb_frame.f_code.co_filename.startswith(PIL_DIR)


@contextmanager
def decoding() -> Iterator[None]:
    """Map Pillow's many ways of failing on bad bytes to the service's client errors (never a 500).

    Only errors raised inside Pillow are the file's fault; the same exception types raised by our own code are
    bugs and propagate (a logged 500), never disguised as "corrupt image".
    """
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise TooLarge("image has too many pixels", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise UnsupportedMedia("not an image, or not JPEG, PNG, WebP or GIF") from exc
    except FILE_ERRORS as exc:
        if not _raised_by_pillow(exc):
            raise
        detail = f"{type(exc).__name__}: {exc}"
        if "MAX_TEXT" in str(exc):  # PngImagePlugin's text and ICC limits, which follow limits.max_png_text_bytes
            raise Unprocessable("PNG text or ICC profile over limits.max_png_text_bytes", detail) from exc
        raise Unprocessable("corrupt or truncated image", detail) from exc


# Bytes of the file handed to the decoder at once. Pillow's default, 64 KiB, makes a decode a loop of calls that
# each take the GIL back (a wait whenever the event loop or another render holds it); 4 MiB decodes most
# originals in one call, and bounds the copy of the file each call takes.
DECODE_BLOCK = 4 * 1024 * 1024


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Read the header only, and refuse an oversized image before a single pixel is decoded (and one with more
    container structures than Pillow should parse before it is even opened: guards.check_structure)."""
    check_structure(data, limits)
    with decoding():
        im = Image.open(io.BytesIO(data), formats=DECODERS)
    if im.format not in SOURCE_FORMATS:  # a decoder's label we have no rules for (as MPO once was): never a 500
        raise UnsupportedMedia("not an image, or not JPEG, PNG, WebP or GIF", f"Pillow labels it {im.format!r}")
    width, height = im.size
    if width * height > limits.max_pixels:
        raise TooLarge(f"image has {width}x{height} pixels, more than the limit of {limits.max_pixels}")
    im.decodermaxblock = DECODE_BLOCK
    return im


def header_exif(im: Image.Image) -> Image.Exif:
    """The EXIF of an opened image, read without decoding pixels; anything unreadable counts as none.

    Pillow's PNG ``getexif()`` decodes the whole image to look for an eXIf chunk after the pixels, which would
    decode before draft and swallow decoding errors here: for PNG only an eXIf chunk before the pixels counts.
    """
    if im.format == "PNG" and "exif" not in im.info:
        return Image.Exif()
    try:
        return im.getexif()
    except Exception:  # a broken EXIF block must not cost the image: it only decides rotation and kept tags
        return Image.Exif()


def exif_orientation(exif: Image.Exif) -> int:
    """The EXIF orientation (1..8); a missing or out-of-range value counts as upright."""
    value = exif.get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def animation_frames(data: bytes, im: Image.Image, limits: Limits, encoding: Encoding) -> int:
    """The number of frames to keep animated: 0 when the original is a still or must be served as one.

    Checked without decoding a pixel, with an early exit: a GIF's frames and the canvas they grow to come from
    its block structure (guards.gif_frames); WebP and APNG declare their frame count, on a fixed canvas.
    """
    canvas = im.size
    if im.format == "GIF":
        frames, canvas = gif_frames(data, limits.max_frames, limits)
        check_canvas(canvas, limits)  # even a still decodes its first frame on the grown canvas
    if not encoding.animation or im.format not in ANIMATED_SOURCES:
        return 0
    with decoding():  # Pillow seeks to the second frame to answer: a cut file fails right there
        if not getattr(im, "is_animated", False):
            return 0
    if im.format != "GIF":
        with decoding():
            frames = im.n_frames - hidden_frames(im)
    if frames < 2:  # an APNG whose animation is one frame besides its hidden default image
        return 0
    if frames > limits.max_frames or frames * canvas[0] * canvas[1] > limits.max_animation_pixels:
        return 0
    return frames


def hidden_frames(im: Image.Image) -> int:
    """Frames Pillow counts that are not part of the animation: an APNG may declare its default image (the still
    that viewers without APNG show, e.g. "animation not supported") outside the animation, and Pillow still makes
    it frame 0. Browsers never play it, so neither do we; as a still, the original is that default image."""
    return 1 if im.format == "PNG" and im.info.get("default_image") else 0


def decoded_frames(im: Image.Image) -> Iterator[tuple[Image.Image, float]]:
    """An animation's frames as Pillow composites them (RGBA), each with its duration in ms, hidden ones skipped.

    Only the decoding runs under ``decoding()`` (a cut or corrupt frame is the file's fault); what the caller does
    with each frame is not, so a bug of ours there stays a 500.
    """
    frames = itertools.islice(ImageSequence.Iterator(im), hidden_frames(im), None)
    while True:
        with decoding():
            frame = next(frames, None)
            if frame is None:
                return
            rgba = frame.convert("RGBA")  # loads the frame: only then does WebP fill in its duration
            duration = frame.info.get("duration", 100)
        yield rgba, duration


def load(im: Image.Image, data: bytes, target: tuple[int, int], timings: Timings) -> Intermediate:
    """Decode the pixels for a whole-original ``target`` size, shrinking on load where the decoder can (JPEG DCT
    scaling, sized by ``DRAFT_GAP``).

    The result remembers the factor by which draft shrank it (1.0 without), so crop coordinates can be mapped
    into it exactly. At 1/8, a progressive JPEG is decoded from its DC scans alone (service/jpeg.py): the same
    pixels, 3-6x faster. At 1/4, without its luma AC refinement scans: 2-3x faster, over 40 dB from the full
    decode's rendition. A still WebP is decoded by libwebp straight into a buffer of ours (service/webp.py): the
    same pixels, without Pillow's two copies of an RGBA canvas. A PNG's image data is inflated by libdeflate
    (service/png.py): the same pixels, 17-22% faster.
    """
    source_format = SOURCE_FORMATS[im.format or ""]
    scale = 1.0
    if source_format == "webp" and not getattr(im, "is_animated", False):
        still = decode_still(data, im.mode, im.size)
        if still is not None:
            timings.decoder = "libwebp"
            return Intermediate(still, scale)
    if source_format == "jpeg" and target[0] * DRAFT_GAP < im.width and target[1] * DRAFT_GAP < im.height:
        width = im.width
        want = (math.ceil(target[0] * DRAFT_GAP), math.ceil(target[1] * DRAFT_GAP))
        drafted = im.draft(im.mode, want)
        if drafted is not None:
            scale = width / drafted[1][2]
            fast = FAST_PATHS.get(round(scale))  # draft's scale is exactly 8, 4, 2 or 1
            rewritten = decode_rewritten(fast[1](data), JpegImagePlugin.JpegImageFile, want) if fast else None
            if rewritten is not None:
                timings.decoder = fast[0]
                return Intermediate(normalise_mode(rewritten), scale)
    if source_format == "png":
        rewritten = decode_rewritten(inflated(data), PngImagePlugin.PngImageFile)
        if rewritten is not None:
            timings.decoder = "libdeflate"
            return Intermediate(normalise_mode(rewritten), scale)
    with decoding():
        im.load()
    return Intermediate(normalise_mode(im), scale)


def decode_rewritten(
    data: bytes | None, plugin: type[ImageFile.ImageFile], want: tuple[int, int] | None = None
) -> Image.Image | None:
    """An original rewritten for a faster decode (service/jpeg.py's progressive JPEGs, at the draft size ``want``;
    service/png.py's inflated PNGs) decoded by ``plugin`` itself (Pillow's opener could make an MPO of a JPEG);
    None when the file did not qualify (``data`` is None) or that decode fails: the original then decodes as
    usual, and reports its own errors."""
    if data is None:
        return None
    try:
        im = plugin(io.BytesIO(data))
        im.decodermaxblock = DECODE_BLOCK
        if want is not None:
            im.draft(im.mode, want)
        im.load()
    except FILE_ERRORS:
        return None
    return im


def reduced(intermediate: Intermediate, target: tuple[int, int]) -> Intermediate:
    """An intermediate to keep: without draft (PNG, WebP, GIF), reduced by an integer factor to about
    ``DRAFT_GAP`` times ``target``, like a drafted JPEG (less memory kept, less work for each preset)."""
    return intermediate if intermediate.scale != 1 else intermediate.shrunk(target)


def normalise_mode(im: Image.Image) -> Image.Image:
    """Bring the decoded image to a mode LANCZOS works on: L, LA, RGB, RGBA or CMYK (converted in to_srgb).

    Palette images become RGB(A); 16-bit grayscale is scaled (not clipped) to 8 bits; 16-bit RGB PNGs are
    already read as 8-bit RGB by Pillow (most significant byte), which keeps full tonal range.
    """
    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        return im
    if mode in ("P", "PA"):
        return im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I"):  # I;16, I;16B, I: 16-bit grayscale PNGs
        return im.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    return im.convert("RGBA" if "A" in mode else "RGB")
