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
from collections.abc import Callable, Iterable, Mapping

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

    def shrunk(self, decode_size: tuple[int, int]) -> Intermediate:
        """A new intermediate reduced by the largest integer factor (box filter) after which it still serves
        ``decode_size``; this one when that factor is 1."""
        width, height = self._image.size
        factor = int(min(width / max(decode_size[0] * DRAFT_GAP, 1), height / max(decode_size[1] * DRAFT_GAP, 1)))
        if factor < 2:
            return self
        return Intermediate(self.reduce(factor), self.scale * factor)

    def region(self, size: tuple[int, int], box: tuple[float, float, float, float]) -> Image.Image:
        """``box`` (in the original's coordinates) scaled to ``size``: reduce() then LANCZOS, in one pass.

        Always a new image, owned by the caller: the kept one is never handed out.
        """
        im = self._image
        box = (box[0] / self.scale, box[1] / self.scale, box[2] / self.scale, box[3] / self.scale)
        if im.size == size and box == (0, 0, im.width, im.height):
            return im.copy()
        return im.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


class Decode:
    """A claim on decoding one original at ``target``, held while the decode runs.

    The presets of one page's image arrive together (a browser asks for a thumbnail and its large view at once,
    and nginx pins them all to this instance): without claims each would decode the same file at the same time.
    A render whose size an ongoing decode covers waits for it instead (``wait``): the wait is never longer than
    decoding again, and frees the core for other work.
    """

    __slots__ = ("_running", "digest", "preset", "target")

    def __init__(self, digest: str, target: tuple[int, int], preset: str = "") -> None:
        self.digest = digest
        self.target = target
        self.preset = preset  # the name of the preset whose render claimed it
        self._running = native_lock()  # held until the decode is done: waiters block on it, on native threads
        self._running.acquire()

    def covers(self, decode_size: tuple[int, int]) -> bool:
        """Whether the intermediate this decode makes will serve a preset needing ``decode_size``
        (``load()`` decodes to at least ``DRAFT_GAP`` times its target, as ``Intermediate.serves`` asks)."""
        return self.target[0] >= decode_size[0] and self.target[1] >= decode_size[1]

    def wait(self) -> None:
        self._running.acquire()
        self._running.release()

    def finish(self) -> None:
        self._running.release()


class IntermediateCache:
    """A per-instance LRU of intermediates by original digest, bounded in bytes, and the decodes under way.

    An intermediate that has served every configured preset goes to the cold end of the LRU: nginx caches each
    rendition, so it is the least likely to be asked for again (another format of a size, a signed ad-hoc size),
    while one still missing a preset is about to be (a page asks for an image's sizes together). (In make bench's
    page mix, which keeps more big originals in flight than 64 MiB holds, this order alone did not lower the
    decodes per answer: the cache's size did. It matters when a page's originals fit.)

    Renders run on several native threads (service/offload.py), so every access holds a native lock; entries
    are read-only (see ``Intermediate``), so handing one to several threads at once is safe.
    """

    def __init__(self, max_bytes: int, presets: Iterable[str] = ()) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.presets = frozenset(presets)  # the configured presets' names (none: plain LRU order)
        self._entries: OrderedDict[str, Intermediate] = OrderedDict()
        self._served: dict[str, set[str]] = {}  # per kept original: the configured presets rendered from it
        self._decoding: dict[str, list[Decode]] = {}
        self._shrinking: set[str] = set()  # kept originals being reduced by a render thread (outside the lock)
        self._lock = native_lock()

    def lookup(
        self, digest: str, decode_size: tuple[int, int], widest: Callable[[], tuple[int, int]], preset: str = ""
    ) -> Intermediate | Decode:
        """The kept intermediate that serves ``decode_size`` (for the preset named ``preset``), waiting for a decode
        under way that will make one; else a claim to decode, which the caller must hand back to ``done`` whatever
        happens.

        The claim's size is ``decode_size`` for an original's first decode, and ``widest()`` (every configured
        preset's need) when the original is already kept or being decoded at a smaller size: it is being asked
        at several sizes, so this decode serves them all and the original is decoded at most twice.
        """
        while True:
            with self._lock:
                entry = self._entries.get(digest)
                if entry is not None and entry.serves(decode_size):
                    self.hits += 1
                    self._used(digest, preset)
                    return entry
                under_way = self._decoding.setdefault(digest, [])
                awaited = next((claim for claim in under_way if claim.covers(decode_size)), None)
                if awaited is None:
                    self.misses += 1
                    several = entry is not None or bool(under_way)
                    claim = Decode(digest, widest() if several else decode_size, preset)
                    under_way.append(claim)
                    return claim
            awaited.wait()  # then look again: kept now, unless that decode failed or was too big to keep

    def done(self, claim: Decode, entry: Intermediate | None) -> None:
        """End ``claim``: keep ``entry`` (None when the decode failed) and wake the renders waiting for it."""
        with self._lock:
            under_way = self._decoding[claim.digest]
            under_way.remove(claim)
            if not under_way:
                del self._decoding[claim.digest]
            if entry is not None:
                self._put(claim.digest, entry)
                self._used(claim.digest, claim.preset)
        claim.finish()

    def shrink(self, digest: str, needs: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        """After a render from the kept ``digest``: reduce it to what the configured presets it has not served yet
        need (``needs()``: each configured preset's decode size for this original), when that halves its sides or more.

        The reduction runs on the calling render thread, outside the lock; renders holding the bigger intermediate
        keep using it (entries are read-only), and it is freed when the last of them is done.
        """
        with self._lock:
            entry = self._entries.get(digest)
            served = frozenset(self._served.get(digest, ()))
            if entry is None or digest in self._shrinking or not self.presets or self.presets <= served:
                return  # not kept, being reduced already, or done with every preset (evicted first anyway)
            self._shrinking.add(digest)
        smaller = entry
        try:
            unserved = [size for name, size in needs().items() if name not in served]
            if unserved:
                smaller = entry.shrunk((max(w for w, _ in unserved), max(h for _, h in unserved)))
        finally:
            with self._lock:
                self._shrinking.discard(digest)
                if smaller is not entry and self._entries.get(digest) is entry:
                    self._entries[digest] = smaller  # same place in the LRU
                    self.nbytes += smaller.nbytes - entry.nbytes

    def _used(self, digest: str, preset: str) -> None:
        """Note that ``preset`` was rendered from the kept ``digest``: most recently used, unless it has now served
        every configured preset (then least recently used, see the class)."""
        if digest not in self._entries:  # too big to keep
            return
        served = self._served.setdefault(digest, set())
        if preset in self.presets:
            served.add(preset)
        self._entries.move_to_end(digest, last=not self.presets or not self.presets <= served)

    def _put(self, digest: str, entry: Intermediate) -> None:
        old = self._entries.pop(digest, None)
        if old is not None:
            self.nbytes -= old.nbytes
        if entry.nbytes > self.max_bytes:
            self._served.pop(digest, None)
            return
        self._entries[digest] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            evicted_digest, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
            self._served.pop(evicted_digest, None)
