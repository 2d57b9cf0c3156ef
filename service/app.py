"""The Falcon WSGI app: ``GET /<preset>/<key>`` -> the original, resized.

Built by ``create_app(config, ...)`` with its collaborators passed in (as in Falcon's look/asgilook tutorials),
so tests assemble it with real or fake parts and gunicorn gets the real ones from ``service.wsgi``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import falcon

from service.budget import RenderBudget, Renderer
from service.cache import MemcachedOriginals, OriginalStore, origins_namespace
from service.config import Config
from service.errors import Overloaded, PhizerError
from service.gallery import GalleryResource
from service.guards import configure_decoders
from service.identity import etag_matches, preset_fingerprint, preset_fingerprints, rendition_etag
from service.metrics import (
    DEADLINES,
    INTERMEDIATES,
    REQUESTS,
    SHED,
    Timings,
    access_log,
    exposition,
)
from service.offload import make_spawn
from service.origins import OriginChain, make_origin
from service.pipeline import Pipeline
from service.presets import ADHOC, ImageRequest, Preset, format_token, negotiates, parse_path
from service.purge import CACHE_DIR_ENV, PURGE_PATH, PurgeResource

log = logging.getLogger(__name__)

# Statuses that say something about the original itself (nginx caches them for cache_valid_404, too).
ORIGINAL_VERDICTS = (404, 413, 415, 422)
# ... and a bad signature, which a signed URL keeps: all carry error_cache_control.
CACHED_BRIEFLY = (*ORIGINAL_VERDICTS, 403)
# An incoming X-Request-ID is kept when it looks like one (nginx sets a valid one); anything else is replaced.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")  # polled by machines: no access log line
AFTER_RESPONSE = "phizer.after_response"  # environ key: what runs once the response is sent (_AfterResponse)


class ImageResource:
    """Serves renditions; any path that is not a route lands here (a Falcon sink)."""

    def __init__(
        self, config: Config, store: OriginalStore, pipeline: Pipeline, renderer: Renderer, instance: str
    ) -> None:
        self.config = config
        self.store = store
        self.pipeline = pipeline
        self.renderer = renderer
        self.instance = instance
        self.fingerprints = preset_fingerprints(config)

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_: Any) -> None:
        deadline = time.monotonic() + self.config.limits.request_timeout
        if self.instance:
            resp.set_header("X-Phizer-Instance", self.instance)
        if req.method not in ("GET", "HEAD"):
            resp.set_header("Allow", "GET, HEAD")
            raise _Status(405, f"method {req.method} not allowed")
        config = self.config
        request = parse_path(
            req.path, config.presets, config.limits.max_key_bytes, config.encoding.url_format_suffix, config.signing
        )
        token = format_token(request, req.get_header("Accept"))
        preset = request.preset
        # An ad-hoc size's ETag covers its whole preset (nginx's key has the size in the path: service/identity.py).
        fingerprint = preset_fingerprint(config, preset) if preset.name == ADHOC else self.fingerprints[preset.name]
        timings: Timings = req.context.timings
        req.context.fields.update(preset=preset.name, key=request.key, format=request.format or token)
        if negotiates(request):
            resp.set_header("Vary", "Accept")
        if_none_match = req.get_header("If-None-Match")
        if if_none_match:
            # Revalidation (nginx's, a browser's) is decided from the version (digest and focal point) in
            # memcached's head item when it is there: no origin fetch, not even a read of the original's chunks.
            head = self.store.head(request.key)
            if head is not None:
                self._lifetime(resp, preset, head.fallback)
                if self._not_modified(resp, if_none_match, head.version, fingerprint, request, token):
                    return
        self.renderer.admit()  # a full line sheds before any origin work
        with timings.stage("original"):
            original = self.store.get(request.key, timings, deadline)
        self._lifetime(resp, preset, original.fallback)
        if self._not_modified(resp, if_none_match, original.version, fingerprint, request, token):
            return
        rendition = self.renderer.render(
            lambda: self.pipeline.render(
                original.data,
                original.digest,
                request.preset,
                negotiated=token,
                forced_format=request.format,
                timings=timings,
                focus=original.focus,
            ),
            deadline,
            timings,
        )
        req.context.fields["format"] = rendition.format
        resp.content_type = rendition.content_type
        resp.data = rendition.body

    def _lifetime(self, resp: falcon.Response, preset: Preset, fallback: bool) -> None:
        """Cache-Control for browsers and CDNs, and X-Accel-Expires for nginx (which honours it over its own
        proxy_cache_valid, and never forwards it): the preset's, or the short fallback ones for an original that a
        fallback origin served, so the rendition is made again from the first origin once the original is there.
        Set on 200s and 304s only: the error handler removes it (nginx must never keep an error long)."""
        config = self.config
        cache_control, seconds = (
            (config.fallback_cache_control, config.fallback_cache_valid)
            if fallback
            else (preset.cache_control or config.cache_control, preset.cache_valid)
        )
        resp.set_header("Cache-Control", cache_control)
        resp.set_header("X-Accel-Expires", str(config.cache_valid if seconds is None else seconds))

    @staticmethod
    def _not_modified(
        resp: falcon.Response,
        if_none_match: str | None,
        version: str,
        fingerprint: str,
        request: ImageRequest,
        token: str,
    ) -> bool:
        """Set the ETag; answer 304 (and say so) when the client already holds this rendition."""
        etag = rendition_etag(version, fingerprint, request.format, token)
        resp.set_header("ETag", etag)
        if not etag_matches(if_none_match, etag):
            return False
        resp.status = falcon.HTTP_304
        return True


class _Status(PhizerError):
    """A status without a class of its own in errors.py (405 from the sink)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def create_app(
    config: Config,
    store: OriginalStore | None = None,
    pipeline: Pipeline | None = None,
    renderer: Renderer | None = None,
    instance: str = "",
) -> _AfterResponse:
    """Assemble the app; collaborators default to the real ones built from ``config``.

    ``renderer`` runs each render (CPU-bound) within the host's render budget (service/budget.py): by default
    ``config.render_threads`` slots shared through ``$PHIZER_SLOTS_DIR`` (private to the process without it).
    """
    if store is None:
        chain = OriginChain([make_origin(url, config) for url in config.origins])
        cache = None
        if config.memcached.servers and chain.memcached:
            namespace = origins_namespace(config.origins)
            cache = MemcachedOriginals(config.memcached, config.limits, namespace, config.fallback_cache_valid)
        store = OriginalStore(chain, cache)
        store.prepare()  # in gunicorn's worker: after gevent's patching, before the first request
    configure_decoders(config.limits)
    instance = instance if config.instance_header else ""
    pipeline = pipeline or Pipeline(config.encoding, config.limits, config.presets.values())
    if renderer is None:
        slots = config.render_threads or os.cpu_count() or 1
        budget = RenderBudget(slots, os.environ.get("PHIZER_SLOTS_DIR") or None)
        limits = config.limits
        renderer = Renderer(budget, make_spawn(slots), limits.render_wait, limits.render_queue)

    app = falcon.App(media_type=falcon.MEDIA_TEXT)
    app.req_options.strip_url_path_trailing_slash = False
    described = {name: preset.public() for name, preset in config.presets.items()}
    if config.signing.keys:  # signed ad-hoc sizes, under their path's reserved first segment: limits, never keys
        described[ADHOC] = config.signing.public()
    presets_body = json.dumps(described, indent=1).encode()

    def presets(req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = presets_body
        resp.set_header("Cache-Control", "no-cache")

    def healthz(req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "ok\n"
        resp.set_header("Cache-Control", "no-store")

    def readyz(req: falcon.Request, resp: falcon.Response) -> None:
        """Ready when memcached and every origin answer (each probe has its own short timeout)."""
        problems = store.readiness()
        resp.content_type = falcon.MEDIA_TEXT
        resp.set_header("Cache-Control", "no-store")
        if problems:
            resp.status = falcon.HTTP_503
            resp.text = "not ready: unreachable " + ", ".join(problems) + "\n"
        else:
            resp.text = "ready\n"

    def metrics(req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = exposition()
        resp.set_header("Cache-Control", "no-store")

    app.add_route("/presets.json", _Get(presets))
    app.add_route("/healthz", _Get(healthz))
    app.add_route("/readyz", _Get(readyz))
    if config.gallery:
        app.add_route("/", GalleryResource(config))
    app.add_route("/metrics", _Get(metrics))
    app.add_route(PURGE_PATH, PurgeResource(config, store, os.environ.get(CACHE_DIR_ENV)))  # loopback only (nginx)
    app.add_sink(ImageResource(config, store, pipeline, renderer, instance), prefix="/")
    app.add_middleware(_Observe(instance))

    def on_phizer_error(req: falcon.Request, resp: falcon.Response, exc: PhizerError, params: Any) -> None:
        if exc.detail:
            req.context.fields["detail"] = exc.detail  # logged, never shown
        resp.status = exc.status
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = exc.reason + "\n"
        # Verdicts on the original (missing, too large, not an image, corrupt) are cached briefly: a missing or bad
        # file requested in a loop must not hammer the origin or be decoded again each time; so is a bad signature.
        # Other errors never. nginx's lifetime for a 200 must not stick to an error (a render failed after it).
        cached = exc.status in CACHED_BRIEFLY
        resp.set_header("Cache-Control", config.error_cache_control if cached else "no-store")
        resp.delete_header("ETag")
        resp.delete_header("X-Accel-Expires")
        if isinstance(exc, Overloaded):
            resp.set_header("Retry-After", str(exc.retry_after))
        if instance:
            resp.set_header("X-Phizer-Instance", instance)

    def on_falcon_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError, params: Any) -> None:
        """Falcon's own errors (a method a route lacks, a malformed header...): same one-line body, same status."""
        for name, value in (exc.headers or {}).items():
            resp.set_header(name, value)
        reason = f"{exc.title}: {exc.description}" if exc.description else (exc.title or "error")
        on_phizer_error(req, resp, _Status(int(exc.status_code), reason.lower()), params)

    def on_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params: Any) -> None:
        log.exception("unexpected error serving %s", req.path)
        on_phizer_error(req, resp, _Status(500, "internal error"), params)

    app.add_error_handler(Exception, on_unexpected)
    app.add_error_handler(falcon.HTTPError, on_falcon_error)
    app.add_error_handler(PhizerError, on_phizer_error)
    return _AfterResponse(app)


class _Observe:
    """Every response: its request id (nginx's, else a new one), Server-Timing, nosniff; every image request: its
    metrics and one JSON log line (request id, preset, key, format, status, bytes, stages, where the original
    came from, instance; an error's detail, which the client never sees)."""

    def __init__(self, instance: str) -> None:
        self.instance = instance

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        incoming = req.get_header("X-Request-ID") or ""
        req.context.request_id = incoming if REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        req.context.timings = Timings()
        req.context.fields = {}

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: Any, req_succeeded: bool) -> None:
        timings: Timings = req.context.timings
        # Browsers take the Content-Type phizer sets (always the encoded output's), never sniff.
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("X-Request-ID", req.context.request_id)
        resp.set_header("Server-Timing", timings.server_timing())
        if req.path in QUIET_PATHS:
            return
        body = resp.data if resp.data is not None else (resp.text or "").encode()  # an image, or an error's line
        req.env[AFTER_RESPONSE] = functools.partial(self._account, req, resp.status_code, len(body))

    def _account(self, req: falcon.Request, status: int, size: int) -> None:
        """Metrics and the log line, once the response is out (``_AfterResponse``)."""
        timings: Timings = req.context.timings
        fields = req.context.fields
        if "preset" in fields:
            REQUESTS.labels(fields["preset"], fields.get("format", ""), str(status)).inc()
            timings.observe()
            if timings.intermediate:
                INTERMEDIATES.labels(timings.intermediate).inc()
        if status == 503:
            SHED.inc()
        elif status == 504:
            DEADLINES.inc()
        line = {"request_id": req.context.request_id, "method": req.method, "path": req.path, **fields}
        line.update(status=status, bytes=size, original=timings.source or None)
        line.update(decoder=timings.decoder or None)
        line.update(stages_ms={name: round(s * 1000, 1) for name, s in dict(timings.stages).items()})
        line.update(instance=self.instance or None)
        access_log.info("", extra={"fields": line})


class _AfterResponse:
    """The WSGI app: Falcon's, with what a request left under ``AFTER_RESPONSE`` in its environ (its metrics and log
    line) run once its response is sent. PEP 3333 servers call the body's ``close()`` after its last byte (gunicorn
    does, so do Falcon's test clients): nginx gets the answer about 0.3 ms sooner per miss (measured, B5)."""

    def __init__(self, app: falcon.App) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> _Closing:
        return _Closing(self.app(environ, start_response), environ)


class _Closing:
    """A WSGI body whose ``close()`` also runs the request's ``AFTER_RESPONSE``."""

    def __init__(self, body: Iterable[bytes], environ: dict[str, Any]) -> None:
        self.body = body
        self.environ = environ

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            after = self.environ.pop(AFTER_RESPONSE, None)
            if after is not None:
                after()


class _Get:
    """A GET/HEAD-only Falcon resource around a plain function."""

    def __init__(self, fn: Any) -> None:
        self.on_get = fn
        self.on_head = fn
