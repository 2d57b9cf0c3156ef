"""Hostile input through the real stack (nginx, gunicorn, the pipeline): every bomb, trick and damaged file gets
an honest status quickly, the verdict is cached by nginx, and the instance goes on serving normal requests.

Also nginx's request hygiene: methods other than GET/HEAD, oversized headers, and the headers every response has.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

from service.launcher import Stack
from service.procs import free_port
from tests import support
from tests.hostile import (
    fat_icc_jpeg,
    growing_gif,
    idat_bomb_png,
    jpeg_declaring,
    many_chunks_png,
    many_comments_gif,
    many_frames_gif,
    many_scans_jpeg,
    many_segments_jpeg,
    png_header_only,
    png_iccp_bomb,
    saved,
    stray_bytes_jpeg,
    tall_png,
    text_png,
)

WEBP = {"Accept": "image/webp,*/*"}
# name -> (bytes, expected status, at most this many seconds through the whole stack, cold)
HOSTILE = {
    "growing.gif": (lambda: growing_gif(100, 12_000), 413),  # frame two grows the canvas to 144 MP
    "scans.jpg": (lambda: many_scans_jpeg(5_000), 413),  # thousands of scans: seconds of decoding each
    "tall.png": (tall_png, 413),  # 2x70000: over WebP's and JPEG's maximum dimension
    "ztxt.png": (lambda: text_png(16 * 1024 * 1024), 422),  # 16 MB of text in a 16 KB file
    "frames.gif": (lambda: many_frames_gif(200_000), 200),  # 200,000 frames: served as a still, quickly
    "mpo.jpg": (
        lambda: saved(
            Image.new("RGB", (400, 300), "red"),
            "MPO",
            save_all=True,
            append_images=[Image.new("RGB", (400, 300), "blue")],
        ),
        200,
    ),
    "huge.jpg": (lambda: jpeg_declaring(65_535, 65_535), 413),  # 4.3 GP declared
    "bomb.png": (lambda: png_header_only(20_000, 20_000), 413),
    "comments.gif": (lambda: many_comments_gif(3_000_000), 413),  # 9 MB of empty comments: minutes in Pillow
    "comment.gif": (lambda: many_comments_gif(1, 4 * 1024 * 1024), 413),  # one 4 MiB comment, joined quadratically
    "chunks.png": (lambda: many_chunks_png(1_000_000), 413),  # 12 MB of empty chunks: seconds in Pillow
    "segments.jpg": (lambda: many_segments_jpeg(2_000_000), 413),  # 8 MB of empty APP segments
    "fill.jpg": (lambda: stray_bytes_jpeg(10_000_000, 0xFF), 413),  # 10 MB of 0xFF fill bytes: 8.7 s in Pillow
    "iccp.png": (lambda: png_iccp_bomb(16 * 1024 * 1024), 422),  # an ICC profile inflating to 16 MiB
    "icc.jpg": (lambda: fat_icc_jpeg(8 * 1024 * 1024, 1), 200),  # an 8 MiB profile: ignored, never kept
    "idat.png": (lambda: idat_bomb_png(7000), 200),  # 49 MP of zeros in 143 KB: within max_pixels, decoded once
    "image.tiff": (lambda: saved(Image.new("RGB", (64, 64)), "TIFF"), 415),  # not a decoder phizer allows
    "image.bmp": (lambda: saved(Image.new("RGB", (64, 64)), "BMP"), 415),
    "image.svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>', 415),
    "anim.webp": (
        lambda: saved(
            Image.new("RGB", (16, 16)), "WEBP", save_all=True, append_images=[Image.new("RGB", (16, 16))] * 999
        ),
        200,
    ),  # 1,000 frames: over max_frames, a still
}
TIME_BOUND = 3.0  # seconds per request, cold: each of these costs milliseconds when refused early
DAMAGED_SOURCES = ["16_storm_720_30k.jpg", "12_kite_alpha.png", "13_onestandsout.webp", "14_sunset_anim.gif"]


def damaged(data: bytes) -> dict[str, bytes]:
    """The file cut short, and with bytes flipped at fixed places (header, early data, middle)."""
    variants = {"cut": data[: len(data) // 2]}
    for where in (20, 200, len(data) // 3, len(data) // 2):
        flipped = bytearray(data)
        flipped[where] ^= 0xFF
        variants[f"flip{where}"] = bytes(flipped)
    return variants


@pytest.fixture(scope="module")
def stack(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("hostile")
    folder = state / "originals"
    folder.mkdir()
    for name, (make, _) in HOSTILE.items():
        (folder / name).write_bytes(make())
    for source in DAMAGED_SOURCES:
        for label, data in damaged((corpus / source).read_bytes()).items():
            (folder / f"{label}-{source}").write_bytes(data)
    (folder / "normal.jpg").write_bytes((corpus / "16_storm_720_30k.jpg").read_bytes())
    (state / "secret.jpg").write_bytes((corpus / "16_storm_720_30k.jpg").read_bytes())  # outside the origin
    with Stack(state, port=free_port(), instances=2, env={"PHIZER_ORIGINS": f"file://{folder}"}) as started:
        yield started


def get(stack: Stack, path: str, headers: dict[str, str] | None = None) -> tuple[requests.Response, float]:
    started = time.perf_counter()
    response = requests.get(stack.url + path, headers=headers or WEBP, timeout=30)
    return response, time.perf_counter() - started


def assert_still_serving(stack: Stack) -> None:
    assert get(stack, "/healthz")[0].status_code == 200
    normal, _ = get(stack, "/small/normal.jpg", {"Accept": "image/jpeg"})
    assert normal.status_code == 200 and Image.open(io.BytesIO(normal.content)).width == 320


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_original_gets_an_honest_status_fast_and_cached(stack: Stack, name: str) -> None:
    expected = HOSTILE[name][1]
    first, seconds = get(stack, f"/small/{name}")
    print(f"{name}: {first.status_code} in {seconds * 1000:.0f} ms {first.text.strip() if expected >= 400 else ''}")
    assert first.status_code == expected, first.text
    assert seconds < TIME_BOUND
    if expected >= 400:
        assert first.text.count("\n") == 1 and "Error" not in first.text and "/" not in first.text
    else:
        out = Image.open(io.BytesIO(first.content))
        assert out.width <= 320 and getattr(out, "n_frames", 1) == 1
    # Decoded once per period. nginx may answer the first before it has stored it (its cache entry is made valid
    # after the last byte is sent: seen once on a loaded machine), so a MISS right after it may be that race.
    for _ in range(5):
        second, _ = get(stack, f"/small/{name}")
        if second.headers["X-Cache-Status"] == "HIT":
            break
        time.sleep(0.1)
    assert (second.status_code, second.headers["X-Cache-Status"]) == (expected, "HIT")
    assert_still_serving(stack)


@pytest.mark.parametrize("source", DAMAGED_SOURCES)
def test_damaged_files_are_a_4xx_or_a_whole_image(stack: Stack, source: str) -> None:
    for label in ("cut", "flip20", "flip200"):
        response, seconds = get(stack, f"/small/{label}-{source}")
        assert seconds < TIME_BOUND, label
        assert response.status_code in (200, 413, 415, 422), (label, response.status_code, response.text)
        if response.status_code == 200:
            Image.open(io.BytesIO(response.content)).load()  # complete, never a truncated image
        else:
            assert response.text.count("\n") == 1 and "Error" not in response.text
    assert_still_serving(stack)


def test_only_get_and_head_reach_an_instance(stack: Stack) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        response = requests.request(method, stack.url + "/small/normal.jpg", data=b"x" * 5000, timeout=10)
        assert (response.status_code, response.text) == (405, "method not allowed\n"), method
        assert response.headers["Allow"] == "GET, HEAD" and "X-Phizer-Instance" not in response.headers
    assert requests.head(stack.url + "/small/normal.jpg", timeout=10).status_code == 200


def test_oversized_headers_get_the_one_line_400(stack: Stack) -> None:
    response = requests.get(stack.url + "/small/normal.jpg", headers={"X-Big": "a" * 9000}, timeout=10)
    assert (response.status_code, response.text) == (400, "bad request: malformed URL or headers\n")


def test_every_response_says_nosniff_once(stack: Stack) -> None:
    for path in ("/small/normal.jpg", "/small/normal.jpg", "/small/missing.jpg", "/nope", "/healthz"):
        response = requests.get(stack.url + path, timeout=10, stream=True)
        assert response.raw.headers.getlist("X-Content-Type-Options") == ["nosniff"], path


def raw_exchange(stack: Stack, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` as is to the stack's nginx on a new connection; the status and body of the answer."""
    head, body = raw_answer(stack.url, request)
    return int(head.split(b" ")[1]), body


def raw_answer(url: str, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` as is to ``url``'s server on a new connection; the head and body of the answer (to its
    Content-Length)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            lengths = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
            if lengths and len(body) >= int(lengths[0].split(b":")[1]):
                break
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize(
    ("request_bytes", "status", "body"),
    [
        (
            b"GET /small/normal.jpg HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"a" * 2000,
            413,
            b"request body not accepted\n",
        ),
        (
            b"GET /small/normal.jpg HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
            b"bad request: unsupported transfer coding\n",
        ),
        (b"GET /small/normal.jpg HTTP/9.9\r\nHost: x\r\n\r\n", 505, b"HTTP version not supported\n"),
        (b"GARBAGE\r\n\r\n", 400, b"bad request: malformed URL or headers\n"),
        (b"GET /small/normal.jpg%00.png HTTP/1.1\r\nHost: x\r\n\r\n", 400, b"bad request: malformed URL or headers\n"),
        (
            b"GET /small/normal.jpg HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            b"bad request: malformed URL or headers\n",
        ),
        (b"GET /small/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, b"request line too long\n"),
    ],
    ids=["body-on-get", "transfer-coding", "http-version", "request-line", "nul", "cl-and-te", "long-url"],
)
def test_nginx_refuses_malformed_requests_in_one_line(
    stack: Stack, request_bytes: bytes, status: int, body: bytes
) -> None:
    assert raw_exchange(stack, request_bytes) == (status, body)


@pytest.mark.parametrize(
    "path",
    [
        "/small/../secret.jpg",
        "/small/%2e%2e/secret.jpg",
        "/small/..%2fsecret.jpg",
        "/small/%252e%252e/secret.jpg",
        "/small/..%5csecret.jpg",
        "/small/%c0%ae%c0%ae/secret.jpg",
        "/small//secret.jpg",
    ],
)
def test_no_path_reaches_outside_the_file_origin(stack: Stack, path: str) -> None:
    status, body = raw_exchange(stack, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status in (400, 404) and body.count(b"\n") == 1, (status, body)


def test_an_instance_refuses_malformed_requests_in_one_line_too(tmp_path: Path) -> None:
    """gunicorn's own refusals (only reachable by connecting to an instance directly) are nginx's one plain line."""
    with support.instance(tmp_path, [f"file://{tmp_path}"]) as (_, url):
        for request, status, body in [
            (b"GARBAGE\r\n\r\n", 400, b"bad request: malformed URL or headers\n"),
            (b"GET /small/x.jpg HTTP/9.9\r\nHost: x\r\n\r\n", 400, b"bad request: malformed URL or headers\n"),
            (
                b"GET /small/x.jpg HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
                431,
                b"request header fields too large\n",
            ),
        ]:
            head, got = raw_answer(url, request)
            assert (int(head.split(b" ")[1]), got) == (status, body), head
            assert b"X-Content-Type-Options: nosniff" in head
