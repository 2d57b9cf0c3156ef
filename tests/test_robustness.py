"""Damaged originals, swept over the whole corpus: every outcome is a complete image or a clean client error.

A truncated upload or a flipped bit must never produce a 500, a crash, or a half-decoded image. Each corpus file
is cut at several points and damaged in its middle, then rendered; the result is either an error the app maps
to a 4xx, or an output that itself decodes completely.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from service.config import load_config
from service.errors import TooLarge, Unprocessable, UnsupportedMedia
from service.pipeline import Pipeline
from tests.imaging import corpus_files
from tests.support import CORPUS

CONFIG = load_config(environ={})
CUTS = (0.02, 0.3, 0.7, 0.97)


def damaged(data: bytes) -> list[tuple[str, bytes]]:
    middle = len(data) // 2
    variants = [(f"cut{int(cut * 100)}", data[: int(len(data) * cut)]) for cut in CUTS]
    variants.append(
        ("flipped", data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 64]) + data[middle + 64 :])
    )
    variants.append(("zeroed", data[:middle] + b"\0" * 4096 + data[middle + 4096 :]))
    return variants


@pytest.mark.parametrize("name", [f.path.name for f in corpus_files(CORPUS)])
def test_damaged_originals_never_escape_as_other_errors(corpus: Path, name: str) -> None:
    pipeline = Pipeline(CONFIG.encoding, CONFIG.limits)  # no intermediate shared across variants
    data = (corpus / name).read_bytes()
    outcomes = []
    for label, variant in damaged(data):
        for preset in ("thumb", "medium"):
            try:
                rendition = pipeline.render(variant, f"{name}-{label}", CONFIG.presets[preset], negotiated="")
            except (Unprocessable, UnsupportedMedia, TooLarge) as exc:
                assert exc.reason and "\n" not in exc.reason
                outcomes.append("error")
                continue
            with Image.open(io.BytesIO(rendition.body)) as output:
                output.load()  # a served image decodes to the end
                assert output.size == (rendition.width, rendition.height)
            outcomes.append("image")
    # A cut at 2% can never be a whole image: the sweep really exercised the error path for this format.
    assert outcomes[0] == "error"
