"""Fuzzing the pipeline's entry point with damaged originals (issue 10): whatever the bytes, ``Pipeline.render``
answers with a complete image inside the preset's box or with one of phizer's own 4xx errors, within
RENDER_SECONDS.

tests/test_robustness.py damages every corpus file at a few fixed points; here Hypothesis searches instead: bit
flips, inserted and deleted bytes, truncations, header fields (sizes, counts, delays, offsets, the EXIF
orientation) overwritten with edge values, and whole segments/chunks/blocks duplicated. The seeds are small, so
several thousand renders fit in about a minute: the corpus's one small JPEG as it is, and tiny images of every
decoded format (stills and animations) made from corpus pixels and the corpus's real ICC profiles. Runs are
derandomized and keep no example database: a checkout tries the same inputs on every machine, and a failure prints
the seed's name and the list of mutations that reproduce it. What longer, randomized runs found is replayed by
``test_what_fuzzing_found_renders_or_fails_cleanly``.
"""

from __future__ import annotations

import dataclasses
import io
import resource
import zlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageSequence

from service.errors import TooLarge, Unprocessable, UnsupportedMedia
from service.formats import SAVE_FORMATS
from service.guards import configure_decoders
from service.pipeline import Pipeline
from service.presets import Preset
from tests.imaging import DEFAULT_CONFIG, render

# Generous: the seeds render in milliseconds; a damaged one that takes seconds has found a cost the guards miss.
RENDER_SECONDS = 2.0
EXAMPLES_PER_SEED = 600
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_SEED,
    deadline=timedelta(seconds=RENDER_SECONDS),
    derandomize=True,
    database=None,
)
# The errors that mean "this original is the client's problem" (413, 415, 422); anything else is a 500.
CLIENT_ERRORS = (TooLarge, UnsupportedMedia, Unprocessable)
PRESETS = (
    DEFAULT_CONFIG.presets["thumb"],  # cover 150x150: a centred crop
    DEFAULT_CONFIG.presets["small"],  # contain, width only
    Preset("fuzz-height", height=90),  # contain, height only
    Preset("fuzz-upscale", width=200, height=120, fit="cover", upscale=True, format="source"),
)
# Far more than any render of a seed needs (max_pixels' 50 MP is 200 MB per RGBA copy), far less than the machine.
MEMORY_HEADROOM = 4 * 2**30
HEAD_BYTES = 1024  # where headers live: half of the byte edits land here
EDGE_VALUES = (0, 1, 2, 3, 7, 8, 9, 15, 16, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0xFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


# ---------------------------------------------------------------------------------------------------- mutations


class Mutation(Protocol):
    def apply(self, data: bytes) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class Field:
    """An integer field of a seed's header. ``crc``: the PNG chunk span (type and data) whose CRC-32 follows it,
    recomputed after an overwrite so the decoder reads the new value instead of stopping at the checksum."""

    name: str
    offset: int
    size: int
    order: Literal["big", "little"]
    crc: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class SetField:
    """Overwrite a header field with ``value``."""

    field: Field
    value: int

    def apply(self, data: bytes) -> bytes:
        out = bytearray(data)
        f = self.field
        out[f.offset : f.offset + f.size] = self.value.to_bytes(f.size, f.order)
        if f.crc is not None:
            start, end = f.crc
            out[end : end + 4] = zlib.crc32(out[start:end]).to_bytes(4, "big")
        return bytes(out)


@dataclasses.dataclass(frozen=True)
class Duplicate:
    """Copy the segment/chunk/block ``data[start:end]`` to ``at`` (another structure boundary)."""

    start: int
    end: int
    at: int

    def apply(self, data: bytes) -> bytes:
        return data[: self.at] + data[self.start : self.end] + data[self.at :]


# Byte edits come after the structural ones, so their positions wrap around whatever length the data has by then.


@dataclasses.dataclass(frozen=True)
class Flip:
    """Invert one bit."""

    pos: int
    bit: int

    def apply(self, data: bytes) -> bytes:
        if not data:
            return data
        pos = self.pos % len(data)
        return data[:pos] + bytes([data[pos] ^ (1 << self.bit)]) + data[pos + 1 :]


@dataclasses.dataclass(frozen=True)
class Insert:
    """Insert bytes."""

    pos: int
    blob: bytes

    def apply(self, data: bytes) -> bytes:
        pos = self.pos % (len(data) + 1)
        return data[:pos] + self.blob + data[pos:]


@dataclasses.dataclass(frozen=True)
class Delete:
    """Delete ``count`` bytes."""

    pos: int
    count: int

    def apply(self, data: bytes) -> bytes:
        pos = self.pos % (len(data) + 1)
        return data[:pos] + data[pos + self.count :]


@dataclasses.dataclass(frozen=True)
class Truncate:
    """Keep only the first ``length`` bytes (an upload cut short)."""

    length: int

    def apply(self, data: bytes) -> bytes:
        return data[: self.length % (len(data) + 1)]


def mutate(data: bytes, mutations: list[Mutation]) -> bytes:
    for mutation in mutations:
        data = mutation.apply(data)
    return data


# -------------------------------------------------------------------------------------------- seed structure


@dataclasses.dataclass(frozen=True)
class Seed:
    """A small, valid original and where its structure is: fields worth overwriting, chunks worth duplicating."""

    data: bytes
    fields: tuple[Field, ...]
    chunks: tuple[tuple[int, int], ...]

    def __repr__(self) -> str:
        return f"<Seed: {len(self.data)} bytes, {len(self.fields)} fields, {len(self.chunks)} chunks>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints every argument of a failing example, fixtures too, and would print a dataclass field
        by field: this keeps the report to the mutations instead of a megabyte of seeds."""
        printer.text(repr(self))


def exif_fields(data: bytes, start: int, end: int, crc: tuple[int, int] | None) -> list[Field]:
    """The orientation and IFD0's offset of a TIFF/EXIF block somewhere in ``data[start:end]``."""
    for tiff, order in ((data.find(b"II*\0", start, end), "little"), (data.find(b"MM\0*", start, end), "big")):
        if tiff < 0:
            continue
        fields = [Field("exif.ifd0_offset", tiff + 4, 4, order, crc)]  # type: ignore[arg-type]
        tag = (0x0112).to_bytes(2, order) + (3).to_bytes(2, order)  # type: ignore[arg-type]
        entry = data.find(tag, tiff, end)
        if entry >= 0:
            fields.append(Field("exif.orientation", entry + 8, 2, order, crc))  # type: ignore[arg-type]
        return fields
    return []


def next_marker(data: bytes, pos: int) -> int:
    """The end of a JPEG scan's entropy-coded data: the next 0xFF that is neither stuffing nor a restart marker."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        if data[pos + 1] == 0 or 0xD0 <= data[pos + 1] <= 0xD7:
            pos += 2
            continue
        return pos


def jpeg_structure(data: bytes) -> Seed:
    """Segments (a scan with its entropy-coded data), their lengths, SOF sizes and sampling, SOS spectral bands."""
    fields: list[Field] = []
    chunks: list[tuple[int, int]] = []
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != 0xD9:
        marker = data[pos + 1]
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        fields.append(Field(f"{marker:02X}.length", pos + 2, 2, "big"))
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            fields += [Field("SOF.height", pos + 5, 2, "big"), Field("SOF.width", pos + 7, 2, "big")]
            fields.append(Field("SOF.components", pos + 9, 1, "big"))
            fields += [Field(f"SOF.sampling{i}", pos + 11 + 3 * i, 1, "big") for i in range(data[pos + 9])]
        elif marker == 0xDA:  # start of scan: the spectral band and approximation bits of progressive scans
            ns = data[pos + 4]
            fields += [Field(f"SOS.{name}", pos + 5 + 2 * ns + i, 1, "big") for i, name in enumerate(("Ss", "Se", "A"))]
            end = next_marker(data, end)
        elif marker == 0xE1:
            fields += exif_fields(data, pos, end, None)
        chunks.append((pos, end))
        pos = end
    return Seed(data, tuple(fields), tuple(chunks))


PNG_FIELDS = {
    b"IHDR": (("width", 0, 4), ("height", 4, 4), ("depth", 8, 1), ("colour", 9, 1), ("interlace", 12, 1)),
    b"acTL": (("frames", 0, 4), ("plays", 4, 4)),
    b"fcTL": (
        ("width", 4, 4),
        ("height", 8, 4),
        ("x", 12, 4),
        ("y", 16, 4),
        ("delay_num", 20, 2),
        ("delay_den", 22, 2),
        ("dispose", 24, 1),
        ("blend", 25, 1),
    ),
}


def png_structure(data: bytes) -> Seed:
    """Chunks, their lengths, IHDR and APNG frame fields, the eXIf orientation (CRCs kept valid)."""
    fields: list[Field] = []
    chunks: list[tuple[int, int]] = []
    pos = 8
    while pos + 12 <= len(data):
        kind = data[pos + 4 : pos + 8]
        body = pos + 8
        end = body + int.from_bytes(data[pos : pos + 4], "big")
        crc = (pos + 4, end)
        fields.append(Field(f"{kind.decode()}.length", pos, 4, "big"))
        fields += [
            Field(f"{kind.decode()}.{name}", body + at, size, "big", crc) for name, at, size in PNG_FIELDS.get(kind, ())
        ]
        if kind == b"eXIf":
            fields += exif_fields(data, body, end, crc)
        chunks.append((pos, end + 4))
        pos = end + 4
    return Seed(data, tuple(fields), tuple(chunks))


def gif_structure(data: bytes) -> Seed:
    """The logical screen, every frame's descriptor, graphic control and loop fields; blocks as chunks."""
    fields = [
        Field("screen.width", 6, 2, "little"),
        Field("screen.height", 8, 2, "little"),
        Field("flags", 10, 1, "little"),
    ]
    chunks: list[tuple[int, int]] = []
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)

    def sub_blocks(pos: int) -> int:
        while pos < len(data) and data[pos]:
            pos += 1 + data[pos]
        return pos + 1

    while pos < len(data) and data[pos] != 0x3B:
        start = pos
        if data[pos] == 0x21:  # extension: graphic control (delay, transparency), application (NETSCAPE loop)
            if data[pos + 1] == 0xF9:
                fields += [Field("gce.flags", pos + 3, 1, "little"), Field("gce.delay", pos + 4, 2, "little")]
                fields.append(Field("gce.transparent", pos + 6, 1, "little"))
            elif data[pos + 3 : pos + 14] == b"NETSCAPE2.0":
                fields.append(Field("netscape.loop", pos + 16, 2, "little"))
            pos = sub_blocks(pos + 2)
        else:  # image descriptor, local colour table, LZW code size, data
            names = ("left", "top", "width", "height")
            fields += [Field(f"frame.{name}", pos + 1 + 2 * i, 2, "little") for i, name in enumerate(names)]
            fields += [Field("frame.flags", pos + 9, 1, "little"), Field("frame.lzw_bits", pos + 10, 1, "little")]
            flags = data[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            pos = sub_blocks(pos + 1)
        chunks.append((start, pos))
    return Seed(data, tuple(fields), tuple(chunks))


WEBP_FIELDS = {
    b"VP8X": (("flags", 0, 1), ("canvas_w", 4, 3), ("canvas_h", 7, 3)),
    b"ANIM": (("loop", 4, 2),),
    b"ANMF": (("x", 0, 3), ("y", 3, 3), ("w", 6, 3), ("h", 9, 3), ("duration", 12, 3), ("flags", 15, 1)),
    b"VP8 ": (("width", 6, 2), ("height", 8, 2)),
    b"VP8L": (("size", 1, 4),),
}


def webp_structure(data: bytes) -> Seed:
    """RIFF and chunk sizes, canvas and frame fields (frames' own chunks too); top-level chunks."""
    fields = [Field("RIFF.size", 4, 4, "little")]
    chunks: list[tuple[int, int]] = []

    def walk(pos: int, end: int, top: bool) -> None:
        while pos + 8 <= end:
            kind = data[pos : pos + 4]
            body = pos + 8
            size = int.from_bytes(data[pos + 4 : body], "little")
            fields.append(Field(f"{kind.decode()}.size", pos + 4, 4, "little"))
            fields.extend(
                Field(f"{kind.decode()}.{name}", body + at, n, "little") for name, at, n in WEBP_FIELDS.get(kind, ())
            )
            if kind == b"ANMF":
                walk(body + 16, body + size, top=False)
            if top:
                chunks.append((pos, body + size + size % 2))
            pos = body + size + size % 2

    walk(12, len(data), top=True)
    return Seed(data, tuple(fields), tuple(chunks))


# ------------------------------------------------------------------------------------------------------- seeds


def saved(im: Image.Image | list[Image.Image], fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    if isinstance(im, list):
        im[0].save(out, fmt, save_all=True, append_images=im[1:], **options)
    else:
        im.save(out, fmt, **options)
    return out.getvalue()


def sunset_frames(corpus: Path) -> list[Image.Image]:
    """Three frames of the corpus's animated GIF, shrunk to 48x32 RGBA with a transparent corner."""
    frames = []
    with Image.open(corpus / "14_sunset_anim.gif") as gif:
        for index in range(3):
            gif.seek(index)
            frame = gif.convert("RGBA").resize((48, 32))
            frame.paste((0, 0, 0, 0), (0, 0, 12, 8))
            frames.append(frame)
    return frames


def photo(corpus: Path, size: tuple[int, int]) -> Image.Image:
    with Image.open(corpus / "16_storm_720_30k.jpg") as im:
        return im.convert("RGB").resize(size)


def icc(corpus: Path, name: str) -> bytes:
    """A corpus file's embedded ICC profile (header only: nothing is decoded)."""
    with Image.open(corpus / name) as im:
        return im.info["icc_profile"]


def exif(orientation: int) -> bytes:
    block = Image.Exif()
    block[0x0112] = orientation
    block[0x8298] = "phizer fuzz"  # copyright
    return block.tobytes()


def alpha(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(im.size))
    return rgba


def gray16(size: tuple[int, int]) -> Image.Image:
    """A 16-bit grayscale gradient (Pillow's I;16: PNG stores it with bit depth 16)."""
    return Image.linear_gradient("L").resize(size).convert("I").point(lambda v: v * 257).convert("I;16")


SEEDS: dict[str, Callable[[Path], Seed]] = {
    "corpus-storm-720.jpg": lambda c: jpeg_structure((c / "16_storm_720_30k.jpg").read_bytes()),
    "progressive-exif6-adobergb.jpg": lambda c: jpeg_structure(
        saved(photo(c, (96, 64)), "JPEG", progressive=True, exif=exif(6), icc_profile=icc(c, "11_cups_adobergb.jpg"))
    ),
    "cmyk-swop.jpg": lambda c: jpeg_structure(
        saved(photo(c, (64, 40)).convert("CMYK"), "JPEG", icc_profile=icc(c, "09_fallenleaf_cmyk.jpg"))
    ),
    "gray-restarts.jpg": lambda c: jpeg_structure(
        saved(photo(c, (64, 40)).convert("L"), "JPEG", quality=75, restart_marker_blocks=4)
    ),
    "rgba-srgb-exif3.png": lambda c: png_structure(
        saved(alpha(photo(c, (64, 40))), "PNG", icc_profile=icc(c, "12_kite_alpha.png"), exif=exif(3))
    ),
    "palette-trns.png": lambda c: png_structure(saved(photo(c, (48, 32)).quantize(16), "PNG", transparency=0)),
    "gray16.png": lambda c: png_structure(saved(gray16((48, 32)), "PNG")),
    "apng.png": lambda c: png_structure(saved(sunset_frames(c), "PNG", duration=[80, 90, 100], loop=2)),
    "lossy.webp": lambda c: webp_structure(saved(photo(c, (64, 40)), "WEBP", quality=70)),
    "anim-alpha.webp": lambda c: webp_structure(
        saved(sunset_frames(c), "WEBP", duration=[80, 90, 100], loop=2, quality=60)
    ),
    "anim-transparent.gif": lambda c: gif_structure(
        saved(sunset_frames(c), "GIF", duration=[80, 90, 100], loop=0, disposal=2)
    ),
}


@pytest.fixture(scope="module", autouse=True)
def address_space_cap() -> Iterator[None]:
    """A render that runs away with memory must fail here, with its example, rather than wake the kernel's OOM
    killer, which kills whatever is biggest on the machine (a randomized run of this file once reached 23 GB):
    while this module runs, the address space is capped at what the process already has plus MEMORY_HEADROOM."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    cap = mapped + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module", autouse=True)
def decoders() -> None:
    """Pillow's process-wide limits as every worker has them (create_app sets them)."""
    configure_decoders(DEFAULT_CONFIG.limits)


@pytest.fixture(scope="module")
def seeds(corpus: Path) -> dict[str, Seed]:
    return {name: make(corpus) for name, make in SEEDS.items()}


# -------------------------------------------------------------------------------------------------- strategies


@st.composite
def mutations(draw: st.DrawFn, seed: Seed) -> list[Mutation]:
    """Up to two field overwrites and one duplication on the pristine seed, then up to four byte edits."""
    size = len(seed.data)
    found: list[Mutation] = []
    fields = st.sampled_from(seed.fields)
    for field in draw(st.lists(fields, max_size=2)):
        top = 256**field.size - 1
        edges = [v for v in EDGE_VALUES if v <= top]
        current = int.from_bytes(seed.data[field.offset : field.offset + field.size], field.order)
        near = [v for v in (current - 1, current + 1, current * 2, current * 16) if 0 <= v <= top]
        found.append(SetField(field, draw(st.sampled_from(edges + near) | st.integers(0, top))))
    if draw(st.booleans()):
        start, end = draw(st.sampled_from(seed.chunks))
        boundaries = sorted({edge for chunk in seed.chunks for edge in chunk})
        found.append(Duplicate(start, end, draw(st.sampled_from(boundaries))))
    pos = st.integers(0, min(size, HEAD_BYTES) - 1) | st.integers(0, size - 1)
    blobs = st.binary(min_size=1, max_size=16) | st.sampled_from(
        [b"\xff", b"\x00", b"\xff\xd8", b"\xff\xda", b"\xff\xd9", b"\x00" * 64, b"\xff" * 64]
    )
    edits = st.one_of(
        st.builds(Flip, pos, st.integers(0, 7)),
        st.builds(Insert, pos, blobs),
        st.builds(Delete, pos, st.integers(1, 256)),
        st.builds(Truncate, pos),
    )
    found += draw(st.lists(edits, max_size=4))
    return found


# -------------------------------------------------------------------------------------------------------- tests


def outcome(preset: Preset, data: bytes, negotiated: str, forced: str | None) -> str:
    """Render once: a client error is an outcome (its name); a rendition must decode completely, be the format
    it says, and fit the preset's box ("image"). Any other exception propagates: it would be a 500."""
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)  # fresh: no intermediate from another example
    try:
        rendition = render(pipeline, data, preset, negotiated=negotiated, forced_format=forced)
    except CLIENT_ERRORS as exc:
        assert 400 <= exc.status < 500
        return type(exc).__name__
    with Image.open(io.BytesIO(rendition.body)) as out:
        assert out.format == SAVE_FORMATS[rendition.format]
        assert out.size == (rendition.width, rendition.height)
        for frame in ImageSequence.Iterator(out):
            frame.load()  # every frame decodes to the end
    assert preset.width is None or rendition.width <= preset.width, (rendition.width, preset)
    assert preset.height is None or rendition.height <= preset.height, (rendition.height, preset)
    return "image"


def test_every_seed_renders_undamaged(seeds: dict[str, Seed]) -> None:
    """The fuzz pass starts from valid originals: each seed renders at every preset (else the fuzzing below would
    only ever test the error path)."""
    for name, seed in seeds.items():
        for preset in PRESETS:
            assert outcome(preset, seed.data, "", None) == "image", (name, preset.name)
        assert seed.fields and seed.chunks, name


# Pillow's complaints about the damage it survives, and the bomb warning configure_decoders silences (pytest
# restores the warning filters around each test).
@pytest.mark.filterwarnings("ignore::UserWarning:PIL", "ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", list(SEEDS))
@FUZZ_SETTINGS
@given(
    preset=st.sampled_from(PRESETS),
    negotiated=st.sampled_from(["", "webp", "avif"]),
    forced=st.sampled_from([None, "jpeg", "png", "webp", "gif", "avif"]),
    data=st.data(),
)
def test_damaged_original_renders_or_fails_cleanly(
    seeds: dict[str, Seed], name: str, preset: Preset, negotiated: str, forced: str | None, data: st.DataObject
) -> None:
    seed = seeds[name]
    damage = data.draw(mutations(seed), label="mutations")
    event(outcome(preset, mutate(seed.data, damage), negotiated, forced))


def field(seed: Seed, name: str) -> Field:
    """The seed's first field called ``name`` (the first frame's, where every frame has one)."""
    return next(f for f in seed.fields if f.name == name)


# What the fuzzing above found (derandomized or in longer, randomized runs), replayed on every run: the seed, its
# damage (found in terms of the seed's structure, so it survives a change of encoder), negotiated token, forced
# format.
FOUND = [
    # An APNG's num_plays is 32 bits; GIF's and WebP's loop counts are 16. As GIF: struct.error from the encoder.
    pytest.param(
        "apng.png", lambda s: [SetField(field(s, "acTL.plays"), 65536)], "", None, id="apng-plays-65536-as-gif"
    ),
    # The same as WebP: RuntimeError("ERROR assembling WebP: -1.") from libwebp's muxer.
    pytest.param(
        "apng.png", lambda s: [SetField(field(s, "acTL.plays"), 65536)], "webp", None, id="apng-plays-65536-as-webp"
    ),
    # An animated GIF cut one byte into its second frame's graphic control block: IndexError from Pillow's
    # is_animated (its seek to frame 1), which the pipeline asks outside decoding().
    pytest.param("anim-transparent.gif", lambda s: [Truncate(s.chunks[3][0] + 1)], "", None, id="gif-cut-in-frame-2"),
    # A WebP frame's duration is 24 bits of milliseconds, GIF's 16 bits of centiseconds: at 655.36 s or more, GIF's
    # encoder raises struct.error.
    pytest.param(
        "anim-alpha.webp",
        lambda s: [SetField(field(s, "ANMF.duration"), 655_360)],
        "",
        None,
        id="webp-duration-655s-as-gif",
    ),
    # Found while minimising that one: an APNG frame of 65535/1 s, as WebP, is past what libwebp's muxer takes
    # (RuntimeError "timestamps must be non-decreasing").
    pytest.param(
        "apng.png",
        lambda s: [SetField(field(s, "fcTL.delay_num"), 65535), SetField(field(s, "fcTL.delay_den"), 1)],
        "webp",
        None,
        id="apng-delay-65535s-as-webp",
    ),
]


@pytest.mark.parametrize(("name", "damage", "negotiated", "forced"), FOUND)
def test_what_fuzzing_found_renders_or_fails_cleanly(
    seeds: dict[str, Seed],
    name: str,
    damage: Callable[[Seed], list[Mutation]],
    negotiated: str,
    forced: str | None,
) -> None:
    seed = seeds[name]
    outcome(PRESETS[0], mutate(seed.data, damage(seed)), negotiated, forced)
