"""The Falcon WSGI app: ``GET /<preset>/<key>`` -> the original, resized.

Built by ``create_app(config, ...)`` with its collaborators passed in (as in Falcon's look/asgilook tutorials),
so tests assemble it with real or fake parts and gunicorn gets the real ones from ``service.wsgi``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import falcon

from service.cache import MemcachedOriginals, OriginalStore
from service.config import Config
from service.errors import PhizerError
from service.formats import varies_on_accept
from service.offload import Offload, make_offload
from service.origins import OriginChain, make_origin
from service.pipeline import Pipeline
from service.presets import parse_path

log = logging.getLogger(__name__)

# Bump when the pipeline's output for the same inputs changes, so ETags (and browser caches) follow.
PIPELINE_VERSION = "1"


def accepts_webp(req: falcon.Request) -> bool:
    """The one format-negotiation rule, mirrored by nginx's cache key: Accept lists image/webp."""
    return "image/webp" in (req.get_header("Accept") or "").lower()


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison, as If-None-Match requires."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


class ImageResource:
    """Serves renditions; any path that is not a route lands here (a Falcon sink)."""

    def __init__(
        self, config: Config, store: OriginalStore, pipeline: Pipeline, offload: Offload[Any], instance: str
    ) -> None:
        self.config = config
        self.store = store
        self.pipeline = pipeline
        self.offload = offload
        self.instance = instance
        self.preset_ids = {
            name: json.dumps(preset.public(), sort_keys=True) + json.dumps(dict(preset.quality_by_format))
            for name, preset in config.presets.items()
        }

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_: Any) -> None:
        if self.instance:
            resp.set_header("X-Phizer-Instance", self.instance)
        if req.method not in ("GET", "HEAD"):
            resp.set_header("Allow", "GET, HEAD")
            raise _Status(405, f"method {req.method} not allowed")
        request = parse_path(
            req.path, self.config.presets, self.config.limits.max_key_bytes, self.config.encoding.url_format_suffix
        )
        webp = accepts_webp(req)
        varies = varies_on_accept(request.preset, request.format)
        original = self.store.get(request.key)
        identity = "\0".join(
            (
                PIPELINE_VERSION,
                original.digest,
                self.preset_ids[request.preset.name],
                request.format or "",
                "webp" if varies and webp else "",
            )
        )
        etag = '"' + hashlib.blake2b(identity.encode(), digest_size=16).hexdigest() + '"'
        resp.set_header("ETag", etag)
        resp.set_header("Cache-Control", self.config.cache_control)
        if varies:
            resp.set_header("Vary", "Accept")
        if etag_matches(req.get_header("If-None-Match"), etag):
            resp.status = falcon.HTTP_304
            return
        rendition = self.offload(
            lambda: self.pipeline.render(
                original.data, original.digest, request.preset, accepts_webp=webp, forced_format=request.format
            )
        )
        resp.content_type = rendition.content_type
        resp.data = rendition.body


class _Status(PhizerError):
    """A status without a class of its own in errors.py (405 from the sink)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def create_app(
    config: Config,
    store: OriginalStore | None = None,
    pipeline: Pipeline | None = None,
    offload: Offload[Any] | None = None,
    instance: str = "",
) -> falcon.App:
    """Assemble the app; collaborators default to the real ones built from ``config``.

    ``offload`` runs each render (CPU-bound) somewhere: by default on ``config.render_threads`` native threads.
    """
    if store is None:
        cache = None
        if config.memcached.servers:
            cache = MemcachedOriginals(config.memcached, config.limits.memcached_timeout)
        store = OriginalStore(OriginChain([make_origin(url, config) for url in config.origins]), cache)
    pipeline = pipeline or Pipeline(config.encoding, config.limits)
    offload = offload or make_offload(config.render_threads)

    app = falcon.App(media_type=falcon.MEDIA_TEXT)
    app.req_options.strip_url_path_trailing_slash = False
    presets_body = json.dumps({name: preset.public() for name, preset in config.presets.items()}, indent=1).encode()

    def presets(req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = presets_body
        resp.set_header("Cache-Control", "no-cache")

    def healthz(req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "ok\n"
        resp.set_header("Cache-Control", "no-store")

    app.add_route("/presets.json", _Get(presets))
    app.add_route("/healthz", _Get(healthz))
    app.add_sink(ImageResource(config, store, pipeline, offload, instance), prefix="/")

    def on_phizer_error(req: falcon.Request, resp: falcon.Response, exc: PhizerError, params: Any) -> None:
        resp.status = exc.status
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = exc.reason + "\n"
        # 404s are cached briefly (a missing file must not hammer the origin); other errors never.
        resp.set_header("Cache-Control", config.error_cache_control if exc.status == 404 else "no-store")
        resp.delete_header("ETag")
        if instance:
            resp.set_header("X-Phizer-Instance", instance)

    def on_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: Any) -> None:
        if isinstance(exc, falcon.HTTPError):  # Falcon's own (e.g. an unroutable path): keep the status
            on_phizer_error(req, resp, _Status(int(exc.status_code), exc.title or "error"), params)
            return
        log.exception("unexpected error serving %s", req.path)
        on_phizer_error(req, resp, _Status(500, "internal error"), params)

    app.add_error_handler(Exception, on_unexpected)
    app.add_error_handler(PhizerError, on_phizer_error)
    return app


class _Get:
    """A GET/HEAD-only Falcon resource around a plain function."""

    def __init__(self, fn: Any) -> None:
        self.on_get = fn
        self.on_head = fn
