"""Rendition identity end to end: a config change that alters output is never served or revalidated from old
bytes, and a revalidation that memcached can decide costs no origin fetch (real nginx, gunicorn, memcached)."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from service.launcher import Stack
from service.procs import free_port
from tests.support import CountingProxy

PRESETS = {"small": {"width": 320, "quality": 82}, "thumb": {"width": 150, "height": 150, "fit": "cover"}}
JPEG = {"Accept": "image/jpeg"}


@pytest.fixture(scope="module")
def origin(corpus: Path) -> Iterator[CountingProxy]:
    """An HTTP origin (the upload server kind) that counts the GETs reaching it."""
    photo = (corpus / "16_storm_720_30k.jpg").read_bytes()
    proxy = CountingProxy(files={"/photo.jpg": photo, "/other.jpg": photo})
    yield proxy
    proxy.close()


def write_config(path: Path, origin: CountingProxy, small_quality: int) -> None:
    presets = {**PRESETS, "small": {**PRESETS["small"], "quality": small_quality}}
    path.write_text(yaml.safe_dump({"origins": [origin.url], "allow_private_origins": True, "presets": presets}))


def test_config_change_reaches_nginx_cache_and_etags(origin: CountingProxy, tmp_path: Path) -> None:
    """Change one preset's quality and restart: its renditions change through nginx (a MISS, new bytes, no 304
    for the old ETag), while the untouched preset's cached renditions are still served."""
    config = tmp_path / "config.yaml"
    write_config(config, origin, 82)
    with Stack(tmp_path / "state", port=free_port(), instances=1, env={"PHIZER_CONFIG": str(config)}) as stack:
        before = requests.get(stack.url + "/small/photo.jpg", headers=JPEG, timeout=30)
        thumb = requests.get(stack.url + "/thumb/photo.jpg", headers=JPEG, timeout=30)
        again = requests.get(stack.url + "/small/photo.jpg", headers=JPEG, timeout=30)
        assert again.headers["X-Cache-Status"] == "HIT" and again.content == before.content
    write_config(config, origin, 40)
    with Stack(tmp_path / "state", port=free_port(), instances=1, env={"PHIZER_CONFIG": str(config)}) as stack:
        after = requests.get(stack.url + "/small/photo.jpg", headers=JPEG, timeout=30)
        assert after.status_code == 200 and after.headers["X-Cache-Status"] == "MISS"
        assert len(after.content) < len(before.content) * 0.8  # quality 40, not the cached quality 82
        assert after.headers["ETag"] != before.headers["ETag"]
        stale = requests.get(
            stack.url + "/small/photo.jpg", headers={**JPEG, "If-None-Match": before.headers["ETag"]}, timeout=30
        )
        assert stale.status_code == 200 and stale.content == after.content
        kept = requests.get(stack.url + "/thumb/photo.jpg", headers=JPEG, timeout=30)
        assert kept.headers["X-Cache-Status"] == "HIT" and kept.content == thumb.content


def memcached_stats(address: str) -> dict[str, int]:
    """memcached's counters (``cmd_get`` counts each key of a multi-key get)."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += conn.recv(65536)
    stats = (line.split()[1:3] for line in data.decode().splitlines() if line.startswith("STAT "))
    return {name: int(value) for name, value in stats if value.isdigit()}


def instance_get(sock: Path, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    """GET straight from one instance over its unix socket (past nginx's cache, as nginx revalidates)."""
    conn = http.client.HTTPConnection("localhost", timeout=30)
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(str(sock))
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def test_revalidation_costs_no_origin_fetch(origin: CountingProxy, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    write_config(config, origin, 82)
    with Stack(tmp_path / "state", port=free_port(), instances=1, env={"PHIZER_CONFIG": str(config)}) as stack:
        first = requests.get(stack.url + "/small/other.jpg", headers=JPEG, timeout=30)
        assert first.status_code == 200 and origin.gets["/other.jpg"] == 1
        etag, memcached = first.headers["ETag"], stack.memcached_servers[0]
        deadline = time.monotonic() + 10
        while memcached_stats(memcached)["curr_items"] < 2:  # chunk and head, stored in the background
            assert time.monotonic() < deadline, "the original never reached memcached"
            time.sleep(0.05)
        gets = memcached_stats(memcached)["cmd_get"]
        revalidated = instance_get(stack.socket_path(0), "/small/other.jpg", {**JPEG, "If-None-Match": etag})
        assert revalidated.status == 304 and revalidated.getheader("ETag") == etag
        assert memcached_stats(memcached)["cmd_get"] - gets == 1  # the head item only, not the original's chunks
        assert origin.gets["/other.jpg"] == 1
        changed = instance_get(stack.socket_path(0), "/small/other.jpg", {**JPEG, "If-None-Match": 'W/"other"'})
        assert changed.status == 200
