"""Intermediates: decoded, shrunk-on-load originals kept per instance, so an original's next presets skip decoding.

nginx pins every preset of one original to one instance, so the instance that decoded an original for one preset
is the one asked for its others: a small LRU by content digest, bounded in bytes, turns those into resizes.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from PIL import Image

from service.geometry import DRAFT_GAP
from service.offload import native_lock


@dataclasses.dataclass(frozen=True)
class Intermediate:
    """A decoded original, mode-normalised, shrunk by ``scale`` (draft or reduce) but not yet cropped or resized."""

    image: Image.Image
    scale: float

    def serves(self, decode_size: tuple[int, int]) -> bool:
        """Whether a preset needing ``decode_size`` renders from this as well as from a fresh decode."""
        return self.scale == 1 or (
            self.image.width >= decode_size[0] * DRAFT_GAP and self.image.height >= decode_size[1] * DRAFT_GAP
        )

    @property
    def nbytes(self) -> int:
        return self.image.width * self.image.height * len(self.image.getbands())


class IntermediateCache:
    """A per-instance LRU of intermediates by original digest, bounded in bytes.

    Renders run on several native threads (service/offload.py), so every access holds a native lock; kept
    images are only ever read (resized into new images), never changed, so sharing them between threads is safe.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, Intermediate] = OrderedDict()
        self._lock = native_lock()

    def get(self, digest: str, decode_size: tuple[int, int]) -> Intermediate | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None or not entry.serves(decode_size):
                self.misses += 1
                return None
            self._entries.move_to_end(digest)
            self.hits += 1
            return entry

    def put(self, digest: str, entry: Intermediate) -> None:
        with self._lock:
            old = self._entries.pop(digest, None)
            if old is not None:
                self.nbytes -= old.nbytes
            if entry.nbytes > self.max_bytes:
                return
            self._entries[digest] = entry
            self.nbytes += entry.nbytes
            while self.nbytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
