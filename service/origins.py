"""Where originals come from: S3 (or any S3-compatible store), a local folder, an HTTP server; and the ordered chain.

The chain is phizer's answer to "a fresh upload is not in S3 yet": origins are tried in the configured order and
the first that has the key wins, so the upload web server can sit behind S3 as a fallback. A key that is missing
everywhere is a 404; but if any origin *failed*, the key may well exist there, so the answer is 502/504 and
nothing is cached as missing. Every network call has a timeout, every body a size limit and a deadline.

An HTTP origin is a server phizer was pointed at, not one it should be steered to: it follows no redirect unless its
URL says so (and then only on its own host), and it connects only to public addresses unless
``allow_private_origins`` is set, so neither a DNS answer nor a redirect can point phizer at the internal network
(a cloud metadata service, an admin port). S3 origins are exempt: their endpoint is operator config, often a
private MinIO or Ceph.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import urllib3

from service.config import Config, ConfigError, Limits
from service.errors import BadGateway, GatewayTimeout, NotFound, TooLarge
from service.metrics import ORIGIN_ERRORS
from service.original import Original, parse_focus
from service.public_net import AddressRefused, PublicHTTPPool, PublicHTTPSPool

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
ERROR_BODY_BYTES = 64 * 1024  # error and redirect bodies up to this size are read away, keeping the connection
MAX_REDIRECTS = 3  # hops followed with ?redirects=same-host
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
# An origin's focal point for an original (service/original.py parses it): S3 user metadata ``focus``, sent as the
# header x-amz-meta-focus, which HTTP origins may send too.
FOCUS_METADATA = "focus"
FOCUS_HEADER = "X-Amz-Meta-Focus"


class OriginFailure(Exception):
    """An origin could not answer (error status, refused connection, bad credentials...)."""


class OriginTimeout(OriginFailure):
    """An origin did not answer in time."""


class Origin(Protocol):
    """One place originals may be: ``fetch`` returns the original (bytes and focal point), or None when the key is
    not there; ``probe`` (for /readyz) raises OriginFailure when the origin cannot be reached at all."""

    url: str
    memcached: bool  # whether the originals cache keeps what it serves (the URL's ``memcached`` option)

    def fetch(self, key: str) -> Original | None: ...

    def probe(self) -> None: ...


def read_limited(chunks: Iterator[bytes], max_bytes: int, deadline: float, what: str) -> bytes:
    """Join streamed chunks, refusing bodies over ``max_bytes`` and reads that outlast ``deadline``.

    Per-read socket timeouts alone would let an origin that drips a byte a second hold a request forever. The
    deadline is checked after each chunk, so each must come from one socket read (see ``reads``): a request then
    ends at most one read timeout after the deadline.
    """
    parts: list[bytes] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"original larger than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise OriginTimeout(f"{what}: body not received in time")
        parts.append(chunk)
    return b"".join(parts)


def reads(read1: Callable[[int], bytes | None]) -> Iterator[bytes]:
    """A body as the socket delivers it, up to READ_CHUNK at a time, from a ``read1``-style method.

    ``read(n)`` waits until n bytes have arrived, one socket read after another, each within the read timeout: an
    origin dripping a byte at a time keeps a 256 KiB read going for days, and the deadline is never checked.
    """
    while chunk := read1(READ_CHUNK):
        yield chunk


# Every origin kind takes ``memcached=off``: memcached saves slow or paid fetches (S3, a remote web server); in
# front of a folder on a local disk it only costs CPU (storing and reading back every original over a socket,
# checking its digest) to save a read from the page cache, several times faster. Default on, for every kind.
MEMCACHED_OPTION = {"memcached": ("on", "off")}


def url_options(url: str, allowed: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """An origin URL's query options, each at most once and with one of its allowed values (the first is the default).

    Anything else is a ConfigError: a misspelt option silently ignored would leave the default in force with the
    operator none the wiser.
    """
    parts = urllib.parse.urlsplit(url)
    options = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    names = [name for name, _ in options]
    if len(set(names)) < len(names) or any(value not in allowed.get(name, ()) for name, value in options):
        choices = "; ".join(" or ".join(f"{name}={value}" for value in values) for name, values in allowed.items())
        raise ConfigError(f"{url}: {parts.scheme} origins take {choices}; got {parts.query!r}")
    return {name: values[0] for name, values in allowed.items()} | dict(options)


class FileOrigin:
    """Originals in a local folder. Keys never escape it, not even through symlinks."""

    def __init__(self, url: str, limits: Limits) -> None:
        self.memcached = url_options(url, MEMCACHED_OPTION)["memcached"] == "on"
        self.url = url
        self.root = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
        self.limits = limits

    def probe(self) -> None:
        if not (self.root.is_dir() and os.access(self.root, os.R_OK | os.X_OK)):
            raise OriginFailure(f"{self.url}: not a readable folder")

    def fetch(self, key: str) -> Original | None:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            return None
        try:
            with open(path, "rb") as file:
                size = file.seek(0, 2)
                if size > self.limits.max_original_bytes:
                    raise TooLarge(f"original larger than {self.limits.max_original_bytes} bytes")
                file.seek(0)
                return Original.from_bytes(file.read())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:  # no file can have that name: a client's key, not a failure
                return None
            raise OriginFailure(f"{self.url}: {exc.strerror}") from exc


def _site(url: str) -> tuple[str, str | None, int | None] | None:
    """Scheme, host and port: what a same-host redirect keeps (None for a port that is not a number)."""
    parts = urllib.parse.urlsplit(url)
    try:
        return parts.scheme, parts.hostname, parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None


class HttpOrigin:
    """An HTTP(S) server holding originals under a prefix, e.g. the upload web server as a fallback.

    Redirects are a policy: with ``?redirects=none`` (the default) any redirect is a failure (502), since an image
    server that redirects usually means a wrong prefix or a login page; ``?redirects=same-host`` follows up to
    MAX_REDIRECTS hops that keep the scheme, host and port. Unless ``allow_private`` is set, connections go to
    public addresses only (see service/public_net.py), redirected ones included.
    """

    def __init__(self, url: str, limits: Limits, *, allow_private: bool = False) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url = url
        self.base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        options = url_options(url, {"redirects": ("none", "same-host"), **MEMCACHED_OPTION})
        self.follow_redirects = options["redirects"] == "same-host"
        self.memcached = options["memcached"] == "on"
        self.limits = limits
        self.allow_private = allow_private

    @functools.cached_property
    def pool(self) -> urllib3.PoolManager:
        """Connections to the server, made on first use: in the worker, after gevent has patched sockets."""
        pool = urllib3.PoolManager(
            maxsize=64,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=self.limits.origin_connect_timeout, read=self.limits.origin_read_timeout),
            cert_reqs="CERT_REQUIRED",
        )
        if not self.allow_private:
            pool.pool_classes_by_scheme = {"http": PublicHTTPPool, "https": PublicHTTPSPool}
        return pool

    def probe(self) -> None:
        """Any HTTP answer to a HEAD of the prefix is reachable; no answer (or a refused address) is not."""
        try:
            self.pool.request("HEAD", self.base + "/", redirect=False, timeout=self.limits.readiness_timeout)
        except urllib3.exceptions.HTTPError as exc:
            raise OriginFailure(f"{self.url}: {exc}") from exc

    def fetch(self, key: str) -> Original | None:
        url = f"{self.base}/{urllib.parse.quote(key, safe='/')}"
        deadline = time.monotonic() + self.limits.origin_total_timeout
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._get(url)
            reusable = False  # only a connection whose response was read to the end may be reused
            try:
                if resp.status == 200:
                    length = resp.headers.get("Content-Length")
                    if length and length.isdigit() and int(length) > self.limits.max_original_bytes:
                        raise TooLarge(f"original larger than {self.limits.max_original_bytes} bytes")
                    data = read_limited(reads(resp.read1), self.limits.max_original_bytes, deadline, self.url)
                    reusable = True
                    return Original.from_bytes(data, parse_focus(resp.headers.get(FOCUS_HEADER), key))
                reusable = self._discard(resp, deadline)
                if resp.status in (404, 410):
                    return None
                if resp.status not in REDIRECT_STATUSES:
                    raise OriginFailure(f"{self.url}: HTTP {resp.status}")
                url = self._redirect(url, resp)
            except urllib3.exceptions.ReadTimeoutError as exc:
                raise OriginTimeout(f"{self.url}: timed out") from exc
            except urllib3.exceptions.HTTPError as exc:
                raise OriginFailure(f"{self.url}: {exc}") from exc
            finally:
                if reusable:
                    resp.release_conn()
                else:
                    resp.close()
        raise OriginFailure(f"{self.url}: more than {MAX_REDIRECTS} redirects")

    def _get(self, url: str) -> urllib3.BaseHTTPResponse:
        """Send the GET and read the response's head; the body is left to the caller."""
        try:
            return self.pool.request("GET", url, preload_content=False, redirect=False)
        except AddressRefused as exc:
            raise OriginFailure(f"{self.url}: {exc}") from exc
        except urllib3.exceptions.NewConnectionError as exc:  # refused, unresolvable: a failure, not a timeout
            raise OriginFailure(f"{self.url}: {exc}") from exc  # (urllib3 derives it from ConnectTimeoutError)
        except (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ReadTimeoutError) as exc:
            raise OriginTimeout(f"{self.url}: timed out") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise OriginFailure(f"{self.url}: {exc}") from exc

    def _discard(self, resp: urllib3.BaseHTTPResponse, deadline: float) -> bool:
        """Read an error or redirect body away so its connection can be reused; False if it is too big, too slow or
        broken (the connection is then closed instead). Within the deadline: an origin dripping its 404 page must
        not hold a request either."""
        try:
            read_limited(reads(resp.read1), ERROR_BODY_BYTES, deadline, self.url)
        except (TooLarge, OriginTimeout, urllib3.exceptions.HTTPError):
            return False
        return True

    def _redirect(self, url: str, resp: urllib3.BaseHTTPResponse) -> str:
        """Where a redirect from ``url`` leads, if this origin's policy lets it be followed; else an OriginFailure."""
        location = resp.headers.get("Location")
        if not location:
            raise OriginFailure(f"{self.url}: HTTP {resp.status} without a Location")
        target = urllib.parse.urljoin(url, location)
        if not self.follow_redirects:
            raise OriginFailure(
                f"{self.url}: HTTP {resp.status} redirect to {target} not followed (redirects=none; "
                "?redirects=same-host follows redirects on the origin's own host)"
            )
        if _site(target) != _site(self.base):
            raise OriginFailure(f"{self.url}: HTTP {resp.status} redirect to {target}, another host, not followed")
        return target


class _ReadsAsTheyCome:
    """botocore's raw stream (a urllib3 response), its ``read(n)`` answered by ``read1(n)``.

    Put under a StreamingBody, this makes each of its reads one socket read (see ``reads``) while it still counts
    the bytes against Content-Length and checks the checksum S3 sent; StreamingBody has no ``read1`` of its own.
    """

    def __init__(self, raw: urllib3.BaseHTTPResponse) -> None:
        self.raw = raw

    def read(self, amt: int | None = None) -> bytes:
        return self.raw.read1(amt)

    def close(self) -> None:
        self.raw.close()


class S3Origin:
    """A bucket (and key prefix) in S3 or any S3-compatible store; endpoint and credentials from boto3's chain.

    ``s3://bucket/prefix?forbidden=missing`` reads S3's 403 AccessDenied as "not here": a reader granted
    s3:GetObject without s3:ListBucket gets 403, not 404, for a key that does not exist, and would otherwise turn
    every missing key into a 502. Only AccessDenied is read so: bad credentials (InvalidAccessKeyId,
    SignatureDoesNotMatch...) stay failures, or a broken deployment would answer cacheable 404s for everything.
    The default, ``forbidden=failure``, keeps a 403 a failure (502), so a permissions mistake does not pass for
    missing files.
    """

    def __init__(self, url: str, limits: Limits, max_pool_connections: int) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url = url
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        options = url_options(url, {"forbidden": ("failure", "missing"), **MEMCACHED_OPTION})
        self.forbidden_is_missing = options["forbidden"] == "missing"
        self.memcached = options["memcached"] == "on"
        self.limits = limits
        self.max_pool_connections = max_pool_connections

    @functools.cached_property
    def client(self) -> Any:
        """The boto3 client, made in the worker (OriginalStore.prepare, else on first use): created before gevent's
        patching, TLS breaks (see NOTES.md)."""
        limits = self.limits
        return self._client(limits.origin_connect_timeout, limits.origin_read_timeout, 3, self.max_pool_connections)

    @functools.cached_property
    def probe_client(self) -> Any:
        """A client for /readyz's probe: one short attempt, so an unreachable endpoint is said so quickly."""
        timeout = self.limits.readiness_timeout
        return self._client(timeout, timeout, 1, 1)

    @staticmethod
    def _client(connect: float, read: float, attempts: int, pool: int) -> Any:
        """A client making at most ``attempts`` attempts in all (botocore's max_attempts counts retries only)."""
        import boto3
        from botocore.config import Config as BotoConfig

        retries = {"total_max_attempts": attempts, "mode": "standard"}
        config = BotoConfig(connect_timeout=connect, read_timeout=read, retries=retries, max_pool_connections=pool)
        return boto3.session.Session().client("s3", config=config)

    def probe(self) -> None:
        """The bucket answers HEAD (403 counts: a reader without s3:ListBucket still reaches it)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.probe_client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("403", "AccessDenied"):
                raise OriginFailure(f"{self.url}: {exc}") from exc
        except BotoCoreError as exc:
            raise OriginFailure(f"{self.url}: {exc}") from exc

    def fetch(self, key: str) -> Original | None:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

        object_key = f"{self.prefix}/{key}" if self.prefix else key
        deadline = time.monotonic() + self.limits.origin_total_timeout
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=object_key)
            # Closed on every way out: a half-read body left open holds its connection until garbage collection.
            with contextlib.closing(resp["Body"]) as body:
                if resp.get("ContentLength", 0) > self.limits.max_original_bytes:
                    raise TooLarge(f"original larger than {self.limits.max_original_bytes} bytes")
                body._raw_stream = _ReadsAsTheyCome(body._raw_stream)  # no public way in: see _ReadsAsTheyCome
                data = read_limited(body.iter_chunks(READ_CHUNK), self.limits.max_original_bytes, deadline, self.url)
            return Original.from_bytes(data, parse_focus(resp.get("Metadata", {}).get(FOCUS_METADATA), key))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound") or (code == "AccessDenied" and self.forbidden_is_missing):
                return None
            raise OriginFailure(f"{self.url}: {code or exc}") from exc
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            raise OriginTimeout(f"{self.url}: timed out") from exc
        except BotoCoreError as exc:
            raise OriginFailure(f"{self.url}: {exc}") from exc


def make_origin(url: str, config: Config) -> Origin:
    """Build the origin an URL names (the scheme picks the kind); raises ConfigError for options it does not know."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "s3":
        return S3Origin(url, config.limits, config.s3_max_pool_connections)
    if scheme == "file":
        return FileOrigin(url, config.limits)
    return HttpOrigin(url, config.limits, allow_private=config.allow_private_origins)


def list_keys(config: Config, prefix: str) -> Iterator[str]:
    """The keys under ``prefix`` in the first origin (s3:// or file://; an HTTP server cannot be listed)."""
    origin = make_origin(config.origins[0], config)
    if isinstance(origin, S3Origin):
        base = f"{origin.prefix}/" if origin.prefix else ""
        pages = origin.client.get_paginator("list_objects_v2").paginate(Bucket=origin.bucket, Prefix=base + prefix)
        for page in pages:
            for item in page.get("Contents", []):
                yield item["Key"][len(base) :]
    elif isinstance(origin, FileOrigin):
        start = origin.root / prefix.rpartition("/")[0]  # the deepest folder the prefix names in full
        found = []
        for folder, _, files in os.walk(start):
            for name in files:
                key = Path(folder, name).relative_to(origin.root).as_posix()
                if key.startswith(prefix):
                    found.append(key)
        yield from sorted(found)
    else:
        raise ValueError(f"cannot list the keys of {config.origins[0]} (only s3:// and file:// origins): give keys")


class OriginChain:
    """Tries each origin in order; the first that has the key wins."""

    def __init__(self, origins: Sequence[Origin]) -> None:
        self.origins = list(origins)

    @property
    def memcached(self) -> bool:
        """Whether any origin's originals are kept in memcached (if none is, memcached is not even asked)."""
        return any(origin.memcached for origin in self.origins)

    def unreachable(self) -> list[str]:
        """Origins that cannot be reached at all, as "origin N (kind)" (for /readyz; the detail goes to the log)."""
        down = []
        for index, origin in enumerate(self.origins, 1):
            try:
                origin.probe()
            except OriginFailure as exc:
                log.warning("readiness: origin %d unreachable: %s", index, exc)
                down.append(f"origin {index} ({urllib.parse.urlsplit(origin.url).scheme})")
        return down

    def prepare(self) -> None:
        """Build the S3 origins' clients now rather than on the first fetch (see OriginalStore.prepare)."""
        for origin in self.origins:
            if isinstance(origin, S3Origin):
                _ = origin.client

    def fetch(self, key: str) -> Original:
        failures: list[OriginFailure] = []
        for index, origin in enumerate(self.origins):
            try:
                original = origin.fetch(key)
            except OriginFailure as exc:
                log.warning("origin failed for %r: %s", key, exc)
                ORIGIN_ERRORS.labels("timeout" if isinstance(exc, OriginTimeout) else "failure").inc()
                failures.append(exc)
                continue
            if original is not None:
                return replace(original, fallback=index > 0, memcached=origin.memcached)
        # The public reason never names an origin (bucket, host, path): the detail is for the log only.
        if failures and all(isinstance(exc, OriginTimeout) for exc in failures):
            raise GatewayTimeout("origin timed out", str(failures[-1]))
        if failures:
            raise BadGateway("origin failed", str(failures[-1]))
        raise NotFound(f"original {key!r} not found")
