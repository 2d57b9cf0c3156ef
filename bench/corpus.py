"""The bench's originals: the shared corpus's JPEGs, PNGs and WebPs, as many distinct originals as a run needs.

A miss must stay a miss, and distinct originals must be distinct. Caches are keyed by name (nginx's cache,
memcached, thumbor's storage) or by content (phizer's per-instance caches use the original's digest), so the
pool holds ``pages`` copies of the corpus made unique by a few trailing bytes (ignored by every decoder), and
each run reads them through hard links under names nobody asked for before. Within a run no content repeats
(except across the presets of one original, which is the point of B2); across runs a content comes back only
after all the others, far beyond any small per-instance cache. The pool lives in the state folder and is
reused by later ``make bench`` runs.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from tests.support import CORPUS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # the bench images; the GIF animation is left out
B6_MEGAPIXELS = (0.3, 0.6, 1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 20.4)


class Originals:
    """The folder every side reads originals from (phizer's file origin, thumbor's file loader)."""

    def __init__(self, root: Path, pages: int) -> None:
        self.root = root
        if not CORPUS.is_dir():
            raise RuntimeError(f"corpus not found at {CORPUS} (set PHIZER_CORPUS)")
        # Dots inside a stem become "_": phizer reads "/small/a_2.5mp.jpg" as key "a_2.5mp" forced to JPEG.
        sources = [p for p in CORPUS.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        self.sources = {p.stem.replace(".", "_") + p.suffix: p for p in sources}
        self.names = sorted(self.sources)
        self.pages = pages
        for name in self.names:
            data = self.sources[name].read_bytes()
            for page in range(pages):
                target = self.pool_path(page, name)
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data + f"\0phizer-bench {page}".encode())

    def pool_path(self, page: int, name: str) -> Path:
        return self.root / "pool" / str(page) / name

    def key(self, prefix: str, page: int, name: str) -> str:
        """Original ``name`` of pool page ``page`` (< ``pages``), under the fresh key ``<prefix>/<page>/<name>``."""
        target = self.root / prefix / str(page) / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(self.pool_path(page, name), target)
        return f"{prefix}/{page}/{name}"

    def fresh_key(self, key: str, name: str) -> str:
        """Original ``name`` under ``key`` with content no cache has seen: a copy tagged with the key, not a link."""
        target = self.root / key
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.sources[name].read_bytes() + f"\0phizer-bench {key}".encode())
        return key

    def page(self, prefix: str, page: int) -> list[str]:
        """Every corpus image once (one web page's worth of distinct originals), under fresh keys."""
        return [self.key(prefix, page, name) for name in self.names]


def shuffled(items: Sequence[str], seed: int) -> list[str]:
    """A reproducible shuffle: the same run order on both sides and across runs."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def megapixel_series(folder: Path, source: Path) -> list[tuple[float, Path]]:
    """One photo re-encoded (baseline JPEG, q90) at each of ``B6_MEGAPIXELS``: B6's x axis without other changes."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with Image.open(source) as im:
        im.load()
        for mp in B6_MEGAPIXELS:
            path = folder / f"{mp:g}mp.jpg"
            scale = min(1.0, (mp * 1e6 / (im.width * im.height)) ** 0.5)
            size = (round(im.width * scale), round(im.height * scale))
            if not path.exists():
                resized = im if size == im.size else im.resize(size, Image.Resampling.LANCZOS)
                resized.save(path, "JPEG", quality=90)
            out.append((round(size[0] * size[1] / 1e6, 2), path))
    return out
