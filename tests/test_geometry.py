"""Output geometry: every corpus file x every fit mode x the default presets -> the exact expected size.

The expected sizes are computed here with plain float arithmetic (an independent second implementation of the
rule), and a few are written out literally, so a shared mistake cannot pass unnoticed.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from service.geometry import crop_box, output_size
from service.presets import Preset
from tests.imaging import DEFAULT_CONFIG, corpus_files


def expected_size(src_w: int, src_h: int, preset: Preset) -> tuple[int, int]:
    """The documented rule, restated: contain fits inside the box, cover fills it, no enlarging unless upscale."""

    def rnd(x: float) -> int:
        return max(1, math.floor(x + 0.5 + 1e-9))

    if preset.fit == "cover":
        assert preset.width and preset.height
        k = 1.0 if preset.upscale else min(1.0, src_w / preset.width, src_h / preset.height)
        return rnd(preset.width * k), rnd(preset.height * k)
    scale = min(s for s in (preset.width and preset.width / src_w, preset.height and preset.height / src_h) if s)
    if not preset.upscale:
        scale = min(scale, 1.0)
    return rnd(src_w * scale), rnd(src_h * scale)


def fit_variants() -> list[Preset]:
    """Each default preset in both fit modes (cover needs a box: width-only presets get a square one)."""
    variants = []
    for preset in DEFAULT_CONFIG.presets.values():
        for fit in ("contain", "cover"):
            height = preset.height or (preset.width if fit == "cover" else None)
            variants.append(dataclasses.replace(preset, name=f"{preset.name}-{fit}", fit=fit, height=height))
    return variants


def test_every_corpus_file_every_fit_every_preset(corpus: Path) -> None:
    checked = 0
    for item in corpus_files(corpus):
        w, h = item.upright
        for preset in fit_variants():
            got = output_size(w, h, preset)
            assert got == expected_size(w, h, preset), (item.path.name, preset)
            assert got[0] <= max(w, preset.width or 0) and got[1] <= max(h, preset.height or 0)
            if preset.fit == "cover" and preset.width and preset.width <= w and preset.height and preset.height <= h:
                assert got == (preset.width, preset.height)
            checked += 1
    assert checked == 16 * len(fit_variants())


@pytest.mark.parametrize(
    ("size", "preset", "expected"),
    [
        ((6028, 3391), Preset("small", width=320), (320, 180)),
        ((2560, 3837), Preset("medium", width=800), (800, 1199)),  # 10_wine upright (EXIF orientation 6)
        ((2560, 3837), Preset("thumb", 150, 150, fit="cover"), (150, 150)),
        ((720, 480), Preset("large", width=1600), (720, 480)),  # never enlarged
        ((720, 480), Preset("large", width=1600, upscale=True), (1600, 1067)),
        ((100, 300), Preset("thumb", 150, 150, fit="cover"), (100, 100)),  # box shrinks, stays square
        ((100, 300), Preset("thumb", 150, 150, fit="cover", upscale=True), (150, 150)),
        ((4000, 3), Preset("small", width=320), (320, 1)),  # never 0
        ((3, 4000), Preset("tall", height=200), (1, 200)),
        ((1000, 500), Preset("box", 300, 300), (300, 150)),
        ((500, 1000), Preset("box", 300, 300), (150, 300)),
    ],
)
def test_literal_sizes(size: tuple[int, int], preset: Preset, expected: tuple[int, int]) -> None:
    assert output_size(*size, preset) == expected


def test_crop_box_is_centred_with_the_output_aspect() -> None:
    assert crop_box(400, 200, 100, 100) == (100, 0, 300, 200)
    assert crop_box(200, 400, 100, 50) == (0, 150, 200, 250)
    assert crop_box(300, 200, 150, 100) == (0, 0, 300, 200)
