"""Where originals come from: S3 (or any S3-compatible store), a local folder, an HTTP server; and the ordered chain.

The chain is phizer's answer to "a fresh upload is not in S3 yet": origins are tried in the configured order and
the first that has the key wins, so the upload web server can sit behind S3 as a fallback. A key that is missing
everywhere is a 404; but if any origin *failed*, the key may well exist there, so the answer is 502/504 and
nothing is cached as missing. Every network call has a timeout and every body a size limit.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import urllib3

from service.config import Config, ConfigError, Limits
from service.errors import BadGateway, GatewayTimeout, NotFound, TooLarge

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
DIGEST_CHARS = 32  # hex characters of SHA-256 kept: 128 bits


def content_digest(data: bytes) -> str:
    """An original's identity, for ETags and caches; the one place it is computed, so every check agrees.

    SHA-256: OpenSSL's SHA extensions hash a 4 MB photo in 3 ms, blake2b takes 7.
    """
    return hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]


@dataclass(frozen=True)
class Original:
    """An original's bytes and their digest (its identity for ETags and per-instance caches)."""

    data: bytes
    digest: str

    @classmethod
    def from_bytes(cls, data: bytes) -> Original:
        return cls(data=data, digest=content_digest(data))


class OriginFailure(Exception):
    """An origin could not answer (error status, refused connection, bad credentials...)."""


class OriginTimeout(OriginFailure):
    """An origin did not answer in time."""


class Origin(Protocol):
    """One place originals may be: ``fetch`` returns the bytes, or None when the key is not there."""

    url: str

    def fetch(self, key: str) -> bytes | None: ...


def read_limited(chunks: Iterator[bytes], max_bytes: int, deadline: float, what: str) -> bytes:
    """Join streamed chunks, refusing bodies over ``max_bytes`` and reads that outlast ``deadline``.

    Per-read socket timeouts alone would let an origin that drips a byte a second hold a request forever.
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


class FileOrigin:
    """Originals in a local folder. Keys never escape it, not even through symlinks."""

    def __init__(self, url: str, limits: Limits) -> None:
        self.url = url
        self.root = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
        self.limits = limits

    def fetch(self, key: str) -> bytes | None:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            return None
        try:
            with open(path, "rb") as file:
                size = file.seek(0, 2)
                if size > self.limits.max_original_bytes:
                    raise TooLarge(f"original larger than {self.limits.max_original_bytes} bytes")
                file.seek(0)
                return file.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as exc:
            raise OriginFailure(f"{self.url}: {exc.strerror}") from exc


class HttpOrigin:
    """An HTTP(S) server holding originals under a prefix, e.g. the upload web server as a fallback."""

    def __init__(self, url: str, limits: Limits) -> None:
        self.url = url.rstrip("/")
        self.limits = limits

    @functools.cached_property
    def pool(self) -> urllib3.PoolManager:
        """Connections to the server, made on first use: in the worker, after gevent has patched sockets."""
        return urllib3.PoolManager(
            maxsize=64,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=self.limits.origin_connect_timeout, read=self.limits.origin_read_timeout),
            cert_reqs="CERT_REQUIRED",
        )

    def fetch(self, key: str) -> bytes | None:
        url = f"{self.url}/{urllib.parse.quote(key, safe='/')}"
        deadline = time.monotonic() + self.limits.origin_total_timeout
        try:
            resp = self.pool.request("GET", url, preload_content=False, redirect=True)
        except (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ReadTimeoutError) as exc:
            raise OriginTimeout(f"{self.url}: timed out") from exc
        except urllib3.exceptions.MaxRetryError as exc:
            if isinstance(exc.reason, (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ReadTimeoutError)):
                raise OriginTimeout(f"{self.url}: timed out") from exc
            raise OriginFailure(f"{self.url}: {exc.reason}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise OriginFailure(f"{self.url}: {exc}") from exc
        finished = False  # only a connection whose response was read to the end may be reused
        try:
            if resp.status != 200:
                resp.drain_conn()  # error bodies are small; reading them keeps the connection reusable
                finished = True
                if resp.status in (404, 410):
                    return None
                raise OriginFailure(f"{self.url}: HTTP {resp.status}")
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > self.limits.max_original_bytes:
                raise TooLarge(f"original larger than {self.limits.max_original_bytes} bytes")
            data = read_limited(resp.stream(READ_CHUNK), self.limits.max_original_bytes, deadline, self.url)
            finished = True
            return data
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise OriginTimeout(f"{self.url}: timed out") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise OriginFailure(f"{self.url}: {exc}") from exc
        finally:
            if finished:
                resp.release_conn()
            else:
                resp.close()


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
        self.forbidden_is_missing = _forbidden_is_missing(url, parts.query)
        self.limits = limits
        self.max_pool_connections = max_pool_connections

    @functools.cached_property
    def client(self) -> Any:
        """The boto3 client, made on first use: created before gevent's patching, TLS breaks (see NOTES.md)."""
        import boto3
        from botocore.config import Config as BotoConfig

        return boto3.session.Session().client(
            "s3",
            config=BotoConfig(
                connect_timeout=self.limits.origin_connect_timeout,
                read_timeout=self.limits.origin_read_timeout,
                retries={"max_attempts": 2, "mode": "standard"},
                max_pool_connections=self.max_pool_connections,
            ),
        )

    def fetch(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

        object_key = f"{self.prefix}/{key}" if self.prefix else key
        deadline = time.monotonic() + self.limits.origin_total_timeout
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=object_key)
            if resp.get("ContentLength", 0) > self.limits.max_original_bytes:
                resp["Body"].close()
                raise TooLarge(f"original larger than {self.limits.max_original_bytes} bytes")
            return read_limited(
                resp["Body"].iter_chunks(READ_CHUNK), self.limits.max_original_bytes, deadline, self.url
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound") or (code == "AccessDenied" and self.forbidden_is_missing):
                return None
            raise OriginFailure(f"{self.url}: {code or exc}") from exc
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            raise OriginTimeout(f"{self.url}: timed out") from exc
        except BotoCoreError as exc:
            raise OriginFailure(f"{self.url}: {exc}") from exc


def _forbidden_is_missing(url: str, query: str) -> bool:
    """Read an s3 URL's options. Anything but one ``forbidden=failure|missing`` is a ConfigError: a misspelt
    option silently ignored would leave the default in force with the operator none the wiser."""
    options = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if len(options) > 1 or any(name != "forbidden" or value not in ("failure", "missing") for name, value in options):
        raise ConfigError(f"{url}: s3 origins take one option, forbidden=failure or forbidden=missing; got {query!r}")
    return options == [("forbidden", "missing")]


def make_origin(url: str, config: Config) -> Origin:
    """Build the origin an URL names (the scheme picks the kind); raises ConfigError for options it does not know."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "s3":
        return S3Origin(url, config.limits, config.s3_max_pool_connections)
    if scheme == "file":
        return FileOrigin(url, config.limits)
    return HttpOrigin(url, config.limits)


class OriginChain:
    """Tries each origin in order; the first that has the key wins."""

    def __init__(self, origins: Sequence[Origin]) -> None:
        self.origins = list(origins)

    def fetch(self, key: str) -> Original:
        failures: list[OriginFailure] = []
        for origin in self.origins:
            try:
                data = origin.fetch(key)
            except OriginFailure as exc:
                log.warning("origin failed for %r: %s", key, exc)
                failures.append(exc)
                continue
            if data is not None:
                return Original.from_bytes(data)
        if failures and all(isinstance(exc, OriginTimeout) for exc in failures):
            raise GatewayTimeout(f"origin timed out: {failures[-1]}")
        if failures:
            raise BadGateway(f"origin failed: {failures[-1]}")
        raise NotFound(f"original {key!r} not found")
