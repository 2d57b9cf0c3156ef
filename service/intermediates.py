"""Intermediates: decoded, shrunk-on-load originals kept per instance, so an original's next presets skip decoding.

nginx pins every preset of one original to one instance, so the instance that decoded an original for one preset
is the one asked for its others: a small LRU by content digest, bounded in bytes, turns those into resizes.

Kept intermediates are read by several render threads at once, so they are read-only by construction: the image
is private to ``Intermediate``, whose only way out is ``region()``, which always returns a new image owned by the
caller (a resize, or a copy when no resize is needed). No render can ever hand a kept image to an encoder
(Pillow's ``save()`` writes its settings onto the image object) or change its pixels. The kept image holds
pixels only: the original's ``info`` (ICC profile, EXIF, text chunks) is dropped, so the byte count the LRU
bounds is the memory it pins.
"""

from __future__ import annotations

from collections import OrderedDict

from PIL import Image

from service.geometry import DRAFT_GAP
from service.offload import native_lock

# resize() first box-reduces by an integer factor while the remaining LANCZOS scale stays >= this (Pillow: 3.0
# is practically indistinguishable from a plain LANCZOS resize).
REDUCING_GAP = 3.0


def pixels_only(im: Image.Image) -> Image.Image:
    """A new image object over the same decoded pixels (no copy), without the original's metadata or file."""
    bare = im._new(im.im)
    bare.info = {}
    return bare


class Intermediate:
    """A decoded original, mode-normalised, shrunk by ``scale`` (draft or reduce) but not yet cropped or resized."""

    __slots__ = ("_image", "scale")

    def __init__(self, image: Image.Image, scale: float) -> None:
        self._image = pixels_only(image)
        self.scale = scale

    @property
    def size(self) -> tuple[int, int]:
        return self._image.size

    @property
    def nbytes(self) -> int:
        """The memory the pixels pin (Pillow stores L as 1 byte per pixel, everything else we keep as 4)."""
        return self._image.width * self._image.height * (1 if self._image.mode == "L" else 4)

    def serves(self, decode_size: tuple[int, int]) -> bool:
        """Whether a preset needing ``decode_size`` renders from this as well as from a fresh decode."""
        width, height = self._image.size
        return self.scale == 1 or (width >= decode_size[0] * DRAFT_GAP and height >= decode_size[1] * DRAFT_GAP)

    def reduce(self, factor: int) -> Image.Image:
        """The pixels shrunk by an integer ``factor`` (box filter): a new image."""
        return self._image.reduce(factor)

    def region(self, size: tuple[int, int], box: tuple[float, float, float, float]) -> Image.Image:
        """``box`` (in the original's coordinates) scaled to ``size``: reduce() then LANCZOS, in one pass.

        Always a new image, owned by the caller: the kept one is never handed out.
        """
        im = self._image
        box = (box[0] / self.scale, box[1] / self.scale, box[2] / self.scale, box[3] / self.scale)
        if im.size == size and box == (0, 0, im.width, im.height):
            return im.copy()
        return im.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


class IntermediateCache:
    """A per-instance LRU of intermediates by original digest, bounded in bytes.

    Renders run on several native threads (service/offload.py), so every access holds a native lock; entries
    are read-only (see ``Intermediate``), so handing one to several threads at once is safe.
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

    def holds(self, digest: str) -> bool:
        """Whether an intermediate of this original is kept, at whatever size."""
        with self._lock:
            return digest in self._entries

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
