"""The image pipeline: one original plus one preset in, one encoded rendition out.

Modelled on imgproxy's processing/pipeline.go: ``Pipeline.render`` builds one ``RenderContext`` from the
original's header (``plan``), then runs a short, explicit sequence of small named steps on it:

    still:     decode (or reuse an intermediate) -> smart_crop -> crop_resize -> orient -> to_srgb -> pad
               -> choose_output -> flatten -> encode
    animation: choose_output -> every frame: crop_resize -> orient -> to_srgb -> pad -> encode

so a reader sees what happens to every pixel and in which order, and the output format is decided in one place
(``choose_output``), once per render. Speed is the product, so the order is chosen for it:

- Decoding (service/decoding.py) shrinks on load where the format allows: JPEG DCT scaling with ``Image.draft``
  to a size still at least ``DRAFT_GAP`` times the output, then ``reduce()`` + LANCZOS finish the job; a
  progressive JPEG's DC scans alone at 1/8; a still WebP straight from libwebp; a PNG inflated by libdeflate.
- PNG renditions' filtered rows are compressed by libdeflate in one call (service/png.py): a third of the CPU of
  Pillow's own level 6, for 2-3% more bytes.
- Orientation and the ICC conversion run *after* the resize, on the small image: the crop box is worked out in
  the raw image's terms (geometry.py maps gravity and the origin's focal point through the EXIF orientation), and
  the colour transform is per pixel, so doing them last is exact for orientation and within a fraction of a ΔE
  for colour (tests/test_fidelity.py measures it), at a fraction of the cost. (imgproxy also rotates after
  scaling.)
- Crops: geometry.py places a cover crop by the origin's focal point, else the preset's gravity; "smart" gravity
  moves it, in ``smart_crop``, to the most salient window of a small copy of the intermediate (saliency.py).
  Animations use the gravity's point (smart: the centre): their frames are never kept as an intermediate.
- Colour (service/colour.py): embedded ICC profiles (RGB or CMYK, Adobe inverted CMYK included: Pillow un-inverts it
  on decode) are converted to sRGB with littleCMS and then *dropped*: untagged images are sRGB on the web, and
  dropping saves the bytes of a profile in every thumbnail. Grayscale stays grayscale (a gray profile is dropped
  unconverted). CMYK without a profile falls back to Pillow's naive conversion, as there is no CMYK profile to assume.
- Intermediates (service/intermediates.py): each instance keeps a small LRU of decoded, shrunk-on-load originals
  by digest; a preset that needs no more pixels than the kept one resizes from it. When a later preset needs
  more, that second decode is made for the largest configured preset (``Pipeline.widest``): an original asked at
  several sizes is decoded at most twice, whatever the order of its presets. Presets arriving together (a page
  asks for an image's sizes at once) wait for a decode of the same original already under way when it is big
  enough for them, and the first one that needs more decodes for the largest preset at once. After each render
  the kept decode shrinks (box reduce) to what the presets it has not served yet need (``IntermediateCache.shrink``).

Concurrency: renders run on several native threads at once. Everything a render changes is its own (the opened
file, every image from ``crop_resize`` on, the context); what is shared is read-only (kept intermediates, cached
colour transforms, the settings).

Errors: reading the original (service/decoding.py) turns bad bytes into client errors (415, 422, 413); the steps
here raise ``TooLarge`` for an output over the encoders' dimensions, and nothing else of their own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from fractions import Fraction

from PIL import Image, ImageColor

from service.colour import to_srgb
from service.config import Encoding, Limits
from service.decoding import (
    animation_frames,
    decoded_frames,
    exif_orientation,
    header_exif,
    load,
    open_image,
    reduced,
)
from service.errors import TooLarge
from service.formats import (
    ALPHA_OUTPUTS,
    ANIMATED_OUTPUTS,
    CONTENT_TYPES,
    MAX_DIMENSIONS,
    MAX_FRAME_MS,
    MAX_LOOP,
    SAVE_FORMATS,
    SOURCE_FORMATS,
    choose_format,
    kept_exif,
    save_options,
)
from service.geometry import Layout, Point, layout, refocused
from service.intermediates import Intermediate, IntermediateCache
from service.metrics import Timings
from service.original import Focus
from service.png import deflate_rows
from service.presets import Preset
from service.saliency import salient_point

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


@dataclasses.dataclass(frozen=True)
class Rendition:
    """One encoded output image."""

    body: bytes
    format: str  # "jpeg" | "png" | "webp" | "gif" | "avif"
    content_type: str
    width: int
    height: int


@dataclasses.dataclass
class RenderContext:
    """One render, from the opened original to the encoded bytes. Owned by one render thread."""

    preset: Preset
    data: bytes  # the original's bytes (read again by the decode fast paths)
    forced_format: str | None  # from a URL suffix
    negotiated: str  # the request's format token ("avif", "webp" or ""), see service/presets.py
    source: Image.Image  # opened, header read, not yet decoded: this render's own file object
    source_format: str  # "jpeg" | "png" | "webp" | "gif"
    orientation: int
    focus: Point | None  # the origin's focal point (upright), which overrides the preset's gravity
    layout: Layout
    icc: bytes | None
    exif: bytes | None  # the EXIF block the output keeps (config's keep_metadata), never the orientation
    frames: int  # > 0: served as an animation of this many frames
    timings: Timings  # this request's stage durations (decode, resize, encode)
    background: str  # the pad and flatten colour: the preset's, else the global one
    format: str = ""  # decided once, by choose_output


# -------------------------------------------------------------------------------------------------------- steps


def smart_crop(ctx: RenderContext, source: Intermediate) -> None:
    """Smart gravity: move the cover crop onto the most salient window (an origin's focal point wins over it)."""
    if ctx.preset.fit != "cover" or ctx.preset.gravity != "smart" or ctx.focus is not None:
        return
    left, top, right, bottom = ctx.layout.box
    width, height = ctx.source.size
    window = (Fraction(right - left) / width, Fraction(bottom - top) / height)
    point = salient_point(source, window)
    if point is not None:
        ctx.layout = refocused(ctx.layout, ctx.source.size, point)


def crop_resize(source: Intermediate, lay: Layout) -> Image.Image:
    """The preset's region of the original at the output size (before orientation): a new image of our own.

    Not under ``decoding()``: the pixels are decoded already, so an error here is never the file's (a bad box or
    mode would be ours, raised inside Pillow all the same) and stays a logged 500.
    """
    return source.region(lay.raw_size, lay.box)


def orient(im: Image.Image, orientation: int) -> Image.Image:
    """Apply the EXIF orientation; the tag itself is never written to the output (see formats.save_options)."""
    transpose = TRANSPOSES.get(orientation)
    return im if transpose is None else im.transpose(transpose)


def pad(im: Image.Image, lay: Layout, background: str, transparent: bool) -> Image.Image:
    """fit: pad: the upright image on a canvas of exactly the box, at the layout's offset, the rest filled with
    ``background``, or with transparent pixels when the image has transparency (``transparent``): the output then
    keeps alpha where its format can, and ``flatten`` puts it all on the background where it cannot."""
    if im.size == lay.out_size:
        return im
    if im.mode in ("L", "LA") and len(set(ImageColor.getrgb(background)[:3])) > 1:  # a coloured pad on a gray image
        im = im.convert("RGBA" if im.mode == "LA" else "RGB")
    fill = ImageColor.getcolor(background, im.mode)
    if transparent:  # the background's colour under zero alpha: lossy WebP edges bleed into it, not into black
        assert isinstance(fill, tuple)
        fill = (*fill[:-1], 0)
    canvas = Image.new(im.mode, lay.out_size, fill)
    canvas.paste(im, lay.offset)
    return canvas


def has_transparency(im: Image.Image) -> bool:
    """Whether any pixel is not fully opaque (an all-opaque alpha channel is dropped, saving bytes)."""
    return im.mode in ("LA", "RGBA") and im.getchannel("A").getextrema()[0] < 255


def choose_output(ctx: RenderContext, transparent: bool) -> str:
    """Decide the output format, once per render (see formats.choose_format for the rules)."""
    ctx.format = choose_format(
        ctx.source_format, transparent, ctx.frames > 0, ctx.preset.format, ctx.forced_format, ctx.negotiated
    )
    if max(ctx.layout.out_size) > MAX_DIMENSIONS[ctx.format]:
        width, height = ctx.layout.out_size
        raise TooLarge(f"a {width}x{height} rendition is over {ctx.format}'s {MAX_DIMENSIONS[ctx.format]} px limit")
    return ctx.format


def flatten(im: Image.Image, fmt: str, transparent: bool, background: str) -> Image.Image:
    """Composite alpha onto ``background`` when the output has no alpha; drop an alpha that carries nothing."""
    if im.mode not in ("LA", "RGBA") or (transparent and fmt in ALPHA_OUTPUTS):
        return im
    base_mode = im.mode[:-1]
    if not transparent:
        return im.convert(base_mode)
    base = Image.new(base_mode, im.size, ImageColor.getcolor(background, base_mode))
    base.paste(im, mask=im.getchannel("A"))
    return base


def encode(ctx: RenderContext, frames: list[Image.Image], encoding: Encoding, **extra: object) -> Rendition:
    """Encode this render's own image(s) in ``ctx.format``: the one place a rendition's bytes are written.

    Into an anonymous in-memory file (memfd), not a BytesIO: Pillow runs its own encoders (JPEG, GIF) into a real
    file with the GIL released, into a BytesIO holding it throughout. Measured (py-spy --gil, make bench's page
    mix): JPEG encoding held an instance's GIL 13% of the time, stalling its other render thread and its event
    loop while a core stood idle. (libwebp and libavif release it either way; PNG's writer holds it, but only to
    filter and store the rows: libdeflate compresses them without it.)
    """
    out_w, out_h = ctx.layout.out_size
    options = save_options(ctx.format, ctx.preset.quality_for(ctx.format), out_w * out_h, encoding, ctx.exif)
    if len(frames) > 1:
        options.update(save_all=True, append_images=frames[1:], **extra)
    fd = os.memfd_create("phizer-rendition", os.MFD_CLOEXEC)
    with open(fd, "w+b", buffering=0) as out:
        frames[0].save(out, SAVE_FORMATS[ctx.format], **options)
        body = os.pread(fd, os.fstat(fd).st_size, 0)
    if ctx.format == "png":
        body = deflate_rows(body, encoding.png_compress_level)
    return Rendition(body, ctx.format, CONTENT_TYPES[ctx.format], out_w, out_h)


# ----------------------------------------------------------------------------------------------------- pipeline


class Pipeline:
    """Renders originals to presets; one per worker, holding the encoder settings, limits and the intermediates."""

    def __init__(self, encoding: Encoding, limits: Limits, presets: Iterable[Preset] = ()) -> None:
        self.encoding = encoding
        self.limits = limits
        self.presets = tuple(presets)  # the configured presets: what an original asked at several sizes may need
        self.intermediates = IntermediateCache(limits.intermediate_cache_bytes, (p.name for p in self.presets))

    def render(
        self,
        data: bytes,
        digest: str,
        preset: Preset,
        *,
        negotiated: str = "",
        forced_format: str | None = None,
        timings: Timings | None = None,
        focus: Focus | None = None,
    ) -> Rendition:
        """Render ``data`` (the original, whose content hash is ``digest``) at ``preset``.

        ``negotiated`` is the request's format token (service/presets.py: "avif" or "webp" when the client
        accepts it and the preset's negotiation order allows it); ``timings`` (if given) learns how long decoding,
        resizing and encoding took; ``focus`` is the origin's focal point (x, y fractions of the upright image;
        Original.focus).
        """
        ctx = self.plan(data, preset, negotiated, forced_format, timings, focus)
        if ctx.frames and choose_output(ctx, True) in ANIMATED_OUTPUTS:
            return self.animation(ctx)
        ctx.frames = 0  # an animation asked for as JPEG/PNG is a still of its first frame
        im = self.still(ctx, digest)
        transparent = has_transparency(im)
        fmt = choose_output(ctx, transparent)
        im = flatten(im, fmt, transparent, ctx.background)
        with ctx.timings.stage("encode"):
            return encode(ctx, [im], self.encoding)

    def plan(
        self,
        data: bytes,
        preset: Preset,
        negotiated: str = "",
        forced_format: str | None = None,
        timings: Timings | None = None,
        focus: Focus | None = None,
    ) -> RenderContext:
        """Open the original (header only, limits checked) and work out the geometry for ``preset``."""
        im = open_image(data, self.limits)
        exif = header_exif(im)
        orientation = exif_orientation(exif)
        point = None if focus is None else (Fraction(focus[0]), Fraction(focus[1]))
        return RenderContext(
            preset=preset,
            data=data,
            forced_format=forced_format,
            negotiated=negotiated,
            source=im,
            source_format=SOURCE_FORMATS[im.format or ""],
            orientation=orientation,
            focus=point,
            layout=layout(im.size, orientation, preset, point),
            icc=im.info.get("icc_profile"),
            exif=kept_exif(exif, self.encoding.keep_metadata),
            frames=animation_frames(data, im, self.limits, self.encoding),
            timings=timings if timings is not None else Timings(),
            background=preset.background or self.encoding.background,
        )

    def still(self, ctx: RenderContext, digest: str | None) -> Image.Image:
        """Decode (or reuse an intermediate), place the crop, crop and resize, orient, convert to sRGB, pad: ready
        to encode."""
        intermediate = self.intermediate(ctx, digest)
        with ctx.timings.stage("resize"):
            smart_crop(ctx, intermediate)
            im = crop_resize(intermediate, ctx.layout)
            if digest is not None:  # this render is done with the kept intermediate: only its other presets need it
                self.intermediates.shrink(digest, lambda: self.needs(ctx))
            im = to_srgb(orient(im, ctx.orientation), ctx.icc)
            return pad(im, ctx.layout, ctx.background, has_transparency(im)) if ctx.preset.fit == "pad" else im

    def intermediate(self, ctx: RenderContext, digest: str | None) -> Intermediate:
        """The decoded original at the size this preset needs (or a kept, bigger one).

        With a ``digest`` and a non-zero cache size, the result is kept for the original's next presets, and a decode
        of the same original under way on another render thread is waited for when it is big enough (service/
        intermediates.py: ``IntermediateCache.lookup``). (The decode-cost checks, JPEG scans included, ran when the
        original was opened: guards.check_structure.)
        """
        if digest is None or self.intermediates.max_bytes <= 0:
            with ctx.timings.stage("decode"):
                return load(ctx.source, ctx.data, ctx.layout.decode_size, ctx.timings)
        found = self.intermediates.lookup(digest, ctx.layout.decode_size, lambda: self.widest(ctx), ctx.preset.name)
        ctx.timings.intermediate = "hit" if isinstance(found, Intermediate) else "miss"
        if isinstance(found, Intermediate):
            return found
        decoded = None
        try:
            with ctx.timings.stage("decode"):
                decoded = reduced(load(ctx.source, ctx.data, found.target, ctx.timings), found.target)
        finally:
            self.intermediates.done(found, decoded)
        return decoded

    def widest(self, ctx: RenderContext) -> tuple[int, int]:
        """The decode size that serves every configured preset of this original (and this render's own).

        Asked for when an original's kept intermediate is too small for a second preset: the original is being
        asked at several sizes (a page's thumbnail, then its large view), so this decode is made big enough for
        all of them. An original is then decoded at most twice, however its presets are ordered, instead of once
        per bigger preset; a site that only ever asks one preset never pays for more than it needs.
        """
        sizes = [*self.needs(ctx).values(), ctx.layout.decode_size]
        return max(width for width, _ in sizes), max(height for _, height in sizes)

    def needs(self, ctx: RenderContext) -> dict[str, tuple[int, int]]:
        """Each configured preset's decode size for this original."""
        return {
            preset.name: layout(ctx.source.size, ctx.orientation, preset, ctx.focus).decode_size
            for preset in self.presets
        }

    def animation(self, ctx: RenderContext) -> Rendition:
        """Resize every frame (GIF/WebP give each frame fully composited), keeping durations and loop count."""
        frames: list[Image.Image] = []
        durations = []
        transparent = False  # padded transparently when the first frame has transparency, like a still
        with ctx.timings.stage("decode"):
            for rgba, duration in decoded_frames(ctx.source):
                durations.append(min(max(round(duration), 0), MAX_FRAME_MS))
                still = to_srgb(orient(crop_resize(Intermediate(rgba, 1.0), ctx.layout), ctx.orientation), ctx.icc)
                if ctx.preset.fit == "pad":
                    transparent = transparent or (not frames and has_transparency(still))
                    still = pad(still, ctx.layout, ctx.background, transparent)
                frames.append(still)
        with ctx.timings.stage("encode"):
            loop = min(int(ctx.source.info.get("loop", 0)), MAX_LOOP)
            return encode(ctx, frames, self.encoding, duration=durations, loop=loop)
