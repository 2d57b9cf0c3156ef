"""The fast paths for progressive JPEGs (service/jpeg.py), taken only where they apply and declined for anything
unusual.

DC-only: the 1/8 decode of ``dc_only(data)`` must equal the 1/8 decode of ``data`` pixel for pixel (checked on the
corpus' progressive JPEGs and on generated ones of every layout the fast path takes); a rendition made through it
is also held to a PSNR bound against an independent full-resolution reference, like tests/test_fidelity.py does.

Quarter: lossy by design (it drops the low bits that refinement scans carry), so its renditions are held to
QUARTER_BOUND against the same pipeline's renditions through the full decode, on the corpus and generated files.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from service import decoding
from service.colour import to_srgb
from service.config import Limits
from service.decoding import normalise_mode
from service.errors import Unprocessable
from service.jpeg import dc_only, quarter, segments
from service.metrics import Timings
from service.pipeline import Pipeline, orient
from tests.imaging import DEFAULT_CONFIG, corpus_files, decode, psnr, render

PROGRESSIVE = ["02_seeding_16mp_progressive.jpg", "03_dragonfly_13mp_progressive.jpg", "04_picos_8mp_progressive.jpg"]
PSNR_BOUND = 38.0
QUARTER_BOUND = 40.0  # a quarter rendition against the full decode's (40.3-47 dB measured)
DECODERS = {8: "dc-only", 4: "quarter"}  # the fast path taken at each draft scale


def scaled(data: bytes, factor: int) -> Image.Image:
    """``data`` decoded at 1/``factor`` DCT scaling, as the pipeline's draft does for a small enough preset."""
    im = Image.open(io.BytesIO(data))
    im.draft(im.mode, (im.width // factor, im.height // factor))
    im.load()
    return im


def assert_same_pixels(data: bytes) -> None:
    fast = dc_only(data)
    assert fast is not None and len(fast) < len(data)
    a, b = scaled(fast, 8), scaled(data, 8)
    assert (a.mode, a.size) == (b.mode, b.size)
    assert a.tobytes() == b.tobytes(), f"{psnr(a, b):.1f} dB"


@pytest.fixture(scope="module")
def photo(corpus: Path) -> Image.Image:
    """Photo content, not a size multiple of 8 or 16 (edge blocks and partial MCUs included)."""
    return Image.open(corpus / "06_fallenleaf_4mp_baseline.jpg").resize((1203, 797), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def big_photo(corpus: Path) -> Image.Image:
    """Large enough for the small and medium presets to decode it at 1/4; not a size multiple of 8 or 16."""
    return Image.open(corpus / "06_fallenleaf_4mp_baseline.jpg").resize((3207, 2131), Image.Resampling.LANCZOS)


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
    im.save(out, "JPEG", **{"quality": 88, "progressive": True, **options})
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
    """Every progressive corpus JPEG at every default preset: DC-only is taken exactly where draft picks 1/8 and
    quarter where it picks 1/4, and the rendition is within PSNR_BOUND of full decode + plain LANCZOS (the slow,
    independent reference)."""
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
            ratio = min(files[name].width // want[0], files[name].height // want[1])
            expected = DECODERS[8] if ratio >= 8 else DECODERS[4] if ratio >= 4 else ""
            assert timings.decoder == expected, (name, preset.name)
            taken += [(name, preset.name, expected)] if expected else []
    assert len(taken) >= 6  # thumb for all three, small for the two largest, small for picos, medium for seeding
    assert {decoder for _, _, decoder in taken} == set(DECODERS.values())
    worst = min(results)
    print(f"fast paths taken for {taken}; worst PSNR {worst[0]:.2f} dB ({worst[1]} at {worst[2]})")
    assert worst[0] >= PSNR_BOUND, worst


def rendition(data: bytes, preset_name: str) -> tuple[Image.Image, str]:
    """The pipeline's output (encoded, then decoded) and the decoder it used, from a pipeline of its own (no
    intermediate shared with another render)."""
    timings = Timings()
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    out = render(pipeline, data, DEFAULT_CONFIG.presets[preset_name], timings=timings)
    return decode(out.body), timings.decoder


def assert_quarter_close(data: bytes, preset_name: str, monkeypatch: pytest.MonkeyPatch) -> float:
    """The rendition through quarter within QUARTER_BOUND of the one through the full decode (the pipeline with
    the quarter fast path off); its PSNR. Encoded outputs: the encoder's own rounding adds to the difference
    (a 54 dB difference before encoding is 42 dB after), so this is the stricter measure."""
    fast, decoder = rendition(data, preset_name)
    assert decoder == "quarter"
    with monkeypatch.context() as patch:
        patch.delitem(decoding.FAST_PATHS, 4)
        full, decoder = rendition(data, preset_name)
    assert decoder == ""
    db = psnr(fast, full)
    assert db >= QUARTER_BOUND, f"{db:.2f} dB"
    return db


@pytest.mark.parametrize(
    "name, preset", [("02_seeding_16mp_progressive.jpg", "medium"), ("04_picos_8mp_progressive.jpg", "small")]
)
def test_corpus_quarter_renditions_are_close_to_the_full_decode(
    corpus: Path, name: str, preset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The corpus' progressive JPEGs where a default preset decodes them at 1/4 (45.6 and 42.4 dB measured; 51.8
    and 54.0 before encoding); the 1/4 image itself too, for every one of them (45.5-48 dB)."""
    data = (corpus / name).read_bytes()
    assert_quarter_close(data, preset, monkeypatch)
    for other in PROGRESSIVE:
        original = (corpus / other).read_bytes()
        fast = quarter(original)
        assert fast is not None and len(fast) < len(original) * 2 // 3
        a, b = scaled(fast, 4), scaled(original, 4)
        assert a.size == b.size and psnr(a, b) >= QUARTER_BOUND, other


@pytest.mark.parametrize(
    "mode, options",
    [
        ("L", {}),
        ("RGB", {"subsampling": 0}),  # 4:4:4: chroma loses its refinement scans too
        ("RGB", {"subsampling": 1}),  # 4:2:2: likewise (chroma upsampled, not scaled by its IDCT)
        ("RGB", {"subsampling": 2}),  # 4:2:0: chroma keeps all of its scans
        ("CMYK", {}),
        ("RGB", {"subsampling": 2, "restart_marker_blocks": 7}),
        ("L", {"restart_marker_rows": 1}),
        ("RGB", {"subsampling": 2, "optimize": True}),
        ("RGB", {"subsampling": 0, "quality": 70}),  # the coarsest quantizers quarter takes: lost bits weigh most
    ],
    ids=["gray", "444", "422", "420", "cmyk", "420-restarts", "gray-restarts", "optimize", "444-q70"],
)
def test_generated_quarter_renditions_are_close_to_the_full_decode(
    big_photo: Image.Image, mode: str, options: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """libjpeg's standard progressive script (Pillow's ``progressive=True``) in every layout quarter takes, at the
    small preset (1/4 of this photo; medium takes 1/4 of originals over 4800 px wide, as the corpus' seeding)."""
    data = progressive(big_photo.convert(mode), **options)
    assert (1, 63, 1, 0) in scans(data), "an AC refinement scan to drop"
    assert_quarter_close(data, "small", monkeypatch)


def test_quarter_holds_on_fine_detail(big_photo: Image.Image, monkeypatch: pytest.MonkeyPatch) -> None:
    """Text and one-pixel stripes over the photo, where the lost low bits of large high-frequency coefficients
    weigh most: at quality 70, the coarsest quarter takes, the worst case measured (40.3 dB, 45.0 before
    encoding); at quality 65 it would be 40.0 and at 60 39.6, which ``MAX_LOST`` declines."""
    detail = big_photo.copy()
    draw = ImageDraw.Draw(detail)
    for y in range(0, detail.height, 14):
        draw.text((5, y), "The quick brown fox jumps over the lazy dog 0123456789 " * 8, fill=(255, 255, 255))
    for x in range(0, detail.width, 3):
        draw.line([(x, detail.height * 3 // 4), (x, detail.height)], fill=(0, 0, 0))
    for subsampling in (0, 1, 2):
        assert_quarter_close(progressive(detail, quality=70, subsampling=subsampling), "small", monkeypatch)
    assert quarter(progressive(detail, quality=65)) is None


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
        assert dc_only(case) is None and quarter(case) is None, name
    plain = io.BytesIO()
    photo.save(plain, "JPEG", quality=88)
    assert dc_only(plain.getvalue()) is None and quarter(plain.getvalue()) is None


def test_quarter_declines_what_it_cannot_shorten_or_would_cost_too_much(photo: Image.Image) -> None:
    """Nothing to drop (no AC refinement scan: quarter's own output is such a file), coarse quantizers (quality
    50), or a first AC scan leaving out more low bits than libjpeg's standard script: the normal decode."""
    data = progressive(photo)
    once = quarter(data)
    assert once is not None and quarter(once) is None
    ends = [
        s.start + 2 + int.from_bytes(data[s.start + 2 : s.start + 4], "big") for s in segments(data) if s.marker == 0xDA
    ]
    end = ends[scans(data).index((1, 5, 0, 2))]  # luma's first AC scan: Ss=1, Se=5, Ah=0, Al=2
    assert quarter(data[: end - 1] + b"\x04" + data[end:]) is None  # Al=4: 15 times the quantizer lost
    assert quarter(progressive(photo, quality=50)) is None and quarter(progressive(photo, quality=70)) is not None


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


def test_damaged_files_at_one_quarter_end_complete_or_refused(big_photo: Image.Image) -> None:
    """A cut file is refused as corrupt (quarter sees no EOI), and a bit flipped anywhere, in a scan quarter keeps
    or in one it drops, gives either a whole rendition or a 422: never a 500 nor a half-decoded image."""
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, Limits())
    small = DEFAULT_CONFIG.presets["small"]
    data = progressive(big_photo)
    with pytest.raises(Unprocessable):
        pipeline.still(pipeline.plan(data[: len(data) * 3 // 4], small), None)
    outcomes = []
    for at in range(len(data) // 20, len(data), len(data) // 10):
        flipped = data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]
        timings = Timings()
        try:
            out = pipeline.still(pipeline.plan(flipped, small, timings=timings), None)
        except Unprocessable:
            outcomes.append("422")
            continue
        assert out.size == (320, 213)
        outcomes.append(timings.decoder or "full")
    print(outcomes)
    assert "quarter" in outcomes
