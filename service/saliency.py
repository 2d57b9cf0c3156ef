"""Smart crops: the window of a cover crop that keeps the most interesting part of the image.

smartcrop.js's (and thumbor's) idea, reduced to what a thumbnail service can afford per render: on a small copy of
the decoded intermediate (about SAMPLE_SIDE pixels on its long side, so a few milliseconds whatever the original),
score every pixel by edge energy, saturation and skin tone, then slide the crop window along the one axis being
cropped and keep the position with the highest score, each pixel weighed by how central it is in the window (so
a subject ends up in the middle of the crop, not cut at its edge). Ties (a flat image) go to the most central
position, so "smart" never does worse than "centre" on an image with nothing to find. Pure Pillow and
deterministic: the same intermediate always gives the same point.

Everything here is in the raw (stored, unoriented) image's terms, like the intermediate and the crop box: no EXIF
orientation mapping is needed.
"""

from __future__ import annotations

from fractions import Fraction

from PIL import Image, ImageChops, ImageFilter, ImageOps

from service.geometry import HALF, Point
from service.intermediates import Intermediate

SAMPLE_SIDE = 160  # the small copy's long side, at least: position precision is 1/SAMPLE_SIDE of the image
# Skin tones in YCbCr (Chai and Ngan's classic ranges), as 0/255 masks.
_SKIN_CB = [255 if 77 <= v <= 127 else 0 for v in range(256)]
_SKIN_CR = [255 if 133 <= v <= 173 else 0 for v in range(256)]


def sample(source: Intermediate) -> Image.Image:
    """A small RGB copy of the intermediate (reduce() hands out a new image: the kept one is never touched)."""
    factor = max(1, max(source.size) // SAMPLE_SIDE)
    return source.reduce(factor).convert("RGB")


def saliency(im: Image.Image) -> Image.Image:
    """Per pixel interest (mode L): half edge energy, a quarter saturation (of bright enough pixels), a quarter skin.

    Edges find detail against plain backgrounds; saturation finds colourful subjects on grey or white; skin finds
    faces and people, which edges alone rank below a patterned wall.
    """
    edges = ImageOps.expand(ImageOps.crop(im.convert("L").filter(ImageFilter.FIND_EDGES), 1), 1, 0)  # no borders
    _, sat, val = im.convert("HSV").split()
    _, cb, cr = im.convert("YCbCr").split()
    skin = ImageChops.multiply(cb.point(_SKIN_CB), cr.point(_SKIN_CR))
    return ImageChops.add(edges, ImageChops.add(ImageChops.multiply(sat, val), skin, scale=2), scale=2)


def best_centre(profile: list[float], length: int) -> Fraction:
    """The centre of the ``length``-long window of ``profile`` that scores highest (pixel i spans i..i+1).

    A window's score weighs each pixel by a tent, 1 at the window's centre and 0 at its edges, so the best window
    centres the interesting part rather than just including it, and a subject is not cut at the crop's edge.
    With prefix sums of p and of p*x, each window costs O(1). Ties (a flat profile) go to the most central.
    """
    sums, moments = [0.0], [0.0]
    for i, value in enumerate(profile):
        sums.append(sums[-1] + value)
        moments.append(moments[-1] + value * (i + 0.5))
    half = length / 2
    slack = len(profile) - length

    def score(start: int) -> float:
        centre, middle, end = start + half, start + length // 2, start + length
        left = centre * (sums[middle] - sums[start]) - (moments[middle] - moments[start])
        right = (moments[end] - moments[middle]) - centre * (sums[end] - sums[middle])
        return (sums[end] - sums[start]) - (left + right) / half

    start = max(range(slack + 1), key=lambda s: (round(score(s), 9), -abs(2 * s - slack)))
    return Fraction(2 * start + length, 2)


def salient_point(source: Intermediate, window: tuple[Fraction, Fraction]) -> Point | None:
    """The centre of the most salient crop window, as fractions of the raw image; None when nothing is cropped.

    ``window`` is the crop's size as fractions of the raw image's width and height: one of them is 1 (a cover crop
    keeps the whole of one axis), so the search is one-dimensional along the other.
    """
    if window[0] >= 1 and window[1] >= 1:
        return None
    sal = saliency(sample(source)).convert("F")
    horizontal = window[0] < 1
    size = sal.width if horizontal else sal.height
    # A BOX resize to one row (or column) averages each column (or row) exactly, in C.
    line = sal.resize((sal.width, 1) if horizontal else (1, sal.height), Image.Resampling.BOX)
    length = max(1, min(size, round((window[0] if horizontal else window[1]) * size)))
    centre = best_centre(list(line.get_flattened_data()), length) / size
    return (centre, HALF) if horizontal else (HALF, centre)
