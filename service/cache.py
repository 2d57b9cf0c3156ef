"""The originals cache: memcached shared by every host, and single-flight inside an instance.

Fetching an original is the slow, paid-for part (S3 latency and requests); decoding it is cheap by comparison.
So originals are cached in one memcached pool shared by all hosts, and concurrent requests for one key within an
instance share a single fetch. memcached is an accelerator only: when it is down or hung, requests still succeed
from the origin, paying at most a short timeout.

Originals are stored in chunks below memcached's default 1 MiB item limit, so phone photos (3-10 MB) are cached
without depending on the server's ``-I`` setting: a head item names the chunks, and a read that misses any chunk
is a miss (an evicted chunk can never yield a truncated original).

memcached is shared and unauthenticated, so nothing read back is trusted blindly: keys carry a namespace per
origin set (deployments reading different origins never see each other's originals), a head item that ``set``
could not have written is a miss before anything is allocated for it, and a joined original must match its digest.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service.budget import before_deadline
from service.config import Limits, MemcachedOptions
from service.metrics import ORIGINALS, Timings
from service.original import DIGEST_CHARS, Focus, Original, content_digest, focus_text, parse_focus, version

log = logging.getLogger(__name__)

# bump when the stored layout changes (3: the focal point, a phz2 head without one is not "none"; 4: BLAKE3 digests,
# a phz3 head's SHA-256 digest would never match its chunks again)
KEY_PREFIX = "phz4:"
NAMESPACE = re.compile(r"[0-9A-Za-z_-]{1,64}")
# digest:size:count[:focus][:f], as ``set`` writes it (":f": a fallback origin served it); 15 digits bound the numbers
# before int() sees them.
HEAD_FORMAT = re.compile(
    rb"([0-9a-f]{%d}):([0-9]{1,15}):([0-9]{1,15})(?::([0-9.]{1,20},[0-9.]{1,20}))?(:f)?" % DIGEST_CHARS
)


class OriginalFetcher(Protocol):
    def fetch(self, key: str) -> Original: ...


def origins_namespace(origins: Sequence[str]) -> str:
    """The originals' namespace in memcached for a deployment: a short hash of its ordered origin URLs.

    Deployments that share a pool but read different origins (or the same ones in another order: the first hit
    wins) may hold different originals under one key; each must read back only what it could have fetched itself.
    """
    return hashlib.blake2b("\0".join(origins).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def cache_key(namespace: str, key: str) -> str:
    """A memcached-safe key: object keys may be 1 KiB with spaces; memcached allows 250 bytes, no spaces."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=20).hexdigest()
    return f"{KEY_PREFIX}{namespace}:{digest}"


def chunk_keys(head_key: str, digest: str, count: int) -> list[str]:
    """The chunks' keys name the content: a head rewritten for new content never points at stale chunks."""
    return [f"{head_key}:{digest[:16]}:{i}" for i in range(count)]


@dataclass(frozen=True)
class Head:
    """What a head item says of an original: its digest, its size in bytes, the number of chunks holding it, and
    the focal point its origin gave (it travels with the original: a render from memcached keeps it) and whether a
    fallback origin served it (its renditions live shortly, 304s included)."""

    digest: str
    size: int
    count: int
    focus: Focus | None = None
    fallback: bool = False

    @property
    def version(self) -> str:
        """The cached original's ``Original.version`` (digest and focal point): what its ETags are built from."""
        return version(self.digest, self.focus)


class MemcachedOriginals:
    """Originals in memcached, chunked, under ``namespace``; every failure is logged and treated as a miss.

    ``limits`` gives the timeout of every memcached call and the largest original a head may announce. An original
    from a fallback origin is kept ``fallback_expire`` seconds at most (0: not at all): long enough to render its
    other presets, short enough that the next render after its renditions expire asks the first origin again.
    """

    def __init__(self, options: MemcachedOptions, limits: Limits, namespace: str, fallback_expire: int = 60) -> None:
        if not NAMESPACE.fullmatch(namespace):  # else every key would be refused and every read quietly miss
            raise ValueError(f"memcached namespace must match {NAMESPACE.pattern}, got {namespace!r}")
        self.options = options
        self.timeout = limits.memcached_timeout
        self.max_original_bytes = limits.max_original_bytes
        self.namespace = namespace
        self.fallback_expire = min(fallback_expire, options.expire or fallback_expire)  # expire 0: never expires

    @functools.cached_property
    def addresses(self) -> list[tuple[str, int]]:
        """The servers as (host, port)."""
        return [(host, int(port)) for host, _, port in (s.rpartition(":") for s in self.options.servers)]

    @functools.cached_property
    def client(self) -> Any:
        """A pooled HashClient (one socket per greenlet, never shared), made in the worker (OriginalStore.prepare,
        else on first use), after gevent has patched sockets; it connects on first use."""
        from pymemcache.client.hash import HashClient

        return HashClient(
            self.addresses,
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

    def unreachable(self) -> list[str]:
        """The servers that do not answer ``version`` within the timeout (for /readyz; a fresh connection each,
        so the pool's dead-server bookkeeping is neither used nor disturbed)."""
        from pymemcache.client.base import Client

        down = []
        for server, address in zip(self.options.servers, self.addresses, strict=True):
            client = Client(address, connect_timeout=self.timeout, timeout=self.timeout)
            try:
                client.version()
            except Exception:
                down.append(server)
            finally:
                client.close()
        return down

    def get(self, key: str) -> Original | None:
        head_key = cache_key(self.namespace, key)
        try:
            head = self._head(head_key)
            if head is None:
                return None
            names = chunk_keys(head_key, head.digest, head.count)
            chunks = self.client.get_many(names)
        except Exception as exc:  # memcached must never fail a request
            log.warning("memcached get failed: %s", exc)
            return None
        if len(chunks) != head.count:  # a chunk was evicted: an ordinary miss
            return None
        if sum(len(chunk) for chunk in chunks.values()) != head.size:  # checked before the join allocates
            log.warning("memcached chunks of %r do not add up to their head's size: a miss", key)
            return None
        data = b"".join(chunks[name] for name in names)
        if content_digest(data) != head.digest:
            log.warning("memcached original %r does not match its digest: a miss", key)
            return None
        return Original(data=data, digest=head.digest, focus=head.focus, fallback=head.fallback)

    def head(self, key: str) -> Head | None:
        """The cached original's head item alone (its version, whether a fallback served it): enough to answer
        If-None-Match with a 304 without moving megabytes. None on a miss."""
        try:
            return self._head(cache_key(self.namespace, key))
        except Exception as exc:  # memcached must never fail a request
            log.warning("memcached get failed: %s", exc)
            return None

    def delete(self, key: str) -> bool:
        """Remove an original (``phizer purge``): its head first, so readers miss from then on, then the chunks
        it names. True when a head was there; a failure is logged and reported as False."""
        head_key = cache_key(self.namespace, key)
        try:
            head = self._head(head_key)
            self.client.delete(head_key, noreply=False)
            if head is not None:
                self.client.delete_many(chunk_keys(head_key, head.digest, head.count), noreply=False)
        except Exception as exc:
            log.warning("memcached delete failed: %s", exc)
            return False
        return head is not None

    def _head(self, head_key: str) -> Head | None:
        """Read and check a head item; one that ``set`` could not have written (garbage, a size over the limit, a
        chunk count that does not fit the size) is a miss before anything is allocated or fetched for it."""
        raw = self.client.get(head_key)
        if raw is None:
            return None
        match = HEAD_FORMAT.fullmatch(raw)
        if match is not None:
            size, count = int(match[2]), int(match[3])
            if size <= self.max_original_bytes and count == -(-size // self.options.chunk_bytes):
                focus = parse_focus(match[4].decode("ascii"), head_key) if match[4] else None
                return Head(
                    digest=match[1].decode("ascii"), size=size, count=count, focus=focus, fallback=bool(match[5])
                )
        log.warning("memcached head %s is malformed: a miss", head_key)
        return None

    def set(self, key: str, original: Original) -> None:
        if original.fallback and not self.fallback_expire:  # memcached reads 0 as "never expires"
            return
        expire = self.fallback_expire if original.fallback else self.options.expire
        head_key = cache_key(self.namespace, key)
        step = self.options.chunk_bytes
        data = original.data
        # Slices of bytes: an original that fits one chunk is stored as is (the whole slice is the object itself).
        parts = [data[offset : offset + step] for offset in range(0, len(data), step)]
        items = dict(zip(chunk_keys(head_key, original.digest, len(parts)), parts, strict=True))
        focus = f":{focus_text(original.focus)}" if original.focus is not None else ""
        fallback = ":f" if original.fallback else ""
        head = f"{original.digest}:{len(data)}:{len(parts)}{focus}{fallback}".encode("ascii")
        try:
            # Chunks first, head last: a reader that finds the head finds the chunks.
            self.client.set_many(items, expire=expire, noreply=False)
            self.client.set(head_key, head, expire=expire, noreply=False)
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

    def get(self, key: str, timings: Timings | None = None, deadline: float | None = None) -> Original:
        """The original for ``key``; ``timings`` learns where it came from and the memcached and fetch stages.

        A fetch from the origins gives up at ``deadline`` (504); memcached's own short timeouts bound the rest.
        """
        timings = timings if timings is not None else Timings()
        original = self.flight.do(key, lambda: self._load(key, timings, deadline))
        if not timings.source:
            timings.source = "shared"  # another request of this instance fetched it; this one waited
        return original

    def readiness(self) -> list[str]:
        """What keeps this store from serving as it should: unreachable memcached servers and origins."""
        problems = []
        if self.cache is not None and (down := self.cache.unreachable()):
            log.warning("readiness: memcached unreachable: %s", ", ".join(down))
            problems.append(f"{len(down)} of {len(self.cache.options.servers)} memcached servers")
        probe = getattr(self.origins, "unreachable", None)  # the real chain; fakes in tests may not probe
        return problems + (probe() if probe is not None else [])

    def prepare(self) -> None:
        """Build the network clients (memcached's, the S3 origins') now, not on the first miss.

        A worker loads the app after gevent's patching and before it accepts a request: building them there keeps
        the first miss of every fresh or recycled worker from holding its event loop, and so /healthz and every other
        request of the instance, for boto3's import and client (about 0.4 s measured).
        """
        if self.cache is not None:
            _ = self.cache.client
        prepare = getattr(self.origins, "prepare", None)  # the real chain; fakes in tests may have nothing to build
        if prepare is not None:
            prepare()

    def head(self, key: str) -> Head | None:
        """The original's head item if memcached has it, else None (also without a cache): the origins are never
        asked, so a conditional request costs one small memcached read at most."""
        return self.cache.head(key) if self.cache is not None else None

    def delete(self, key: str) -> bool:
        """Forget the original in memcached (``phizer purge``); True when it was cached there."""
        return self.cache.delete(key) if self.cache is not None else False

    def _load(self, key: str, timings: Timings, deadline: float | None) -> Original:
        if self.cache is not None:
            with timings.stage("memcached"):
                cached = self.cache.get(key)
            if cached is not None:
                timings.source = "memcached"
                ORIGINALS.labels("memcached").inc()
                return cached
        with timings.stage("fetch"):
            fetch = functools.partial(self.origins.fetch, key)
            original = fetch() if deadline is None else before_deadline(fetch, deadline)
        timings.source = "origin"
        ORIGINALS.labels("origin").inc()
        if self.cache is None or not original.memcached:
            return original
        if self.background:
            threading.Thread(target=self.cache.set, args=(key, original), name="memcached-store", daemon=True).start()
        else:
            self.cache.set(key, original)
        return original
