"""JPEG marker structure: one walker over a JPEG's segments, shared by the scan guard and the DC-only fast path.

The walker reads markers and lengths only; after a scan header it skips the entropy-coded data to the next real
marker (``0xFF`` followed by neither a stuffed ``0x00`` nor a restart marker) with one C-level regex search, so a
walk over a 1.5 MB original costs under a millisecond.

``dc_only`` is the speed half. At 1/8 DCT scaling libjpeg-turbo's IDCT reads nothing but each block's DC
coefficient, yet a progressive JPEG's decoder still entropy-decodes every AC scan into a whole-image coefficient
buffer first (2-3x slower per pixel than a baseline JPEG; draft hardly helps). A JPEG of the headers and the DC
scans alone decodes to the same 1/8 image 3-6x faster. Two details make it the *same* image, bit for bit:

- libjpeg-turbo smooths blocks whose AC coefficients were never received (block smoothing, which with no AC at
  all also re-predicts DC from the neighbours: 36-45 dB from the full decode). So ``dc_only`` appends, per
  component, a scan declaring all its AC coefficients received and zero (one end-of-band run over its blocks):
  with nothing left to smooth, the decoder outputs the plain DC values, as after a full decode.
- A component subsampled 2x in both directions (4:2:0 chroma) is scaled by libjpeg-turbo with a 2x2 IDCT rather
  than upsampled, which reads its lowest AC coefficients: such a component keeps all of its scans (chroma AC scans
  are small).

tests/test_jpeg.py checks the equality on the corpus and on generated files of every kind the fast path takes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

SOI, EOI, SOS, DHT = 0xD8, 0xD9, 0xDA, 0xC4
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
    """A frame component: its id and sampling factors."""

    ident: int
    h: int
    v: int


def _frame(data: bytes, seg: Segment) -> tuple[int, int, list[Component]] | None:
    """(width, height, components) of an 8-bit frame header; None for any other precision or a bad header."""
    header = data[seg.start + 4 : seg.end]
    if len(header) < 6 or header[0] != 8:
        return None
    height, width, count = int.from_bytes(header[1:3], "big"), int.from_bytes(header[3:5], "big"), header[5]
    if not 1 <= count <= 4 or len(header) != 6 + 3 * count or height == 0 or width == 0:
        return None
    comps = [Component(header[6 + 3 * i], header[7 + 3 * i] >> 4, header[7 + 3 * i] & 15) for i in range(count)]
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


def _reads_ac_at_one_eighth(comps: list[Component]) -> set[int]:
    """The components whose 1/8 decode reads AC coefficients: libjpeg-turbo (jdmaster.c) scales a component
    subsampled 2x (or more) both ways with a 2x2 (or larger) IDCT instead of upsampling a 1x1 one."""
    h_max, v_max = max(c.h for c in comps), max(c.v for c in comps)
    return {c.ident for c in comps if h_max % (2 * c.h) == 0 and v_max % (2 * c.v) == 0}


def _scan(data: bytes, seg: Segment) -> tuple[list[int], bool, int] | None:
    """(component ids, whether it is a DC scan, Ah) of a scan header; None for a malformed one."""
    header = data[seg.start + 4 : seg.start + 2 + int.from_bytes(data[seg.start + 2 : seg.start + 4], "big")]
    count = header[0] if header else 0
    if not 1 <= count <= 4 or len(header) != 4 + 2 * count:
        return None
    return list(header[1 : 1 + 2 * count : 2]), header[-3:-1] == b"\x00\x00", header[-1] >> 4


def dc_only(data: bytes) -> bytes | None:
    """A JPEG of ``data``'s headers and DC scans (plus the AC scans of 2x2-subsampled components), then all-zero
    AC scans for the other components; None unless ``data`` is a plain 8-bit progressive Huffman JPEG whose every
    component has a DC scan and which ends in EOI.

    Every DC scan is kept, successive-approximation refinements included, so the DC coefficients are exactly the
    full decode's; restart intervals stay with the scans they belong to. Anything unusual (baseline, arithmetic
    coding, lossless, 12-bit, DNL, a second frame, a missing DC scan, a truncated or malformed file) gives None:
    the caller decodes the original as it is.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    parts, frame, reads_ac = [data[:2]], None, set()
    covered: set[int] = set()  # components whose first DC scan is in
    for seg in segments(data):
        marker = seg.marker
        if marker in UNUSUAL or seg.truncated or 0xD0 <= marker <= 0xD7:
            return None
        if marker == EOI:
            break
        if marker in SOF_MARKERS:
            frame = _frame(data, seg) if marker == SOF2 and frame is None else None
            if frame is None:
                return None
            reads_ac = _reads_ac_at_one_eighth(frame[2])
        elif marker == SOS:
            scan = _scan(data, seg)
            if frame is None or scan is None:
                return None
            ids, dc, ah = scan
            if dc:
                if ah == 0:  # a first DC scan (refinements, Ah > 0, add low bits to what it sent)
                    covered.update(ids)
            elif len(ids) != 1:  # an interleaved AC scan: not allowed in a progressive JPEG
                return None
            elif ids[0] not in reads_ac:
                continue  # an AC scan not needed at 1/8
        parts.append(data[seg.start : seg.end])
    else:
        return None  # no EOI: truncated
    if frame is None:
        return None
    width, height, comps = frame
    if covered != {c.ident for c in comps}:
        return None
    h_max, v_max = max(c.h for c in comps), max(c.v for c in comps)
    parts += [NO_RESTARTS, EOB_TABLE]
    for c in comps:
        if c.ident not in reads_ac:
            parts.append(_eob_scan(c, -(-width * c.h // (h_max * 8)) * -(-height * c.v // (v_max * 8))))
    parts.append(b"\xff\xd9")
    return b"".join(parts)
