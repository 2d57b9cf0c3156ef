"""The DC-only fast path for progressive JPEGs (service/jpeg.py): the same pixels as the full decode, taken only
where it applies, and declined for anything unusual.

The 1/8 decode of ``dc_only(data)`` must equal the 1/8 decode of ``data`` pixel for pixel (checked on the corpus'
progressive JPEGs and on generated ones of every layout the fast path takes); a rendition made through it is also
held to a PSNR bound against an independent full-resolution reference, like tests/test_fidelity.py does.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from service.config import Limits
from service.errors import Unprocessable
from service.jpeg import dc_only, segments
from service.metrics import Timings
from service.pipeline import Pipeline, normalise_mode, orient, to_srgb
from tests.imaging import DEFAULT_CONFIG, corpus_files, psnr

PROGRESSIVE = ["02_seeding_16mp_progressive.jpg", "03_dragonfly_13mp_progressive.jpg", "04_picos_8mp_progressive.jpg"]
PSNR_BOUND = 38.0


def eighth(data: bytes) -> Image.Image:
    """``data`` decoded at 1/8 DCT scaling, as the pipeline's draft does for a small enough preset."""
    im = Image.open(io.BytesIO(data))
    im.draft(im.mode, (im.width // 8, im.height // 8))
    im.load()
    return im


def assert_same_pixels(data: bytes) -> None:
    fast = dc_only(data)
    assert fast is not None and len(fast) < len(data)
    a, b = eighth(fast), eighth(data)
    assert (a.mode, a.size) == (b.mode, b.size)
    assert a.tobytes() == b.tobytes(), f"{psnr(a, b):.1f} dB"


@pytest.fixture(scope="module")
def photo(corpus: Path) -> Image.Image:
    """Photo content, not a size multiple of 8 or 16 (edge blocks and partial MCUs included)."""
    return Image.open(corpus / "06_fallenleaf_4mp_baseline.jpg").resize((1203, 797), Image.Resampling.LANCZOS)


def scans(data: bytes) -> list[tuple[int, int, int, int]]:
    """(Ss, Se, Ah, Al) of every scan."""
    found = []
    for seg in segments(data):
        if seg.marker == 0xDA:
            end = seg.start + 2 + int.from_bytes(data[seg.start + 2 : seg.start + 4], "big")
            found.append((data[end - 3], data[end - 2], data[end - 1] >> 4, data[end - 1] & 15))
    return found


def progressive(im: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=88, progressive=True, **options)
    return out.getvalue()


@pytest.mark.parametrize("name", PROGRESSIVE)
def test_corpus_progressive_jpegs_decode_to_the_same_pixels(corpus: Path, name: str) -> None:
    assert_same_pixels((corpus / name).read_bytes())


@pytest.mark.parametrize(
    "mode, options",
    [
        ("L", {}),
        ("RGB", {"subsampling": 0}),  # 4:4:4
        ("RGB", {"subsampling": 1}),  # 4:2:2
        ("RGB", {"subsampling": 2}),  # 4:2:0: chroma keeps its AC scans
        ("CMYK", {}),  # Adobe APP14, four components
        ("RGB", {"subsampling": 2, "restart_marker_blocks": 7}),  # restart intervals in the kept scans
        ("L", {"restart_marker_rows": 1}),
    ],
    ids=["gray", "444", "422", "420", "cmyk", "420-restarts", "gray-restarts"],
)
def test_generated_progressive_jpegs_decode_to_the_same_pixels(
    photo: Image.Image, mode: str, options: dict[str, object]
) -> None:
    """libjpeg's progressive script sends DC with successive approximation (Al=1, then a refinement scan): both
    are kept, else the pixels would differ."""
    data = progressive(photo.convert(mode), **options)
    assert (0, 0, 1, 0) in scans(data), "a DC refinement scan"
    assert_same_pixels(data)


def test_renditions_take_the_fast_path_and_match_a_full_decode(corpus: Path) -> None:
    """Every progressive corpus JPEG at every default preset: the fast path is taken exactly where draft picks 1/8,
    and the rendition is within PSNR_BOUND of full decode + plain LANCZOS (the slow, independent reference)."""
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    files = {f.path.name: f for f in corpus_files(corpus)}
    taken, results = [], []
    for name in PROGRESSIVE:
        data = (corpus / name).read_bytes()
        full = Image.open(io.BytesIO(data))
        full.load()
        full = normalise_mode(full)
        for preset in DEFAULT_CONFIG.presets.values():
            timings = Timings()
            plan = pipeline.plan(data, preset, timings=timings)
            fast = pipeline.still(plan, None)
            slow = full.resize(plan.layout.raw_size, Image.Resampling.LANCZOS, box=plan.layout.box)
            slow = to_srgb(orient(slow, plan.orientation), plan.icc)
            results.append((psnr(fast, slow), name, preset.name))
            want = [size * 1.5 for size in plan.layout.decode_size]
            one_eighth = min(files[name].width // want[0], files[name].height // want[1]) >= 8
            assert (timings.decoder == "dc-only") == one_eighth, (name, preset.name)
            taken += [(name, preset.name)] if one_eighth else []
    assert len(taken) >= 4  # thumb for all three, small for the two largest
    worst = min(results)
    print(f"fast path taken for {taken}; worst PSNR {worst[0]:.2f} dB ({worst[1]} at {worst[2]})")
    assert worst[0] >= PSNR_BOUND, worst


def patched(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data
    return data.replace(old, new, 1)


def test_unusual_files_are_declined(photo: Image.Image) -> None:
    data = progressive(photo)
    sof = data.index(b"\xff\xc2")
    first_dc = next(s for s in segments(data) if s.marker == 0xDA)
    cases = {
        "baseline": progressive(photo).replace(b"\xff\xc2", b"\xff\xc0", 1),
        "arithmetic (SOF10)": data[:sof] + b"\xff\xca" + data[sof + 2 :],
        "12-bit": data[: sof + 4] + b"\x0c" + data[sof + 5 :],
        "no DC scan": data[: first_dc.start] + data[first_dc.end :],
        "DNL": patched(data, b"\xff\xd9", b"\xff\xdc\x00\x04\x00\x10\xff\xd9"),
        "second frame": data[:-2] + data,
        "truncated": data[: len(data) * 2 // 3],
        "no EOI": data[:-2],
        "not a JPEG": b"GIF89a" + data[6:],
    }
    for name, case in cases.items():
        assert dc_only(case) is None, name
    plain = io.BytesIO()
    photo.save(plain, "JPEG", quality=88)
    assert dc_only(plain.getvalue()) is None


def test_declined_files_take_the_normal_path(photo: Image.Image) -> None:
    """A cut progressive JPEG is still refused as corrupt (the fast path never serves a half-sent file), and a
    baseline one renders through the normal decode."""
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, Limits())
    thumb = DEFAULT_CONFIG.presets["thumb"]
    big = photo.resize((3609, 2391))  # thumb decodes it at 1/8
    cut = progressive(big)[:-40_000]
    with pytest.raises(Unprocessable):
        pipeline.still(pipeline.plan(cut, thumb), None)
    baseline = io.BytesIO()
    big.save(baseline, "JPEG", quality=88)
    timings = Timings()
    out = pipeline.still(pipeline.plan(baseline.getvalue(), thumb, timings=timings), None)
    assert timings.decoder == "" and out.size == (150, 150)
    timings = Timings()
    pipeline.still(pipeline.plan(progressive(big), thumb, timings=timings), None)
    assert timings.decoder == "dc-only"
