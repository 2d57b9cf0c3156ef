"""phizer's configuration: one schema with defaults, loaded from YAML and validated at start-up.

Everything tunable (presets, origins, memcached, every limit) lives here so that a reader finds all knobs in
one place, and a typo in a config file stops the service at start-up with a message naming the bad key
instead of surfacing as a 500 later. Environment variables override the file for the few things an
operator changes per host: ``PHIZER_CONFIG`` (the file), ``PHIZER_ORIGINS``, ``PHIZER_MEMCACHED``,
``PHIZER_ALLOW_PRIVATE_ORIGINS`` (1 or 0, true or false), which goes with the origins: an upload server on the
internal network given in ``PHIZER_ORIGINS`` needs it, and there may be no config file to say so; and
``PHIZER_SIGNING_KEYS`` (comma-separated), so the secrets of signed ad-hoc sizes need not sit in the file.
S3 endpoint and credentials deliberately stay with boto3's own chain (``AWS_ENDPOINT_URL``, ...).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from PIL import ImageColor

from service.presets import ADHOC, DEFAULT_NEGOTIATE, FITS, FORMATS, GRAVITIES, NEGOTIABLE, Preset, Signing

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.yaml")
REPO_ROOT = Path(__file__).resolve().parent.parent
# Lifetimes are whole seconds, or nginx's way of writing them with one unit: 30s, 10m, 12h, 7d.
DURATION = re.compile(r"([0-9]{1,9})([smhd]?)")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_SIGNING_KEY_CHARS = 16  # an HMAC key shorter than this is guessable


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds that keep one bad original or slow origin from hurting the instance."""

    max_pixels: int = 50_000_000  # width x height of the original (and of every frame's canvas), before decoding
    max_jpeg_scans: int = 100  # progressive JPEGs: encoders write about 10 scans, mozjpeg about 20; each costs a pass
    # PNG text chunks (tEXt, zTXt, iTXt) decompressed, in total; also a GIF's extension data (comments)
    max_png_text_bytes: int = 1024 * 1024
    max_blocks: int = 20_000  # JPEG segments and stray bytes, PNG chunks, GIF extension blocks: a Python step each
    max_original_bytes: int = 64 * 1024 * 1024  # larger originals are refused while streaming, with 413
    max_key_bytes: int = 1024
    max_frames: int = 100  # animated originals with more frames are served as a still of frame one
    max_animation_pixels: int = 100_000_000  # sum over frames of an animated original
    origin_connect_timeout: float = 3.0  # seconds
    origin_read_timeout: float = 10.0  # seconds per read on HTTP/S3 origins
    origin_total_timeout: float = 30.0  # seconds for a whole body, so a dripping origin cannot hold a request
    memcached_timeout: float = 0.25  # seconds; a hung memcached costs at most this per request (and per /readyz)
    readiness_timeout: float = 1.0  # seconds /readyz waits for each origin (one attempt) before calling it unreachable
    # Bytes of reduced decodes kept per instance (nginx pins an original's presets to one instance, so its
    # other presets render from the kept one without decoding again); 0 disables. A decode that serves a 1600 px
    # preset pins 10-40 MB until that preset is rendered, then shrinks to what the others need (a quarter or
    # less): 96 MiB holds the originals of a page in flight (make bench's page mix, misses per answer: 64 MiB
    # 0.50, 96 MiB 0.44, 128 MiB 0.43; without the shrinking 0.67, 0.55, 0.46).
    intermediate_cache_bytes: int = 96 * 1024 * 1024
    # Overload (service/budget.py): one deadline per request (origin fetch, wait for a render slot, render; nginx
    # waits a little longer); a miss waits at most render_wait seconds for one of the host's render slots, and at
    # most render_queue misses of an instance wait at once: beyond either, 503 with Retry-After at once. Sized so
    # that cold pages are not an overload: an HTTP/2 browser asks for a whole page of thumbnails at once, and two
    # pages of 40 photos on a 2-core host take 3-4 s to render (2 s and 32 shed 24-42 of their 80 images).
    request_timeout: float = 30.0
    render_wait: float = 5.0
    render_queue: int = 64


@dataclasses.dataclass(frozen=True)
class Encoding:
    """Encoder settings shared by every preset (quality is per preset)."""

    background: str = "#ffffff"  # alpha is flattened onto this colour for formats without alpha
    progressive_min_pixels: int = 100_000  # JPEG outputs at least this big are progressive
    png_compress_level: int = 6  # zlib's scale, applied by libdeflate (service/png.py): 2-3% larger, 3x faster
    webp_method: int = 4
    # AVIF encoder speed, 0 (slowest, smallest) to 10. Provisional default: bench/ measures the curve.
    avif_speed: int = 9  # bench/results/encoders.md: 43 ms at 1600 px (WebP method 4: 115 ms), speed 6: 316 ms
    # Formats "auto" presets offer, in order of preference, to clients whose Accept lists them (a preset's own
    # ``negotiate`` overrides it): [] never negotiates (JPEG/PNG/GIF for everyone), [webp] turns AVIF off.
    negotiate: tuple[str, ...] = DEFAULT_NEGOTIATE
    keep_metadata: tuple[str, ...] = ()  # EXIF tags kept in outputs, e.g. ("copyright", "artist")
    animation: bool = True  # animated GIF/WebP stay animated (up to limits.max_frames)
    url_format_suffix: bool = True  # /<preset>/<key>.webp forces WebP when <key> has its own extension


@dataclasses.dataclass(frozen=True)
class MemcachedOptions:
    """How originals are kept in the shared memcached pool."""

    servers: tuple[str, ...] = ()  # host:port; empty disables the originals cache
    expire: int = 86_400  # seconds an original stays cached
    chunk_bytes: int = 1_000_000  # originals are split into items below memcached's default 1 MiB item limit
    pool_size: int = 64  # connections per server per instance (one per concurrent greenlet)
    dead_timeout: float = 30.0  # seconds a failed server is skipped before it is retried


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole, validated configuration of one phizer instance."""

    presets: Mapping[str, Preset]
    origins: tuple[str, ...]
    memcached: MemcachedOptions = MemcachedOptions()
    limits: Limits = Limits()
    encoding: Encoding = Encoding()
    cache_control: str = "public, max-age=31536000"  # every preset's default (a preset may set its own)
    cache_valid: int = 7 * 86400  # seconds nginx keeps a rendition: every preset's default ("7d" in YAML)
    # Renditions of an original served by a fallback origin (any after the first: e.g. the upload server, before
    # the file reaches S3) live this short, in browsers, CDNs and nginx (and the original as long in memcached),
    # so once the original is on the first origin the next render takes it from there.
    fallback_cache_control: str = "public, max-age=60"
    fallback_cache_valid: int = 60
    error_cache_control: str = "public, max-age=60"  # for 404/413/415/422: a bad file cannot hammer the origin
    s3_max_pool_connections: int = 64  # botocore's default of 10 would throw away connections under load
    # HTTP origins may connect to private, loopback, link-local... addresses (an upload server on the internal
    # network). Off, a host name (or redirect) that resolves to one is refused (502): phizer cannot be steered at
    # internal services. S3 and file origins are not concerned: their endpoint or folder is the operator's choice.
    allow_private_origins: bool = False
    # Renders at once on the whole host (0: one per core), shared by its instances through lock files in
    # $PHIZER_SLOTS_DIR (service/budget.py); each instance may use them all, so an idle core can be borrowed.
    render_threads: int = 0
    instance_header: bool = True  # X-Phizer-Instance on responses (debugging aid; the Ansible role turns it off)
    gallery: bool = True  # GET / shows the originals at every preset (service/gallery.py; off in the Ansible role)
    gallery_page_size: int = 12  # originals per gallery page (each shown at every preset)
    # Signed ad-hoc sizes (/_/<signature>/<W>x<H>/<key>): off without keys.
    signing: Signing = dataclasses.field(default_factory=Signing)


def _check_type(path: str, value: Any, expected: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and expected in (int, float, (int, float)):
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if not isinstance(value, expected):
        names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
        raise ConfigError(f"{path}: expected {names}, got {value!r}")
    return value


def _build(cls: type, path: str, raw: Any, **fixed: Any) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrongly typed values by name."""
    if raw is None:
        raw = {}
    _check_type(path, raw, dict)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in fixed}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    values: dict[str, Any] = dict(fixed)
    for name, value in raw.items():
        field = fields[name]
        default = field.default
        key = f"{path}.{name}"
        if isinstance(default, tuple):
            _check_type(key, value, list)
            values[name] = tuple(str(v) for v in value)
        elif isinstance(default, bool):
            values[name] = _check_type(key, value, bool)
        elif isinstance(default, float):
            values[name] = float(_check_type(key, value, (int, float)))
        elif isinstance(default, int):
            values[name] = _check_type(key, value, int)
        elif isinstance(default, str):
            values[name] = _check_type(key, value, str)
        else:  # optional fields (None default) of Preset
            values[name] = value
        if isinstance(values[name], (int, float)) and not isinstance(values[name], bool) and values[name] < 0:
            raise ConfigError(f"{key}: must not be negative, got {value!r}")
    return cls(**values)


def _duration(path: str, value: Any) -> int:
    """Seconds from a whole number or a duration with one unit ("30s", "10m", "12h", "7d")."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{path}: expected seconds or a duration such as 30s, 10m, 12h or 7d, got {value!r}")
    return int(match[1]) * DURATION_UNITS[match[2]]


def _lifetimes(path: str, raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with its optional validities (``cache_valid``, ``fallback_cache_valid``) in seconds and its
    ``Cache-Control`` values checked as header values; ``path`` is "" at the top level."""
    raw = dict(raw)
    prefix = f"{path}." if path else ""
    for name in ("cache_valid", "fallback_cache_valid"):
        if raw.get(name) is not None:
            raw[name] = _duration(prefix + name, raw[name])
    for name in ("cache_control", "fallback_cache_control"):
        value = raw.get(name)
        if value is not None and not (isinstance(value, str) and re.fullmatch(r"[ -~]+", value)):
            raise ConfigError(f"{prefix}{name}: expected a header value (printable ASCII)")
    return raw


def _check_quality_format(path: str, quality: int, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"{path}.format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"{path}.quality: must be from 1 to 100, got {quality!r}")


def _check_colour(path: str, value: Any) -> str:
    """A colour Pillow reads (``#rrggbb``, ``#rgb``, ``rgb(...)``, a CSS name): checked here, not at render time."""
    _check_type(path, value, str)
    try:
        ImageColor.getrgb(value)
    except ValueError:
        raise ConfigError(f"{path}: not a colour (e.g. '#ffffff', 'white'), got {value!r}") from None
    return value


def _check_negotiate(path: str, order: tuple[str, ...]) -> None:
    """A negotiation order names known formats, each once."""
    for token in order:
        if token not in NEGOTIABLE:
            raise ConfigError(f"{path}: {token!r} cannot be negotiated (known: {', '.join(NEGOTIABLE)})")
    if len(set(order)) != len(order):
        raise ConfigError(f"{path}: a format is listed twice in {list(order)!r}")


def _preset(name: str, raw: Any, negotiate: tuple[str, ...]) -> Preset:
    """Build and check one preset; ``negotiate`` is the global order, taken when the preset has none."""
    path = f"presets.{name}"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"{path}: preset names may hold only letters, digits, '_' and '-'")
    if name == ADHOC:
        raise ConfigError(f"{path}: {ADHOC!r} is reserved for signed ad-hoc sizes (/{ADHOC}/<signature>/...)")
    raw = _lifetimes(path, _check_type(path, raw, dict))
    for dim in ("width", "height"):
        value = raw.get(dim)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10000):
            raise ConfigError(f"{path}.{dim}: expected a whole number of pixels from 1 to 10000, got {value!r}")
    preset = _build(Preset, path, raw, name=name, **({} if "negotiate" in raw else {"negotiate": negotiate}))
    _check_negotiate(f"{path}.negotiate", preset.negotiate)
    if preset.width is None and preset.height is None:
        raise ConfigError(f"{path}: needs a width, a height or both")
    if preset.fit not in FITS:
        raise ConfigError(f"{path}.fit: must be one of {', '.join(FITS)}, got {preset.fit!r}")
    if preset.fit in ("cover", "pad") and (preset.width is None or preset.height is None):
        raise ConfigError(f"{path}.fit: {preset.fit!r} needs both width and height")
    if preset.gravity == "center":  # the American spelling, as thumbor and imgproxy accept it
        preset = dataclasses.replace(preset, gravity="centre")
    if preset.gravity not in GRAVITIES:
        raise ConfigError(f"{path}.gravity: must be one of {', '.join(GRAVITIES)}, got {preset.gravity!r}")
    if preset.background is not None:
        _check_colour(f"{path}.background", preset.background)
    _check_quality_format(path, preset.quality, preset.format)
    for fmt, quality in preset.quality_by_format.items():
        if fmt not in FORMATS or isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ConfigError(f"{path}.quality_by_format.{fmt}: expected a known format and a quality from 1 to 100")
    return preset


def _signing(raw: Any, environ: Mapping[str, str]) -> Signing:
    """Signed ad-hoc sizes; the keys (from ``signing.keys`` or ``$PHIZER_SIGNING_KEYS``) are secrets: messages
    name a bad one by its place, never by its value."""
    if not isinstance(raw or {}, dict):  # not _check_type: its message would quote the value, maybe a key
        raise ConfigError("signing: expected a mapping (keys, max_width, max_height, quality, format, ...)")
    raw = _lifetimes("signing", raw or {})
    where, keys = "signing.keys", raw.pop("keys", [])
    if environ.get("PHIZER_SIGNING_KEYS"):
        where, keys = "PHIZER_SIGNING_KEYS", _split_env(environ["PHIZER_SIGNING_KEYS"])
    if not isinstance(keys, list):
        raise ConfigError(f"{where}: expected a list of keys")
    for i, key in enumerate(keys):
        if not isinstance(key, str) or len(key) < MIN_SIGNING_KEY_CHARS or "," in key or key != key.strip():
            raise ConfigError(
                f"{where}[{i}]: expected a string of at least {MIN_SIGNING_KEY_CHARS} characters, "
                "without commas or surrounding spaces"
            )
    signing = _build(Signing, "signing", raw, keys=tuple(keys))
    for side in ("max_width", "max_height"):
        if not 1 <= getattr(signing, side) <= 10000:
            raise ConfigError(f"signing.{side}: expected a whole number of pixels from 1 to 10000")
    _check_quality_format("signing", signing.quality, signing.format)
    _check_negotiate("signing.negotiate", signing.negotiate)
    return signing


def _origin(index: int, url: str) -> str:
    """Check an origin URL's form; a relative ``file://dir`` is resolved against the checkout (for the samples)."""
    if not re.match(r"^(s3://[^/]+|file://.|https?://[^/]+)", url):
        raise ConfigError(
            f"origins[{index}]: expected s3://bucket[/prefix], file:///abs/dir or http(s)://host[/prefix], got {url!r}"
        )
    if url.startswith("file://") and not url.startswith("file:///"):
        return "file://" + str(REPO_ROOT / url[len("file://") :])
    return url


def _split_env(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def parse_config(raw: Any, environ: Mapping[str, str] | None = None) -> Config:
    """Validate a raw mapping (as read from YAML) and apply environment overrides."""
    environ = os.environ if environ is None else environ
    _check_type("config", raw, dict)
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    presets_raw = _check_type("presets", raw.get("presets") or {}, dict)
    if not presets_raw:
        raise ConfigError("presets: at least one preset is required")
    encoding = _build(Encoding, "encoding", raw.get("encoding"))
    for name, top in (("avif_speed", 10), ("png_compress_level", 9)):
        if getattr(encoding, name) > top:
            raise ConfigError(f"encoding.{name}: must be from 0 to {top}, got {getattr(encoding, name)!r}")
    _check_negotiate("encoding.negotiate", encoding.negotiate)
    presets = {name: _preset(name, value, encoding.negotiate) for name, value in presets_raw.items()}

    origins = list(_check_type("origins", raw.get("origins") or [], list))
    if environ.get("PHIZER_ORIGINS"):
        origins = _split_env(environ["PHIZER_ORIGINS"])
    origins = [_origin(i, str(url)) for i, url in enumerate(origins)]
    if not origins:
        raise ConfigError("origins: at least one origin is required (or set PHIZER_ORIGINS)")

    memcached_raw = dict(_check_type("memcached", raw.get("memcached") or {}, dict))
    if "PHIZER_MEMCACHED" in environ:
        memcached_raw["servers"] = _split_env(environ["PHIZER_MEMCACHED"])
    memcached = _build(MemcachedOptions, "memcached", memcached_raw)
    for i, server in enumerate(memcached.servers):
        if not re.fullmatch(r"[^:\s]+:\d+", server):
            raise ConfigError(f"memcached.servers[{i}]: expected host:port, got {server!r}")

    sections = ("presets", "origins", "memcached", "limits", "encoding", "signing")
    scalars = _lifetimes("", {k: v for k, v in raw.items() if k not in sections})
    private = environ.get("PHIZER_ALLOW_PRIVATE_ORIGINS", "").strip().lower()
    if private:
        if private not in ("1", "true", "0", "false"):
            raise ConfigError(f"PHIZER_ALLOW_PRIVATE_ORIGINS: expected 1 or 0 (true or false), got {private!r}")
        scalars["allow_private_origins"] = private in ("1", "true")
    config = _build(
        Config,
        "config",
        scalars,
        presets=presets,
        origins=tuple(origins),
        memcached=memcached,
        limits=_build(Limits, "limits", raw.get("limits")),
        encoding=_check_encoding(encoding),
        signing=_signing(raw.get("signing"), environ),
    )
    if config.gallery_page_size < 1:
        raise ConfigError(f"gallery_page_size: must be at least 1, got {config.gallery_page_size!r}")
    if config.limits.readiness_timeout <= 0:  # 0 would make every probe fail: never ready
        raise ConfigError(
            f"limits.readiness_timeout: must be more than 0 seconds, got {config.limits.readiness_timeout!r}"
        )
    # Ad-hoc sizes without an order of their own negotiate like a preset without one.
    signing_order = {} if "negotiate" in (raw.get("signing") or {}) else {"negotiate": encoding.negotiate}
    # Presets (and ad-hoc sizes) without lifetimes of their own get the config's: decided once, here.
    inherit = {"cache_control": config.cache_control, "cache_valid": config.cache_valid}

    def lifetimes(item: Preset | Signing) -> dict[str, Any]:
        own = {name: getattr(item, name) for name in inherit}
        return {name: inherit[name] if value is None else value for name, value in own.items()}

    return dataclasses.replace(
        config,
        presets={name: dataclasses.replace(preset, **lifetimes(preset)) for name, preset in presets.items()},
        signing=dataclasses.replace(config.signing, **lifetimes(config.signing), **signing_order),
    )


def _check_encoding(encoding: Encoding) -> Encoding:
    _check_colour("encoding.background", encoding.background)
    return encoding


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (else ``$PHIZER_CONFIG``, else the bundled default) and validate it."""
    environ = os.environ if environ is None else environ
    chosen = Path(path or environ.get("PHIZER_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        raw = yaml.safe_load(chosen.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{chosen}: cannot read config: {exc}") from exc
    try:
        return parse_config(raw, environ)
    except ConfigError as exc:
        raise ConfigError(f"{chosen}: {exc}") from exc
