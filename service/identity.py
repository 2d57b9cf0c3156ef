"""A rendition's identity: every input that decides its bytes, folded into one value.

Two things must change whenever a rendition's bytes may change, and only then: the ETag (browsers and CDNs
revalidate with it) and nginx's cache key (else nginx keeps serving, or 304-revalidating, old bytes for
``cache_valid`` after a config change). Both come from here:

- ``preset_fingerprints(config)``: per preset, a hash of its whole definition (its negotiation order included)
  and the AVIF quality it maps to, plus everything else that changes output bytes: the encoder settings (AVIF's
  speed too), the limits that turn an animation into a still, the pipeline's version and the versions of Pillow,
  the codecs it links and the AVIF plugin with its libavif and AV1 encoders. nginx gets it as a template variable
  (service/nginx_conf.py) and puts it in its cache key; after a change the old entries are never looked up again
  and age out (``cache_inactive``).
- ``rendition_etag``: the fingerprint with the original's version (its digest, and the focal point its origin
  gave, which moves cover crops: original.Original.version), the URL-forced format and the format token.

Signed ad-hoc sizes (``/_/...``) have one fingerprint for nginx, ``adhoc_fingerprint``, of their shared settings
(the size, fit and gravity are in the path, hence in nginx's cache key); their ETag takes the fingerprint of the
whole ad-hoc preset. A preset's lifetimes (``cache_control``, ``cache_valid``) change no bytes and are left out.

The ETag is weak: a kept intermediate may give a preset a slightly different (equally good) resize than a
fresh decode would, so equal ETags mean equivalent renditions, not always equal bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

import PIL
import pillow_avif
from PIL import features
from pillow_avif import _avif

from service.config import Config
from service.presets import Preset

# Bump when the pipeline's output for the same inputs changes.
PIPELINE_VERSION = "4"  # 3: an APNG's hidden default image is not a frame; 4: progressive JPEGs at 1/4 (jpeg.quarter)
# nginx's cache key and cache folder levels, rendered into nginx/nginx.conf.j2 (service/nginx_conf.py) and used by
# service/purge.py to find the files nginx wrote: the request path, the format token, the preset's fingerprint.
CACHE_KEY = "{uri}|{token}|{fingerprint}"
CACHE_LEVELS = (1, 2)


@functools.cache
def library_versions() -> dict[str, str | None]:
    """Pillow and the codec libraries it was built against, and the AVIF plugin with the libavif and AV1 encoders
    its wheel bundles (an upgrade of any may change output bytes)."""
    versions: dict[str, str | None] = {"pillow": PIL.__version__}
    for name in ("jpg", "libjpeg_turbo", "webp", "zlib", "littlecms2"):
        versions[name] = features.version(name)
    versions.update(pillow_avif=pillow_avif.__version__, libavif=_avif.libavif_version, av1=_avif.codec_versions())
    return versions


def _digest(value: object, size: int = 16) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:size]


# Preset fields that decide how long a rendition is kept, not its bytes.
LIFETIME_FIELDS = ("cache_control", "cache_valid")


def preset_fingerprint(config: Config, preset: Preset) -> str:
    """A short hash of everything that decides ``preset``'s renditions' bytes, besides the original."""
    definition = {**dataclasses.asdict(preset), "quality_by_format": dict(preset.quality_by_format)}
    return _digest(
        {
            "pipeline": PIPELINE_VERSION,
            "libraries": library_versions(),
            "encoding": dataclasses.asdict(config.encoding),
            "animation_limits": [config.limits.max_frames, config.limits.max_animation_pixels],
            "preset": {name: value for name, value in definition.items() if name not in LIFETIME_FIELDS},
            # The AVIF quality it encodes with: a recalibrated mapping (formats.AVIF_QUALITY) changes the bytes.
            "avif_quality": preset.quality_for("avif"),
        }
    )


def preset_fingerprints(config: Config) -> dict[str, str]:
    """The fingerprint of each named preset."""
    return {name: preset_fingerprint(config, preset) for name, preset in config.presets.items()}


def adhoc_fingerprint(config: Config) -> str:
    """The fingerprint of signed ad-hoc sizes' shared settings (an ad-hoc preset without its URL's size)."""
    return preset_fingerprint(config, config.signing.preset())


def rendition_etag(original_version: str, fingerprint: str, forced_format: str | None, token: str) -> str:
    """The (weak) ETag of one rendition; ``original_version`` is ``Original.version``."""
    return 'W/"' + _digest([original_version, fingerprint, forced_format or "", token], 32) + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison, as If-None-Match requires."""
    if not if_none_match:
        return False
    ours = etag.removeprefix("W/")
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or ours in tags
