"""Presets (the whitelist of renditions) and the URL rules: ``/<preset>/<key>``, format suffixes, format tokens.

Only configured presets are served, so a client cannot ask for arbitrary sizes and fill the caches; other sizes
need a URL signed by the site (``/_/<signature>/<W>x<H>/<key>``, with signing keys configured). The URL grammar
and every check of a client-supplied key live here, before any I/O happens.

nginx must agree with these rules (its hash key picks the instance, its cache key the stored rendition), so the
rules that nginx needs are data here, rendered into nginx's config by service/nginx_conf.py, never rewritten by
hand: ``SUFFIX_PATTERN`` and ``ADHOC_PATTERN`` (regexes that Python's ``re`` and nginx's PCRE read alike) and
``negotiation_rules``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from service.errors import BadRequest, Forbidden, NotFound
from service.formats import avif_quality
from service.signature import verify

FITS = ("contain", "cover", "pad")
# Where a cover crop keeps its window (and a pad places the image), in the upright image's terms; "smart" picks the
# most salient window (service/saliency.py). A focal point given by the origin overrides it.
GRAVITIES = ("centre", "north", "south", "east", "west", "northeast", "northwest", "southeast", "southwest", "smart")
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
# Signed ad-hoc sizes: ``/_/<signature>/<W>x<H>[/<fit>[/<gravity>]]/<key>``, the signature over everything after
# ``/_/<signature>/``. ADHOC is the path's first segment (never a preset name); ADHOC_PATTERN the signed part, read
# alike by Python's ``re`` and nginx's PCRE (nginx hashes on its adhoc_key group). A segment after the size that is
# a fit (then a gravity) token is read as one, so a key starting with such a word needs the fit (and gravity) given.
ADHOC = "_"
ADHOC_PATTERN = (
    rf"(?P<adhoc_w>[0-9]{{0,5}})x(?P<adhoc_h>[0-9]{{0,5}})"  # 5 digits: int() never sees thousands
    rf"(?:/(?P<adhoc_fit>{'|'.join(FITS)})(?:/(?P<adhoc_gravity>{'|'.join(GRAVITIES)}))?)?/(?P<adhoc_key>.+)"
)
_ADHOC_RE = re.compile(ADHOC_PATTERN)


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
    # Lifetimes (service/config.py fills in the config's when a preset has none): Cache-Control for browsers and
    # CDNs, and the seconds nginx keeps a rendition (the app sends them as X-Accel-Expires). Not part of a
    # rendition's identity: they do not change its bytes.
    cache_control: str | None = None
    cache_valid: int | None = None
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
            "gravity": self.gravity,
            "background": self.background,
            "cache_control": self.cache_control,
            "cache_valid": self.cache_valid,
        }


@dataclasses.dataclass(frozen=True)
class Signing:
    """Signed ad-hoc sizes: on when ``keys`` are given; the size limits and the settings of their renditions."""

    keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # secrets: never shown, served or logged
    max_width: int = 4000
    max_height: int = 4000
    quality: int = 82
    format: str = "auto"
    cache_control: str | None = None  # as a preset's (default: the config's)
    cache_valid: int | None = None
    negotiate: tuple[str, ...] = DEFAULT_NEGOTIATE  # as a preset's (default: config's encoding.negotiate)

    def preset(
        self, width: int | None = None, height: int | None = None, fit: str = "contain", gravity: str = "centre"
    ) -> Preset:
        """The preset of one signed size: the URL gives the box, fit and gravity; the rest comes from here."""
        return Preset(
            name=ADHOC,
            width=width,
            height=height,
            fit=fit,
            gravity=gravity,
            quality=self.quality,
            format=self.format,
            negotiate=self.negotiate,
            cache_control=self.cache_control,
            cache_valid=self.cache_valid,
        )

    def public(self) -> dict[str, Any]:
        """What ``/presets.json`` says of ad-hoc sizes: whether they are on and their limits, never the keys."""
        return {
            "enabled": bool(self.keys),
            "max_width": self.max_width,
            "max_height": self.max_height,
            "quality": self.quality,
            "format": self.format,
            "negotiate": list(self.negotiate),
            "cache_control": self.cache_control,
            "cache_valid": self.cache_valid,
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
    path: str,
    presets: Mapping[str, Preset],
    max_key_bytes: int,
    format_suffix: bool = True,
    signing: Signing | None = None,
) -> ImageRequest:
    """Split ``/<preset>/<key>`` (already percent-decoded) into a preset and a checked key.

    With ``format_suffix``, ``/<preset>/photo.jpg.webp`` asks for ``photo.jpg`` as WebP (``SUFFIX_PATTERN``;
    nginx's ``$phizer_key`` map applies the same pattern). With ``signing`` keys, ``/_/...`` is a signed ad-hoc size.
    """
    name, sep, key = path.lstrip("/").partition("/")
    if name == ADHOC and signing is not None and signing.keys:
        return parse_adhoc(key, signing, max_key_bytes)
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


def parse_adhoc(path: str, signing: Signing, max_key_bytes: int) -> ImageRequest:
    """``<signature>/<W>x<H>[/<fit>[/<gravity>]]/<key>``: the signature first (403), then the size's limits (400).

    Either side may be omitted (``640x``: 640 wide, the height follows the aspect ratio), not both; ``cover`` and
    ``pad`` need both. No format suffix: the format is ``signing.format`` (negotiated when "auto", like a preset's).
    """
    signature, _, signed = path.partition("/")
    if not verify(signing.keys, signed, signature):
        raise Forbidden("bad or missing signature")
    match = _ADHOC_RE.fullmatch(signed)
    if match is None:
        raise BadRequest("expected /_/<signature>/<W>x<H>[/<fit>[/<gravity>]]/<key>")
    width, height = (int(match[side]) if match[side] else None for side in ("adhoc_w", "adhoc_h"))
    fit = match["adhoc_fit"] or "contain"
    for side, value, limit in (("width", width, signing.max_width), ("height", height, signing.max_height)):
        if value is not None and not 1 <= value <= limit:
            raise BadRequest(f"ad-hoc {side} must be from 1 to {limit}, got {value}")
    if width is None and height is None:
        raise BadRequest("ad-hoc size needs a width, a height or both")
    if fit in ("cover", "pad") and (width is None or height is None):
        raise BadRequest(f"ad-hoc fit {fit!r} needs both width and height")
    preset = signing.preset(width, height, fit, match["adhoc_gravity"] or "centre")
    return ImageRequest(preset=preset, key=check_key(match["adhoc_key"], max_key_bytes), format=None)


def adhoc_key(path: str) -> str | None:
    """The original's key of a signed ad-hoc path (``/_/<signature>/<W>x<H>[...]/<key>``, signature unchecked), or
    None for any other path: how ``phizer purge`` recognises the cached ad-hoc renditions of a key."""
    prefix, _, rest = path.lstrip("/").partition("/")
    signature, _, signed = rest.partition("/")
    match = _ADHOC_RE.fullmatch(signed) if prefix == ADHOC and signature else None
    return match["adhoc_key"] if match else None


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
