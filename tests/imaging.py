"""Helpers for the image tests: the corpus manifest and the picture-comparison metrics (PSNR, ΔE).

The metrics use Pillow only (ImageStat for PSNR, littleCMS for Lab), so the tests need no numpy.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageCms, ImageStat

from service.colour import SRGB
from service.config import load_config
from service.original import content_digest
from service.pipeline import Pipeline, Rendition
from service.presets import Preset

DEFAULT_CONFIG = load_config(environ={})


@dataclasses.dataclass(frozen=True)
class CorpusFile:
    """One row of the corpus MANIFEST.tsv."""

    path: Path
    width: int  # as stored, before EXIF orientation
    height: int
    orientation: int

    @property
    def upright(self) -> tuple[int, int]:
        """The size once the EXIF orientation is applied."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)


def corpus_files(corpus: Path) -> list[CorpusFile]:
    """Every image of the corpus, with its stored size and EXIF orientation (from the manifest's details)."""
    with (corpus / "MANIFEST.tsv").open(newline="") as manifest:
        rows = list(csv.DictReader(manifest, delimiter="\t"))
    files = []
    for row in rows:
        details = dict(part.strip().split("=", 1) for part in row["details"].split(";") if "=" in part)
        orientation = int(details.get("exif_orientation", 1))
        files.append(CorpusFile(corpus / row["file"], int(row["width"]), int(row["height"]), orientation))
    return files


def render(pipeline: Pipeline, data: bytes, preset: Preset, **options: Any) -> Rendition:
    """``pipeline.render`` with the original's real content hash, as the app passes it (intermediates are kept
    per digest, so a made-up digest shared by different images would be a test bug)."""
    return pipeline.render(data, content_digest(data), preset, **options)


def decode(body: bytes) -> Image.Image:
    """Open an encoded rendition."""
    return Image.open(io.BytesIO(body))


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB over all bands of two same-sized 8-bit images (99 when identical)."""
    assert a.size == b.size and a.mode == b.mode, (a.size, a.mode, b.size, b.mode)
    rms = ImageStat.Stat(ImageChops.difference(a, b)).rms
    mse = sum(r * r for r in rms) / len(rms)
    return 99.0 if mse == 0 else 10 * math.log10(255 * 255 / mse)


def visible(im: Image.Image) -> Image.Image:
    """What a viewer sees of ``im``: with alpha, its colours premultiplied by it, so PSNR does not count the
    colour of transparent pixels (any resampling with alpha, Pillow's premultiplying resize and reduce
    included, changes it without a visible difference)."""
    return im.convert({"RGBA": "RGBa", "LA": "La"}[im.mode]) if im.mode in ("RGBA", "LA") else im


_TO_LAB = ImageCms.buildTransform(SRGB, ImageCms.createProfile("LAB"), "RGB", "LAB")


def mean_delta_e(a: Image.Image, b: Image.Image) -> float:
    """Mean CIE76 ΔE between two same-sized sRGB images (about 2.3 is a just-noticeable difference)."""
    assert a.size == b.size, (a.size, b.size)
    lab_a = ImageCms.applyTransform(a.convert("RGB"), _TO_LAB).tobytes()
    lab_b = ImageCms.applyTransform(b.convert("RGB"), _TO_LAB).tobytes()
    total = 0.0
    # Pillow's 8-bit Lab: L is 0..255 for 0..100; a and b are signed bytes (x ^ 0x80 makes them offset-128).
    for i in range(0, len(lab_a), 3):
        dl = (lab_a[i] - lab_b[i]) * (100 / 255)
        da = (lab_a[i + 1] ^ 0x80) - (lab_b[i + 1] ^ 0x80)
        db = (lab_a[i + 2] ^ 0x80) - (lab_b[i + 2] ^ 0x80)
        total += math.sqrt(dl * dl + da * da + db * db)
    return total / (len(lab_a) // 3)
