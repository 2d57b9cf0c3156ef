"""Guards that bound what one original can cost before the expensive step runs.

Pixel counts bound most decodes, but not all: a progressive JPEG's decode time grows with its number of scans
(each walks the whole coefficient buffer: a few hundred KB with thousands of scans costs seconds), and Pillow has
process-wide limits of its own (the decompression-bomb check that also covers a GIF frame growing its canvas,
PNG text chunks) that must follow the configured ones. Each check is cheap: a walk over the JPEG's markers,
never its entropy-coded data beyond finding the next marker.
"""

from __future__ import annotations

import warnings

from PIL import Image, PngImagePlugin

from service.config import Limits
from service.errors import TooLarge
from service.jpeg import SOS, segments


def configure_decoders(limits: Limits) -> None:
    """Make Pillow's own process-wide limits follow the config (called once per process, by create_app).

    Pillow refuses (DecompressionBombError) at twice ``MAX_IMAGE_PIXELS`` and only warns below: set to half of
    ``max_pixels``, it refuses exactly above the limit wherever Pillow checks, including a GIF frame that grows
    the canvas past its header's size, which a header check cannot see. PNG text chunks are bounded likewise.
    """
    Image.MAX_IMAGE_PIXELS = max(1, limits.max_pixels // 2)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    PngImagePlugin.MAX_TEXT_CHUNK = min(limits.max_png_text_bytes, PngImagePlugin.MAX_TEXT_CHUNK)
    PngImagePlugin.MAX_TEXT_MEMORY = limits.max_png_text_bytes


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """The number of scans (SOS markers) in a JPEG, counted from its markers (service/jpeg.py walks them); stops
    counting past ``stop_after``. A malformed stream ends the count: the decoder reports it."""
    scans = 0
    for segment in segments(data):
        scans += segment.marker == SOS
        if scans > stop_after:
            break
    return scans


def gif_frames(data: bytes, stop_after: int) -> tuple[int, tuple[int, int]]:
    """A GIF's frame count (counting stops past ``stop_after``) and the canvas its frames grow to, read from the
    block structure alone: no pixel is decoded, and a GIF of 200,000 frames costs no more than ``stop_after``.

    A frame's descriptor may reach beyond the logical screen, and Pillow then grows the canvas: the returned canvas
    is what a decode would allocate for every frame. A malformed structure ends the walk (the decoder reports it).
    """
    size = len(data)
    if size < 13:
        return 0, (0, 0)
    width, height = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    flags, pos, frames = data[10], 13, 0
    if flags & 0x80:
        pos += 3 << ((flags & 7) + 1)  # global colour table

    def skip_sub_blocks(pos: int) -> int:
        while pos < size and data[pos]:
            pos += 1 + data[pos]
        return pos + 1

    while pos < size and frames <= stop_after:
        kind = data[pos]
        if kind == 0x21:  # extension: label, then sub-blocks
            pos = skip_sub_blocks(pos + 2)
        elif kind == 0x2C and pos + 10 <= size:  # image: descriptor, local colour table, LZW size, sub-blocks
            left, top, w, h = (int.from_bytes(data[pos + i : pos + i + 2], "little") for i in (1, 3, 5, 7))
            width, height = max(width, left + w), max(height, top + h)
            local = data[pos + 9]
            pos += 10 + ((3 << ((local & 7) + 1)) if local & 0x80 else 0)
            pos = skip_sub_blocks(pos + 1)
            frames += 1
        else:  # trailer, or garbage
            break
    return frames, (width, height)


def check_canvas(canvas: tuple[int, int], limits: Limits) -> None:
    """Refuse a canvas over ``limits.max_pixels``: what every frame of an animation is decoded into."""
    if canvas[0] * canvas[1] > limits.max_pixels:
        raise TooLarge(f"a frame grows the image to {canvas[0]}x{canvas[1]} pixels, over limits.max_pixels")


def check_jpeg_scans(data: bytes, limits: Limits) -> None:
    """Refuse a JPEG with more scans than ``limits.max_jpeg_scans`` before it is decoded."""
    scans = jpeg_scans(data, limits.max_jpeg_scans)
    if scans > limits.max_jpeg_scans:
        raise TooLarge(f"JPEG has more than {limits.max_jpeg_scans} scans (limits.max_jpeg_scans)")
