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

    contain: the largest size inside the box, keeping the aspect ratio. cover: exactly the box. Without
    ``upscale`` nothing is ever enlarged: contain stops at the original size, and cover shrinks the box (keeping
    its aspect ratio, so square thumbnails stay square) until it fits inside the original.
    """
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


def crop_box(src_w: float, src_h: float, out_w: int, out_h: int) -> tuple[float, float, float, float]:
    """The centred region of a ``src_w`` x ``src_h`` image with the aspect ratio of ``out_w`` x ``out_h``."""
    if src_w * out_h > src_h * out_w:  # source is wider: crop the sides
        w, h = src_h * out_w / out_h, src_h
    else:
        w, h = src_w, src_w * out_h / out_w
    left, top = (src_w - w) / 2, (src_h - h) / 2
    return left, top, left + w, top + h


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one preset's output comes from in the raw (as stored, unoriented) original."""

    raw_size: tuple[int, int]  # the output size before orientation (axes swapped for orientations 5-8)
    out_size: tuple[int, int]  # the final, upright output size
    box: tuple[float, float, float, float]  # the region of the raw original that is kept (cover crops)
    decode_size: tuple[int, int]  # the size the whole raw original is scaled to on the way


def layout(size: tuple[int, int], orientation: int, preset: Preset) -> Layout:
    """The geometry of ``preset`` for a raw original of ``size`` with EXIF ``orientation``."""
    width, height = size
    swap = orientation in SWAPS_AXES
    out_w, out_h = output_size(*((height, width) if swap else size), preset)
    raw_size = (out_h, out_w) if swap else (out_w, out_h)
    box = crop_box(width, height, *raw_size) if preset.fit == "cover" else (0.0, 0.0, width, height)
    shrink = max(raw_size[0] / (box[2] - box[0]), raw_size[1] / (box[3] - box[1]))
    return Layout(raw_size, (out_w, out_h), box, (math.ceil(width * shrink), math.ceil(height * shrink)))
