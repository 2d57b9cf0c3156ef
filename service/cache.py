"""The originals cache: memcached shared by every host, and single-flight inside an instance.

Fetching an original is the slow, paid-for part (S3 latency and requests); decoding it is cheap by comparison.
So originals are cached in one memcached pool shared by all hosts, and concurrent requests for one key within an
instance share a single fetch. memcached is an accelerator only: when it is down or hung, requests still succeed
from the origin, paying at most a short timeout.

Originals are stored in chunks below memcached's default 1 MiB item limit, so phone photos (3-10 MB) are cached
without depending on the server's ``-I`` setting: a head item names the chunks, and a read that misses any chunk
is a miss (an evicted chunk can never yield a truncated original).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from service.config import MemcachedOptions
from service.origins import Original

log = logging.getLogger(__name__)

KEY_PREFIX = "phz1:"  # bump when the stored layout changes


class OriginalFetcher(Protocol):
    def fetch(self, key: str) -> Original: ...


def cache_key(key: str) -> str:
    """A memcached-safe key: object keys may be 1 KiB with spaces; memcached allows 250 bytes, no spaces."""
    return KEY_PREFIX + hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=20).hexdigest()


class MemcachedOriginals:
    """Originals in memcached, chunked; every failure is logged and treated as a miss."""

    def __init__(self, options: MemcachedOptions, timeout: float) -> None:
        self.options = options
        self.timeout = timeout

    @functools.cached_property
    def client(self) -> Any:
        """A pooled HashClient (one socket per greenlet, never shared), made on first use: in the worker,
        after gevent has patched sockets. A rare double creation on a first-use race would be harmless."""
        from pymemcache.client.hash import HashClient

        servers = [(host, int(port)) for host, _, port in (s.rpartition(":") for s in self.options.servers)]
        return HashClient(
            servers,
            use_pooling=True,
            max_pool_size=self.options.pool_size,
            connect_timeout=self.timeout,
            timeout=self.timeout,
            ignore_exc=True,
            retry_attempts=1,
            retry_timeout=1,
            dead_timeout=self.options.dead_timeout,
            no_delay=True,
        )

    def get(self, key: str) -> Original | None:
        head_key = cache_key(key)
        try:
            head = self.client.get(head_key)
            if not head:
                return None
            digest, size_text, count_text = head.decode("ascii").split(":")
            size, count = int(size_text), int(count_text)
            names = [f"{head_key}:{digest[:16]}:{i}" for i in range(count)]
            chunks = self.client.get_many(names)
        except Exception as exc:  # memcached must never fail a request
            log.warning("memcached get failed: %s", exc)
            return None
        if len(chunks) != count:
            return None
        data = b"".join(chunks[name] for name in names)
        if len(data) != size:
            return None
        return Original(data=data, digest=digest)

    def set(self, key: str, original: Original) -> None:
        head_key = cache_key(key)
        step = self.options.chunk_bytes
        data = memoryview(original.data)
        items = {
            f"{head_key}:{original.digest[:16]}:{i}": bytes(data[offset : offset + step])
            for i, offset in enumerate(range(0, len(data), step))
        }
        head = f"{original.digest}:{len(data)}:{len(items)}".encode("ascii")
        try:
            # Chunks first, head last: a reader that finds the head finds the chunks.
            self.client.set_many(items, expire=self.options.expire, noreply=False)
            self.client.set(head_key, head, expire=self.options.expire, noreply=False)
        except Exception as exc:  # a failed store only costs a later miss
            log.warning("memcached set failed: %s", exc)


class SingleFlight:
    """Concurrent calls for one key run the function once; the others wait and share its outcome.

    Uses threading primitives, which gevent's monkey-patching makes cooperative, so it is correct both
    under gunicorn's gevent worker and in plain threaded tests.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, _Call] = {}

    def do(self, key: str, fn: Callable[[], Original]) -> Original:
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if call is None:
                call = self._calls[key] = _Call()
        if not leader:
            call.done.wait()
            if call.error is not None:
                raise call.error
            assert call.result is not None
            return call.result
        try:
            call.result = fn()
            return call.result
        except BaseException as exc:
            call.error = exc
            raise
        finally:
            with self._lock:
                del self._calls[key]
            call.done.set()


class _Call:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Original | None = None
        self.error: BaseException | None = None


class OriginalStore:
    """Cache-aside in front of the origin chain: memcached first, then one fetch per key, then store.

    The store into memcached runs in the background (a greenlet under gevent), overlapping the render: storing a
    4 MB original costs about 15 ms that no request needs to wait for. ``background=False`` stores inline.
    """

    def __init__(self, origins: OriginalFetcher, cache: MemcachedOriginals | None, background: bool = True) -> None:
        self.origins = origins
        self.cache = cache
        self.background = background
        self.flight = SingleFlight()

    def get(self, key: str) -> Original:
        return self.flight.do(key, lambda: self._load(key))

    def _load(self, key: str) -> Original:
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
        original = self.origins.fetch(key)
        if self.cache is not None and self.background:
            threading.Thread(target=self.cache.set, args=(key, original), name="memcached-store", daemon=True).start()
        elif self.cache is not None:
            self.cache.set(key, original)
        return original
