"""Purging a key: every cached rendition of it from this host's nginx cache, and its original from memcached.

An original replaced under the same key is otherwise served from caches for up to ``cache_valid`` (nginx) and
``memcached.expire``. ``phizer purge KEY`` asks each host's nginx for ``POST /_phizer/purge`` (loopback only:
nginx/nginx.conf.j2), which an instance answers here: it deletes the original from the shared memcached pool,
then the cache files of every rendition nginx may hold for the key, so the next request is a MISS that fetches
the original from the origin again.

nginx-light has no purge module, so the files are found the way nginx names them: the md5 of the cache key in
the folders given by the cache levels (both defined once in service/identity.py and rendered into nginx's config). The
renditions a key can have (each preset, plain and with each format suffix, each with every format token it
can get) are not listed here but found by running service/presets.py's own rules over the candidate URLs, so
they cannot drift from what nginx and the app do.

Signed ad-hoc sizes cannot be listed from a key (any size, any signature), so when signing is on the cache folder
is read instead: nginx writes each entry's cache key in its header (a ``KEY:`` line), whose path names the key. One
pass over the folder per purge request (up to ``MAX_KEYS`` keys), reading the first ``ENTRY_HEAD_BYTES`` of each file.

nginx keeps open descriptors of cache files (``open_file_cache``) and trusts them while the inode it recorded
is unchanged, so an unlinked file would still be served for up to ``open_file_cache_valid``. The header's first
field is nginx's cache file format version: it is zeroed before the unlink, so a worker still holding the file
reads it as an old-format entry (a MISS), and the new file it writes gets a new inode that the others notice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import falcon

from service.cache import OriginalStore
from service.config import Config
from service.errors import BadRequest, PhizerError
from service.identity import CACHE_KEY, CACHE_LEVELS, preset_fingerprints
from service.presets import NEGOTIABLE, SUFFIX_FORMATS, Preset, adhoc_key, check_key, format_token, parse_path

log = logging.getLogger(__name__)

PURGE_PATH = "/_phizer/purge"  # nginx/nginx.conf.j2 lets only loopback (and admin_allow) reach it
CACHE_DIR_ENV = "PHIZER_NGINX_CACHE_DIR"  # nginx's proxy_cache_path on this host (launcher, Ansible)
HEADER_VERSION_BYTES = 8  # ngx_http_file_cache_header_t starts with its version (an ngx_uint_t)
MAX_KEYS = 1000  # per request; `phizer purge` sends batches
MAX_BODY_BYTES = 1024 * 1024  # nginx's client_max_body_size for the admin location
# An entry's header (ngx_http_file_cache_header_t, ETag, Vary) and its "KEY: " line: a request line is at most
# 8 KiB (nginx's large_client_header_buffers), so its $uri, hence the cache key, fits.
ENTRY_HEAD_BYTES = 16 * 1024
KEY_LINE = b"\nKEY: "


@dataclasses.dataclass(frozen=True)
class Rendition:
    """One response nginx may cache for a key: the request path ($uri), its format token, and an Accept
    header that earns that token."""

    path: str
    token: str
    accept: str


def renditions(presets: Mapping[str, Preset], key: str, max_key_bytes: int, format_suffix: bool) -> list[Rendition]:
    """Every rendition of ``key``: each preset, plain and (``format_suffix``) with each format suffix that
    service/presets.py reads back as this key, each with every format token its request can get."""
    check_key(key, max_key_bytes)
    accepts = ["", *NEGOTIABLE.values()]
    found: list[Rendition] = []
    for name in presets:
        paths = [f"/{name}/{key}"]
        if format_suffix:  # lower and upper case; parse_path says which of them are suffix forms of this key
            extensions = dict.fromkeys(ext for lower in SUFFIX_FORMATS for ext in (lower, lower.upper()))
            paths += [f"/{name}/{key}.{ext}" for ext in extensions]
        for path in paths:
            try:
                request = parse_path(path, presets, max_key_bytes, format_suffix)
            except PhizerError:
                continue
            if request.key != key:  # e.g. /small/a.jpg.webp is a.jpg as WebP, not the key "a.jpg.webp"
                continue
            tokens: dict[str, str] = {}
            for accept in accepts:
                tokens.setdefault(format_token(request, accept), accept)
            found += [Rendition(path, token, accept) for token, accept in tokens.items()]
    return found


def cache_key(rendition: Rendition, fingerprint: str) -> str:
    """nginx's cache key (identity.CACHE_KEY) for a rendition."""
    return CACHE_KEY.format(uri=rendition.path, token=rendition.token, fingerprint=fingerprint)


def cache_file(cache_dir: str | os.PathLike[str], key: str) -> Path:
    """Where nginx keeps the entry of cache key ``key``: md5 hex, folders from its end (identity.CACHE_LEVELS)."""
    digest = hashlib.md5(key.encode("utf-8", "surrogatepass")).hexdigest()
    folders, end = [], len(digest)
    for width in CACHE_LEVELS:
        folders.append(digest[end - width : end])
        end -= width
    return Path(cache_dir, *folders, digest)


def cached_adhoc(cache_dir: str | os.PathLike[str]) -> Iterator[tuple[Path, str]]:
    """Every signed ad-hoc rendition in nginx's cache: (its file, the original's key), from each entry's KEY line.
    Files that are not entries (nginx's temporary ``<md5>.<n>`` files, anything else) are passed over."""
    for folder, _, names in os.walk(cache_dir):
        for name in names:
            if len(name) != 32:  # an entry is named by the md5 of its key
                continue
            path = Path(folder, name)
            try:
                with open(path, "rb") as entry:
                    head = entry.read(ENTRY_HEAD_BYTES)
            except OSError:  # removed meanwhile (nginx's cache manager, another purge)
                continue
            start = head.find(KEY_LINE)
            end = head.find(b"\n", start + len(KEY_LINE))
            if start < 0 or end < 0:
                continue
            uri = head[start + len(KEY_LINE) : end].decode("utf-8", "replace").rsplit("|", 2)[0]  # CACHE_KEY
            key = adhoc_key(uri)
            if key is not None:
                yield path, key


def remove_cache_file(path: Path) -> bool:
    """Make nginx's entry at ``path`` a miss and delete it; False when there was none."""
    try:
        with open(path, "r+b") as entry:  # a worker that still has it open must not serve it: see the docstring
            entry.write(b"\0" * HEADER_VERSION_BYTES)
    except FileNotFoundError:
        return False
    path.unlink(missing_ok=True)
    return True


class PurgeNotConfigured(PhizerError):
    status = 501


class PurgeFailed(PhizerError):
    status = 500


class PurgeResource:
    """``POST /_phizer/purge`` with ``{"keys": [...]}``: purge each key on this host (and from the shared
    memcached pool); answers ``{"purged": {key: {"renditions": files removed, "original": was cached}}}``."""

    def __init__(self, config: Config, store: OriginalStore, cache_dir: str | None) -> None:
        self.config = config
        self.store = store
        self.cache_dir = cache_dir
        self.fingerprints = preset_fingerprints(config)

    def purge(self, key: str) -> dict[str, Any]:
        if not self.cache_dir:
            raise PurgeNotConfigured(f"purge is not configured on this instance ({CACHE_DIR_ENV} is not set)")
        if not os.path.isdir(self.cache_dir):  # else every file would be "not found" and the purge a silent no-op
            raise PurgeFailed("nginx's cache folder is missing", f"{CACHE_DIR_ENV}={self.cache_dir}")
        limits, encoding = self.config.limits, self.config.encoding
        found = renditions(self.config.presets, key, limits.max_key_bytes, encoding.url_format_suffix)
        # The original first: a request arriving from now on fetches it from the origin, whatever it finds below.
        original = self.store.delete(key)
        removed = 0
        for rendition in found:
            fingerprint = self.fingerprints[rendition.path.split("/", 2)[1]]
            path = cache_file(self.cache_dir, cache_key(rendition, fingerprint))
            try:
                removed += remove_cache_file(path)
            except OSError as exc:
                raise PurgeFailed("cannot remove cached renditions", f"{path}: {exc}") from exc
        log.info("purged %r: %d cached renditions, original %s", key, removed, "removed" if original else "not cached")
        return {"renditions": removed, "original": original}

    def purge_adhoc(self, keys: Collection[str]) -> dict[str, int]:
        """Remove the cached signed ad-hoc renditions of ``keys`` (after their originals: see ``purge``); how many
        files each had. The folder is read once for all of them."""
        removed = dict.fromkeys(keys, 0)
        for path, key in cached_adhoc(self.cache_dir or ""):
            if key in removed:
                try:
                    removed[key] += remove_cache_file(path)
                except OSError as exc:
                    raise PurgeFailed("cannot remove cached renditions", f"{path}: {exc}") from exc
        if any(removed.values()):
            log.info("purged signed ad-hoc sizes: %s", {key: n for key, n in removed.items() if n})
        return removed

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        try:
            body = json.loads(req.bounded_stream.read(MAX_BODY_BYTES))
        except ValueError:
            body = None
        keys = body.get("keys") if isinstance(body, dict) else None
        if not isinstance(keys, list) or not keys or not all(isinstance(key, str) for key in keys):
            raise BadRequest('expected a JSON body {"keys": ["key", ...]}')
        if len(keys) > MAX_KEYS:
            raise BadRequest(f"at most {MAX_KEYS} keys per request")
        for key in keys:  # every key is checked before anything is purged
            try:
                check_key(key, self.config.limits.max_key_bytes)
            except BadRequest as exc:
                raise BadRequest(f"{key!r}: {exc.reason}") from exc
        purged = {key: self.purge(key) for key in keys}
        if self.config.signing.keys:
            for key, removed in self.purge_adhoc(keys).items():
                purged[key]["renditions"] += removed
        resp.data = json.dumps({"purged": purged}).encode()
        resp.content_type = falcon.MEDIA_JSON
        resp.set_header("Cache-Control", "no-store")
