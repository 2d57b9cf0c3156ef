"""Does the output look right? Orientation, colour, 16-bit input and the fast path's quality, each measured
against an independent, slow reference made with plain Pillow calls (full decode, no draft, no reducing).

Bounds (figures from this machine in parentheses; the test prints the measured ones, run with -s):
- orientation: PSNR >= 30 dB against the upright reference (about 40+ dB; a wrong rotation is under 15 dB).
- colour: mean CIE76 ΔE < 2.0 against littleCMS on the full-res image then resized (Adobe RGB ~0.9,
  CMYK ~0.5); dropping the profile instead must exceed it (Adobe RGB ~5, CMYK ~13).
- quality: PSNR >= 35 dB for every still corpus image at every default preset, decoded fresh (worst about
  46 dB) or rendered from a kept intermediate (worst about 50 dB), shrunk after each preset or not.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import ExifTags, Image, ImageCms, ImageOps

from service.colour import SRGB, to_srgb
from service.decoding import normalise_mode, open_image
from service.pipeline import Pipeline, orient
from service.presets import Preset
from tests.imaging import DEFAULT_CONFIG, decode, mean_delta_e, psnr, render, visible

PIPELINE = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
DELTA_E_BOUND = 2.0
PSNR_BOUND = 35.0
ORIENTATION_PSNR_BOUND = 30.0
# The transposition that *stores* an upright picture under each EXIF orientation (the inverse of displaying it).
STORE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def jpeg(im: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=95, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def upright(corpus: Path) -> Image.Image:
    """An asymmetric photo, upright, 960x640 (big enough for draft to shrink it on load)."""
    return Image.open(corpus / "05_storm_2.5mp_baseline.jpg").resize((960, 640), Image.Resampling.LANCZOS)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("preset", [Preset("small", 320), Preset("thumb", 150, 100, fit="cover")], ids=lambda p: p.fit)
def test_every_exif_orientation_comes_out_upright(upright: Image.Image, orientation: int, preset: Preset) -> None:
    transpose = STORE[orientation]
    stored = upright if transpose is None else upright.transpose(transpose)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    data = jpeg(stored, exif=exif.tobytes())
    # The generator itself is checked against Pillow's independent reading of the EXIF spec.
    assert psnr(ImageOps.exif_transpose(Image.open(io.BytesIO(data))), upright) > 30

    reference = decode(render(PIPELINE, jpeg(upright), preset, forced_format="png").body)
    rendition = render(PIPELINE, data, preset, forced_format="png")
    out = decode(rendition.body)
    assert out.size == reference.size == (rendition.width, rendition.height)
    assert ExifTags.Base.Orientation not in out.getexif()
    score = psnr(out, reference)
    print(f"orientation {orientation} {preset.fit}: {score:.1f} dB")
    assert score >= ORIENTATION_PSNR_BOUND, f"orientation {orientation}: {score:.1f} dB"


def littlecms_reference(data: bytes, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """(converted, dropped): the full-res original converted to sRGB with its own profile by littleCMS, and the
    same with the profile simply dropped, both then resized with LANCZOS."""
    full = Image.open(io.BytesIO(data))
    profile = ImageCms.ImageCmsProfile(io.BytesIO(full.info["icc_profile"]))
    converted = ImageCms.profileToProfile(full, profile, SRGB, ImageCms.Intent.PERCEPTUAL, outputMode="RGB")
    dropped = full.convert("RGB")
    return (
        converted.resize(size, Image.Resampling.LANCZOS),  # type: ignore[union-attr]
        dropped.resize(size, Image.Resampling.LANCZOS),
    )


@pytest.mark.parametrize("name", ["11_cups_adobergb.jpg", "09_fallenleaf_cmyk.jpg"])
def test_embedded_profiles_are_converted_to_srgb(corpus: Path, name: str) -> None:
    data = (corpus / name).read_bytes()
    preset = DEFAULT_CONFIG.presets["small"]
    out = decode(render(PIPELINE, data, preset, forced_format="png").body)
    assert out.mode == "RGB" and "icc_profile" not in out.info  # converted, then the profile dropped
    converted, dropped = littlecms_reference(data, out.size)
    error, control = mean_delta_e(out, converted), mean_delta_e(dropped, converted)
    print(f"{name}: mean ΔE {error:.2f} (bound {DELTA_E_BOUND}); profile dropped unconverted: {control:.2f}")
    assert error < DELTA_E_BOUND
    assert control > DELTA_E_BOUND, "negative control: dropping the profile should have failed the bound"


def test_16_bit_png_matches_its_8_bit_sibling(corpus: Path) -> None:
    """15 is 06 resized to 1280x800 at 16 bits by ImageMagick: same picture, so renditions must agree."""
    preset = DEFAULT_CONFIG.presets["small"]
    deep, eight = (
        decode(render(PIPELINE, (corpus / name).read_bytes(), preset, forced_format="png").body)
        for name in ("15_fallenleaf_16bit.png", "06_fallenleaf_4mp_baseline.jpg")
    )
    score = psnr(deep, eight)
    print(f"16-bit PNG vs 8-bit JPEG sibling: {score:.1f} dB")
    assert deep.mode == "RGB" and score > 30


def test_16_bit_grayscale_keeps_its_full_range(tmp_path: Path) -> None:
    """A 16-bit gray ramp must come out as an 8-bit ramp (scaled), not clipped to white."""
    ramp = Image.linear_gradient("L").resize((64, 256)).point(lambda v: v * 257, "I").convert("I;16")
    path = tmp_path / "ramp16.png"
    ramp.save(path)
    assert Image.open(path).mode.startswith("I")
    out = decode(render(PIPELINE, path.read_bytes(), Preset("p", 64), forced_format="png").body)
    assert out.mode == "L"
    low, high = out.getextrema()
    assert low <= 2 and high >= 253
    assert len(set(out.getchannel(0).tobytes())) > 200  # no banding: (nearly) every level of the ramp survives


@pytest.mark.parametrize("source", ["fresh", "kept", "shrunk"])
def test_fast_path_quality_against_full_decode(corpus: Path, source: str) -> None:
    """draft + reduce + LANCZOS vs full decode + plain LANCZOS, every still corpus image x every default preset.

    ``kept``: the way nginx's pinning makes it happen, the first preset decodes once for the largest preset and
    keeps the intermediate, and every other preset renders from it. ``shrunk``: the same with the presets known to
    the cache, which reduces the kept intermediate after each preset to what the presets still to come need
    (intermediates.py: ``IntermediateCache.shrink``), so the smaller presets render from a box-reduced decode.
    """
    presets = list(DEFAULT_CONFIG.presets.values())
    results = []
    shrunk = 0
    for path in sorted(p for p in corpus.glob("[0-9]*") if p.suffix != ".gif"):
        data = path.read_bytes()
        full = open_image(data, DEFAULT_CONFIG.limits)
        full.load()
        full = normalise_mode(full)
        pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits, presets if source == "shrunk" else ())
        kept_bytes = []
        # Kept: the largest preset first, so the three others all render from its intermediate.
        for preset in sorted(presets, key=lambda p: -(p.width or 0)) if source != "fresh" else presets:
            plan = pipeline.plan(data, preset)
            fast = pipeline.still(plan, path.name if source != "fresh" else None)
            kept_bytes.append(pipeline.intermediates.nbytes)
            slow = full.resize(plan.layout.raw_size, Image.Resampling.LANCZOS, box=plan.layout.box)
            slow = to_srgb(orient(slow, plan.orientation), plan.icc)
            results.append((psnr(visible(fast), visible(slow)), path.name, preset.name))
        if source != "fresh":
            assert (pipeline.intermediates.misses, pipeline.intermediates.hits) == (1, len(presets) - 1)
        shrunk += kept_bytes[-1] < kept_bytes[0]
    assert len(results) == 15 * len(presets)
    assert shrunk >= 10 if source == "shrunk" else shrunk == 0, shrunk
    worst = min(results)
    print(f"fast path, {source}: worst PSNR {worst[0]:.2f} dB ({worst[1]} at {worst[2]}); {shrunk} shrunk")
    assert worst[0] >= PSNR_BOUND, worst
