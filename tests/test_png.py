"""PNG's deflate by libdeflate (service/png.py): renditions with the same pixels and chunks as Pillow writes, and
really compressed; originals decoded to the same pixels as Pillow alone gives, or left to Pillow."""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from service.decoding import decode_rewritten, load, normalise_mode
from service.errors import Unprocessable
from service.pipeline import Pipeline
from service.png import SIGNATURE, chunks, deflate_rows, inflated
from tests.hostile import saved
from tests.imaging import DEFAULT_CONFIG, decode, render

MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


def picture(mode: str, width: int, height: int) -> Image.Image:
    """Noise over a gradient in ``mode``: rows that each PNG filter treats differently, and some repetition."""
    base = Image.merge(
        "RGBA", [Image.effect_noise((width, height), 60).point(lambda v, k=k: (v * k) % 256) for k in (1, 3, 5, 7)]
    )
    base = Image.blend(base, Image.linear_gradient("L").resize((width, height)).convert("RGBA"), 0.5)
    if mode == "P":
        return base.convert("RGB").quantize(colors=16)
    if mode == "I;16":
        return base.convert("L").convert("I").point(lambda v: v * 257).convert("I;16")
    return base.convert(mode)


def stored(im: Image.Image, **options: object) -> bytes:
    return saved(im, "PNG", compress_level=0, **options)


def idat_block_types(png: bytes) -> list[int]:
    """The deflate type of the first block of each IDAT stream (0: stored, 1: fixed, 2: dynamic Huffman)."""
    data = b"".join(png[offset + 8 : offset + 8 + length] for kind, offset, length in chunks(png) if kind == b"IDAT")
    return [(data[2] >> 1) & 3]  # after the 2-byte zlib header: BFINAL, then BTYPE


def kinds(png: bytes) -> list[bytes]:
    return [kind for kind, _, _ in chunks(png)]


@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(MODES), width=st.integers(1, 67), height=st.integers(1, 23))
def test_every_mode_and_row_length_keeps_its_pixels(mode: str, width: int, height: int) -> None:
    """Bit-packed rows (1-bit, odd widths), palettes, 16-bit and alpha: the filtered rows' size is worked out from
    IHDR, and libdeflate is told it exactly, so any slip there fails the decompression or the pixels."""
    im = picture(mode, width, height)
    before = stored(im)
    after = deflate_rows(before, 6)
    out = decode(after)
    assert (out.mode, out.size) == (im.mode, im.size)
    assert out.tobytes() == im.tobytes()
    if mode == "P":
        assert out.getpalette() == im.getpalette()
    assert kinds(after) == [*[k for k in kinds(before) if k != b"IDAT"][:-1], b"IDAT", b"IEND"]


def test_chunks_around_the_image_data_are_kept_as_written() -> None:
    """Transparency, EXIF and text chunks come through byte for byte, in their places."""
    im = picture("P", 40, 30)
    info = PngImagePlugin.PngInfo()
    info.add_text("Copyright", "someone")
    exif = Image.Exif()
    exif[0x8298] = "someone"
    before = stored(im, transparency=3, pnginfo=info, exif=exif.tobytes())
    after = deflate_rows(before, 6)

    def others(png: bytes) -> list[bytes]:
        return [png[o : o + 12 + n] for kind, o, n in chunks(png) if kind != b"IDAT"]

    assert others(after) == others(before)
    out = decode(after)
    assert out.info["transparency"] == 3 and out.text == {"Copyright": "someone"}
    assert out.getexif()[0x8298] == "someone"


def test_the_image_data_is_one_valid_compressed_chunk() -> None:
    im = Image.linear_gradient("L").resize((300, 200)).convert("RGBA")  # smooth: filtered rows compress well
    before = stored(im)
    after = deflate_rows(before, 6)
    idats = [(o, n) for kind, o, n in chunks(after) if kind == b"IDAT"]
    assert len(idats) == 1
    offset, length = idats[0]
    (crc,) = struct.unpack_from(">I", after, offset + 8 + length)
    assert crc == zlib.crc32(after[offset + 4 : offset + 8 + length])  # what strict decoders (libpng) check
    assert idat_block_types(after) != [0] and idat_block_types(before) == [0]
    assert len(after) < len(before) * 0.8


def test_an_animation_is_refused() -> None:
    """fdAT chunks hold the other frames, which ``deflate_rows`` would leave stored (renditions are never APNGs:
    formats.ANIMATED_OUTPUTS)."""
    frames = [picture("RGB", 32, 32), picture("L", 32, 32).convert("RGB")]
    apng = saved(frames[0], "PNG", save_all=True, append_images=frames[1:], compress_level=0)
    with pytest.raises(ValueError, match="only a still"):
        deflate_rows(apng, 6)


@pytest.fixture(scope="module")
def kite(corpus: Path) -> bytes:
    return (corpus / "12_kite_alpha.png").read_bytes()


def test_a_png_rendition_is_compressed_with_the_same_pixels(kite: bytes) -> None:
    """Through the pipeline (an alpha original, a client without WebP/AVIF: PNG out): the same pixels as when
    stored uncompressed (level 0), much smaller, and within 5% of Pillow's own level 6 on those pixels."""
    preset = DEFAULT_CONFIG.presets["medium"]
    compressed = render(Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits), kite, preset)
    level0 = dataclasses.replace(DEFAULT_CONFIG.encoding, png_compress_level=0)
    plain = render(Pipeline(level0, DEFAULT_CONFIG.limits), kite, preset)
    assert compressed.format == plain.format == "png"
    pixels = decode(compressed.body)
    assert pixels.tobytes() == decode(plain.body).tobytes()
    assert idat_block_types(compressed.body) != [0] and idat_block_types(plain.body) == [0]
    pillows = saved(pixels, "PNG", compress_level=DEFAULT_CONFIG.encoding.png_compress_level)
    assert len(compressed.body) < len(plain.body) / 2
    assert len(compressed.body) <= len(pillows) * 1.05, (len(compressed.body), len(pillows))


# ------------------------------------------------------------------------------------------------------ decoding


def pillow_alone(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def fast(data: bytes) -> Image.Image | None:
    return decode_rewritten(inflated(data), PngImagePlugin.PngImageFile)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    width=st.integers(1, 67),
    height=st.integers(1, 23),
    level=st.sampled_from([0, 1, 6, 9]),
)
def test_originals_decode_to_the_pixels_pillow_gives(mode: str, width: int, height: int, level: int) -> None:
    data = saved(picture(mode, width, height), "PNG", compress_level=level)
    out = fast(data)
    assert out is not None
    ref = pillow_alone(data)
    assert (out.mode, out.size, out.tobytes()) == (ref.mode, ref.size, ref.tobytes())


@pytest.mark.parametrize("name", ["12_kite_alpha.png", "15_fallenleaf_16bit.png"])
def test_the_pipeline_inflates_corpus_pngs_with_libdeflate(corpus: Path, name: str) -> None:
    """Pillow splits these into many IDAT chunks; the kept decode is Pillow's own, pixel for pixel."""
    data = (corpus / name).read_bytes()
    assert sum(kind == b"IDAT" for kind, _, _ in chunks(data)) > 1
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    ctx = pipeline.plan(data, DEFAULT_CONFIG.presets["small"])
    decoded = load(ctx.source, ctx.data, ctx.layout.decode_size, ctx.timings)
    assert ctx.timings.decoder == "libdeflate"
    ref = normalise_mode(pillow_alone(data))
    whole = decoded.region(ref.size, (0, 0, ref.width, ref.height))
    assert (whole.mode, whole.tobytes()) == (ref.mode, ref.tobytes())


def interlaced() -> bytes:
    """A 1x1 red Adam7 PNG: only the first pass holds a pixel."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 1)
    rows = zlib.compress(b"\x00\xff\x00\x00")
    return SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def bad_checksum(data: bytes) -> bytes:
    """The last IDAT's last four data bytes (the zlib stream's Adler-32) flipped, its chunk CRC kept valid."""
    _, offset, length = [c for c in chunks(data) if c[0] == b"IDAT"][-1]
    body = bytearray(data[offset + 4 : offset + 8 + length])
    body[-4:] = bytes(b ^ 0xFF for b in body[-4:])
    return data[: offset + 4] + bytes(body) + struct.pack(">I", zlib.crc32(body)) + data[offset + 12 + length :]


def split_idats(data: bytes) -> bytes:
    """A text chunk between two IDATs (the format forbids it)."""
    _, offset, length = next(c for c in chunks(data) if c[0] == b"IDAT")
    half = length // 2
    idat = data[offset + 8 : offset + 8 + length]
    return (
        data[:offset]
        + chunk(b"IDAT", idat[:half])
        + chunk(b"tEXt", b"a\x00b")
        + chunk(b"IDAT", idat[half:])
        + data[offset + 12 + length :]
    )


@pytest.mark.parametrize(
    "make",
    [
        interlaced,
        lambda: saved(picture("RGB", 20, 20), "PNG", save_all=True, append_images=[picture("L", 20, 20)]),
    ],
    ids=["interlaced", "animated"],
)
def test_what_does_not_qualify_is_left_to_pillow(make: Callable[[], bytes]) -> None:
    """Each of these still decodes exactly as Pillow alone decodes it (the pipeline falls back to it)."""
    data = make()
    assert inflated(data) is None
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    ctx = pipeline.plan(data, DEFAULT_CONFIG.presets["small"])
    decoded = load(ctx.source, ctx.data, ctx.layout.decode_size, ctx.timings)
    assert ctx.timings.decoder == ""
    ref = normalise_mode(pillow_alone(data))
    assert decoded.region(ref.size, (0, 0, ref.width, ref.height)).tobytes() == ref.tobytes()


@pytest.mark.parametrize(
    "spoil",
    [lambda data: data[: len(data) * 2 // 3], bad_checksum, split_idats],
    ids=["cut", "bad-adler32", "split-idats"],
)
def test_a_broken_original_is_still_refused(corpus: Path, spoil: Callable[[bytes], bytes]) -> None:
    """libdeflate refuses the stream; Pillow, decoding the original, reports it: never a half image."""
    data = spoil((corpus / "12_kite_alpha.png").read_bytes())
    assert inflated(data) is None
    with pytest.raises(Unprocessable):
        render(Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits), data, DEFAULT_CONFIG.presets["small"])
