"""Output geometry: the exact size of each rendition and the region of the original it comes from.

Done in exact fractions, from the header alone (size and EXIF orientation), so the app knows every output's
size before decoding a pixel, and a box edge is never off by one.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

from service.presets import Preset

# JPEGs are DCT-scaled on load to at least this many times the output size, so LANCZOS still does the final,
# sharp reduction (with 1.0 the DCT scaling alone would do it, visibly softer); see the quality test.
DRAFT_GAP = 1.5
# EXIF orientations 5-8 turn the image a quarter: the stored width is the upright height.
SWAPS_AXES = (5, 6, 7, 8)


def _round(value: Fraction) -> int:
    """Round half up, never to 0 (exact: the geometry is done in fractions so a box edge is never off by one)."""
    return max(1, math.floor(value + Fraction(1, 2)))


def output_size(src_w: int, src_h: int, preset: Preset) -> tuple[int, int]:
    """The exact output size for an (upright) ``src_w`` x ``src_h`` original.

    contain: the largest size inside the box, keeping the aspect ratio. cover and pad: exactly the box. Without
    ``upscale`` nothing is ever enlarged: contain stops at the original size, and cover shrinks the box (keeping
    its aspect ratio, so square thumbnails stay square) until it fits inside the original.
    """
    if preset.fit == "pad":
        assert preset.width is not None and preset.height is not None  # config.py guarantees it for pad
        return preset.width, preset.height
    if preset.fit == "cover":
        assert preset.width is not None and preset.height is not None  # config.py guarantees it for cover
        box_w, box_h = preset.width, preset.height
        k = Fraction(1) if preset.upscale else min(Fraction(1), Fraction(src_w, box_w), Fraction(src_h, box_h))
        return _round(box_w * k), _round(box_h * k)
    scales = []
    if preset.width is not None:
        scales.append(Fraction(preset.width, src_w))
    if preset.height is not None:
        scales.append(Fraction(preset.height, src_h))
    scale = min(scales)
    if not preset.upscale:
        scale = min(scale, Fraction(1))
    return _round(src_w * scale), _round(src_h * scale)


# A point of an image as fractions of its width and height, (0, 0) the top left corner.
Point = tuple[Fraction, Fraction]
HALF = Fraction(1, 2)
CENTRE: Point = (HALF, HALF)
# Each gravity as the point a cover crop's window is centred on (then slid back inside the image), in the upright
# image's terms. "smart" has no fixed point: it starts from the centre and the pipeline's smart step moves it.
GRAVITY_POINTS: dict[str, Point] = {
    "centre": CENTRE,
    "north": (HALF, Fraction(0)),
    "south": (HALF, Fraction(1)),
    "east": (Fraction(1), HALF),
    "west": (Fraction(0), HALF),
    "northeast": (Fraction(1), Fraction(0)),
    "northwest": (Fraction(0), Fraction(0)),
    "southeast": (Fraction(1), Fraction(1)),
    "southwest": (Fraction(0), Fraction(1)),
    "smart": CENTRE,
}


def to_raw(point: Point, orientation: int) -> Point:
    """Where an upright image's ``point`` is in the raw (stored) image that EXIF ``orientation`` turns upright.

    The inverse of the transposition pipeline.TRANSPOSES applies: e.g. 6 (ROTATE_270, a quarter turn clockwise)
    shows the raw image's left edge at the top, so the upright top (y = 0) is the raw left (x = 0).
    """
    x, y = point
    one = Fraction(1)
    return {
        2: (one - x, y),
        3: (one - x, one - y),
        4: (x, one - y),
        5: (y, x),
        6: (y, one - x),
        7: (one - y, one - x),
        8: (one - y, x),
    }.get(orientation, (x, y))


def _clamp(value: Fraction, low: Fraction, high: Fraction) -> Fraction:
    return max(low, min(value, high))


def crop_box(
    src_w: int, src_h: int, out_w: int, out_h: int, focus: Point = CENTRE
) -> tuple[float, float, float, float]:
    """The region of a ``src_w`` x ``src_h`` image with the aspect ratio of ``out_w`` x ``out_h``, as large as fits,
    centred on ``focus`` as far as the image's edges allow (so north's point, the top middle, gives a top crop)."""
    if src_w * out_h > src_h * out_w:  # source is wider: crop the sides
        w, h = Fraction(src_h * out_w, out_h), Fraction(src_h)
    else:
        w, h = Fraction(src_w), Fraction(src_w * out_h, out_w)
    left = _clamp(focus[0] * src_w - w / 2, Fraction(0), src_w - w)
    top = _clamp(focus[1] * src_h - h / 2, Fraction(0), src_h - h)
    return float(left), float(top), float(left + w), float(top + h)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one preset's output comes from in the raw (as stored, unoriented) original."""

    raw_size: tuple[int, int]  # the resized image before orientation (axes swapped for orientations 5-8)
    out_size: tuple[int, int]  # the final, upright output size (for pad, the whole box)
    box: tuple[float, float, float, float]  # the region of the raw original that is kept (cover crops)
    decode_size: tuple[int, int]  # the size the whole raw original is scaled to on the way
    offset: tuple[int, int] = (0, 0)  # pad: where the upright image sits in the box


def layout(size: tuple[int, int], orientation: int, preset: Preset, focus: Point | None = None) -> Layout:
    """The geometry of ``preset`` for a raw original of ``size`` with EXIF ``orientation``.

    ``focus``, the origin's focal point (upright), overrides the preset's gravity for cover crops.
    """
    width, height = size
    swap = orientation in SWAPS_AXES
    upright = (height, width) if swap else size
    point = focus or GRAVITY_POINTS[preset.gravity]
    out_w, out_h = output_size(*upright, preset)
    offset = (0, 0)
    if preset.fit == "pad":
        inner_w, inner_h = output_size(*upright, dataclasses.replace(preset, fit="contain"))
        gx, gy = GRAVITY_POINTS[preset.gravity]  # pad places the image by gravity only (smart: centred)
        offset = (math.floor((out_w - inner_w) * gx), math.floor((out_h - inner_h) * gy))
        raw_size = (inner_h, inner_w) if swap else (inner_w, inner_h)
    else:
        raw_size = (out_h, out_w) if swap else (out_w, out_h)
    if preset.fit == "cover":
        box = crop_box(width, height, *raw_size, to_raw(point, orientation))
    else:
        box = (0.0, 0.0, float(width), float(height))
    shrink = max(raw_size[0] / (box[2] - box[0]), raw_size[1] / (box[3] - box[1]))
    return Layout(raw_size, (out_w, out_h), box, (math.ceil(width * shrink), math.ceil(height * shrink)), offset)


def refocused(lay: Layout, size: tuple[int, int], raw_point: Point) -> Layout:
    """``lay`` with its cover crop moved to centre on ``raw_point`` (a point of the raw image, as smart finds it):
    same size, so the decode size and the output do not change."""
    return dataclasses.replace(lay, box=crop_box(*size, *lay.raw_size, raw_point))
