"""The image pipeline: one original plus one preset in, one encoded rendition out.

Modelled on imgproxy's processing/pipeline.go: ``Pipeline.render`` is a short, explicit sequence of small named
steps (open -> load -> normalise_mode -> resize -> orient -> to_srgb -> flatten -> encode), so a reader can see
what happens to every pixel and in which order. Speed is the product, so the order is chosen for it:

- JPEGs are always decoded with ``Image.draft`` (DCT scaling on load, 3-6x faster than a full decode) to a size
  still at least ``DRAFT_GAP`` times the output, then ``reduce()`` + LANCZOS finish the job (``REDUCING_GAP``).
- Orientation and the ICC conversion run *after* the resize, on the small image: a centred crop commutes with
  the eight EXIF flips/rotations, and the colour transform is per pixel, so doing them last is exact for
  orientation and within a fraction of a ΔE for colour (tests/test_fidelity.py measures it), at a fraction of
  the cost. (imgproxy also rotates after scaling.)
- Colour: embedded ICC profiles (RGB or CMYK, Adobe inverted CMYK included: Pillow un-inverts it on decode) are
  converted to sRGB with littleCMS and then *dropped*: untagged images are sRGB on the web, and dropping saves
  the bytes of a profile in every thumbnail. Grayscale stays grayscale (a gray profile is dropped unconverted).
  CMYK without a profile falls back to Pillow's naive conversion, as there is no CMYK profile to assume.
- Intermediates: nginx pins every preset of one original to one instance, so each instance keeps a small LRU
  (``limits.intermediate_cache_bytes``) of decoded, shrunk-on-load originals by digest: a preset that needs no
  more pixels than the kept one resizes from it; a bigger one decodes again and replaces it. Decoding for the
  largest preset up front was measured (bench B2/B3) and lost: most pages ask one preset of many originals,
  and concurrent renders of one original would each pay the biggest decode before any was kept.

Errors: anything that is not a JPEG/PNG/WebP/GIF is ``UnsupportedMedia``; a corrupt or truncated file is
``Unprocessable`` (never a half-decoded image); too many pixels, checked from the header before decoding, is
``TooLarge``. AVIF is not offered: bookworm's libavif (0.11) is too old for pillow-simd's AVIF plugin.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, ImageCms, ImageColor, ImageFile, ImageSequence

from service.config import Encoding, Limits
from service.errors import TooLarge, Unprocessable, UnsupportedMedia
from service.formats import (
    ANIMATED_OUTPUTS,
    CONTENT_TYPES,
    ORIENTATION_TAG,
    SAVE_FORMATS,
    SOURCE_FORMATS,
    choose_format,
    encode,
    kept_exif,
    save_options,
)
from service.geometry import DRAFT_GAP, Layout, layout
from service.intermediates import Intermediate, IntermediateCache
from service.presets import Preset

# A truncated file must fail, never come out with a grey bottom half (this is Pillow's default; made explicit).
ImageFile.LOAD_TRUNCATED_IMAGES = False

# resize() first box-reduces by an integer factor while the remaining LANCZOS scale stays >= this (Pillow: 3.0
# is practically indistinguishable from a plain LANCZOS resize).
REDUCING_GAP = 3.0

# EXIF orientation -> the transposition that makes the image upright (2..8; 1 is upright).
TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@dataclasses.dataclass(frozen=True)
class Rendition:
    """One encoded output image."""

    body: bytes
    format: str  # "jpeg" | "png" | "webp" | "gif"
    content_type: str
    width: int
    height: int


# -------------------------------------------------------------------------------------------------------- steps


@contextmanager
def decoding() -> Iterator[None]:
    """Map Pillow's many ways of failing on bad bytes to the service's client errors (never a 500)."""
    try:
        yield
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"image has too many pixels ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise UnsupportedMedia("not an image, or not JPEG, PNG, WebP or GIF") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError) as exc:
        raise Unprocessable(f"corrupt or truncated image: {exc}") from exc


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Read the header only, and refuse an oversized image before a single pixel is decoded."""
    with decoding():
        im = Image.open(io.BytesIO(data), formats=tuple(SOURCE_FORMATS))
    width, height = im.size
    if width * height > limits.max_pixels:
        raise TooLarge(f"image has {width}x{height} pixels, more than the limit of {limits.max_pixels}")
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


def load(im: Image.Image, target: tuple[int, int]) -> tuple[Image.Image, float]:
    """Decode the pixels, shrinking on load where the decoder can (JPEG DCT scaling, sized by ``DRAFT_GAP``).

    ``target`` is the size the whole (uncropped) raw image would be scaled to. Returns the decoded image and the
    factor by which draft shrank it (1.0 without), so crop coordinates can be mapped into it exactly.
    """
    scale = 1.0
    if im.format == "JPEG" and target[0] * DRAFT_GAP < im.width and target[1] * DRAFT_GAP < im.height:
        width = im.width
        want = (math.ceil(target[0] * DRAFT_GAP), math.ceil(target[1] * DRAFT_GAP))
        drafted = im.draft(im.mode, want)
        if drafted is not None:
            scale = width / drafted[1][2]
    with decoding():
        im.load()
    return im, scale


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


def resize(im: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float]) -> Image.Image:
    """Crop ``box`` (in ``im``'s coordinates) and scale it to ``size`` in one pass: reduce() then LANCZOS."""
    if im.size == size and box == (0, 0, im.width, im.height):
        return im
    return im.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


def orient(im: Image.Image, orientation: int) -> Image.Image:
    """Apply the EXIF orientation; the tag itself is never written to the output (see encode)."""
    transpose = TRANSPOSES.get(orientation)
    return im if transpose is None else im.transpose(transpose)


@functools.lru_cache(maxsize=32)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A littleCMS transform from an embedded profile to sRGB (cached: building one costs more than using it)."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        if (space, mode) not in (("RGB", "RGB"), ("RGB", "RGBA"), ("CMYK", "CMYK")):
            return None  # gray profiles, or a profile that does not match the pixels: leave the pixels alone
        out_mode = "RGBA" if mode == "RGBA" else "RGB"
        return ImageCms.buildTransform(profile, SRGB, mode, out_mode, ImageCms.Intent.PERCEPTUAL)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None  # a broken profile is treated as none: better slightly-off colours than no image


def to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert pixels described by an embedded ICC profile to sRGB; CMYK always ends as RGB."""
    transform = _srgb_transform(icc, im.mode) if icc else None
    if transform is not None:
        return ImageCms.applyTransform(im, transform)
    return im.convert("RGB") if im.mode == "CMYK" else im


def has_transparency(im: Image.Image) -> bool:
    """Whether any pixel is not fully opaque (an all-opaque alpha channel is dropped, saving bytes)."""
    return im.mode in ("LA", "RGBA") and im.getchannel("A").getextrema()[0] < 255


def flatten(im: Image.Image, fmt: str, transparent: bool, background: str) -> Image.Image:
    """Composite alpha onto ``background`` when the output has no alpha; drop an alpha that carries nothing."""
    if im.mode not in ("LA", "RGBA") or (transparent and fmt in ("png", "webp", "gif")):
        return im
    base_mode = im.mode[:-1]
    if not transparent:
        return im.convert(base_mode)
    base = Image.new(base_mode, im.size, ImageColor.getcolor(background, base_mode))
    base.paste(im, mask=im.getchannel("A"))
    return base


def animation_frames(im: Image.Image, limits: Limits, encoding: Encoding) -> int:
    """The number of frames to keep animated: 0 when the original is a still or must be served as one."""
    if not encoding.animation or not getattr(im, "is_animated", False):
        return 0
    with decoding():
        frames = im.n_frames
    if frames > limits.max_frames or frames * im.width * im.height > limits.max_animation_pixels:
        return 0
    return frames


# ----------------------------------------------------------------------------------------------------- pipeline


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the header tells about one original and one preset, before any pixel is decoded."""

    image: Image.Image  # opened, not yet decoded
    source_format: str
    orientation: int
    layout: Layout
    icc: bytes | None
    exif: Image.Exif


class Pipeline:
    """Renders originals to presets; one per worker, holding the encoder settings, limits and the intermediates."""

    def __init__(self, encoding: Encoding, limits: Limits) -> None:
        self.encoding = encoding
        self.limits = limits
        self.intermediates = IntermediateCache(limits.intermediate_cache_bytes)

    def render(
        self,
        data: bytes,
        digest: str,
        preset: Preset,
        *,
        accepts_webp: bool = False,
        forced_format: str | None = None,
    ) -> Rendition:
        """Render ``data`` (the original, whose content hash is ``digest``) at ``preset``."""
        plan = self.plan(data, preset)
        exif = kept_exif(plan.exif, self.encoding.keep_metadata)
        out_size = plan.layout.out_size
        if animation_frames(plan.image, self.limits, self.encoding):
            fmt = choose_format(plan.source_format, True, True, preset.format, forced_format, accepts_webp)
            if fmt in ANIMATED_OUTPUTS:
                body = self.animation(plan, fmt, preset.quality_for(fmt))
                return Rendition(body, fmt, CONTENT_TYPES[fmt], *out_size)
        im = self.still(plan, digest)
        transparent = has_transparency(im)
        fmt = choose_format(plan.source_format, transparent, False, preset.format, forced_format, accepts_webp)
        im = flatten(im, fmt, transparent, self.encoding.background)
        body = encode(im, fmt, preset.quality_for(fmt), self.encoding, exif)
        return Rendition(body, fmt, CONTENT_TYPES[fmt], *out_size)

    def plan(self, data: bytes, preset: Preset) -> Plan:
        """Open the original (header only, limits checked) and work out the geometry for ``preset``."""
        im = open_image(data, self.limits)
        exif = header_exif(im)
        orientation = exif_orientation(exif)
        icc = im.info.get("icc_profile")
        return Plan(im, SOURCE_FORMATS[im.format or ""], orientation, layout(im.size, orientation, preset), icc, exif)

    def still(self, plan: Plan, digest: str | None = None) -> Image.Image:
        """Decode (or reuse an intermediate), resize, orient and convert to sRGB: ready to flatten and encode."""
        intermediate = self.intermediate(plan, digest)
        scale = intermediate.scale
        left, top, right, bottom = plan.layout.box
        box = (left / scale, top / scale, right / scale, bottom / scale)
        with decoding():
            im = resize(intermediate.image, plan.layout.raw_size, box)
        im = orient(im, plan.orientation)
        return to_srgb(im, plan.icc)

    def intermediate(self, plan: Plan, digest: str | None) -> Intermediate:
        """The decoded original at the size this preset needs (or a kept, bigger one).

        With a ``digest`` and a non-zero cache size, the result is kept for the original's next presets.
        """
        cache = self.intermediates if digest is not None and self.intermediates.max_bytes > 0 else None
        if cache is not None and digest is not None:
            kept = cache.get(digest, plan.layout.decode_size)
            if kept is not None:
                return kept
        target = plan.layout.decode_size
        im, scale = load(plan.image, target)
        im = normalise_mode(im)
        if cache is None or digest is None:
            return Intermediate(im, scale)
        # Without draft (PNG, WebP), keep a reduced image: smaller, and what resize() would reduce to anyway.
        # Otherwise a decoded PNG or GIF still holds the original's bytes (for further frames), which must not
        # be kept as well: copy it. Decoded JPEGs and WebPs let go of their file, and a mode conversion has
        # already made a new image: no copy needed (it cost 7% of a miss).
        factor = int(min(im.width / (target[0] * DRAFT_GAP), im.height / (target[1] * DRAFT_GAP)))
        if scale == 1 and factor >= 2:
            im, scale = im.reduce(factor), float(factor)
        elif im is plan.image and plan.source_format not in ("jpeg", "webp"):
            im = im.copy()
        intermediate = Intermediate(im, scale)
        cache.put(digest, intermediate)
        return intermediate

    def animation(self, plan: Plan, fmt: str, quality: int) -> bytes:
        """Resize every frame (GIF/WebP give each frame fully composited), keeping durations and loop count."""
        frames, durations = [], []
        with decoding():
            for frame in ImageSequence.Iterator(plan.image):
                rgba = frame.convert("RGBA")  # loads the frame: only then does WebP fill in its duration
                durations.append(frame.info.get("duration", 100))
                still = resize(rgba, plan.layout.raw_size, plan.layout.box)
                frames.append(to_srgb(orient(still, plan.orientation), plan.icc))
        out = io.BytesIO()
        options = save_options(fmt, quality, plan.layout.out_size[0] * plan.layout.out_size[1], self.encoding)
        if fmt == "gif":
            options["disposal"] = 2  # every frame is complete: clear before drawing the next
        frames[0].save(
            out,
            SAVE_FORMATS[fmt],
            save_all=True,
            append_images=frames[1:],
            duration=durations,
            loop=plan.image.info.get("loop", 0),
            **options,
        )
        return out.getvalue()
