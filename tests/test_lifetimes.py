"""Per-preset lifetimes and short-lived fallback originals, through real nginx, gunicorn, memcached and moto's S3.

The app tells nginx how long to keep each rendition (X-Accel-Expires: the preset's ``cache_valid``, or
``fallback_cache_valid`` when a fallback origin served the original) and browsers with Cache-Control; nginx must
honour the first, never forward it, and let one preset's entries expire while another's stay HITs.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from service.launcher import Stack
from service.procs import free_port
from tests.support import AWS_ENV, CountingProxy, s3_client

BUCKET = "lifetimes"
STORM = "16_storm_720_30k.jpg"  # 720x480
JPEG = {"Accept": "image/jpeg"}
LONG = "public, max-age=31536000"
CONFIG = {
    "presets": {
        "long": {"width": 100},
        "short": {"width": 120, "cache_valid": 1},  # nginx keeps it one second
        "branded": {"width": 140, "cache_control": "public, max-age=600", "cache_valid": "10m"},
    },
    "fallback_cache_control": "public, max-age=5",
    "fallback_cache_valid": "2s",
    "allow_private_origins": True,
}


def jpeg(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 60, 30)).save(out, "JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def fallback() -> Iterator[CountingProxy]:
    """The upload server: it has fresh uploads before they reach S3 (a 4:1 picture here, unlike S3's 3:2)."""
    proxy = CountingProxy(files={"/fresh.jpg": jpeg((400, 100))})
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def stack(
    corpus: Path, s3_endpoint: str, fallback: CountingProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    s3_client(s3_endpoint).put_object(Bucket=BUCKET, Key="photo.jpg", Body=(corpus / STORM).read_bytes())
    state = tmp_path_factory.mktemp("lifetimes")
    config = state / "config.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "origins": [f"s3://{BUCKET}", fallback.url]}))
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": s3_endpoint, "PHIZER_CONFIG": str(config)}
    with Stack(state, port=free_port(), instances=2, env=env) as started:
        yield started


def get(stack: Stack, path: str) -> requests.Response:
    return requests.get(stack.url + path, headers=JPEG, timeout=30)


def test_each_preset_sends_its_own_cache_control(stack: Stack) -> None:
    branded, long = get(stack, "/branded/photo.jpg"), get(stack, "/long/photo.jpg")
    assert branded.status_code == long.status_code == 200
    assert branded.headers["Cache-Control"] == "public, max-age=600"
    assert long.headers["Cache-Control"] == LONG
    again = get(stack, "/branded/photo.jpg")
    assert again.headers["X-Cache-Status"] == "HIT" and again.headers["Cache-Control"] == "public, max-age=600"
    for resp in (branded, long, again):
        assert "X-Accel-Expires" not in resp.headers  # nginx's business only
    presets = requests.get(stack.url + "/presets.json", timeout=10).json()
    assert presets["branded"] == {**presets["branded"], "cache_control": "public, max-age=600", "cache_valid": 600}
    assert presets["long"] == {**presets["long"], "cache_control": LONG, "cache_valid": 7 * 86400}
    assert presets["short"]["cache_valid"] == 1


def test_a_short_lived_preset_expires_in_nginx_while_another_stays_a_hit(stack: Stack) -> None:
    for preset in ("short", "long"):
        get(stack, f"/{preset}/photo.jpg")
        assert get(stack, f"/{preset}/photo.jpg").headers["X-Cache-Status"] == "HIT"
    time.sleep(2.5)  # well past "short"'s one second (nginx counts whole seconds)
    short, long = get(stack, "/short/photo.jpg"), get(stack, "/long/photo.jpg")
    assert short.status_code == 200 and short.headers["X-Cache-Status"] in ("EXPIRED", "REVALIDATED", "MISS")
    assert long.headers["X-Cache-Status"] == "HIT"
    with Image.open(io.BytesIO(short.content)) as image:
        assert image.width == 120


def test_fallback_original_lives_short_until_the_first_origin_has_it(
    stack: Stack, s3_endpoint: str, fallback: CountingProxy, corpus: Path
) -> None:
    first = get(stack, "/long/fresh.jpg")
    assert first.status_code == 200 and fallback.gets["/fresh.jpg"] == 1
    assert first.headers["Cache-Control"] == "public, max-age=5"  # browsers and CDNs: briefly
    with Image.open(io.BytesIO(first.content)) as image:
        assert image.size == (100, 25)  # the upload server's 4:1 picture
    assert get(stack, "/long/fresh.jpg").headers["X-Cache-Status"] == "HIT"  # nginx keeps it, for 2 s
    # The upload reaches S3 (as another picture, so where a rendition came from shows).
    s3_client(s3_endpoint).put_object(Bucket=BUCKET, Key="fresh.jpg", Body=(corpus / STORM).read_bytes())
    deadline = time.monotonic() + 20
    while True:  # nginx's entry (2 s) and memcached's copy of the fallback original (2 s) run out
        time.sleep(1)
        resp = get(stack, "/long/fresh.jpg")
        if resp.headers["Cache-Control"] == LONG:
            break
        assert resp.headers["Cache-Control"] == "public, max-age=5"
        assert time.monotonic() < deadline, "the rendition never came from the first origin"
    assert resp.headers["X-Cache-Status"] in ("EXPIRED", "MISS")
    with Image.open(io.BytesIO(resp.content)) as image:
        assert image.size == (100, 67)  # S3's 3:2 storm
    time.sleep(2.5)
    assert get(stack, "/long/fresh.jpg").headers["X-Cache-Status"] == "HIT"  # now kept as long as the preset says
