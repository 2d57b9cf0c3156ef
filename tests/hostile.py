"""Hostile originals, generated: each a known way to make an image service spend seconds, memory or a 500.

Shared by the unit tests of the guards (tests/test_guards.py) and the through-nginx tests (tests/test_hostile.py).
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image, PngImagePlugin

GIF_HEADER = b"GIF89a" + struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
GIF_FRAME = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x44\x01\x00"


def saved(im: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


def growing_gif(screen: int, frame: int) -> bytes:
    """A two-frame GIF whose second frame's descriptor is ``frame`` px square on a ``screen`` px logical screen."""
    first = Image.new("P", (screen, screen), 1)
    first.putpalette([0, 0, 0, 255, 0, 0])
    data = saved(first, "GIF")
    descriptor = data.index(b"\x2c\x00\x00\x00\x00")  # the first (only) image descriptor, at 0,0
    image_block = data[descriptor:-1]  # descriptor, LZW data; without the trailer
    grown = b"\x2c" + struct.pack("<HHHH", 0, 0, frame, frame) + image_block[9:]
    return data[:-1] + grown + b"\x3b"


def many_frames_gif(frames: int) -> bytes:
    """A GIF of ``frames`` 1x1 frames (about 16 bytes each)."""
    return GIF_HEADER + GIF_FRAME * frames + b"\x3b"


def tiny_scans(count: int) -> bytes:
    """``count`` minimal scans (SOS headers with a few bytes of data holding stuffed 0xFF00 and a restart marker)."""
    sos = b"\xff\xda" + struct.pack(">H", 8) + b"\x01\x01\x00\x00\x3f\x00"
    return (sos + b"\x12\xff\x00\x34\xff\xd0\x56\xff\x00") * count


def many_scans_jpeg(count: int) -> bytes:
    """A real progressive JPEG (Pillow opens its header) followed by ``count`` more tiny scans."""
    data = saved(Image.new("RGB", (64, 64), "teal"), "JPEG", progressive=True)
    return data[:-2] + tiny_scans(count) + b"\xff\xd9"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + idat + png_chunk(b"IEND", b"")


def tall_png(height: int = 70_000) -> bytes:
    """A real 2 x ``height`` grayscale PNG (a few hundred bytes): no encoder but PNG can write it whole."""
    return saved(Image.new("L", (2, height), 128), "PNG")


def text_png(text_bytes: int, colour: str = "red") -> bytes:
    """A small PNG with a zTXt chunk that inflates to ``text_bytes`` of text."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * text_bytes, zip=True)
    return saved(Image.new("RGB", (64, 64), colour), "PNG", pnginfo=info)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF) claims ``width`` x ``height``."""
    data = bytearray(saved(Image.new("RGB", (16, 16), "blue"), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def fat_metadata_jpeg(segments: int, seed: int) -> bytes:
    """A 64x64 JPEG carrying ``segments`` APP15 segments of 64 KiB each (metadata Pillow keeps on the image)."""
    data = saved(Image.new("RGB", (64, 64), (seed % 256, 80, 160)), "JPEG")
    body = bytes([seed % 256]) * 65_000
    app = (b"\xff\xef" + struct.pack(">H", len(body) + 2) + body) * segments
    return data[:2] + app + data[2:]


def many_comments_gif(comments: int, comment_bytes: int = 0) -> bytes:
    """A 1x1 GIF whose frame follows ``comments`` comment extensions of ``comment_bytes`` each (in sub-blocks of up
    to 255): Pillow reads each in Python and joins a frame's comments quadratically (3 million empty ones: minutes)."""
    body = b"".join(bytes([len(part)]) + part for part in _split(b"c" * comment_bytes, 255))
    return GIF_HEADER + (b"\x21\xfe" + body + b"\x00") * comments + GIF_FRAME + b"\x3b"


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def many_chunks_png(chunks: int) -> bytes:
    """A 64x64 PNG with ``chunks`` empty private ancillary chunks before its pixels (12 bytes each)."""
    data = saved(Image.new("RGB", (64, 64), "green"), "PNG")
    return data[:33] + png_chunk(b"phIz", b"") * chunks + data[33:]  # after the signature and IHDR


def many_segments_jpeg(segments: int) -> bytes:
    """A 64x64 JPEG with ``segments`` empty APP5 segments (4 bytes each) before its frame header."""
    data = saved(Image.new("RGB", (64, 64), "green"), "JPEG")
    return data[:2] + b"\xff\xe5\x00\x02" * segments + data[2:]


def fat_icc_jpeg(icc_bytes: int, seed: int) -> bytes:
    """A 64x64 JPEG carrying an ``icc_bytes`` embedded profile (unusable: littleCMS refuses it, the pixels stay)."""
    profile = bytes([seed % 256]) * icc_bytes
    return saved(Image.new("RGB", (64, 64), (seed % 256, 40, 90)), "JPEG", icc_profile=profile)


def png_iccp_bomb(inflated: int) -> bytes:
    """A 64x64 PNG whose iCCP chunk inflates to ``inflated`` bytes (a few KB in the file)."""
    data = saved(Image.new("RGB", (64, 64), "green"), "PNG")
    return data[:33] + png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * inflated, 9)) + data[33:]


def idat_bomb_png(side: int) -> bytes:
    """A ``side`` x ``side`` RGB PNG of zeros: megapixels from a few hundred KB (within max_pixels up to 7071)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    compressor = zlib.compressobj(9)
    idat = compressor.compress(b"\x00" * ((side * 3 + 1) * side)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def stray_bytes_jpeg(count: int, byte: int) -> bytes:
    """A 64x64 JPEG with ``count`` bytes outside any segment before its quantization tables: 0xFF fill bytes
    (allowed before a marker) or junk, both of which Pillow's header parser reads one Python step at a time."""
    data = saved(Image.new("RGB", (64, 64), "green"), "JPEG")
    tables = data.index(b"\xff\xdb")
    return data[:tables] + bytes([byte]) * count + data[tables:]
