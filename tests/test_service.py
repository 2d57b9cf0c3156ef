"""The core service end to end: a real gunicorn+gevent instance, a real S3 API (moto), real memcached.

Origin GETs are counted by a proxy in front of the S3 server (and by the upload server itself), so "served
from memcached" and "one fetch for twenty requests" are observed at the origin, not inferred.
"""

from __future__ import annotations

import http.client
import io
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests import support

S3_KEYS = {
    "s3-only.jpg": "16_storm_720_30k.jpg",
    "both.jpg": "16_storm_720_30k.jpg",  # also on the upload server (as another image): S3 is first
    "photos/storm.jpg": "05_storm_2.5mp_baseline.jpg",
    "kite.png": "12_kite_alpha.png",
}
PAGE = [f"page/{i:02d}.jpg" for i in range(40)]


@dataclass
class Origins:
    s3: support.CountingProxy  # in front of moto: counts S3 GETs, can delay them
    upload: support.CountingProxy  # the upload web server fallback
    folder: Path
    urls: list[str]


def _png_header_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, so the pixel limit must be checked before any decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def origins(corpus: Path, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origins]:
    client = support.s3_client(s3_endpoint)
    client.create_bucket(Bucket="phizer")
    for key, name in S3_KEYS.items():
        client.put_object(Bucket="phizer", Key=f"orig/{key}", Body=(corpus / name).read_bytes())
    small = (corpus / "16_storm_720_30k.jpg").read_bytes()
    for key in PAGE:
        client.put_object(Bucket="phizer", Key=f"orig/{key}", Body=small)
    storm = (corpus / "05_storm_2.5mp_baseline.jpg").read_bytes()
    client.put_object(Bucket="phizer", Key="orig/not-an-image.jpg", Body=b"<html>hello</html>\n")
    client.put_object(Bucket="phizer", Key="orig/truncated.jpg", Body=storm[: len(storm) // 2])
    client.put_object(Bucket="phizer", Key="orig/bomb.png", Body=_png_header_bomb(20000, 20000))
    folder = tmp_path_factory.mktemp("folder-origin")
    shutil.copy(corpus / "08_grey_4mp_grayscale.jpg", folder / "local-only.jpg")
    s3 = support.CountingProxy(upstream=s3_endpoint)
    upload = support.CountingProxy(
        files={
            "/uploads/fresh.jpg": (corpus / "16_storm_720_30k.jpg").read_bytes(),
            "/uploads/both.jpg": (corpus / "08_grey_4mp_grayscale.jpg").read_bytes(),
        }
    )
    try:
        yield Origins(s3, upload, folder, ["s3://phizer/orig", upload.url + "/uploads", f"file://{folder}"])
    finally:
        s3.close()
        upload.close()


@pytest.fixture(scope="module")
def service(origins: Origins, memcached_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("instance")
    with support.instance(tmp, origins.urls, [memcached_server], env={"AWS_ENDPOINT_URL": origins.s3.url}) as (_, url):
        yield url


def size_of(body: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(body)) as image:
        return image.size


def raw_get(base: str, path: str) -> tuple[int, str]:
    """GET with the path sent verbatim (requests would normalise '..' away)."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read().decode(errors="replace")
    conn.close()
    return resp.status, body


def test_each_origin_kind_serves(service: str) -> None:
    for key, expected in [("s3-only.jpg", (320, 213)), ("fresh.jpg", (320, 213)), ("local-only.jpg", (320, 200))]:
        resp = requests.get(f"{service}/small/{key}", timeout=30)
        assert resp.status_code == 200, (key, resp.text)
        assert size_of(resp.content) == expected, key


def test_origins_are_tried_in_order(service: str, origins: Origins) -> None:
    resp = requests.get(f"{service}/small/both.jpg", timeout=30)
    assert resp.status_code == 200 and size_of(resp.content) == (320, 213)  # S3's 3:2 storm, not the 16:10 grey
    assert origins.upload.gets["/uploads/both.jpg"] == 0


def test_presets_json_describes_every_preset(service: str) -> None:
    presets = requests.get(f"{service}/presets.json", timeout=10).json()
    assert presets["thumb"] == {**presets["thumb"], "width": 150, "height": 150, "fit": "cover", "upscale": False}
    assert presets["small"]["height"] is None


def test_memcached_hit_means_no_origin_get(
    service: str, origins: Origins, memcached_server: str, tmp_path: Path
) -> None:
    before = origins.s3.gets["/phizer/orig/photos/storm.jpg"]
    assert requests.get(f"{service}/medium/photos/storm.jpg", timeout=30).status_code == 200
    assert origins.s3.gets["/phizer/orig/photos/storm.jpg"] == before + 1
    assert requests.get(f"{service}/thumb/photos/storm.jpg", timeout=30).status_code == 200
    # A second instance sharing memcached (another process, as on another host) fetches nothing either.
    env = {"AWS_ENDPOINT_URL": origins.s3.url}
    with support.instance(tmp_path, origins.urls, [memcached_server], env=env, name="other") as (_, other):
        resp = requests.get(f"{other}/large/photos/storm.jpg", timeout=30)
        assert resp.status_code == 200 and size_of(resp.content) == (1600, 1067)
    assert origins.s3.gets["/phizer/orig/photos/storm.jpg"] == before + 1


def test_memcached_down_still_serves(origins: Origins, tmp_path: Path) -> None:
    with support.memcached(tmp_path) as (proc, address):
        env = {"AWS_ENDPOINT_URL": origins.s3.url}
        with support.instance(tmp_path, origins.urls, [address], env=env, name="nomc") as (_, url):
            assert requests.get(f"{url}/small/s3-only.jpg", timeout=30).status_code == 200
            proc.stop()
            for preset in ("thumb", "medium"):
                resp = requests.get(f"{url}/{preset}/photos/storm.jpg", timeout=30)
                assert resp.status_code == 200, resp.text


def test_concurrent_misses_make_one_origin_get(service: str, origins: Origins) -> None:
    key = "/phizer/orig/kite.png"
    origins.s3.delay = 0.5
    try:
        with ThreadPoolExecutor(20) as pool:
            statuses = list(
                pool.map(
                    lambda i: requests.get(f"{service}/{['small', 'thumb'][i % 2]}/kite.png", timeout=30).status_code,
                    range(20),
                )
            )
    finally:
        origins.s3.delay = 0.0
    assert statuses == [200] * 20
    assert origins.s3.gets[key] == 1


def test_slow_origin_fetches_overlap(service: str, origins: Origins) -> None:
    """The seed's headline: a page of 40 uncached images, each origin GET taking 1 s, in one instance."""
    origins.s3.delay = 1.0
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(40) as pool:
            statuses = list(pool.map(lambda key: requests.get(f"{service}/small/{key}", timeout=60).status_code, PAGE))
        elapsed = time.monotonic() - started
    finally:
        origins.s3.delay = 0.0
    assert statuses == [200] * 40
    assert elapsed < 5, f"40 one-second fetches took {elapsed:.1f}s: they did not overlap"


def test_http_semantics(service: str) -> None:
    url = f"{service}/small/photos/storm.jpg"
    resp = requests.get(url, headers={"Accept": "image/jpeg"}, timeout=30)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "image/jpeg"
    assert int(resp.headers["Content-Length"]) == len(resp.content)
    assert resp.headers["Cache-Control"] == "public, max-age=31536000"
    assert resp.headers["Vary"] == "Accept"  # the default presets negotiate the format
    etag = resp.headers["ETag"]
    assert etag.startswith('W/"')  # equivalent renditions, not always equal bytes: see service/identity.py
    assert requests.get(url, headers={"If-None-Match": etag, "Accept": "image/jpeg"}, timeout=30).status_code == 304
    webp = requests.get(url, headers={"Accept": "image/webp,*/*"}, timeout=30)
    assert webp.headers["Content-Type"] == "image/webp" and webp.headers["ETag"] != etag
    assert requests.get(url, headers={"If-None-Match": etag, "Accept": "image/webp"}, timeout=30).status_code == 200
    head = requests.head(url, headers={"Accept": "image/jpeg"}, timeout=30)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == resp.headers["Content-Length"]
    assert head.headers["ETag"] == etag


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("/huge/s3-only.jpg", 404, "unknown preset"),
        ("/small/nothing-here.jpg", 404, "not found"),
        ("/small/a/../s3-only.jpg", 400, "'..'"),
        ("/small/a%00b.jpg", 400, "control characters"),
        ("/small/" + "k" * 1100, 400, "longer than 1024"),
        ("/small/not-an-image.jpg", 415, ""),
        ("/small/truncated.jpg", 422, ""),
        ("/small/bomb.png", 413, ""),
        ("/small", 400, "missing key"),
    ],
)
def test_client_mistakes_get_clear_statuses(service: str, path: str, status: int, reason: str) -> None:
    got, body = raw_get(service, path)
    assert got == status, body
    assert body.endswith("\n") and body.count("\n") == 1 and reason in body
    assert raw_get(service, "/healthz") == (200, "ok\n")  # the instance survived


def test_origin_error_and_timeout(tmp_path: Path) -> None:
    upload = support.CountingProxy(files={"/x.jpg": b"never served"})
    try:
        config = {"limits": {"origin_read_timeout": 0.5}}
        with support.instance(tmp_path, [upload.url], config=config, name="errors") as (_, url):
            upload.status = 503
            assert raw_get(url, "/small/x.jpg") == (502, "origin failed\n")  # never the origin's address
            upload.status, upload.delay = None, 2.0
            assert raw_get(url, "/small/x.jpg") == (504, "origin timed out\n")
    finally:
        upload.close()


def test_private_origin_is_refused(tmp_path: Path) -> None:
    """With the guard on, an HTTP origin on 127.0.0.1 is never contacted: 502, and the log names the refused address
    (under gevent, whose patched sockets and resolver the guard runs on)."""
    upload = support.CountingProxy(files={"/x.jpg": b"never served"})
    try:
        env = {"PHIZER_ALLOW_PRIVATE_ORIGINS": "0"}
        with support.instance(tmp_path, [upload.url], env=env, name="guarded") as (proc, url):
            assert raw_get(url, "/small/x.jpg")[0] == 502
            assert "refused to connect to 127.0.0.1: 127.0.0.1 (loopback)" in proc.log_path.read_text()
        assert upload.total() == 0
    finally:
        upload.close()


def test_s3_over_https_under_gevent(corpus: Path, tmp_path: Path) -> None:
    """TLS is where creating boto3 clients before gevent's patching breaks (RecursionError): prove it does not."""
    cert, key = support.self_signed_cert(tmp_path)
    with support.moto_s3(tmp_path, tls=(cert, key)) as endpoint:
        client = support.s3_client(endpoint, verify=str(cert))
        client.create_bucket(Bucket="secure")
        client.put_object(Bucket="secure", Key="a.jpg", Body=(corpus / "16_storm_720_30k.jpg").read_bytes())
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_CA_BUNDLE": str(cert)}
        with support.instance(tmp_path, ["s3://secure"], env=env, name="tls") as (_, url):
            with ThreadPoolExecutor(4) as pool:
                responses = list(pool.map(lambda p: requests.get(f"{url}/{p}/a.jpg", timeout=30), ["small", "thumb"]))
            assert [r.status_code for r in responses] == [200, 200], responses[0].text
            assert size_of(responses[1].content) == (150, 150)
