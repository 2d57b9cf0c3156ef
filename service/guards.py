"""Guards that bound what one original can cost before the expensive step runs.

Pixel counts bound most decodes, but not all: a progressive JPEG's decode time grows with its number of scans
(each walks the whole coefficient buffer: a few hundred KB with thousands of scans costs seconds), and Pillow has
process-wide limits of its own (the decompression-bomb check that also covers a GIF frame growing its canvas,
PNG text chunks) that must follow the configured ones. Pillow also reads a file's container structure (JPEG
segments before the first scan, PNG chunks, GIF extension blocks) in Python, one structure at a time, and
concatenates a GIF's comment sub-blocks quadratically: a 9 MB GIF of 3 million empty comments cost 7 minutes of
CPU. ``check_structure`` counts those structures before Pillow opens the file. Each check is cheap: a walk over
markers, chunks or blocks that stops at its limit, never the entropy-coded or compressed data.
"""

from __future__ import annotations

import re
import warnings

from PIL import Image, PngImagePlugin

from service.config import Limits
from service.errors import TooLarge
from service.jpeg import SOS, STANDALONE, segments
from service.png import SIGNATURE as PNG_SIGNATURE
from service.png import chunks

# Bytes outside any segment (junk, or 0xFF fill bytes before a marker), at most 64 KiB at a time.
_LOOSE_BYTES = re.compile(rb"(?:[^\xff]|\xff(?=\xff)){1,65536}")


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


def jpeg_segments(data: bytes, max_segments: int, max_scans: int) -> tuple[int, int]:
    """The numbers of segments and of scans (SOS markers) in a JPEG, counted from its markers in one walk
    (service/jpeg.py walks them) that stops past either limit. A malformed stream ends the count: the decoder
    reports it."""
    count, scans = 0, 0
    for segment in segments(data):
        count += 1
        scans += segment.marker == SOS
        if count > max_segments or scans > max_scans:
            break
    return count, scans


def gif_frames(data: bytes, stop_after: int, limits: Limits | None = None) -> tuple[int, tuple[int, int]]:
    """A GIF's frame count (counting stops past ``stop_after``) and the canvas its frames grow to, read from the
    block structure alone: no pixel is decoded, and a GIF of 200,000 frames costs no more than ``stop_after``.

    A frame's descriptor may reach beyond the logical screen, and Pillow then grows the canvas: the returned canvas
    is what a decode would allocate for every frame. A malformed structure ends the walk (the decoder reports it).
    With ``limits``, the extensions Pillow parses in Python (up to the frames it would read) are bounded too: more
    than ``max_blocks`` extension blocks and sub-blocks, or more than ``max_png_text_bytes`` of extension data (a
    comment, which Pillow joins quadratically), is TooLarge.
    """
    size = len(data)
    if size < 13:
        return 0, (0, 0)
    width, height = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    flags, pos, frames = data[10], 13, 0
    blocks, extension_bytes = 0, 0
    max_blocks = limits.max_blocks if limits is not None else size
    max_bytes = limits.max_png_text_bytes if limits is not None else size
    if flags & 0x80:
        pos += 3 << ((flags & 7) + 1)  # global colour table

    def skip_sub_blocks(pos: int) -> int:
        while pos < size and data[pos]:
            pos += 1 + data[pos]
        return pos + 1

    while pos < size and frames <= stop_after:
        kind = data[pos]
        if kind == 0x21:  # extension: label, then sub-blocks, each counted (Pillow reads them one by one)
            pos += 2
            blocks += 1
            while pos < size and data[pos] and blocks <= max_blocks and extension_bytes <= max_bytes:
                extension_bytes += data[pos]
                pos += 1 + data[pos]
                blocks += 1
            pos += 1
            if blocks > max_blocks:
                raise TooLarge(f"GIF has more than {max_blocks} extension blocks (limits.max_blocks)")
            if extension_bytes > max_bytes:
                raise TooLarge(f"GIF extensions hold more than {max_bytes} bytes (limits.max_png_text_bytes)")
        elif kind == 0x2C and pos + 10 <= size:  # image: descriptor, local colour table, LZW size, sub-blocks
            left, top, w, h = (int.from_bytes(data[pos + i : pos + i + 2], "little") for i in (1, 3, 5, 7))
            width, height = max(width, left + w), max(height, top + h)
            local = data[pos + 9]
            pos += 10 + ((3 << ((local & 7) + 1)) if local & 0x80 else 0)
            pos = skip_sub_blocks(pos + 1)  # image data: decoded in C, not counted
            frames += 1
        else:  # trailer, or garbage
            break
    return frames, (width, height)


def png_chunks(data: bytes, stop_after: int) -> int:
    """The number of chunks in a PNG, from their length fields alone; counting stops past ``stop_after``."""
    count = 0
    for _ in chunks(data):
        count += 1
        if count > stop_after:
            break
    return count


def jpeg_header_steps(data: bytes, stop_after: int) -> int:
    """The steps Pillow's JPEG parser (JpegImagePlugin, in Python) takes before the first scan: one per segment and
    one per byte outside a segment (junk, fill bytes), which it reads one at a time; counting stops past
    ``stop_after``. The walk itself skips those bytes with a regex, 64 KiB at a time."""
    steps, pos, size = 0, 2, len(data)
    while pos + 1 < size and steps <= stop_after:
        loose = _LOOSE_BYTES.match(data, pos)
        if loose:
            steps += loose.end() - pos
            pos = loose.end()
            continue
        marker = data[pos + 1]
        if marker == SOS:
            break
        steps += 1
        pos += 2 if marker in STANDALONE or marker == 0 else 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return steps


def check_structure(data: bytes, limits: Limits) -> None:
    """Refuse, before Pillow opens it, an original whose container holds more than ``limits.max_blocks``
    structures (JPEG segments and stray bytes before the first scan, PNG chunks, GIF extension blocks): Pillow
    parses each in Python (about 2 us each, 10,000 cost 20-30 ms; a 64 MB file of empty ones seconds). Real files
    hold tens (JPEG, GIF) to a few thousand (PNG, one IDAT chunk per 8-64 KiB). WebP is parsed by libwebp, in C."""
    limit = limits.max_blocks
    if data.startswith(b"\xff\xd8"):  # one walk bounds the segments (ours to walk again) and counts the scans
        count, scans = jpeg_segments(data, limit, limits.max_jpeg_scans)
        if count <= limit and scans > limits.max_jpeg_scans:
            raise TooLarge(f"JPEG has more than {limits.max_jpeg_scans} scans (limits.max_jpeg_scans)")
        count = max(count, jpeg_header_steps(data, limit))
    elif data.startswith(PNG_SIGNATURE):
        count = png_chunks(data, limit)
    elif data.startswith((b"GIF87a", b"GIF89a")):
        _, canvas = gif_frames(data, 1, limits)  # Pillow's open reads up to the second frame (is_animated)
        check_canvas(canvas, limits)
        return
    else:
        return
    if count > limit:
        raise TooLarge(f"image has more than {limit} segments, chunks or stray bytes (limits.max_blocks)")


def check_canvas(canvas: tuple[int, int], limits: Limits) -> None:
    """Refuse a canvas over ``limits.max_pixels``: what every frame of an animation is decoded into."""
    if canvas[0] * canvas[1] > limits.max_pixels:
        raise TooLarge(f"a frame grows the image to {canvas[0]}x{canvas[1]} pixels, over limits.max_pixels")
