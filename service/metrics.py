"""What operators see: Prometheus metrics and per-request stage timings (Server-Timing); log lines: service/logs.py.

Metrics use ``prometheus_client``'s multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set (the launcher and
the systemd units set it, one folder per host): every instance writes its own files and any instance serves
``/metrics`` for all of them, so one scrape covers the host (nginx lets only loopback and configured addresses
reach it). Without it (tests, tools) they are plain in-process metrics.

A request's ``Timings`` collect how long each stage took: ``original`` (memcached and origin together, as the
request waited for them), ``memcached``, ``fetch`` (the origin), ``wait`` (for a render slot), ``decode``,
``resize``, ``encode``. Render stages are recorded on render threads, the others on the event loop: each request
has its own ``Timings``, written by one thread at a time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
STAGES = ("original", "memcached", "fetch", "wait", "decode", "resize", "encode")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("phizer_requests", "Image requests answered, by preset, output format and status",
                   ["preset", "format", "status"])  # fmt: skip
STAGE_SECONDS = Histogram("phizer_stage_seconds", "Time per request stage", ["stage"], buckets=BUCKETS)
ORIGINALS = Counter("phizer_originals", "Originals asked of the store, by where they came from", ["outcome"])
INTERMEDIATES = Counter("phizer_intermediates", "Kept decodes looked up, by outcome", ["outcome"])
ORIGIN_ERRORS = Counter("phizer_origin_errors", "Origin failures, by kind", ["kind"])
RENDERS_IN_FLIGHT = Gauge("phizer_renders_in_flight", "Renders running now", multiprocess_mode="livesum")
RENDERS_QUEUED = Gauge("phizer_renders_queued", "Requests waiting for a render slot", multiprocess_mode="livesum")
SHED = Counter("phizer_shed", "Requests answered 503 because every render slot was busy")
DEADLINES = Counter("phizer_deadlines", "Requests answered 504 because their deadline passed")

# Every labelled series whose label values are known in advance exists from the start, at 0, so each family is in
# the first scrape and rate() counts the first increment (Prometheus' advice: a series that appears at 1 is missed).
LABEL_VALUES = ((ORIGINALS, ("memcached", "origin")), (INTERMEDIATES, ("hit", "miss")),
                (ORIGIN_ERRORS, ("timeout", "failure")))  # fmt: skip
for _family, _values in LABEL_VALUES:
    for _value in _values:
        _family.labels(_value)

access_log = logging.getLogger("phizer.access")


def exposition() -> bytes:
    """The metrics in Prometheus' text format: every instance of the host in multiprocess mode."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


class Timings:
    """How long each stage of one request took, in seconds (a stage run twice adds up)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stages: dict[str, float] = {}
        self.source = ""  # where the original came from: memcached, origin, or shared (another request's fetch)
        self.intermediate = ""  # the kept decode: hit or miss ("" when none was looked up)
        # a fast path's decoder: "dc-only" or "quarter" for a progressive JPEG at 1/8 or 1/4 (service/jpeg.py),
        # "libwebp" for a still WebP decoded by libwebp directly (service/webp.py), "libdeflate" for a PNG whose
        # image data libdeflate inflated (service/png.py); "" otherwise
        self.decoder = ""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - started

    def server_timing(self) -> str:
        """The ``Server-Timing`` header: each stage, then the total, in milliseconds."""
        total = (time.perf_counter() - self.started) * 1000
        parts = [f"{name};dur={seconds * 1000:.1f}" for name, seconds in dict(self.stages).items()]
        return ", ".join([*parts, f"total;dur={total:.1f}"])

    def observe(self) -> None:
        for name, seconds in dict(self.stages).items():  # a snapshot: a render past its deadline may still write
            STAGE_SECONDS.labels(name).observe(seconds)
