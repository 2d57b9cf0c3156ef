"""What an original is, wherever it came from: its bytes, their digest, and the focal point its origin gave.

The digest and the focal point together are its version, which ETags and the caches (memcached's items, the
per-instance kept decodes) are built on; service/origins.py makes Originals, service/cache.py stores them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import blake3

log = logging.getLogger(__name__)

DIGEST_CHARS = 32  # hex characters of the BLAKE3 digest kept: 128 bits
# A focal point is x,y as fractions of the upright image ("0.3,0.7"). Plain decimals only: Fraction or float
# parsing of "1e-999999999" or "nan" has no business here.
_FOCUS_RE = re.compile(r"\s*([01]?(?:\.[0-9]{1,12})?)\s*,\s*([01]?(?:\.[0-9]{1,12})?)\s*", re.ASCII)


def content_digest(data: bytes) -> str:
    """An original's identity, for ETags and caches; the one place it is computed, so every check agrees.

    BLAKE3: every miss hashes its original before it is rendered (the kept intermediates are found by digest),
    on the request's path. Measured on a 4.4 MB photo: 0.6 ms, where SHA-256 with the CPU's SHA extensions took 2.3
    (3.5 in a worker) and blake2b 4.3; 0.09 ms against 0.36 on a 0.7 MB one.
    """
    return blake3.blake3(data).hexdigest(length=DIGEST_CHARS // 2)


Focus = tuple[float, float]


def parse_focus(value: str | None, key: str = "") -> Focus | None:
    """The focal point in an origin's ``focus`` metadata, rounded to a millionth; None when absent or malformed.

    A malformed value is the uploader's mistake, not the viewer's: it is logged (once per fetch, so once per
    original's life in memcached) and ignored, never an error.
    """
    if value is None:
        return None
    match = _FOCUS_RE.fullmatch(value)
    point = tuple(float(part) for part in match.groups() if part not in ("", ".")) if match else ()
    if len(point) != 2 or not all(0 <= v <= 1 for v in point):
        log.warning("ignoring malformed focus %.40r of %r (expected x,y fractions such as 0.3,0.7)", value, key)
        return None
    return round(point[0], 6), round(point[1], 6)


def focus_text(focus: Focus) -> str:
    """The canonical text of a focal point (memcached's head item, the ETag): parse_focus reads it back."""
    return f"{focus[0]:.6f},{focus[1]:.6f}"


def version(digest: str, focus: Focus | None) -> str:
    """An original's version: its digest, with its focal point when there is one."""
    return digest if focus is None else f"{digest}@{focus_text(focus)}"


@dataclass(frozen=True)
class Original:
    """An original's bytes and their digest (its identity for ETags and per-instance caches), the focal point
    its origin gave (which changes cover crops, so it is part of ``version``), and ``fallback`` when a fallback
    origin (not the first) served it: its renditions live shortly (config ``fallback_cache_*``)."""

    data: bytes
    digest: str
    focus: Focus | None = None
    fallback: bool = False
    memcached: bool = True  # kept in memcached: its origin's ``memcached`` option (the chain sets it)

    @classmethod
    def from_bytes(cls, data: bytes, focus: Focus | None = None, fallback: bool = False) -> Original:
        return cls(data=data, digest=content_digest(data), focus=focus, fallback=fallback)

    @property
    def version(self) -> str:
        """What a rendition's ETag is built from: the digest, with the focal point when there is one (a new focus
        on the same bytes gives new renditions)."""
        return version(self.digest, self.focus)
