"""Signed ad-hoc sizes through real nginx and gunicorn instances: URLs printed by ``phizer sign`` render at their
size on the instance that holds the original's presets; forged ones are a 403 that nginx answers from its cache
afterwards; oversize ones a 400; without keys, ``/_/`` is nginx's own 404."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from service.launcher import Stack
from service.procs import free_port
from service.signature import derive

KEYS = ("current-key-for-tests-0123", "previous-key-for-tests-456")
CONFIG = {"presets": {"small": {"width": 320}}, "signing": {"max_width": 1000, "max_height": 800, "quality": 75}}
KEYS_ENV = {"PHIZER_SIGNING_KEYS": ",".join(KEYS)}  # the secrets from the environment, not the file
ORIGINALS = ["photo.jpg", "a/b c.jpg", "cover/x.jpg", *(f"spread-{i}.jpg" for i in range(6))]
JPEG = {"Accept": "image/jpeg"}
CHROME = {"Accept": "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"}


def write_config(folder: Path, **extra: object) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, **extra, "origins": [f"file://{folder / 'originals'}"]}))
    return path


@pytest.fixture(scope="module")
def folder(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("signed")
    photo = (corpus / "16_storm_720_30k.jpg").read_bytes()  # 720x480
    for key in ORIGINALS:
        (state / "originals" / key).parent.mkdir(parents=True, exist_ok=True)
        (state / "originals" / key).write_bytes(photo)
    return state


@pytest.fixture(scope="module")
def stack(folder: Path) -> Iterator[Stack]:
    env = {"PHIZER_CONFIG": str(write_config(folder)), **KEYS_ENV}
    with Stack(folder / "state", port=free_port(), instances=3, env=env) as started:
        yield started


def sign(stack: Stack, *args: str) -> list[str]:
    """``phizer sign ARGS`` as an operator runs it, with the stack's config and keys."""
    env = {"PHIZER_CONFIG": stack.env["PHIZER_CONFIG"], **KEYS_ENV, "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "sign", *args, "--base", stack.url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def upstream_lines(stack: Stack) -> int:
    """Access log lines of requests nginx passed to an instance (it logs just after the last byte: let it)."""
    time.sleep(0.2)
    return stack.access_log.read_text().count(" upstream=unix:")


def size(resp: requests.Response) -> tuple[int, int]:
    with Image.open(io.BytesIO(resp.content)) as image:
        return image.size


def test_phizer_sign_urls_render_at_their_size_and_are_cached(stack: Stack) -> None:
    cover, plain = sign(stack, "200x100", "photo.jpg", "a/b c.jpg", "--fit", "cover", "--gravity", "north")
    assert plain.startswith(stack.url + "/_/") and plain.endswith("/200x100/cover/north/a/b%20c.jpg")
    first = requests.get(cover, headers=JPEG, timeout=30)
    assert (first.status_code, first.headers["Content-Type"], size(first)) == (200, "image/jpeg", (200, 100))
    assert first.headers["X-Cache-Status"] == "MISS" and first.headers["Cache-Control"] == "public, max-age=31536000"
    assert requests.get(cover, headers=JPEG, timeout=30).headers["X-Cache-Status"] == "HIT"
    assert size(requests.get(plain, headers=JPEG, timeout=30)) == (200, 100)
    (free,) = sign(stack, "300x", "photo.jpg")
    assert size(requests.get(free, headers=JPEG, timeout=30)) == (300, 200)  # contain; the height follows
    (explicit,) = sign(stack, "300x300", "cover/x.jpg", "--fit", "contain")  # a key whose first segment is a fit
    assert size(requests.get(explicit, headers=JPEG, timeout=30)) == (300, 200)


def test_format_is_negotiated_like_an_auto_preset(stack: Stack) -> None:
    (url,) = sign(stack, "150x", "photo.jpg")
    webp_only = {"Accept": "image/webp,*/*"}
    avif = requests.get(url, headers=CHROME, timeout=30)
    webp = requests.get(url, headers=webp_only, timeout=30)
    jpeg = requests.get(url, headers={"Accept": "*/*"}, timeout=30)
    types = [resp.headers["Content-Type"] for resp in (avif, webp, jpeg)]
    assert types == ["image/avif", "image/webp", "image/jpeg"]
    assert avif.headers["Vary"] == webp.headers["Vary"] == jpeg.headers["Vary"] == "Accept"
    for accept in (CHROME, webp_only, {"Accept": "*/*"}):  # one entry per format
        assert requests.get(url, headers=accept, timeout=30).headers["X-Cache-Status"] == "HIT"


def test_adhoc_sizes_land_on_the_instance_of_the_originals_presets(stack: Stack) -> None:
    instances = set()
    for key in ORIGINALS:
        (url,) = sign(stack, "64x64", key, "--fit", "cover")
        adhoc = requests.get(url, headers=JPEG, timeout=30)
        preset = requests.get(f"{stack.url}/small/{urllib.parse.quote(key)}", headers=JPEG, timeout=30)
        assert adhoc.status_code == preset.status_code == 200, key
        assert adhoc.headers["X-Phizer-Instance"] == preset.headers["X-Phizer-Instance"], key
        instances.add(adhoc.headers["X-Phizer-Instance"])
    assert len(instances) > 1  # the keys spread, so "the same instance" meant something


def test_rotated_out_keys_still_verify(stack: Stack) -> None:
    rest = "120x80/cover/photo.jpg"
    old = requests.get(f"{stack.url}/_/{derive(KEYS[1], rest)}/{rest}", headers=JPEG, timeout=30)
    assert old.status_code == 200 and size(old) == (120, 80)


def test_forged_signatures_are_403_then_nginx_answers_them(stack: Stack) -> None:
    (url,) = sign(stack, "200x100", "photo.jpg")
    for forged in (url.replace("/200x100/", "/2000x100/"), url.replace("/photo.jpg", "/spread-1.jpg"),
                   f"{stack.url}/_/200x100/photo.jpg", f"{stack.url}/_/{'A' * 43}/200x100/photo.jpg"):  # fmt: skip
        first = requests.get(forged, headers=JPEG, timeout=30)
        assert (first.status_code, first.text) == (403, "bad or missing signature\n"), forged
        assert first.headers["X-Cache-Status"] == "MISS" and first.headers["Cache-Control"] == "public, max-age=60"
        assert "X-Phizer-Instance" in first.headers  # the instance said so
        before = upstream_lines(stack)
        again = requests.get(forged, headers=JPEG, timeout=30)
        assert (again.status_code, again.text, again.headers["X-Cache-Status"]) == (403, first.text, "HIT"), forged
        assert upstream_lines(stack) == before  # no instance asked


def test_signed_sizes_over_the_limits_are_400(stack: Stack) -> None:
    for rest, reason in (("1001x10/photo.jpg", "ad-hoc width must be from 1 to 1000, got 1001"),
                         ("10x801/photo.jpg", "ad-hoc height must be from 1 to 800, got 801")):  # fmt: skip
        resp = requests.get(f"{stack.url}/_/{derive(KEYS[0], rest)}/{rest}", headers=JPEG, timeout=30)
        assert (resp.status_code, resp.text) == (400, reason + "\n")


def test_presets_json_and_gallery_show_signing_never_the_keys(stack: Stack) -> None:
    presets = requests.get(stack.url + "/presets.json", timeout=10)
    adhoc = presets.json()["_"]
    assert adhoc["enabled"] is True and (adhoc["max_width"], adhoc["max_height"], adhoc["quality"]) == (1000, 800, 75)
    gallery = requests.get(stack.url + "/", timeout=30)
    assert "Signed ad-hoc sizes (/_/...): on: up to 1000\u00d7800" in gallery.text
    logs = "".join(path.read_text(errors="replace") for path in stack.logs.iterdir() if path.is_file())
    for key in KEYS:
        assert key not in presets.text and key not in gallery.text and key not in logs


def test_without_keys_signed_paths_are_nginx_404(folder: Path) -> None:
    rest = "200x100/photo.jpg"
    (folder / "off").mkdir(exist_ok=True)
    env = {"PHIZER_CONFIG": str(write_config(folder / "off"))}
    with Stack(folder / "off" / "state", port=free_port(), instances=1, env=env) as off:
        resp = requests.get(f"{off.url}/_/{derive(KEYS[0], rest)}/{rest}", headers=JPEG, timeout=30)
        assert (resp.status_code, resp.text) == (404, "not found: expected /<preset>/<key>\n")
        assert "_" not in requests.get(off.url + "/presets.json", timeout=10).json()
