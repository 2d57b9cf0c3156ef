"""Presets (the whitelist of renditions) and the URL rules: ``/<preset>/<key>``, format suffixes, format tokens.

Only configured presets are served, so a client cannot ask for arbitrary sizes and fill the caches. The
URL grammar and every check of a client-supplied key live here, before any I/O happens.

nginx must agree with these rules (its hash key picks the instance, its cache key the stored rendition), so the
rules that nginx needs are data here, rendered into nginx's config by service/nginx_conf.py, never rewritten by
hand: ``SUFFIX_PATTERN`` (a regex that Python's ``re`` and nginx's PCRE read alike) and ``negotiation_rules``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from service.errors import BadRequest, NotFound
from service.formats import avif_quality

FITS = ("contain", "cover")
# "auto" negotiates from Accept (AVIF or WebP when the browser lists it); "source" keeps the original's format.
FORMATS = ("auto", "source", "jpeg", "png", "webp", "gif", "avif")
# URL suffixes that force an output format (see parse_path).
SUFFIX_FORMATS = {"webp": "webp", "jpg": "jpeg", "jpeg": "jpeg", "png": "png", "gif": "gif", "avif": "avif"}
_EXTENSIONS = "|".join(sorted(SUFFIX_FORMATS))
# A key with a format suffix: the suffix counts only after the key's own image extension, so neither
# ``photo.webp`` nor ``storm_2.5mp.jpg`` is misread. Matched case-insensitively against the whole key.
SUFFIX_PATTERN = rf"(?P<sfx_key>.*\.(?:{_EXTENSIONS}))\.(?P<sfx_ext>{_EXTENSIONS})"
_SUFFIX_RE = re.compile(SUFFIX_PATTERN, re.IGNORECASE | re.ASCII)  # ASCII case folding only, like nginx's ~*
# Formats an "auto" preset may negotiate: the token, and the media type that earns it when the request's Accept
# header contains it (case-insensitively; q-values and the header's own order are ignored: the server's order of
# preference, ``Preset.negotiate``, decides). The token is all of Accept that a rendition depends on: nginx keys
# its cache on it and forwards only its media type.
NEGOTIABLE = {"avif": "image/avif", "webp": "image/webp"}
# The order of preference when neither the preset nor config's ``encoding.negotiate`` gives one.
DEFAULT_NEGOTIATE = ("avif", "webp")


@dataclasses.dataclass(frozen=True)
class Preset:
    """One named rendition: box size, how the image fits it, and how it is encoded."""

    name: str
    width: int | None = None  # None: free (derived from height and the aspect ratio)
    height: int | None = None
    fit: str = "contain"  # contain: largest size inside the box; cover: exactly the box, centre-cropped
    upscale: bool = False  # never enlarge beyond the original unless asked
    quality: int = 82
    quality_by_format: Mapping[str, int] = dataclasses.field(default_factory=dict)
    format: str = "auto"
    # "auto" only: the formats offered, in order of preference, to a client whose Accept lists them (config's
    # encoding.negotiate unless the preset has its own; () never negotiates, ("webp",) turns AVIF off).
    negotiate: tuple[str, ...] = DEFAULT_NEGOTIATE

    def quality_for(self, fmt: str) -> int:
        """The encoder quality for output format ``fmt``: a per-format override, else the preset's own quality
        (JPEG's scale), which AVIF reads through its calibration (formats.avif_quality)."""
        if fmt in self.quality_by_format:
            return int(self.quality_by_format[fmt])
        return avif_quality(self.quality) if fmt == "avif" else self.quality

    def public(self) -> dict[str, Any]:
        """The definition as served by ``/presets.json`` (for srcset builders and tests)."""
        return {
            "width": self.width,
            "height": self.height,
            "fit": self.fit,
            "upscale": self.upscale,
            "quality": self.quality,
            "format": self.format,
            "quality_by_format": dict(self.quality_by_format),
            "negotiate": list(self.negotiate),
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
    """Whether the output format (hence the response) depends on Accept: only "auto" without a suffix does, and
    only when the preset offers some format."""
    return request.format is None and request.preset.format == "auto" and bool(request.preset.negotiate)


def format_token(request: ImageRequest, accept: str | None) -> str:
    """The request's format token: the first format of the preset's order whose media type Accept lists, else ""."""
    if not negotiates(request):
        return ""
    accept = (accept or "").lower()
    rules = negotiation_rules(request.preset.negotiate)
    return next((token for token, media_type in rules if media_type in accept), "")


def negotiation_rules(order: tuple[str, ...]) -> list[tuple[str, str]]:
    """(token, media type) in the order they are tried: ``format_token``'s rule, and nginx's (service/nginx_conf.py
    renders one regex per row, per distinct order, so the two cannot disagree)."""
    return [(token, NEGOTIABLE[token]) for token in order]


def order_label(preset: Preset) -> str:
    """The preset's negotiation order as nginx's ``$phizer_negotiates`` value ("avif,webp"; "" = none)."""
    return ",".join(preset.negotiate) if preset.format == "auto" else ""
