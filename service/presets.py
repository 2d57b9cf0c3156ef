"""Presets (the whitelist of renditions) and the URL rules: ``/<preset>/<key>``, format suffixes, format tokens.

Only configured presets are served, so a client cannot ask for arbitrary sizes and fill the caches. The
URL grammar and every check of a client-supplied key live here, before any I/O happens.

nginx must agree with these rules (its hash key picks the instance, its cache key the stored rendition), so the
rules that nginx needs are data here, rendered into nginx's config by service/nginx_conf.py, never rewritten by
hand: ``SUFFIX_PATTERN`` (a regex that Python's ``re`` and nginx's PCRE read alike) and ``NEGOTIATED``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from service.errors import BadRequest, NotFound

FITS = ("contain", "cover", "pad")
# Where a cover crop keeps its window (and a pad places the image), in the upright image's terms; "smart" picks the
# most salient window (service/saliency.py). A focal point given by the origin overrides it.
GRAVITIES = ("centre", "north", "south", "east", "west", "northeast", "northwest", "southeast", "southwest", "smart")
# "auto" negotiates from Accept (WebP when the browser lists it); "source" keeps the original's format.
FORMATS = ("auto", "source", "jpeg", "png", "webp", "gif")
# URL suffixes that force an output format (see parse_path).
SUFFIX_FORMATS = {"webp": "webp", "jpg": "jpeg", "jpeg": "jpeg", "png": "png", "gif": "gif"}
_EXTENSIONS = "|".join(sorted(SUFFIX_FORMATS))
# A key with a format suffix: the suffix counts only after the key's own image extension, so neither
# ``photo.webp`` nor ``storm_2.5mp.jpg`` is misread. Matched case-insensitively against the whole key.
SUFFIX_PATTERN = rf"(?P<sfx_key>.*\.(?:{_EXTENSIONS}))\.(?P<sfx_ext>{_EXTENSIONS})"
_SUFFIX_RE = re.compile(SUFFIX_PATTERN, re.IGNORECASE | re.ASCII)  # ASCII case folding only, like nginx's ~*
# Formats an "auto" preset negotiates, in order of preference: the token, and the media type that earns it
# when the request's Accept header contains it (case-insensitively). The token is all of Accept that a
# rendition depends on: nginx keys its cache on it and forwards only its media type.
NEGOTIATED = (("webp", "image/webp"),)


@dataclasses.dataclass(frozen=True)
class Preset:
    """One named rendition: box size, how the image fits it, and how it is encoded."""

    name: str
    width: int | None = None  # None: free (derived from height and the aspect ratio)
    height: int | None = None
    # contain: largest size inside the box; cover: exactly the box, cropped (see gravity); pad: exactly the box,
    # the image contained in it and the rest filled with ``background``
    fit: str = "contain"
    upscale: bool = False  # never enlarge beyond the original unless asked
    quality: int = 82
    quality_by_format: Mapping[str, int] = dataclasses.field(default_factory=dict)
    format: str = "auto"
    gravity: str = "centre"  # one of GRAVITIES ("center" is read as "centre" by config.py)
    background: str | None = None  # pad and alpha-flattening colour; None: the global encoding.background

    def quality_for(self, fmt: str) -> int:
        """The encoder quality for output format ``fmt`` (a per-format override, else the preset's)."""
        return int(self.quality_by_format.get(fmt, self.quality))

    def public(self) -> dict[str, Any]:
        """The definition as served by ``/presets.json`` (for srcset builders and tests)."""
        return {
            "width": self.width,
            "height": self.height,
            "fit": self.fit,
            "upscale": self.upscale,
            "quality": self.quality,
            "format": self.format,
            "gravity": self.gravity,
            "background": self.background,
        }


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """A parsed public URL."""

    preset: Preset
    key: str  # the original's object key, as stored in the origins
    format: str | None  # an output format forced by a URL suffix, else None


def check_key(key: str, max_bytes: int) -> str:
    """Reject keys that are empty, too long, carry control characters or try to climb out with ``..``."""
    if not key:
        raise BadRequest("empty key")
    if len(key.encode("utf-8", "surrogatepass")) > max_bytes:
        raise BadRequest(f"key longer than {max_bytes} bytes")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise BadRequest("key contains control characters")
    segments = key.split("/")
    if any(seg in ("..", ".") for seg in segments):
        raise BadRequest("key contains '.' or '..' segments")
    if key.startswith("/") or "" in segments:
        raise BadRequest("key contains empty segments")
    return key


def parse_path(
    path: str, presets: Mapping[str, Preset], max_key_bytes: int, format_suffix: bool = True
) -> ImageRequest:
    """Split ``/<preset>/<key>`` (already percent-decoded) into a preset and a checked key.

    With ``format_suffix``, ``/<preset>/photo.jpg.webp`` asks for ``photo.jpg`` as WebP (``SUFFIX_PATTERN``;
    nginx's ``$phizer_key`` map applies the same pattern).
    """
    name, sep, key = path.lstrip("/").partition("/")
    preset = presets.get(name)
    if preset is None:
        raise NotFound(f"unknown preset {name!r}")
    if not sep:
        raise BadRequest("missing key after the preset")
    fmt = None
    suffixed = _SUFFIX_RE.fullmatch(key) if format_suffix else None
    if suffixed:
        key, fmt = suffixed["sfx_key"], SUFFIX_FORMATS[suffixed["sfx_ext"].lower()]
    return ImageRequest(preset=preset, key=check_key(key, max_key_bytes), format=fmt)


def negotiates(request: ImageRequest) -> bool:
    """Whether the output format (hence the response) depends on Accept: only "auto" without a suffix does."""
    return request.format is None and request.preset.format == "auto"


def format_token(request: ImageRequest, accept: str | None) -> str:
    """The request's format token: the first ``NEGOTIATED`` format whose media type Accept lists, else ""."""
    if not negotiates(request):
        return ""
    accept = (accept or "").lower()
    return next((token for token, media_type in NEGOTIATED if media_type in accept), "")
