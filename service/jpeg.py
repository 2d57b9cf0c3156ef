"""JPEG marker structure: one walker over a JPEG's segments, shared by the scan guard and the progressive fast paths.

The walker reads markers and lengths only; after a scan header it skips the entropy-coded data to the next real
marker (``0xFF`` followed by neither a stuffed ``0x00`` nor a restart marker) with one C-level regex search, so a
walk over a 1.5 MB original costs under a millisecond.

The speed half rewrites progressive JPEGs for the scale the pipeline decodes them at. A progressive JPEG's
decoder entropy-decodes every AC scan into a whole-image coefficient buffer before any IDCT (2-3x slower per
pixel than a baseline JPEG; draft hardly helps), so leaving out scans the scaled decode does not need is where
the time goes.

``dc_only``, at 1/8: the IDCT reads nothing but each block's DC coefficient, so a JPEG of the headers and the DC
scans alone decodes to the same 1/8 image 3-6x faster. Two details make it the *same* image, bit for bit:

- libjpeg-turbo smooths blocks whose AC coefficients were never received (block smoothing, which with no AC at
  all also re-predicts DC from the neighbours: 36-45 dB from the full decode). So ``dc_only`` appends, per
  component, a scan declaring all its AC coefficients received and zero (one end-of-band run over its blocks):
  with nothing left to smooth, the decoder outputs the plain DC values, as after a full decode.
- A component subsampled 2x in both directions (4:2:0 chroma) is scaled by libjpeg-turbo with a 2x2 IDCT rather
  than upsampled, which reads its lowest AC coefficients: such a component keeps all of its scans (chroma AC scans
  are small).

``quarter``, at 1/4: not the same pixels. libjpeg-turbo's 2x2 IDCT (IJG's jidctred.c, and its SIMD twin) reads
the odd frequencies 1, 3, 5 and 7 of each direction as well as DC, i.e. coefficients all over the zigzag up to
63 (a block of pure horizontal frequency 3, 5 or 7 decodes to a non-flat 2x2): no AC scan can be dropped
exactly. What can go is precision: the successive-approximation refinement scans (libjpeg's standard script
sends luma AC in two spectral bands at Al=2, then two refinement scans, which hold half of a file's bytes and
most of its decoding time). ``quarter`` keeps every first scan and drops the AC refinement scans of the
components decoded with the 2x2 IDCT (a 4x4-IDCT component, 4:2:0 chroma, keeps all of its scans), then appends
the same all-zero scan as ``dc_only``, which here only marks the coefficients complete. Those coefficients lose
their low 1-2 bits: the 1/4 image is 45-48 dB from the full 1/4 decode on the corpus, the renditions made from
it 51-54 dB from the full decode's before encoding and 42-46 dB after (the encoder's rounding amplifies small
differences), for a 2-2.8x faster decode. Coarse quantizers make each lost bit weigh more: ``MAX_LOST`` declines
originals below about quality 70, where renditions of text over a photo would fall below 40 dB (40.3 dB at
quality 70, the worst measured). PIPELINE_VERSION says so.

tests/test_jpeg.py checks ``dc_only``'s equality and ``quarter``'s PSNR bound on the corpus and on generated files
of every kind the fast paths take, and that unusual files are declined.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

SOI, EOI, SOS, DHT, DQT = 0xD8, 0xD9, 0xDA, 0xC4, 0xDB
SOF2 = 0xC2  # progressive, Huffman-coded: the only frame kind the fast path takes
# Frame headers (SOF0-15), less DHT (C4), JPG (C8) and DAC (CC), which share the range.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {DHT, 0xC8, 0xCC}
# Anything that makes a file unusual enough for the fast path to leave it alone: arithmetic-coding tables (DAC),
# DNL (height defined after the first scan), hierarchical EXP, JPG extensions and a second SOI.
UNUSUAL = frozenset({0xC8, 0xCC, 0xDC, 0xDF, SOI, *range(0xF0, 0xFE)})
# Markers without a length field: TEM, RST0-7 (inside entropy-coded data), SOI, EOI.
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), SOI, EOI})
NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
FILL_RUN = re.compile(rb"\xff+")
MAX_EOB_RUN = 32_767  # the longest end-of-band run one Huffman symbol (EOB14 plus 14 bits) can code


@dataclasses.dataclass(frozen=True)
class Segment:
    """One marker segment: ``data[start:end]``, from its ``0xFF`` to past its payload (for a scan: past its
    entropy-coded data; ``truncated`` when that data runs to the end of the file)."""

    marker: int
    start: int
    end: int
    truncated: bool = False


def segments(data: bytes) -> Iterator[Segment]:
    """The segments of a JPEG after its SOI, in order, up to and including EOI.

    A malformed stream (no marker where one must be, a length past the end) ends the walk: the decoder reports
    the error, and ``dc_only`` sees no EOI and declines.
    """
    size, pos = len(data), 2
    while pos + 2 <= size:
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes: the whole run at once (to its last 0xFF), not one Python step per byte
            pos = FILL_RUN.match(data, pos).end() - 1
            continue
        if marker in STANDALONE:
            yield Segment(marker, pos, pos + 2)
            if marker == EOI:
                return
            pos += 2
            continue
        if pos + 4 > size:
            return
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > size:
            return
        if marker == SOS:
            found = NEXT_MARKER.search(data, end)
            if found is None:
                yield Segment(marker, pos, size, truncated=True)
                return
            end = found.start()
        yield Segment(marker, pos, end)
        pos = end


@dataclasses.dataclass(frozen=True)
class Component:
    """A frame component: its id, sampling factors and quantization table."""

    ident: int
    h: int
    v: int
    table: int


def _frame(data: bytes, seg: Segment) -> tuple[int, int, list[Component]] | None:
    """(width, height, components) of an 8-bit frame header; None for any other precision or a bad header."""
    header = data[seg.start + 4 : seg.end]
    if len(header) < 6 or header[0] != 8:
        return None
    height, width, count = int.from_bytes(header[1:3], "big"), int.from_bytes(header[3:5], "big"), header[5]
    if not 1 <= count <= 4 or len(header) != 6 + 3 * count or height == 0 or width == 0:
        return None
    comps = [
        Component(header[6 + 3 * i], header[7 + 3 * i] >> 4, header[7 + 3 * i] & 15, header[8 + 3 * i])
        for i in range(count)
    ]
    if any(not 1 <= c.h <= 4 or not 1 <= c.v <= 4 for c in comps) or len({c.ident for c in comps}) != count:
        return None
    return width, height, comps


def _eob_scan(comp: Component, blocks: int) -> bytes:
    """A progressive AC first scan (Ss=1, Se=63, Al=0) of one component in which every block is an end of band:
    it marks all of the component's AC coefficients as received and zero. Huffman AC table 0 must hold ``EOBn``
    symbols ``n << 4`` as 4-bit codes ``n`` (see ``EOB_TABLE``)."""
    bits, nbits = 0, 0
    while blocks > 0:
        run = min(blocks, MAX_EOB_RUN)
        r = run.bit_length() - 1
        bits, nbits = (bits << (4 + r)) | (r << r) | (run - (1 << r)), nbits + 4 + r
        blocks -= run
    pad = -nbits % 8
    bits, nbits = (bits << pad) | ((1 << pad) - 1), nbits + pad  # pad with 1-bits, as the standard says
    coded = bits.to_bytes(nbits // 8, "big").replace(b"\xff", b"\xff\x00")
    return b"\xff\xda\x00\x08\x01" + bytes([comp.ident, 0x00, 1, 63, 0x00]) + coded


# AC table 0: the 15 end-of-band-run symbols EOB0..EOB14 (0x00, 0x10, .. 0xE0), each a 4-bit code (0000..1110).
EOB_TABLE = b"\xff\xc4\x00\x22\x10" + bytes([0, 0, 0, 15] + [0] * 12) + bytes(range(0, 0xF0, 0x10))
NO_RESTARTS = b"\xff\xdd\x00\x04\x00\x00"  # DRI 0: the appended scans have no restart markers


def _scaled_up(comps: list[Component]) -> set[int]:
    """The components scaled with a larger IDCT than the frame's at 1/8 and 1/4: libjpeg-turbo (jdmaster.c) scales
    a component subsampled 2x (or more) both ways with a 2x2 (or 4x4) IDCT instead of upsampling a smaller one."""
    h_max, v_max = max(c.h for c in comps), max(c.v for c in comps)
    return {c.ident for c in comps if h_max % (2 * c.h) == 0 and v_max % (2 * c.v) == 0}


def _scan(data: bytes, seg: Segment) -> tuple[list[int], bool, int, int] | None:
    """(component ids, whether it is a DC scan, Ah, Al) of a scan header; None for a malformed one."""
    header = data[seg.start + 4 : seg.start + 2 + int.from_bytes(data[seg.start + 2 : seg.start + 4], "big")]
    count = header[0] if header else 0
    if not 1 <= count <= 4 or len(header) != 4 + 2 * count:
        return None
    return list(header[1 : 1 + 2 * count : 2]), header[-3:-1] == b"\x00\x00", header[-1] >> 4, header[-1] & 15


def dc_only(data: bytes) -> bytes | None:
    """A JPEG of ``data``'s headers and DC scans (plus the AC scans of 2x2-subsampled components), then all-zero
    AC scans for the other components; None unless ``data`` is a plain 8-bit progressive Huffman JPEG whose every
    component has a DC scan and which ends in EOI.

    Every DC scan is kept, successive-approximation refinements included, so the DC coefficients are exactly the
    full decode's; restart intervals stay with the scans they belong to. Anything unusual (baseline, arithmetic
    coding, lossless, 12-bit, DNL, a second frame, a missing DC scan, a truncated or malformed file) gives None:
    the caller decodes the original as it is.
    """
    return _rewritten(data, keep_first_ac=False)


def quarter(data: bytes) -> bytes | None:
    """``data`` without the AC refinement scans (Ah > 0) of the components its 1/4 decode reads with a 2x2 IDCT,
    then a scan declaring their AC coefficients complete; None where ``dc_only`` would decline, where nothing
    would be dropped, or where the low bits dropped from a component's strongest AC coefficients (zigzag 1 and 2)
    could be worth more than ``MAX_LOST`` after dequantization (coarse quantizers: originals below about quality
    70 in libjpeg's scale, whose renditions could fall below 40 dB from the full decode's).

    Not the same pixels: each such coefficient keeps the precision of its first scan (the low 1-2 bits of the
    magnitude are lost). Any first scan is kept, whatever scans were dropped before it: it sets its coefficients
    from its own bits alone, whereas a refinement scan's bits mean something only given every earlier bit of its
    band. The appended scan re-opens the AC band as a first scan at Al=0 (libjpeg-turbo warns about the odd
    progression and decodes on); being all end-of-band runs it changes no coefficient, but marks every one as
    complete, which keeps block smoothing off as after a full decode.
    """
    return _rewritten(data, keep_first_ac=True)


# The most a lowest AC coefficient may lose to quarter, in dequantized units ((2^Al - 1) * quantizer): 21 lets
# libjpeg's standard script through from quality 70 (luma quantizers 7, Al=2), where text and one-pixel stripes
# over a photo still give renditions 40.3 dB from the full decode's (39.6 at quality 60).
MAX_LOST = 21


def _quant_tables(data: bytes, seg: Segment) -> dict[int, list[int]] | None:
    """The quantization tables of a DQT segment by id, each in zigzag order; None for a malformed segment."""
    tables, pos = {}, seg.start + 4
    while pos < seg.end:
        width, ident = (data[pos] >> 4) + 1, data[pos] & 15
        if width > 2 or ident > 3 or pos + 1 + 64 * width > seg.end:
            return None
        entries = data[pos + 1 : pos + 1 + 64 * width]
        tables[ident] = [int.from_bytes(entries[i : i + width], "big") for i in range(0, 64 * width, width)]
        pos += 1 + 64 * width
    return tables


def _lost(comp: Component, kept_al: dict[int, int], tables: dict[int, list[int]]) -> int:
    """The most ``quarter`` can take from the lowest AC coefficients of ``comp`` (zigzag 1 and 2), dequantized:
    the low Al bits its kept first scans left out; unbounded without a first AC scan or a table."""
    table = tables.get(comp.table)
    if comp.ident not in kept_al or table is None:
        return MAX_LOST + 1
    return ((1 << kept_al[comp.ident]) - 1) * max(table[1], table[2])


def _rewritten(data: bytes, keep_first_ac: bool) -> bytes | None:
    """``data`` without AC scans of the components scaled with the frame's own IDCT (scaled-up components keep
    all of their scans): all of them, or (``keep_first_ac``) their refinement scans only; then one all-zero AC
    scan for each of those components. None for anything unusual (see ``dc_only``); with ``keep_first_ac``, also
    when nothing was dropped or the loss is over ``MAX_LOST`` (see ``quarter``)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    parts, frame, scaled_up = [data[:2]], None, set()
    covered: set[int] = set()  # components whose first DC scan is in
    tables: dict[int, bytes] = {}  # quantization tables by id, as the first scan latches them
    kept_al: dict[int, int] = {}  # the coarsest first AC scan kept of each component
    dropped: set[int] = set()
    scanned = False
    for seg in segments(data):
        marker = seg.marker
        if marker in UNUSUAL or seg.truncated or 0xD0 <= marker <= 0xD7:
            return None
        if marker == EOI:
            break
        if marker == DQT:
            found = _quant_tables(data, seg)
            if found is None or (keep_first_ac and scanned):  # redefined between scans: too odd to bound the loss
                return None
            tables.update(found)
        elif marker in SOF_MARKERS:
            frame = _frame(data, seg) if marker == SOF2 and frame is None else None
            if frame is None:
                return None
            scaled_up = _scaled_up(frame[2])
        elif marker == SOS:
            scan, scanned = _scan(data, seg), True
            if frame is None or scan is None:
                return None
            ids, dc, ah, al = scan
            if dc:
                if ah == 0:  # a first DC scan (refinements, Ah > 0, add low bits to what it sent)
                    covered.update(ids)
            elif len(ids) != 1:  # an interleaved AC scan: not allowed in a progressive JPEG
                return None
            elif ids[0] not in scaled_up:
                if not keep_first_ac or ah > 0:
                    dropped.add(ids[0])
                    continue
                kept_al[ids[0]] = max(al, kept_al.get(ids[0], 0))
        parts.append(data[seg.start : seg.end])
    else:
        return None  # no EOI: truncated
    if frame is None:
        return None
    width, height, comps = frame
    if covered != {c.ident for c in comps}:
        return None
    lost = [_lost(c, kept_al, tables) for c in comps if c.ident in dropped]
    if keep_first_ac and (not lost or max(lost) > MAX_LOST):
        return None
    h_max, v_max = max(c.h for c in comps), max(c.v for c in comps)
    parts += [NO_RESTARTS, EOB_TABLE]
    for c in comps:
        if c.ident not in scaled_up:
            parts.append(_eob_scan(c, -(-width * c.h // (h_max * 8)) * -(-height * c.v // (v_max * 8))))
    parts.append(b"\xff\xd9")
    return b"".join(parts)
